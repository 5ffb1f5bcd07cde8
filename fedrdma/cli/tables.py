"""Every table the commands print, from the records they read or write.

In one place so that all of them follow the same rules: every column folds an overlong
cell onto the next line instead of cutting it short, so a figure is never printed as
"977m…"; and with `fedrdma.cli.console` a table written to a pipe gets the room it needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.table import Table

from fedrdma.bench.compare import groups, held
from fedrdma.core.modes import Mode
from fedrdma.core.sizes import chunk_label, size_label
from fedrdma.lab.units import format_duration, format_rate
from fedrdma.sim.roce import P_FAIL_MAX
from fedrdma.sim.tcp_buffers import BUFFER_BDP_FACTOR

if TYPE_CHECKING:
    from fedrdma.bench.compare import Comparison
    from fedrdma.bench.probe import ProbeResult
    from fedrdma.bench.records import (
        FlowerResult,
        HeapResult,
        ModeSummary,
        ScaleResult,
        SoakResult,
        TransferResult,
        WireResult,
    )
    from fedrdma.fl.records import AggregatorRound, DemoResult
    from fedrdma.lab.config import LabConfig
    from fedrdma.lab.lab import PathStatus
    from fedrdma.sim.tune import Recommendation

LEFT = "left"
RIGHT = "right"


def _table(title: str, columns: Sequence[str | tuple[str, str]]) -> Table:
    """A table whose columns fold rather than truncate; a column is a header or (header, justify)."""
    table = Table(title=title)
    for column in columns:
        header, justify = (column, RIGHT) if isinstance(column, str) else column
        table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    return table


# --- bench --------------------------------------------------------------------------------


def _ratio(value: float | None, form: str) -> str:
    return "" if value is None else form.format(value)


def transfer_table(result: TransferResult) -> Table:
    on_line = result.link_rate_gbit is not None
    coded = result.wire.compressed
    moved = f", moved as {result.wire} (GB/s of the fp32 state; the codec's time apart)" if coded else ""
    table = _table(f"{size_label(result.size_bytes)} over {result.path}, medians of {result.repeat}{moved}",
                   [("mode", LEFT), "seconds (min)", "GB/s", *(["of line"] if on_line else []), "vs reference",
                    "vs raw, same pair", "vs grpc", "CPU s", "recv +RSS MiB", "encrypted", "identical",
                    *(["encode s/GB", "decode s/GB"] if coded else [])])
    per_gb = result.size_bytes / 1e9

    def line(row: ModeSummary) -> list[str]:
        return [_ratio(row.vs_line, "{:.3f}")] if on_line else []

    def codec(row: ModeSummary | None) -> list[str]:
        if not coded:
            return []
        if row is None or row.encode_seconds is None or row.decode_seconds is None:
            return ["", ""]
        return [f"{row.encode_seconds / per_gb:.3f}", f"{row.decode_seconds / per_gb:.3f}"]

    for label, row in [("raw WRITE", result.reference), ("raw READ", result.reference_read)]:
        if row is None:
            continue
        table.add_row(label, f"{row.seconds:.3f} ({row.seconds_min:.3f})", f"{row.goodput_gb_s:.2f}",
                      *line(row), "1.00", "", "", f"{row.cpu_seconds:.2f}", f"{row.receiver_extra_rss_mb:.0f}",
                      "", "", *codec(None), style="dim")
    for mode, row in result.modes.items():
        wire = row.goodput_wire_gb_s
        table.add_row(
            mode if wire is None else f"{mode} (wire only {wire:.2f} GB/s)",
            f"{row.seconds:.3f} ({row.seconds_min:.3f})",
            f"{row.goodput_gb_s:.3f}",
            *line(row),
            _ratio(row.vs_reference, "{:.2f}"),
            _ratio(row.vs_raw_same_pair, "{:.2f}"),
            _ratio(row.vs_grpc, "{:.1f}x"),
            f"{row.cpu_seconds:.2f}",
            f"{row.receiver_extra_rss_mb:.0f}",
            {True: "yes", False: "no", None: ""}[row.tls],
            "yes" if row.identical else "[red]NO",
            *codec(row),
        )
    return table


def compare_table(comparison: Comparison, before: str, after: str) -> Table:
    table = _table(f"{after} against {before}", [(c, LEFT) for c in (
        "table", "figures", "count", "within noise", "direction holds", "largest difference")])
    for name, kind, pairs in groups(comparison):
        worst = max(pairs, key=lambda p: p.relative)
        table.add_row(name, kind, str(len(pairs)), str(sum(p.agrees for p in pairs)), held(kind, pairs),
                      f"{100 * worst.relative:.0f} % ({worst.after.name}, {worst.after.unit})")
    return table


def heap_table(result: HeapResult, probe_bytes: int) -> Table:
    table = _table(f"{result.model}: {result.local_steps} local steps of batch {result.batch_size} x "
                   f"{result.seq_len} tokens per round, {result.rounds - 1} counted rounds x {result.repeat} processes",
                   [(c, LEFT) for c in ("heap", "s per round, median (min)", "vs default",
                                        f"{size_label(probe_bytes)} mmapped while training")])
    for variant, row in result.variants.items():
        table.add_row(variant, f"{row.seconds:.2f} ({row.seconds_min:.2f})", f"{row.vs_default:.2f}x",
                      str(row.chunk_mmapped_while_training))
    return table


def scale_table(result: ScaleResult) -> Table:
    table = _table(f"{result.model} ({result.state_mb:.1f} MiB state) over {result.mode}: one aggregator, "
                   f"silos without local training in {result.silo_processes} processes",
                   ["silos", "all accepted", "round s (last)", "aggregation s (last)", "aggregation % of round",
                    "aggregator CPU s", "aggregator peak RSS MiB", "above its 2 globals MiB"])
    for run in result.runs:
        last = run.rounds[-1]
        table.add_row(str(run.silos), "yes" if run.all_accepted else "NO", f"{last.seconds:.2f}",
                      f"{last.aggregation_seconds:.3f}", f"{100 * last.aggregation_seconds / last.seconds:.1f}",
                      f"{run.aggregator_cpu_seconds:.1f}", f"{run.aggregator_peak_rss_mb:.0f}",
                      f"{run.aggregator_rss_above_globals_mb:.0f}")
    return table


def flower_table(result: FlowerResult) -> Table:
    table = _table(f"{result.app.rsplit('/', 1)[-1]} ({result.model}, {result.state_mb:.1f} MiB state), 2 sites on "
                   f"{result.path}: the same Flower app, its arrays moved by Flower and by fedrdma",
                   ["round", "flower s", "flower comm s", "fedrdma s", "fedrdma comm s", "of which nodes s",
                    "comm ratio"])
    for a, b in zip(result.flower.rounds, result.fedrdma.rounds):
        ratio = b.comm_seconds / a.comm_seconds if a.comm_seconds > 0 else float("nan")
        table.add_row(str(a.round), f"{a.seconds:.1f}", f"{a.comm_seconds:.1f}", f"{b.seconds:.1f}",
                      f"{b.comm_seconds:.1f}", "" if b.node_seconds is None else f"{b.node_seconds:.2f}",
                      f"{ratio:.3f}")
    table.add_section()
    for role in sorted({*result.flower.peak_rss_mb, *result.fedrdma.peak_rss_mb}):
        table.add_row(f"peak RSS {role}", f"{result.flower.peak_rss_mb.get(role, 0):.0f} MiB", "",
                      f"{result.fedrdma.peak_rss_mb.get(role, 0):.0f} MiB", "", "", "")
    above = {way: result_way.above_baseline_mb() for way, result_way in (("flower", result.flower),
                                                                         ("fedrdma", result.fedrdma))}
    if any(above.values()):
        table.add_section()
        for role in sorted({*above["flower"], *above["fedrdma"]}):
            cells = [f"{above[way][role]:.0f} MiB" if role in above[way] else "" for way in above]
            table.add_row(f"above baseline {role}", cells[0], "", cells[1], "", "", "")
    return table


def soak_table(result: SoakResult) -> Table:
    where = "in the WAN lab" if result.lab else "on loopback"
    table = _table(f"soak: {result.rounds} rounds of {result.model}, {result.silos} silos {where}, seed "
                   f"{result.seed}, {result.seconds:.0f} s", [("fault", LEFT), "injected", "survived"])
    for kind, count in result.faults.items():
        table.add_row(kind, str(count), str(result.survived.get(kind, 0)))
    table.add_section()
    checks = {
        "rounds retried": str(result.rounds_retried),
        "mismatched rounds": ", ".join(map(str, result.mismatched_rounds)) or "none",
        "stale updates": ", ".join(result.stale_updates) or "none",
        "double counted": ", ".join(map(str, result.double_counted)) or "none",
        "leaked processes / fds / .tmp / namespaces": f"{len(result.leaks.processes)} / {result.leaks.fds} / "
                                                      f"{len(result.leaks.tmp_files)} / {len(result.leaks.namespaces)}",
    }
    for name, value in checks.items():
        table.add_row(name, value, "")
    return table


# --- the federation -----------------------------------------------------------------------


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def demo_table(result: DemoResult) -> Table:
    modes = list(result.transports)
    against_grpc = [m for m in modes if m != Mode.GRPC] if Mode.GRPC in modes and len(modes) > 1 else []
    columns: list[str] = ["round"]
    for m in modes:
        columns += [f"{m} loss", f"{m} round s", f"{m} comm %"]
    columns += [f"comm speedup {m} vs grpc" for m in against_grpc]
    table = _table("federated rounds, side by side", columns)
    rows = {m: {r.round: r for r in result.transports[m].rounds} for m in modes}
    for rnd in sorted(set().union(*(r.keys() for r in rows.values()))):
        cells = [str(rnd)]
        for m in modes:
            r = rows[m].get(rnd)
            cells += ["", "", ""] if r is None else [_loss(r.eval_loss), f"{r.round_seconds:.1f}",
                                                     f"{100 * r.comm_share:.0f}"]
        cells += [_speedup(rows[Mode.GRPC].get(rnd), rows[m].get(rnd)) for m in against_grpc]
        table.add_row(*cells)
    return table


def _speedup(grpc: AggregatorRound | None, mine: AggregatorRound | None) -> str:
    """How many times less a round spent communicating than grpc's; empty where either did not."""
    if grpc is None or mine is None or grpc.comm_seconds <= 0 or mine.comm_seconds <= 0:
        return ""
    return f"{grpc.comm_seconds / mine.comm_seconds:.1f}x"


