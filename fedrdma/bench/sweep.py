"""Goodput by chunk size and window on one path: T2's cells and `tune --probe`'s trials.

One sender and one receiver move the state under each setting in turn over one warm
connection (`Session.retune`), so a cell measures its setting, not TCP's slow start or
process start-up. Each cell gets an uncounted warm-up transfer, then `repeat` counted ones.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedrdma.bench.peer import format_cells
from fedrdma.bench.records import Cell
from fedrdma.bench.transfer import WARMUP, run_pair_events, transfer_env
from fedrdma.bench.wan import ON_LOOPBACK, Placement
from fedrdma.core.scheduler import CHUNK_TIMEOUT_S

SWEEP_MODE = "rdma-e"
"""Chunk size and window are the push path's settings; it is the runtime's default mode."""

TIMEOUT_FACTOR = 4.0
"""A chunk's deadline in a sweep: this many times the time its whole window takes on the line."""


@dataclass(frozen=True)
class CellResult:
    chunk_size: int
    window: int
    seconds: tuple[float, ...]
    identical: bool

    def goodput_bps(self, nbytes: int) -> float:
        return nbytes * 8 / statistics.median(self.seconds)

    def row(self, nbytes: int, line_bps: float | None) -> Cell:
        med = statistics.median(self.seconds)
        goodput = nbytes * 8 / med / 1e9
        return Cell(
            chunk_size=self.chunk_size,
            window=self.window,
            seconds=med,
            seconds_min=min(self.seconds),
            repeat=len(self.seconds),
            goodput_gbit_s=goodput,
            goodput_gbit_s_best=nbytes * 8 / min(self.seconds) / 1e9,
            identical=self.identical,
            vs_line=goodput * 1e9 / line_bps if line_bps else None,
        )


def chunk_timeout(cells: Sequence[tuple[int, int]], line_bps: float | None) -> float:
    """Long enough for the slowest cell's full window on the line, and never below the default."""
    if not line_bps:
        return CHUNK_TIMEOUT_S
    worst = max(chunk * window * 8 / line_bps for chunk, window in cells)
    return max(CHUNK_TIMEOUT_S, TIMEOUT_FACTOR * worst)


def run_cells(
    nbytes: int,
    cells: Sequence[tuple[int, int]],
    repeat: int = 3,
    where: Placement = ON_LOOPBACK,
    env: dict[str, str] | None = None,
    on_transfer: Callable[[], None] = lambda: None,
) -> list[CellResult]:
    """Every cell on one connection; cells whose chunk is above the state are refused up front."""
    too_big = [chunk for chunk, _ in cells if chunk > nbytes]
    if too_big:
        raise ValueError(f"chunk size(s) {too_big} exceed the {nbytes}-byte state; drop them or grow the state")
    line = where.line_bytes_per_s()
    per_cell = repeat + WARMUP
    common = [
        "--size-bytes", str(nbytes), "--transfers", str(per_cell), "--cells", format_cells(list(cells)),
        "--chunk-timeout", f"{chunk_timeout(cells, line * 8 if line else None):.1f}",
    ]
    rows = run_pair_events(SWEEP_MODE, common, per_cell * len(cells), env or transfer_env(), where, on_transfer)
    out = []
    for k, (chunk, window) in enumerate(cells):
        sent = rows["sender"][k * per_cell : (k + 1) * per_cell]
        got = rows["receiver"][k * per_cell : (k + 1) * per_cell]
        assert all(r["chunk_size"] == chunk and r["window"] == window for r in sent), "sweep out of step"
        counted = sent[WARMUP:]
        out.append(CellResult(
            chunk_size=chunk,
            window=window,
            seconds=tuple(r["seconds"] for r in counted),
            identical=all(r["digest"] == s["digest"] for r, s in zip(got, sent, strict=True)),
        ))
    return out


def best(results: Sequence[CellResult], nbytes: int) -> CellResult:
    """The cell with the highest median goodput; ties go to the smaller window (less memory in flight)."""
    return max(results, key=lambda c: (round(c.goodput_bps(nbytes), -6), -c.window, -c.chunk_size))
