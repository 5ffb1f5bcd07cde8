"""The markdown report and PNG plots of `fedrdma bench paper` (from its JSON alone)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from fedrdma.bench.records import PaperResult, T1Table, T2Table, T3Table, T4Table  # noqa: E402
from fedrdma.core.modes import Mode  # noqa: E402
from fedrdma.core.sizes import chunk_label, size_label  # noqa: E402

if TYPE_CHECKING:
    from fedrdma.bench.compare import Comparison

PAPER_FIGURES = {"T1": "44.97 % of round time is communication over TCP",
                 "T2": "Table 2: the best chunk size depends on the link",
                 "T3": "FedRDMA-E up to 3.8x faster than TCP per round",
                 "T4": "Table 4: CPU and memory per transfer"}


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mm(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """Median (min) of a sample, the report's one way of stating a repeated figure."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))})"


# --- tables ---------------------------------------------------------------------------------


def t1_markdown(t1: T1Table) -> str:
    rows = []
    for row in t1.rows:
        r = row.rounds
        rows.append([row.path, row.mode, _mm([x.comm_share * 100 for x in r], "{:.1f}") + " %",
                     _mm([x.comm_seconds for x in r]), _mm([x.compute_seconds for x in r])])
    return _md(["path (rate / RTT / loss)", "mode", "communication share, median (min)",
                "comm s per round", "compute s per round"], rows)


def t2_markdown(t2: T2Table) -> str:
    parts = []
    for path in t2.paths:
        state = path.state_bytes
        windows = sorted({c.window for c in path.cells if c.chunk_size < state})
        chunks = sorted({c.chunk_size for c in path.cells})
        by = {(c.chunk_size, c.window): c for c in path.cells}
        model = {m.chunk_size: m for m in path.model.by_chunk}
        best = (path.best.chunk_size, path.best.window)
        header = ["chunk", *[f"window {w}" for w in windows], "RoCE model (sim)"]
        rows = []
        for chunk in chunks:
            cells = []
            for w in windows:
                key = (chunk, 1) if chunk >= state else (chunk, w)
                cell = by.get(key) if (chunk < state or w == windows[0]) else None
                if cell is None:
                    cells.append("-")
                    continue
                text = f"{path.of_line(cell):.3f} ({cell.goodput_gbit_s_best * 1e9 / path.rate_bps:.3f})"
                cells.append(f"**{text}**" if key == best else text)
            m = model.get(chunk)
            cells.append(f"{m.goodput_fraction:.3f}" + (" ✓" if chunk == path.model.chunk_size else "")
                         if m else "-")
            rows.append([chunk_label(chunk, state), *cells])
        parts.append(f"**{path.label}**, state {size_label(state)}: goodput as a fraction of the line, "
                     f"median (best of {t2.repeat}); bold: best cell (chunk {chunk_label(best[0], state)}, "
                     f"window {best[1]}); ✓: the model's pick for RoCE.\n\n" + _md(header, rows))
    return "\n\n".join(parts)


def t3_markdown(t3: T3Table) -> str:
    rows = []
    for row in t3.rows:
        modes = row.modes
        grpc = modes[Mode.GRPC].seconds
        cells = [f"{m.seconds:.3f} ({m.seconds_min:.3f})" for m in modes.values()]
        speed = [f"{grpc / m.seconds:.1f}x" for mode, m in modes.items() if mode != Mode.GRPC]
        host = [f"{min(row.memcpy_gb_s):.1f}-{max(row.memcpy_gb_s):.1f}"] if row.memcpy_gb_s else []
        rows.append([row.model + (" LoRA" if row.lora else " full"), size_label(row.state_bytes), row.path,
                     *cells, *speed, *host])
    modes = list(t3.rows[0].modes) if t3.rows else []
    header = ["state", "size", "path", *[f"{m} s" for m in modes], *[f"{m} vs grpc" for m in modes if m != Mode.GRPC]]
    if t3.rows and t3.rows[0].memcpy_gb_s:
        header.append("host memcpy GB/s")
    return _md(header, rows)


