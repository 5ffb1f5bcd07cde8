"""Keep chunk-sized temporaries from growing the heap for good.

glibc serves large allocations with mmap (returned to the system on free) only up to a
threshold that it raises on its own after the first large free, up to 32 MiB. After that,
every 4 MiB chunk temporary (checksums, folds, gRPC frames) lands in per-thread heap
arenas that fragment and never shrink: measured on the aggregator of the demo (GPT-2
small, 3 silos), memory beyond its pools and runtime was 289-358 MiB with the dynamic
threshold and 190 MiB with it pinned.

Only for the RDMA modes: the gRPC baseline allocates a fresh multi-MiB buffer per frame and
per (de)serialization, and with every one of them mmapped (page faults, zeroing) it ran at
0.23 instead of 0.40 GB/s for 512 MiB here, with no memory saved. The baseline keeps
glibc's defaults, its best setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc's malloc.h)."""

MMAP_THRESHOLD_BYTES = 128 << 10
"""glibc's own initial value: allocations above it are mmapped and truly freed."""


def pin_mmap_threshold() -> bool:
    """Fix the threshold (which also turns off glibc's dynamic raising of it)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError) as exc:  # not glibc: nothing to pin
        log.debug("mallopt unavailable: %s", exc)
        return False