def round_table(mode: str) -> Table:
    """The aggregator's live table; `add_round_row` adds each round as it closes."""
    return _table(f"rounds ({mode})", ["round", "held-out loss", "broadcast s", "train s", "upload s", "aggregate s",
                                       "comm %", ("accepted", LEFT), ("rejected", LEFT)])


def add_round_row(table: Table, r: AggregatorRound) -> None:
    table.add_row(
        str(r.round),
        _loss(r.eval_loss),
        f"{r.silo_mean('broadcast_seconds'):.2f}",
        f"{r.silo_mean('train_seconds'):.2f}",
        f"{r.silo_mean('upload_seconds'):.2f}",
        f"{r.aggregation_seconds:.2f}",
        f"{100 * r.comm_share:.0f}",
        ", ".join(r.accepted),
        "; ".join(f"{k}: {v}" for k, v in r.rejected.items()),
    )


# --- the lab ------------------------------------------------------------------------------


def status_table(config: LabConfig, rows: Sequence[PathStatus], backend: str, ceiling_bps: float | None,
                 congestion: str) -> Table:
    """Each path as configured and as measured (`-` where a figure was not measured)."""
    ceiling = f", element ceiling {format_rate(ceiling_bps)}" if ceiling_bps else ""
    table = _table(f"lab {config.name}: MTU {config.mtu}, delay by {backend}{ceiling}, "
                   f"TCP congestion control {congestion}",
                   [("path", LEFT), ("silo -> aggregator", LEFT), "rate", "rate up (TCP)", "rate down (TCP)", "RTT",
                    "RTT (ping)", "loss", "loss up", "loss down"])

    def rate(r: Any) -> str:
        return "-" if r is None else f"{format_rate(r.bits_per_second)} ({r.retransmits} retr)"

    def loss(r: Any) -> str:
        return "-" if r is None else f"{r.loss:.4f} ({r.packets_dropped}/{r.packets_seen})"

    for row in rows:
        p = row.path
        table.add_row(
            p.silo_ns, f"{p.silo_addr} -> {p.agg_addr}", format_rate(p.shape.rate_bps),
            rate(row.upload), rate(row.download), format_duration(p.shape.rtt_s),
            "-" if row.rtt_s is None else format_duration(row.rtt_s), f"{p.shape.loss:g}",
            loss(row.upload), loss(row.download),
        )
    return table