def t3_round_trips(t3: T3Table) -> str:
    """Why a LoRA state gains nothing on a WAN path: its time beyond the line is round trips.

    Counted from the table itself (time minus the bytes' time on the line, over the RTT), so
    the sentence follows the run; empty when no LoRA row ran on a path with an RTT.
    """
    parts = []
    for row in t3.rows:
        rtt_ms, rate = row.rtt_ms, row.link_rate_gbit
        if not row.lora or not rtt_ms or not rate:
            continue
        line_s = row.state_bytes * 8 / (rate * 1e9)
        trips = ", ".join(f"{mode} {(m.seconds - line_s) / (rtt_ms / 1e3):.1f}" for mode, m in row.modes.items())
        parts.append(f"{row.model} LoRA on {row.path} ({line_s * 1e3:.0f} ms on the line): {trips}")
    if not parts:
        return ""
    return ("A LoRA state on a WAN path is bound by round trips, not by the line. Beyond the bytes' own time on "
            "the line, each mode took this many round trips: " + "; ".join(parts) + ". grpc needs about one: "
            "the stream, then the receiver's acknowledgement. The one-sided modes need about one more. NIXL sends "
            "a WRITE's notification only after the written bytes are acknowledged, so the receiver learns of them "
            "a round trip after they landed. A READ starts only once the holder's offer has arrived. On a full "
            "state that round trip is under 1 % of the transfer.")


def t4_markdown(t4: T4Table) -> str:
    rows = [[r.model, size_label(r.state_bytes), r.mode, f"{r.cpu_seconds:.2f}",
             f"{r.receiver_extra_rss_mb:.0f}", f"{r.sender_extra_rss_mb:.0f}"] for r in t4.rows]
    return _md(["state", "size", "mode", "CPU s (both processes)", "receiver +RSS MiB", "sender +RSS MiB"], rows)


# --- plots ----------------------------------------------------------------------------------


