"""`fedrdma tune` (model-based chunk size and window) and `fedrdma sim` (the Link-Enable table).

Both print rich tables; `tune --json` writes what the runtime's config accepts
(`config.chunk_size`, `config.window`) plus the model's expectations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from fedrdma.core.sizes import chunk_label, size_label
from fedrdma.lab.units import format_duration, format_rate, parse_duration, parse_loss, parse_rate
from fedrdma.sim import roce
from fedrdma.sim.tcp_buffers import BUFFER_BDP_FACTOR, bdp_bytes, check_buffers, read_tcp_limits
from fedrdma.sim.tune import DEFAULT_STATE_BYTES, Recommendation, recommend

app = typer.Typer(help="Models of RoCE go-back-N and TCP buffers: chunk size and window per path.",
                  no_args_is_help=True)

PIPE_WIDTH = 160
"""Console width when output is not a terminal (rich's 80 would wrap the chunk-size columns)."""

SIM_RATES = "100mbit,1gbit,10gbit"
"""The paper's Table 2 spread of link rates (plus 10 Gbit/s, where RoCE is usually deployed)."""

SIM_RTTS = "1ms,20ms,80ms"
"""Metro, continental and intercontinental round trips."""

SIM_LOSSES = "0,0.001,0.01"
"""Clean, mildly and badly lossy WAN paths."""



def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=PIPE_WIDTH)


def _rate(text: str, option: str = "--rate") -> float:
    try:
        bps = parse_rate(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
    if bps is None:
        raise typer.BadParameter(f"{text!r} is not a finite rate; the model needs the line rate (e.g. 1gbit)",
                                 param_hint=option)
    return float(bps)


def _duration(text: str, option: str = "--rtt") -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _loss(text: str, option: str = "--loss") -> float:
    try:
        return parse_loss(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _state_bytes(size_mb: float | None) -> int:
    if size_mb is None:
        return DEFAULT_STATE_BYTES
    if size_mb <= 0:
        raise typer.BadParameter(f"--size-mb {size_mb} must be positive (MiB of state to move)")
    return int(size_mb * 2**20) // 8 * 8 or 8


@app.command("tune")
def tune(
    rate: str = typer.Option(None, help="Line rate of the path: 1gbit, 500mbit."),
    rtt: str = typer.Option(None, help="Round-trip time of the path: 20ms."),
    loss: str = typer.Option("0", help="Drop probability per packet: 0.01 or 1%."),
    size_mb: float = typer.Option(None, help="State size in MiB; default: GPT-2 small in fp32 (~475 MiB)."),
    probe: bool = typer.Option(False, "--probe", help="Measure on a live lab path with short trial transfers "
                                                      "instead of asking the model (needs root)."),
    lab: str = typer.Option(None, help="With --probe: probe a running lab (`fedrdma lab up`) instead of "
                                       "building a path from --rate/--rtt/--loss."),
    silo: int = typer.Option(1, min=1, help="With --probe --lab: whose path to probe."),
    json_path: Path = typer.Option(None, "--json", help="Write the recommendation here as JSON."),
    proc_root: Path = typer.Option(Path("/proc"), hidden=True, help="Where to read the TCP sysctls (tests)."),
) -> None:
    """Recommend a chunk size and window for a path, and check TCP buffers against its BDP.

    From the RoCE model by default; with --probe from trial transfers on a live path. The
    JSON's `config` holds `chunk_size` and `window`: give the file to the aggregator as
    `tuning = "FILE"` (or `--tuning FILE`).
    """
    console = _console()
    if probe:
        data = _probe(console, rate, rtt, loss, size_mb, lab, silo, proc_root)
    else:
        if lab is not None:
            raise typer.BadParameter("--lab names a path to measure: it needs --probe", param_hint="--lab")
        if rate is None or rtt is None:
            raise typer.BadParameter("give the path: --rate (e.g. 1gbit) and --rtt (e.g. 20ms)",
                                     param_hint="--rate/--rtt")
        bps, seconds, fraction = _rate(rate), _duration(rtt), _loss(loss)
        state = _state_bytes(size_mb)
        rec = recommend(bps, seconds, fraction, state_bytes=state)
        console.print(recommendation_table(rec))
        tcp = tcp_check(bps, seconds, proc_root)
        console.print(tcp_table(tcp, bps, seconds))
        data = rec.to_json() | {"method": "model", "tcp_buffers": tcp}
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2) + "\n")
        console.print(f"wrote {json_path}")