# --- tune and sim -------------------------------------------------------------------------


def probe_table(result: ProbeResult, path: str) -> Table:
    table = _table(f"tune --probe: {path}, trials of {size_label(result.nbytes)}, "
                   f"median of {len(result.chosen.seconds)} after a warm-up",
                   ["chunk", "window", "goodput", "of line", ""])
    for cell in result.cells:
        row = cell.row(result.nbytes, result.line_bps)
        chosen = cell is result.chosen
        table.add_row(size_label(cell.chunk_size), str(cell.window), format_rate(row.goodput_gbit_s * 1e9),
                      _ratio(row.vs_line, "{:.3f}") or "-", "chosen" if chosen else "",
                      style="bold green" if chosen else None)
    return table


def recommendation_table(rec: Recommendation) -> Table:
    table = _table(f"tune: {format_rate(rec.rate_bps)}, RTT {format_duration(rec.rtt_s)}, loss {rec.loss:g}, "
                   f"state {size_label(rec.state_bytes)} (RoCE model)", [("setting", LEFT), ("value", LEFT)])
    table.add_row("chunk_size", f"{rec.chunk_size} ({size_label(rec.chunk_size)})")
    table.add_row("window", str(rec.window))
    table.add_row("expected goodput", f"{format_rate(rec.expected_goodput_bps)} ({rec.goodput_fraction:.2f} of line)")
    table.add_row("expected time", f"{rec.expected_time_s:.3f} s")
    table.add_row("P(transfer fails)", f"{rec.p_fail:.1e}")
    for i, reason in enumerate(rec.reasons):
        table.add_row("why" if i == 0 else "", reason, style="dim")
    return table


