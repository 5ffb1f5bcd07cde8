"""Chunk checksums off the polling loop: the sender's ahead of its posts, the receiver's as chunks land.

xxh3 releases the GIL, so hashing runs on the second core instead of delaying the loop
whose polls move UCX.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from fedrdma.core.chunks import ChunkPlan, chunk_checksum
from fedrdma.core.layout import FlatState


class ChunkHasher:
    """The sender's chunk checksums: from the state's cache, or computed ahead of the posts.

    Results are cached on the state under its version, so an unchanged state is hashed once
    for any number of sends (the aggregator broadcasts one global to every silo).
    """

    def __init__(self, state: FlatState, plan: ChunkPlan) -> None:
        self._state = state
        self._plan = plan
        self._version = state.version
        cached = state.checksums.get(plan.chunk_size)
        self._cached = cached[1] if cached and cached[0] == state.version else None
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[int]] = []
        if self._cached is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-hash")
            self._futures = [
                self._pool.submit(chunk_checksum, state.memoryview(c.offset, c.length)) for c in plan.chunks
            ]

    def checksum(self, index: int) -> int:
        if self._cached is not None:
            return self._cached[index]
        return self._futures[index].result()

    def close(self) -> None:
        if self._pool is None:
            return
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)
        if self._state.version == self._version and all(f.done() and not f.cancelled() for f in self._futures):
            self._state.checksums[self._plan.chunk_size] = (self._version, [f.result() for f in self._futures])


class LandedHashes:
    """The receiver's hashes of landed chunks, keyed by (chunk, generation), collected when done."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-verify")
        self._running: dict[tuple[int, int], Future[int]] = {}

    def submit(self, index: int, generation: int, view: memoryview, first: Callable[[], None] | None = None) -> None:
        """Hash `view` on the worker; `first` runs there just before (a push's copy out of its
        landing slot into `view`: the hash then reads bytes still in cache)."""
        if first is None:
            job = self._pool.submit(chunk_checksum, view)
        else:
            job = self._pool.submit(_after, first, view)
        self._running[(index, generation)] = job

    def settle(self) -> None:
        """Wait for the jobs under way: what they copy into may be given back next."""
        wait(list(self._running.values()))

    def finished(self) -> list[tuple[int, int, int]]:
        """(index, generation, checksum) of every hash done since the last call."""
        done = [key for key, future in self._running.items() if future.done()]
        return [(*key, self._running.pop(key).result()) for key in done]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._running.clear()


def _after(first: Callable[[], None], view: memoryview) -> int:
    first()
    return chunk_checksum(view)