def _probe(console: Console, rate: str | None, rtt: str | None, loss: str, size_mb: float | None,
           lab_name: str | None, silo: int, proc_root: Path) -> dict[str, Any]:
    """Trial transfers on a running lab's path, or on a one-path lab built for the occasion."""
    from contextlib import nullcontext

    from fedrdma.bench.probe import probe
    from fedrdma.bench.wan import placement, shaped_path
    from fedrdma.lab.config import PathShape
    from fedrdma.lab.errors import LabError
    from fedrdma.lab.lab import Lab

    nbytes = None if size_mb is None else _state_bytes(size_mb)
    try:
        if lab_name is not None:
            if rate is not None or rtt is not None:
                raise typer.BadParameter("--lab probes the lab's own path: drop --rate/--rtt", param_hint="--lab")
            running = Lab.attach(lab_name)
            if silo > len(running.paths):
                raise typer.BadParameter(f"lab {lab_name!r} has {len(running.paths)} silo path(s)", param_hint="--silo")
            where_cm: Any = nullcontext(placement(running, silo))
        else:
            if rate is None:
                raise typer.BadParameter("--probe needs a path: --rate (and --rtt, --loss) to build one, "
                                         "or --lab NAME to use a running lab", param_hint="--rate/--lab")
            _rate(rate), _duration(rtt or "0"), _loss(loss)  # refuse bad input with the model's messages
            shape = PathShape.of(rate, rtt or "0", loss)
            where_cm = shaped_path(shape, log=lambda m: console.print(f"[dim]lab: {m}"))
        with where_cm as where:
            console.print(f"probing {where.describe()} with trial transfers ...")
            result = probe(where, nbytes)
    except LabError as exc:
        console.print(f"[bold red]tune --probe:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(probe_table(result, where.describe()))
    data = result.to_json(where)
    if where.shape is not None and where.shape.rate_bps is not None:
        tcp = tcp_check(where.shape.rate_bps, where.shape.rtt_s, proc_root)
        console.print(tcp_table(tcp, where.shape.rate_bps, where.shape.rtt_s))
        data["tcp_buffers"] = tcp
    return data


def probe_table(result: Any, path: str) -> Table:
    table = Table(title=f"tune --probe: {path}, trials of {size_label(result.nbytes)}, "
                        f"median of {len(result.chosen.seconds)} after a warm-up")
    for col in ("chunk", "window", "goodput", "of line", ""):
        table.add_column(col, justify="right")
    for cell in result.cells:
        row = cell.row(result.nbytes, result.line_bps)
        chosen = cell is result.chosen
        table.add_row(size_label(cell.chunk_size), str(cell.window), format_rate(row["goodput_gbit_s"] * 1e9),
                      f"{row['vs_line']:.3f}" if "vs_line" in row else "-", "chosen" if chosen else "",
                      style="bold green" if chosen else None)
    return table


def recommendation_table(rec: Recommendation) -> Table:
    table = Table(title=f"tune: {format_rate(rec.rate_bps)}, RTT {format_duration(rec.rtt_s)}, loss {rec.loss:g}, "
                        f"state {size_label(rec.state_bytes)} (RoCE model)")
    table.add_column("setting")
    table.add_column("value")
    table.add_row("chunk_size", f"{rec.chunk_size} ({size_label(rec.chunk_size)})")
    table.add_row("window", str(rec.window))
    table.add_row("expected goodput", f"{format_rate(rec.expected_goodput_bps)} ({rec.goodput_fraction:.2f} of line)")
    table.add_row("expected time", f"{rec.expected_time_s:.3f} s")
    table.add_row("P(transfer fails)", f"{rec.p_fail:.1e}")
    for i, reason in enumerate(rec.reasons):
        table.add_row("why" if i == 0 else "", reason, style="dim")
    return table


def tcp_check(rate_bps: float, rtt_s: float, proc_root: Path) -> dict[str, Any]:
    """The TCP buffer findings as data (the check is skipped, with the reason, off Linux)."""
    bdp = bdp_bytes(rate_bps, rtt_s)
    try:
        limits = read_tcp_limits(proc_root)
    except (OSError, ValueError) as exc:
        return {"bdp_bytes": bdp, "checked": False, "error": str(exc), "findings": []}
    findings = check_buffers(limits, rate_bps, rtt_s)
    return {"bdp_bytes": bdp, "checked": True, "required_bytes": round(BUFFER_BDP_FACTOR * bdp),
            "findings": [f.__dict__ for f in findings]}


def tcp_table(tcp: dict[str, Any], rate_bps: float, rtt_s: float) -> Table:
    table = Table(title=f"TCP buffers vs {BUFFER_BDP_FACTOR:g} x BDP ({size_label(tcp['bdp_bytes'])} at "
                        f"{format_rate(rate_bps)}, {format_duration(rtt_s)})")
    table.add_column("sysctl")
    table.add_column("now", justify="right")
    table.add_column("needs", justify="right")
    table.add_column("fix")
    if not tcp["checked"]:
        table.add_row("(skipped)", "", "", tcp["error"])
    elif not tcp["findings"]:
        table.add_row("all four", "ok", size_label(tcp["required_bytes"]), "nothing to raise", style="green")
    for f in tcp["findings"]:
        table.add_row(f["sysctl"], size_label(f["current"]), size_label(f["required"]), f["command"], style="yellow")
    return table


@app.command("sim")
def sim(
    rates: str = typer.Option(SIM_RATES, help="Comma list of line rates."),
    rtts: str = typer.Option(SIM_RTTS, help="Comma list of RTTs."),
    losses: str = typer.Option(SIM_LOSSES, help="Comma list of loss fractions."),
    size_mb: float = typer.Option(None, help="State size in MiB; default: GPT-2 small in fp32 (~475 MiB)."),
    png: Path = typer.Option(None, "--png", help="Write goodput vs chunk size per path as a PNG."),
    json_path: Path = typer.Option(None, "--json", help="Write every row as JSON."),
) -> None:
    """The T2-style table from the RoCE model: goodput (fraction of line) per chunk size and path."""
    console = _console()
    rate_list = [_rate(r, "--rates") for r in _items(rates, "--rates")]
    rtt_list = [_duration(r, "--rtts") for r in _items(rtts, "--rtts")]
    loss_list = [_loss(r, "--losses") for r in _items(losses, "--losses")]
    state = _state_bytes(size_mb)
    paths = [(r, t, p) for r in rate_list for t in rtt_list for p in loss_list]
    results = [(path, recommend(*path, state_bytes=state)) for path in paths]
    console.print(sim_table(results, state))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps([rec.to_json() for _, rec in results], indent=2) + "\n")
        console.print(f"wrote {json_path}")
    if png:
        sim_plot(results, png)
        console.print(f"plot: {png}")


