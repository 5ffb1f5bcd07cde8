"""Chunk plans, remote ranges and chunk checksums: what goes where, decided without I/O.

A plan is frozen once built (like torch.distributed.checkpoint's `SavePlan`): both peers
derive the same plan from (nbytes, chunk_size), so a chunk is named by its index alone on
the wire.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import xxhash

from fedrdma.core.errors import PlanError, RangeError

DEFAULT_CHUNK_SIZE = 4 << 20
"""4 MiB: the best or near-best cell over UCX TCP on loopback and the lab's paths (README: the
paper's T2), small enough that a lost chunk on a WAN costs little. Tune per link: `fedrdma tune`."""

DEFAULT_WINDOW = 8
"""Chunks in flight at once: 8 x 4 MiB keeps a loopback or 1 Gbit/s, 20 ms path full."""

CHUNK_ALIGN = 8
"""Chunk boundaries (except the end of the buffer) fall on multiples of this many bytes, so
they never split an element of any dtype a state holds (all are at most 8 bytes wide)."""

MAX_WINDOW = 1024
"""More outstanding chunks than this only grows descriptor tables; no path here needs it."""

REGISTRATION_SLICE = 4 << 30
"""Pools are registered in slices of this many bytes: single regions above ~4 GiB have been
reported to run well below line rate on RDMA NICs with an IOMMU (README: Measurements behind
the defaults). A descriptor cannot span two registrations, so no chunk may straddle a slice
boundary. Read at call time, so a test can lower it to move a multi-slice state quickly."""


@dataclass(frozen=True)
class Chunk:
    index: int
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ChunkPlan:
    """Consecutive chunks covering `[0, nbytes)`; the last one may be shorter."""

    nbytes: int
    chunk_size: int
    chunks: tuple[Chunk, ...]

    @classmethod
    def build(cls, nbytes: int, chunk_size: int) -> ChunkPlan:
        if nbytes <= 0:
            raise PlanError(f"cannot plan a transfer of {nbytes} bytes; the state must not be empty")
        if chunk_size <= 0:
            raise PlanError(f"chunk size must be a positive number of bytes, got {chunk_size}")
        if chunk_size > nbytes:
            raise PlanError(
                f"chunk size {chunk_size} is above the state size {nbytes}; "
                f"use a chunk size of at most {nbytes} bytes"
            )
        if chunk_size % CHUNK_ALIGN and chunk_size != nbytes:
            raise PlanError(
                f"chunk size {chunk_size} is not a multiple of {CHUNK_ALIGN} bytes; a chunk boundary "
                f"must not split a tensor element (use e.g. {chunk_size // CHUNK_ALIGN * CHUNK_ALIGN or CHUNK_ALIGN})"
            )
        if nbytes > REGISTRATION_SLICE and REGISTRATION_SLICE % chunk_size:
            raise PlanError(
                f"chunk size {chunk_size} does not divide the {_size(REGISTRATION_SLICE)} slices in which a "
                f"{_size(nbytes)} state is registered, so a chunk would straddle two registrations, which "
                f"one descriptor cannot name; use a chunk size that divides {REGISTRATION_SLICE} "
                f"(a power of two, e.g. {DEFAULT_CHUNK_SIZE})"
            )
        chunks = tuple(
            Chunk(i, off, min(chunk_size, nbytes - off)) for i, off in enumerate(range(0, nbytes, chunk_size))
        )
        return cls(nbytes, chunk_size, chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        """The distinct chunk lengths, longest first: a list of slot descriptors has a row of
        `count` entries per length, since a chunk's landing place is exactly its length."""
        return tuple(sorted({c.length for c in self.chunks}, reverse=True))

    def slot_entry(self, index: int, slot: int, count: int) -> int:
        """The entry of chunk `index` landing in `slot` of `count`, in such a list."""
        return self.lengths.index(self.chunks[index].length) * count + slot


def registration_slices(nbytes: int) -> list[tuple[int, int]]:
    """(offset, length) of each registration slice of an `nbytes` pool, in order."""
    return [(off, min(REGISTRATION_SLICE, nbytes - off)) for off in range(0, nbytes, REGISTRATION_SLICE)]


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):g} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):g} MiB"


def check_window(window: int) -> int:
    if not 1 <= window <= MAX_WINDOW:
        raise PlanError(f"window must be between 1 and {MAX_WINDOW} chunks in flight, got {window}")
    return window


@dataclass(frozen=True)
class Region:
    """A peer's advertised pool: the only memory we may touch on its side."""

    address: int
    length: int

    def __post_init__(self) -> None:
        if self.address <= 0:
            raise RangeError(f"advertised pool address {self.address:#x} is not a valid address")
        if self.length <= 0:
            raise RangeError(f"advertised pool length {self.length} must be positive")

    def digest(self) -> str:
        """A name for this region that says which it is without saying where it is (logs, tests)."""
        return xxhash.xxh3_64_hexdigest(f"{self.address}:{self.length}".encode())

    def slice(self, offset: int, length: int) -> tuple[int, int]:
        """The absolute (address, length) of `[offset, offset+length)` inside this region.

        Every remote descriptor is built through here, so nothing outside the advertised
        pool can ever be named in a transfer.
        """
        if length <= 0:
            raise RangeError(f"a remote range needs a positive length, got {length}")
        if offset < 0 or offset + length > self.length:
            raise RangeError(
                f"remote range [{offset}, {offset + length}) falls outside the advertised pool "
                f"of {self.length} bytes; the peer's pool is smaller than this transfer"
            )
        return self.address + offset, length


def chunk_checksum(data: memoryview | bytes) -> int:
    """xxh3-64 of a chunk: many times faster than any line here, and GIL-free, so verification
    hides behind the wire (README: Measurements behind the defaults)."""
    return xxhash.xxh3_64_intdigest(data)


def state_digest(data: memoryview | bytes) -> str:
    """A whole-state digest for end-to-end checks (a different hash than the chunk one)."""
    return xxhash.xxh3_128_hexdigest(data)
