"""Pools as shared memory: one memfd the node makes, mapped by the node and by its apps.

A memfd has no name in any file system: only a process handed its descriptor (over the
node's Unix socket, `SCM_RIGHTS`) can map it, so a pool is reachable by the apps the node
let in and by no other process of the host. Both sides map the same pages: bytes a
transfer lands are the app's arrays, with no copy between the node and the app.
"""

from __future__ import annotations

import mmap
import os

import torch

from fedrdma.core.errors import FedRDMAError
from fedrdma.core.layout import FlatState, Layout

PAGE = mmap.PAGESIZE


class PoolError(FedRDMAError):
    """A pool that cannot be made or mapped; the message names the size and the limit."""


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class SharedPool:
    """A FlatState whose buffer is a shared mapping of a memfd."""

    def __init__(self, fd: int, layout: Layout, name: str) -> None:
        self.fd = fd
        self.name = name
        size = os.fstat(fd).st_size
        if size != layout.nbytes:
            raise PoolError(f"pool {name!r} holds {size} bytes, its layout {layout.layout_id} needs {layout.nbytes}")
        self._map = mmap.mmap(fd, layout.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.state = FlatState(layout, torch.frombuffer(self._map, dtype=torch.uint8))

    @classmethod
    def create(cls, name: str, layout: Layout) -> SharedPool:
        """A zeroed pool; refuses one larger than this host's memory before touching a page."""
        if layout.nbytes > host_memory_bytes():
            raise PoolError(f"pool {name!r} needs {layout.nbytes} bytes, more than this host's "
                            f"{host_memory_bytes()}: the layout is not one this site can hold")
        fd = os.memfd_create(f"fedrdma-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, layout.nbytes)
            return cls(fd, layout, name)
        except BaseException:
            os.close(fd)
            raise

    @property
    def layout(self) -> Layout:
        return self.state.layout

    def release(self, start: int = 0, end: int | None = None) -> None:
        """Stop holding the pages of bytes `start:end` in this process's resident set.

        The bytes stay in the memfd, for the node and for this process's next access, which
        maps them again: an app that has copied its arrays out of a pool (or into it) need not
        carry a state's worth of shared pages through training, or through a round. Pages at
        either end that the span only shares are let go too; touching them again costs a fault.
        """
        end = self.layout.nbytes if end is None else min(end, self.layout.nbytes)
        start -= start % PAGE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        """Give the descriptor back; the mapping goes with the last view into it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