def _items(text: str, option: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise typer.BadParameter("give at least one value, comma-separated", param_hint=option)
    return items


def sim_table(results: list[tuple[tuple[float, float, float], Recommendation]], state: int) -> Table:
    grid = [row.chunk_bytes for row in results[0][1].rows]
    table = Table(title=f"RoCE model: goodput / line rate by chunk size, {size_label(state)} state, window covering "
                        f"the BDP per chunk; * best, x P(fail) > {roce.P_FAIL_MAX:g}")
    for col in ("rate", "RTT", "loss"):
        table.add_column(col, justify="right")
    for chunk in grid:
        table.add_column(chunk_label(chunk), justify="right")
    for col in ("best", "window", "P(fail) best", "P(fail) whole"):
        table.add_column(col, justify="right")
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


def sim_plot(results: list[tuple[tuple[float, float, float], Recommendation]], path: Path) -> Path:
    """Goodput / line vs chunk size, one panel per RTT, one line per rate and loss."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    rtts = sorted({rtt for (_, rtt, _), _ in results})
    fig, axes = plt.subplots(1, len(rtts), figsize=(6 * len(rtts), 4.5), squeeze=False, sharey=True)
    for ax, rtt in zip(axes[0], rtts, strict=True):
        for (rate, r, loss), rec in results:
            if r != rtt:
                continue
            rows = [row for row in rec.rows if row.chunk_bytes is not None]
            xs = [row.chunk_bytes / 2**20 for row in rows]
            line = ax.plot(xs, [row.result.goodput_bps / rate for row in rows], marker=".",
                           label=f"{format_rate(rate)}, loss {loss:g}")[0]
            whole = next((row for row in rec.rows if row.chunk_bytes is None), None)
            if whole is not None:
                ax.scatter([rec.state_bytes / 2**20], [whole.result.goodput_bps / rate], marker="x",
                           color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size (MiB); x = unchunked")
        ax.set_title(f"RTT {format_duration(rtt)}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("modelled goodput / line rate")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("RoCE go-back-N model: which chunk sizes keep the link usable")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    app()
