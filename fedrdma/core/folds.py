"""What one fold needs besides the sum: a private copy of the chunk, its hash, the norm of
its delta, and the byte ranges a silo has covered. Kept apart from `core.fedavg`, whose
round logic uses them."""

from __future__ import annotations

import bisect

import torch
import xxhash


class Scratch:
    """Chunk-sized buffers that every fold of a round reuses.

    A fold needs a private copy of the chunk and room for its delta against the global
    state. Allocated afresh per chunk, each is a new multi-MiB block: under the RDMA modes'
    pinned mmap threshold (fedrdma.memory) it is mmapped, faulted and zeroed on every fold,
    which slowed the demo's uploads severalfold (README: Measurements behind the defaults). Grown on demand, never shrunk: a round's chunks
    are all of one size but the last.
    """

    def __init__(self) -> None:
        self._bytes = torch.empty(0, dtype=torch.uint8)
        self._floats = torch.empty(0, dtype=torch.float32)

    def copy(self, source: torch.Tensor) -> torch.Tensor:
        """`source` (bytes) copied into the reused buffer; valid until the next call."""
        if self._bytes.numel() < source.numel():
            self._bytes = torch.empty(source.numel(), dtype=torch.uint8)
        out = self._bytes[: source.numel()]
        out.copy_(source)
        return out

    def floats(self, numel: int) -> torch.Tensor:
        """`numel` float32 elements of the reused buffer, contents undefined."""
        if self._floats.numel() < numel:
            self._floats = torch.empty(numel, dtype=torch.float32)
        return self._floats[:numel]


def sq_norm(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> float:
    """Squared L2 norm of `x - g`, in float32: it only feeds the outlier test (a factor of
    10), where float32's relative error (~1e-6 for a chunk) is irrelevant, and it is half the
    memory traffic of float64. The delta goes to `out` (float32, x's length), not a new block."""
    delta = torch.sub(x.float(), g.float(), out=out)
    return float(torch.dot(delta, delta))


def digest(raw: torch.Tensor) -> int:
    return xxhash.xxh3_64_intdigest(memoryview(raw.numpy()))


def insert_disjoint(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Insert [start, end) into sorted disjoint `ranges`, merging neighbours; False (and
    `ranges` untouched) if it overlaps a range already there."""
    i = bisect.bisect_left(ranges, (start, end))
    if (i > 0 and ranges[i - 1][1] > start) or (i < len(ranges) and ranges[i][0] < end):
        return False
    if i > 0 and ranges[i - 1][1] == start:
        start = ranges[i - 1][0]
        i -= 1
        del ranges[i]
    if i < len(ranges) and ranges[i][0] == end:
        end = ranges[i][1]
        del ranges[i]
    ranges.insert(i, (start, end))
    return True
