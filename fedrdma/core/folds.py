"""What one fold needs besides the sum: a private copy of the chunk, its hash, the norm of
its delta, and the byte ranges a silo has covered; and the reference mean it is tested
against. Kept apart from `core.fedavg`, whose round logic uses them."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch
import xxhash

from fedrdma.core.errors import AggregationError


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


def delta_stats(x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """Squared L2 norm and largest magnitude of `x - g`, in float32.

    The norm only feeds the outlier test (a factor of 10), where float32's relative error
    (~1e-6 for a chunk) is irrelevant, and it is half the memory traffic of float64. The
    largest magnitude bounds what subtracting the silo again would cost (`core.rules.subtractable`).
    The delta goes to `out` (float32, x's length), not a new block, and is spent after."""
    delta = torch.sub(x.float(), g.float(), out=out)
    squared = float(torch.dot(delta, delta))
    return squared, float(delta.abs_().max()) if delta.numel() else 0.0


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


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The reference FedAvg: `sum(w_i * x_i) / sum(w_i)`, computed in float64.

    Returned in the dtype of `tensors[0]`. The streaming aggregator is tested against this.
    """
    if not tensors:
        raise AggregationError("weighted_mean needs at least one tensor")
    if len(tensors) != len(weights):
        raise AggregationError(f"{len(tensors)} tensors but {len(weights)} weights; pass one weight per tensor")
    shape = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.shape != shape:
            raise AggregationError(f"tensor {i} has shape {tuple(t.shape)}, tensor 0 has {tuple(shape)}")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise AggregationError(f"weight {i} is {w}; weights must be finite and >= 0")
    total = float(sum(weights))
    if total <= 0:
        raise AggregationError("the weights sum to 0; at least one weight must be positive")
    acc = torch.zeros(shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc.add_(t.to(torch.float64), alpha=float(w))
    return (acc / total).to(tensors[0].dtype)
