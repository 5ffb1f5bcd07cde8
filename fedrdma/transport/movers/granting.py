"""The receiving side of a push into a bounded inbox: landing slots granted, chunks copied out as they land.

A push's sender WRITEs where it was told, so the receiver registers a small landing area
per session, a few chunk-sized slots (`LandingArea`), and hands the sender keys to it
alone. The sender WRITEs one chunk into each slot granted to it (`core.grants`); each
notice names its slot. The receiver takes a slot of its shared bounded inbox
(`transport.slots`) for the landed chunk, copies the chunk into it, grants the landing
slot again, and hashes and folds the copy, as it does a tcp-e or pull chunk.

The copy runs on the hash worker, just before the copy's hash (`fill`, then `filled` back on
the receiver's loop), not on the loop itself: there it held the thread that drives UCX for
a quarter of its time, and the hash reads the copy while it is still in cache.

Why copy rather than hash and fold where the chunk landed: the sender keeps its key to the
landing area for the whole session, so it could rewrite a chunk between its hash and its
fold; bytes a peer can still write are never checked or folded where they lie. The copy
also keeps memory shared: the landing areas are a window per silo, the copies the one
shared inbox, whatever the state's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from fedrdma.core.chunks import ChunkPlan, Region
from fedrdma.core.errors import ProtocolError
from fedrdma.core.grants import Grants
from fedrdma.core.receiver import Action, Corrupt, Hash, Verified
from fedrdma.transport import wire
from fedrdma.transport.agent import Agent, Pool
from fedrdma.transport.slots import Slot, SlotPool, Slots

GRANT_SPARE_SLOTS = 2
"""Landing slots beyond the window: grants on their way back to the sender while the
window's WRITEs are in flight, so the line does not wait for a grant's round trip."""


class LandingArea:
    """A session's landing slots, registered once with the agent: the only memory of this side
    the pushing peer holds a key to."""

    def __init__(self, agent: Agent, count: int, size: int) -> None:
        self.count, self.size = count, size
        self._slots = SlotPool(count, size)
        self.pool: Pool = self._slots.register(agent)

    @property
    def region(self) -> Region:
        return self.pool.region

    def chunk(self, slot: int, length: int) -> torch.Tensor:
        """What landed in `slot`: the first `length` bytes."""
        start = slot * self.size
        return self._slots.buffer[start : start + length]

    def close(self) -> None:
        self.pool.close()


class Landing:
    """One transfer's use of a landing area: grants out, landed chunks copied into `slots`."""

    def __init__(self, area: LandingArea, slots: Slots, plan: ChunkPlan, generation: int) -> None:
        self.area, self.slots, self.plan = area, slots, plan
        self.grants = Grants(area.count, generation)
        self._pending: deque[wire.Notice] = deque()
        """Notices of chunks still in their landing slots, waiting for a slot of the inbox."""
        self._copies: dict[int, Slot] = {}
        """Chunk index -> the inbox slot for its copy, from its admission to its verdict."""
        self._unfilled: dict[int, tuple[int, int]] = {}
        """Chunk index -> (landing slot, generation) of an admitted chunk not yet copied out:
        its landing slot is held until `filled`."""
        self._pool_moved = slots.pool.moved

    def grant(self) -> list[int]:
        """Landing slots to grant now (send them in a `wire.Grant` if any)."""
        return self.grants.grant()

    def landed(self, notice: wire.Notice) -> None:
        """A chunk's notice: its landing slot is held until the chunk is copied out."""
        if notice.slot is None:
            raise ProtocolError(f"chunk {notice.index}'s notice names no landing slot; this side grants them")
        if notice.index >= len(self.plan):
            raise ProtocolError(f"the peer named chunk {notice.index}, outside the plan of {len(self.plan)} chunks")
        if self.grants.claim(notice.generation, notice.slot):
            self._pending.append(notice)

    def admit(self) -> list[wire.Notice]:
        """Take inbox slots for what the inbox has room for, oldest first. The notices returned
        go to the receiver, each one's actions to `settle`; a chunk is copied out by the job
        that hashes it (`fill`) or, unhashed, by `settle`."""
        admitted = []
        while self._pending:
            notice = self._pending[0]
            if notice.index in self._copies:  # a copy of this chunk is still being checked
                self.grants.release(self._pending.popleft().slot)  # type: ignore[arg-type]
                continue
            copy = self.slots.take_now()
            if copy is None:
                break  # the sender waits for grants meanwhile: back-pressure, not loss
            self._pending.popleft()
            assert notice.slot is not None
            self._copies[notice.index] = copy
            self._unfilled[notice.index] = (notice.slot, notice.generation)
            admitted.append(notice)
        return admitted

    def fill(self, index: int) -> Callable[[], None]:
        """The copy of chunk `index` out of its landing slot, to run before its hash, off the
        receiver's loop. It names its two buffers now: neither is lent to anyone else until
        `filled` (the landing slot) or the chunk's verdict (the inbox slot)."""
        if index not in self._unfilled:
            return lambda: None  # copied out already
        length = self.plan.chunks[index].length
        landed = self.area.chunk(self._unfilled[index][0], length)
        copy = self._copies[index].buffer[:length]

        def run() -> None:
            copy.copy_(landed)  # torch lets go of the GIL for the copy

        return run

    def filled(self, index: int, generation: int) -> None:
        """Chunk `index`'s copy of `generation` is done: its landing slot may be granted again."""
        held = self._unfilled.get(index)
        if held is not None and held[1] == generation:
            del self._unfilled[index]
            self.grants.release(held[0])

    def settle(self, index: int, actions: list[Action]) -> None:
        """The receiver's answer to an admitted notice: a chunk verified unhashed is copied out
        now, one it will not check goes back."""
        if any(isinstance(a, Hash) and a.index == index for a in actions):
            return  # copied out by its hash's job
        if any(isinstance(a, Verified) and a.index == index for a in actions):
            if (held := self._unfilled.get(index)) is not None:
                self.fill(index)()
                self.filled(index, held[1])
        elif not any(isinstance(a, Corrupt) and a.index == index for a in actions):
            self.drop(index)

    def view(self, index: int) -> memoryview:
        """Where chunk `index`'s copy lies, for its hash."""
        return self._copies[index].view(self.plan.chunks[index].length)

    def copy(self, index: int) -> Slot:
        return self._copies[index]

    def drop(self, index: int) -> None:
        """Chunk `index`'s copy is folded or refused: its inbox slot goes back, and its landing
        slot if it was never copied out. No job may be copying it (`LandedHashes.settle`)."""
        copy = self._copies.pop(index, None)
        if copy is not None:
            self.slots.give(copy)
        held = self._unfilled.pop(index, None)
        if held is not None:
            self.grants.release(held[0])

    def reconnected(self, generation: int) -> None:
        """The sender resumed as `generation`: chunks not yet verified come again, so their
        copies and notices go, and every landing slot is the receiver's to grant anew."""
        while self._pending:
            self.grants.release(self._pending.popleft().slot)  # type: ignore[arg-type]
        for index in list(self._copies):
            self.drop(index)
        self.grants.reconnected(generation)

    def waiting_moved(self) -> bool:
        """Chunks wait for the shared inbox and other receivers gave slots back since the last
        call: a wait that moves, which the liveness deadline must not take for a silent peer."""
        before, self._pool_moved = self._pool_moved, self.slots.pool.moved
        return bool(self._pending) and self._pool_moved != before

    def close(self) -> None:
        for index in list(self._copies):
            self.drop(index)
        self._pending.clear()
