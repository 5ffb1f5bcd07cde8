"""`fedrdma tune --probe`: pick a chunk size and window by measuring the live path.

The model (`fedrdma.sim`) predicts RoCE; a UCX-over-TCP path has its own costs (per-chunk
notifications, socket buffers, the polling loop), so on a path we can reach we measure:
short trial transfers over a small grid, on one warm connection, best median wins. The
measuring lives here, with the benchmarks, so that `sim/` stays a model that moves no byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrdma.bench.sweep import CellResult, best, run_cells
from fedrdma.bench.wan import Placement, placement, shaped_path
from fedrdma.core.errors import RunError
from fedrdma.lab.config import PathShape
from fedrdma.lab.errors import LabError
from fedrdma.lab.lab import Lab
from fedrdma.sim.tcp_buffers import tcp_check

PROBE_CHUNKS = (1 << 20, 4 << 20, 16 << 20)
"""1-16 MiB: below 1 MiB per-chunk costs show over TCP, above 16 MiB a lost chunk costs much."""

PROBE_WINDOWS = (4, 8, 16, 32)
"""In-flight chunks from 4 MiB to 512 MiB at these chunk sizes: covers the BDP of every lab path."""

TRIAL_SECONDS = 0.5
"""Each trial transfer lasts about this long on the line: long against an RTT, short in all."""

MIN_TRIAL_BYTES = 32 << 20
"""Trials at least this large, so a 16 MiB chunk with its window still makes a sweep."""

MAX_TRIAL_BYTES = 512 << 20
"""No trial above GPT-2 small's size: fast paths do not need more to be measured."""

PROBE_REPEAT = 2
"""Counted trials per cell (after one warm-up): the probe is meant to be quick."""


@dataclass(frozen=True)
class ProbeResult:
    nbytes: int
    line_bps: float | None
    cells: tuple[CellResult, ...]
    chosen: CellResult

    def config(self) -> dict[str, int]:
        """The keys the runtime's config accepts, as in the model's recommendation."""
        return {"chunk_size": self.chosen.chunk_size, "window": self.chosen.window}

    def to_json(self, where: Placement) -> dict[str, Any]:
        return {
            "method": "probe",
            "path": where.fields() | {"described": where.describe()},
            "state_bytes": self.nbytes,
            "config": self.config(),
            "chosen": self.chosen.row(self.nbytes, self.line_bps).model_dump(mode="json"),
            "table": [c.row(self.nbytes, self.line_bps).model_dump(mode="json") for c in self.cells],
        }


def trial_bytes(line_bps: float | None) -> int:
    if not line_bps:
        return MAX_TRIAL_BYTES
    want = int(line_bps / 8 * TRIAL_SECONDS)
    return max(MIN_TRIAL_BYTES, min(MAX_TRIAL_BYTES, want)) // (1 << 20) * (1 << 20)


def probe_cells(nbytes: int, chunks: Sequence[int] = PROBE_CHUNKS,
                windows: Sequence[int] = PROBE_WINDOWS) -> list[tuple[int, int]]:
    """The trial grid, leaving out windows that would hold more than the whole state."""
    cells = [(c, w) for c in chunks for w in windows if c <= nbytes and c * (w - 1) < nbytes]
    if not cells:
        raise ValueError(f"no trial fits a {nbytes}-byte state: give a larger state")
    return cells


def probe(where: Placement, nbytes: int | None = None, repeat: int = PROBE_REPEAT,
          on_transfer: Callable[[], None] = lambda: None) -> ProbeResult:
    line = where.line_bytes_per_s()
    line_bps = line * 8 if line else None
    size = nbytes or trial_bytes(line_bps)
    cells = run_cells(size, probe_cells(size), repeat=repeat, where=where, on_transfer=on_transfer)
    bad = [c for c in cells if not c.identical]
    if bad:
        raise RunError(f"trial bytes differ at {[(c.chunk_size, c.window) for c in bad]}: the path corrupts data")
    return ProbeResult(size, line_bps, tuple(cells), best(cells, size))


@contextmanager
def probe_path(shape: PathShape | None = None, lab_name: str | None = None, silo: int = 1,
               log: Callable[[str], None] | None = None) -> Iterator[Placement]:
    """Where to probe: path `silo` of the running lab `lab_name`, or a one-path lab shaped
    as `shape`, built for the block and taken down after it."""
    if lab_name is None:
        if shape is None:
            raise ValueError("a probe needs a path: a shape to build, or a running lab's name")
        with shaped_path(shape, log=log) as where:
            yield where
        return
    running = Lab.attach(lab_name)
    if silo > len(running.paths):
        raise LabError(f"lab {lab_name!r} has {len(running.paths)} silo path(s): --silo {silo} names none of them")
    yield placement(running, silo)


def tuning_json(result: ProbeResult, where: Placement, proc_root: Path = Path("/proc")) -> dict[str, Any]:
    """What `tune --probe --json` writes: the probe's result, with the host's TCP buffers
    checked against the path when the path has a line rate."""
    data = result.to_json(where)
    if where.shape is not None and where.shape.rate_bps is not None:
        data["tcp_buffers"] = tcp_check(where.shape.rate_bps, where.shape.rtt_s, proc_root)
    return data