def t2_plot(t2: T2Table, path: Path) -> Path:
    paths = t2.paths
    cols = min(4, len(paths))
    rows = (len(paths) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, p in zip(axes.flat, paths, strict=False):
        state = p.state_bytes
        for w in sorted({c.window for c in p.cells if c.chunk_size < state}):
            cells = sorted((c for c in p.cells if c.window == w and c.chunk_size < state), key=lambda c: c.chunk_size)
            ax.plot([c.chunk_size / 2**20 for c in cells], [p.of_line(c) for c in cells], marker="o",
                    label=f"window {w}")
        whole = [c for c in p.cells if c.chunk_size >= state]
        if whole:
            ax.axhline(p.of_line(whole[0]), color="grey", linestyle=":", label="unchunked")
        model = [m for m in p.model.by_chunk if not m.unchunked]
        ax.plot([m.chunk_size / 2**20 for m in model], [m.goodput_fraction for m in model], "k--",
                linewidth=1, label="RoCE model")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_title(p.label, fontsize=9)
        ax.set_xlabel("chunk MiB")
        ax.set_ylabel("goodput / line")
    for ax in list(axes.flat)[len(paths):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def t1_plot(t1: T1Table, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels, comm, compute = [], [], []
    for row in t1.rows:
        labels.append(f"{row.mode}\n{row.path.split(' / ')[0]}")
        comm.append(statistics.median(r.comm_seconds for r in row.rounds))
        compute.append(statistics.median(r.compute_seconds for r in row.rounds))
    ax.bar(labels, compute, label="compute")
    ax.bar(labels, comm, bottom=compute, label="communication")
    for i, (c, m) in enumerate(zip(comm, compute, strict=True)):
        ax.text(i, c + m, f"{100 * c / (c + m):.0f} %", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per round (median)")
    ax.set_title("T1: communication share of a round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def t3_plot(t3: T3Table, path: Path) -> Path:
    rows = t3.rows
    modes = list(rows[0].modes) if rows else []
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(rows)), 4))
    width = 0.8 / max(1, len(modes))
    for k, mode in enumerate(modes):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(xs, [r.modes[mode].seconds for r in rows], width, label=mode)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r.model.removeprefix('gpt2-')}{' LoRA' if r.lora else ''}\n"
                        f"{r.path.split(' / ')[0]}" for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per transfer (median)")
    ax.set_title("T3: transfer time per mode")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the report -----------------------------------------------------------------------------


def write_report(result: PaperResult, out: Path, before: PaperResult | None = None,
                 comparison: Comparison | None = None) -> Path:
    """The report of `result`; `before` and its `comparison`, when the caller has them, spare a reload."""
    from fedrdma.bench.compare import compare, host_speed, load, markdown

    tables = result.tables
    host = result.host
    lines = [
        "# fedrdma bench paper",
        "",
        f"Command: `{result.command or 'fedrdma bench paper'}` ({result.minutes or 0:.0f} min). "
        f"Host: {host.cpus} CPUs, {host.machine}, Python {host.python}, memory copy "
        f"{host_speed(result)} (start / end); UCX over TCP (no RDMA NIC). "
        f"Lab links: MTU {result.mtu}, offloads off, delay by the lab's element, rate by TBF. "
        f"Every figure is the median of {result.repeat} counted runs after one warm-up, with the minimum "
        "(or, for goodput, the best) in parentheses.",
    ]
    if (t1 := tables.T1) is not None:
        t1_plot(t1, out / "t1.png")
        lines += ["", f"## T1: communication share of a round (paper: {PAPER_FIGURES['T1']})", "",
                  f"{t1.model}, full fine-tuning, {t1.local_steps} local steps, {t1.silos} silo in the "
                  f"lab, {t1.rounds} rounds (each round one sample). Communication = the silo's broadcast "
                  "plus upload; compute = its local training.", "", t1_markdown(t1), "", "![T1](t1.png)"]
    if (t2 := tables.T2) is not None:
        t2_plot(t2, out / "t2.png")
        lines += ["", f"## T2: goodput by chunk size and window (paper: {PAPER_FIGURES['T2']})", "",
                  f"rdma-e push, one warm connection per path, the state sized to ~0.5 s on the line (32-256 MiB). The "
                  f"fastest path runs at 80 % of the delay element's ceiling "
                  f"({t2.ceiling_bps / 1e9:.2f} Gbit/s here). The last column is `fedrdma sim`'s RoCE "
                  "go-back-N model for the same path and state: what these machines cannot show.", "",
                  t2_markdown(t2), "", "![T2](t2.png)"]
    if (t3 := tables.T3) is not None:
        lines += ["", f"## T3: transfer time per mode (paper: {PAPER_FIGURES['T3']})", "",
                  "One transfer of the trainable state between two processes (a round moves it down and up "
                  "once per silo); seconds, median (min). LoRA moves only the adapters."
                  + (" The modes take turns, a fresh pair of processes per transfer, so a host that drifts "
                     "moves them alike; the last column is the host's memory-copy rate before and after "
                     "the row." if t3.interleaved else ""), "",
                  t3_markdown(t3), "", "![T3](t3.png)"]
        if reading := t3_round_trips(t3):
            lines += ["", reading]
        t3_plot(t3, out / "t3.png")
    if (t4 := tables.T4) is not None:
        lines += ["", f"## T4: CPU and memory per transfer (paper: {PAPER_FIGURES['T4']})", "",
                  "From T3's loopback runs: CPU seconds of sender and receiver together (median), and each "
                  "side's peak RSS above what it held before the transfer (largest over the runs; the "
                  "receiver's pool is not counted).", "", t4_markdown(t4)]
    if result.against:
        before = before if before is not None else load(out / result.against)
        comparison = comparison if comparison is not None else compare(before, result)
        lines += ["", "## Repeatability: this run against the previous one", "",
                  markdown(comparison, result.against, (host_speed(before), host_speed(result)))]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
