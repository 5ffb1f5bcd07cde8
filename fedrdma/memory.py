"""Keep chunk-sized temporaries from growing the heap for good.

glibc serves large allocations with mmap (returned to the system on free) only up to a
threshold that it raises on its own after the first large free, up to 32 MiB. After that,
every 4 MiB chunk temporary (checksums, folds, gRPC frames) lands in per-thread heap
arenas that fragment and never shrink, and the aggregator's memory beyond its pools grows.
The pin makes every such temporary an mmap that is faulted and zeroed afresh, so the hot
paths avoid them instead: FedAvg's folds reuse chunk-sized buffers (`core.fedavg._Scratch`).

Only for the RDMA modes: the gRPC baseline allocates a fresh multi-MiB buffer per frame and
per (de)serialization, and with every one of them mmapped (page faults, zeroing) it runs
far slower with no memory saved. The baseline keeps glibc's defaults, its best setting.

Not while training: a training step's activations and gradients are multi-MiB tensors,
each mmapped, page-faulted and zeroed afresh under the pin, which slows a silo's local
round markedly (`fedrdma bench heap` measures it). `compute_heap` lifts the pin while a model
trains or evaluates and puts it back after. The figures behind each of these choices are in
the README: Measurements behind the defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc's malloc.h)."""

MMAP_THRESHOLD_BYTES = 128 << 10
"""glibc's own initial value: allocations above it are mmapped and truly freed."""

COMPUTE_MMAP_THRESHOLD_BYTES = 32 << 20
"""glibc's ceiling for its dynamic threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): where a
training process ends up on its own, so a model's tensors are reused from the heap."""

_pinned = False
"""Whether this process pinned the threshold: only then does training lift it."""


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where there is none (musl, macOS): then nothing is pinned or observed."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError as exc:
        log.debug("libc unavailable: %s", exc)
        return None


def _mallopt_threshold(nbytes: int) -> bool:
    libc = _libc()
    try:
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes)) if libc else False
    except AttributeError as exc:  # not glibc: nothing to pin
        log.debug("mallopt unavailable: %s", exc)
        return False


def pin_mmap_threshold() -> bool:
    """Fix the threshold (which also turns off glibc's dynamic raising of it)."""
    global _pinned
    _pinned = _mallopt_threshold(MMAP_THRESHOLD_BYTES) or _pinned
    return _pinned


@contextmanager
def compute_heap() -> Iterator[None]:
    """Training or evaluation at the threshold glibc would have reached; the pin again afterwards.

    A no-op in a process that never pinned (the grpc baseline keeps glibc's own dynamics).
    """
    if not _pinned:
        yield
        return
    _mallopt_threshold(COMPUTE_MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        _mallopt_threshold(MMAP_THRESHOLD_BYTES)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(field, ctypes.c_size_t) for field in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mmapped(nbytes: int) -> bool | None:
    """Would malloc serve `nbytes` with its own mmap now? None where glibc cannot tell (not glibc, < 2.33).

    The observable effect of the threshold: what tests and `bench heap` check instead of
    trusting that mallopt did what was asked.
    """
    libc = _libc()
    info = getattr(libc, "mallinfo2", None) if libc else None
    if libc is None or info is None:
        return None
    info.restype = _Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    before = info().hblks
    block = libc.malloc(nbytes)
    grew = info().hblks - before
    libc.free(block)
    return grew > 0
