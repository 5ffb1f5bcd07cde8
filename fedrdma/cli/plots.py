"""PNG plots of the commands' results: a federation's rounds, loss per byte, and the RoCE model's grid.

matplotlib is slow to import: commands import this module inside their functions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from fedrdma.lab.units import format_duration, format_rate  # noqa: E402

if TYPE_CHECKING:
    from fedrdma.bench.records import FlowerResult, ScaleResult, WireResult
    from fedrdma.fl.records import AggregatorRound
    from fedrdma.sim.tune import Recommendation

PHASES = ("broadcast_seconds", "train_seconds", "upload_seconds")
"""A silo's part of a round, in the order it happens; the aggregation follows."""


def rounds_plot(by_mode: Mapping[str, Sequence[AggregatorRound]], path: Path) -> Path:
    """Held-out loss per round per mode, and each mode's time per round by phase."""
    modes = list(by_mode)
    fig, axes = plt.subplots(1, 1 + len(modes), figsize=(5 * (1 + len(modes)), 4))
    loss_ax = axes[0]
    for mode in modes:
        rounds = by_mode[mode]
        scored = [r for r in rounds if r.eval_loss is not None]
        loss_ax.plot([r.round for r in scored], [r.eval_loss for r in scored], marker="o", label=mode)
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("held-out loss")
    loss_ax.set_title("held-out loss")
    loss_ax.legend()
    for ax, mode in zip(axes[1:], modes, strict=True):
        rounds = [r for r in by_mode[mode] if r.round > 0]
        xs = [r.round for r in rounds]
        bottom = [0.0] * len(rounds)
        for phase in PHASES:
            vals = [r.silo_mean(phase) for r in rounds]
            ax.bar(xs, vals, bottom=bottom, label=phase.replace("_seconds", ""))
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        agg = [r.aggregation_seconds for r in rounds]
        ax.bar(xs, agg, bottom=bottom, label="aggregation")
        ax.set_xlabel("round")
        ax.set_ylabel("seconds (mean over silos)")
        ax.set_title(f"{mode}: time per round")
        ax.legend()
    return _save(fig, path, 100)


def scale_plot(result: ScaleResult, path: Path) -> Path:
    """Per silo count: the last round's time split into aggregation and the rest, and the aggregator's memory."""
    counts = [run.silos for run in result.runs]
    last = [run.rounds[-1] for run in result.runs]
    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [str(n) for n in counts]
    aggregation = [r.aggregation_seconds for r in last]
    time_ax.bar(labels, [r.seconds - a for r, a in zip(last, aggregation, strict=True)], label="moving the state")
    time_ax.bar(labels, aggregation, bottom=[r.seconds - a for r, a in zip(last, aggregation, strict=True)],
                label="aggregation")
    time_ax.set_xlabel("silos")
    time_ax.set_ylabel("seconds")
    time_ax.set_title(f"{result.model} over {result.mode}: the last round")
    time_ax.legend()
    rss_ax.bar(labels, [run.aggregator_rss_above_globals_mb for run in result.runs])
    rss_ax.set_xlabel("silos")
    rss_ax.set_ylabel("MiB")
    rss_ax.set_title("aggregator peak RSS above its two globals")
    return _save(fig, path, 100)


def sim_plot(results: Sequence[tuple[tuple[float, float, float], Recommendation]], path: Path) -> Path:
    """Goodput / line vs chunk size, one panel per RTT, one line per rate and loss."""
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
    return _save(fig, path, 120)


def _save(fig: plt.Figure, path: Path, dpi: int) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def wire_plot(result: WireResult, path: Path) -> Path:
    """Held-out loss against the bytes moved so far (both directions, all silos), per wire format."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for wire, fmt in result.formats.items():
        xs, ys, moved = [0.0], [fmt.initial_loss], 0
        for r in fmt.rounds:
            moved += r.bytes_up + r.bytes_down
            xs.append(moved / 2**20)
            ys.append(r.eval_loss)
        ax.plot(xs, ys, marker="o", label=wire)
    ax.set_xlabel("MiB moved (broadcasts and uploads, all silos)")
    ax.set_ylabel("held-out loss")
    ax.set_title(f"{result.model}, {result.mode} on {result.path}: loss per byte")
    ax.legend()
    return _save(fig, path, 100)


def flower_plot(result: FlowerResult, path: Path) -> Path:
    """The same Flower app both ways: each round's seconds split into communication and the
    ClientApps' own work, and each process's peak RSS split into its baseline (what it held
    before any array moved, where there is one) and what the run added on top."""
    ways = {"Flower": (result.flower, "tab:blue"), "fedrdma": (result.fedrdma, "tab:orange")}
    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.4
    tallest = 0.0
    for k, (name, (way, color)) in enumerate(ways.items()):
        xs = [r.round + (k - 0.5) * width for r in way.rounds]
        comm = [r.comm_seconds for r in way.rounds]
        time_ax.bar(xs, comm, width, color=color, label=f"{name}: communication")
        time_ax.bar(xs, [r.app_seconds for r in way.rounds], width, bottom=comm, color=color, alpha=0.35,
                    label=f"{name}: ClientApp's work")
        tallest = max([tallest, *(r.seconds for r in way.rounds)])
    time_ax.set_xticks([r.round for r in result.flower.rounds])
    time_ax.set_ylim(0, tallest * 1.45)
    time_ax.set_xlabel("round")
    time_ax.set_ylabel("seconds")
    time_ax.set_title(f"{result.model} ({result.state_mb:.0f} MiB state): a round, both ways")
    time_ax.legend(fontsize=8, ncol=2, loc="upper center")
    roles = sorted({role for way, _ in ways.values() for role in way.peak_rss_mb})
    for k, (name, (way, color)) in enumerate(ways.items()):
        xs = [j + (k - 0.5) * width for j in range(len(roles))]
        peaks = [way.peak_rss_mb.get(r, 0.0) for r in roles]
        bases = [min(way.baseline_rss_mb.get(r, 0.0), peak) for r, peak in zip(roles, peaks)]
        rss_ax.bar(xs, bases, width, color=color, alpha=0.35, label=f"{name}: baseline")
        rss_ax.bar(xs, [peak - base for peak, base in zip(peaks, bases)], width, bottom=bases, color=color,
                   label=f"{name}: above it")
    rss_ax.set_xticks(range(len(roles)), roles, rotation=30, ha="right", fontsize=8)
    rss_ax.set_ylabel("peak RSS, MiB")
    rss_ax.set_title("each process's peak RSS (light: held before any array moved)", fontsize=10)
    rss_ax.legend(fontsize=8)
    fig.suptitle(f"two sites on {result.path}", fontsize=10)
    return _save(fig, path, 100)