def tcp_table(tcp: dict[str, Any], rate_bps: float, rtt_s: float) -> Table:
    table = _table(f"TCP buffers vs {BUFFER_BDP_FACTOR:g} x BDP ({size_label(tcp['bdp_bytes'])} at "
                   f"{format_rate(rate_bps)}, {format_duration(rtt_s)})",
                   [("sysctl", LEFT), "now", "needs", ("fix", LEFT)])
    if not tcp["checked"]:
        table.add_row("(skipped)", "", "", tcp["error"])
    elif not tcp["findings"]:
        table.add_row("all four", "ok", size_label(tcp["required_bytes"]), "nothing to raise", style="green")
    for f in tcp["findings"]:
        table.add_row(f["sysctl"], size_label(f["current"]), size_label(f["required"]), f["command"], style="yellow")
    return table


def sim_table(results: Sequence[tuple[tuple[float, float, float], Recommendation]], state: int) -> Table:
    grid = [row.chunk_bytes for row in results[0][1].rows]
    table = _table(f"RoCE model: goodput / line rate by chunk size, {size_label(state)} state, window covering "
                   f"the BDP per chunk; * best, x P(fail) > {P_FAIL_MAX:g}",
                   ["rate", "RTT", "loss", *(chunk_label(chunk) for chunk in grid),
                    "best", "window", "P(fail) best", "P(fail) whole"])
    for (rate, rtt, loss), rec in results:
        cells = [format_rate(rate), format_duration(rtt), f"{loss:g}"]
        by_chunk = {row.chunk_bytes: row for row in rec.rows}
        best_key = None if rec.chunk_size == rec.state_bytes else rec.chunk_size
        for chunk in grid:
            row = by_chunk.get(chunk)
            if row is None:
                cells.append("")
                continue
            text = f"{row.result.goodput_bps / rate:.2f}"
            if not row.usable:
                text = f"[dim]{text}x[/]"
            elif chunk == best_key:
                text = f"[bold green]{text}*[/]"
            cells.append(text)
        whole = by_chunk.get(None)
        cells += [chunk_label(best_key), str(rec.window), f"{rec.p_fail:.0e}",
                  f"{whole.result.p_fail:.0e}" if whole else ""]
        table.add_row(*cells)
    return table


def wire_table(result: WireResult, ratios: dict[str, dict[str, float | None]]) -> Table:
    """Per wire format: what it moved and what it scored, and each against fp32 in the same run."""
    rounds = result.rounds_asked
    table = _table(f"{result.model}, {rounds} rounds, {len(result.silos)} silos, {result.mode} on {result.path}: "
                   "the same federation per wire format",
                   [("wire", LEFT), "final loss", "loss vs fp32", "uploads", "x fp32", "broadcasts after round 1",
                    "x fp32", "comm s / round", "x fp32", "x fp32 after round 1", "codec s / round",
                    "comm + codec x fp32"])
    for wire, fmt in result.formats.items():
        r = ratios.get(wire, {})
        final = fmt.rounds[-1].eval_loss if fmt.rounds else None
        table.add_row(wire, "" if final is None else f"{final:.4f}", _ratio(r.get("loss_change"), "{:+.2%}"),
                      size_label(fmt.total("bytes_up")), _ratio(r.get("bytes_up"), "{:.3f}"),
                      size_label(fmt.total("bytes_down", 1)), _ratio(r.get("bytes_down_after_first"), "{:.3f}"),
                      f"{fmt.per_round('comm_seconds'):.2f}", _ratio(r.get("comm_seconds"), "{:.3f}"),
                      _ratio(r.get("comm_seconds_after_first"), "{:.3f}"),
                      f"{fmt.per_round('codec_seconds'):.2f}", _ratio(r.get("comm_and_codec_seconds"), "{:.3f}"))
    return table
