"""A bounded inbox: receivers' chunks land in a few chunk-sized slots instead of a state.

Why: with a full-size inbox per silo the aggregator holds N copies of the model, 8 GiB for
16 silos of GPT-2 small and hundreds of GB for a 7B model. A slot holds one chunk from the
moment its header is accepted until the chunk is verified and folded (or refused), then the
next chunk reuses it; the state the session was made with is never written.

The slots are one pool shared by every silo (`SlotPool`), so memory follows how many chunks
can land at once, which the aggregator's line bounds, not how many silos there are. A
reader that finds no free slot stops reading its connection, and TCP's flow control slows
that sender: back-pressure, not loss. Each silo may hold at most `cap` slots (`Slots`), so
one that stalls mid-chunk (slow, or hostile) can hold only its share, and its transfer's own
liveness (then the round's deadline) ends the stall.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch

from fedrdma.core.errors import PeerLost, TransferError

SLOTS_PER_STREAM = 2
"""A silo's share, per data connection: one being read while the last one waits to be
folded, so a connection never waits for the fold of its previous chunk."""

WAIT_STEP_S = 0.5
"""How often a reader waiting for a slot looks whether the pool is still moving."""

Consume = Callable[[int, torch.Tensor], None]
"""(offset, the verified chunk's bytes): fold them before returning; the slot is reused after."""


class Slot:
    """One chunk-sized buffer, lent to one chunk at a time."""

    def __init__(self, size: int) -> None:
        self.buffer = torch.empty(size, dtype=torch.uint8)

    def view(self, length: int) -> memoryview:
        """Where a reader receives a chunk of `length` bytes."""
        if not 0 < length <= self.buffer.numel():
            raise TransferError(f"a {length}-byte chunk does not fit a {self.buffer.numel()}-byte slot")
        return memoryview(self.buffer.numpy()).cast("B")[:length]


class SlotPool:
    """`count` slots of `size` bytes that every silo's uploads share.

    Allocated untouched: pages fault in as chunks land, so slots never used cost address
    space, not memory.
    """

    def __init__(self, count: int, size: int) -> None:
        if count < 1 or size < 1:
            raise ValueError(f"a bounded inbox needs at least one slot of at least one byte, not {count} x {size}")
        self.size, self.count = size, count
        self._free: queue.Queue[Slot] = queue.Queue()
        for _ in range(count):
            self._free.put(Slot(size))
        self._moved = time.monotonic()
        """When a slot last came back: a wait restarts on that, not on a fixed clock."""

    @property
    def nbytes(self) -> int:
        """What the slots take once every one has held a chunk (memory accounting)."""
        return self.size * self.count

    @property
    def free(self) -> int:
        return self._free.qsize()

    def share(self, cap: int, consume: Consume) -> Slots:
        """One receiver's use of the pool: at most `cap` slots at once, verified chunks to `consume`."""
        return Slots(self, min(cap, self.count), consume)

    def take(self, timeout: float, since: float) -> Slot:
        """A free slot, waiting while slots keep coming back; PeerLost once none came back for
        `timeout` (and the wait, begun at `since`, is that old): the pool is stuck."""
        while True:
            try:
                return self._free.get(timeout=WAIT_STEP_S)
            except queue.Empty:
                now = time.monotonic()
                if now - max(self._moved, since) > timeout:
                    raise PeerLost(f"no inbox slot came free within {timeout:.0f} s "
                                   f"(all {self.count} hold chunks not yet verified)") from None

    def give(self, slot: Slot) -> None:
        self._moved = time.monotonic()
        self._free.put(slot)


class Slots:
    """One receiver's share of a SlotPool: at most `cap` slots, and what to do with each verified chunk."""

    def __init__(self, pool: SlotPool, cap: int, consume: Consume) -> None:
        if cap < 1:
            raise ValueError(f"a receiver needs at least one slot, not {cap}")
        self.pool, self.cap, self.consume = pool, cap, consume
        self.size = pool.size
        self._share = threading.BoundedSemaphore(cap)
        self._held = 0
        self._lock = threading.Lock()

    @classmethod
    def own(cls, count: int, size: int, consume: Consume) -> Slots:
        """`count` slots of a pool of its own (a receiver that shares with no one)."""
        return SlotPool(count, size).share(count, consume)

    @property
    def held(self) -> int:
        """Slots this receiver holds now (0 between transfers, once every chunk was folded or dropped)."""
        return self._held

    def take(self, timeout: float) -> Slot:
        """A slot for the next chunk: first this receiver's share, then the pool's; waits as
        long as slots keep coming back (PeerLost after `timeout` without any)."""
        since = time.monotonic()
        while not self._share.acquire(timeout=WAIT_STEP_S):
            if time.monotonic() - since > timeout:
                raise PeerLost(f"none of this peer's {self.cap} inbox slots came free within {timeout:.0f} s")
        try:
            slot = self.pool.take(timeout, since)
        except BaseException:
            self._share.release()
            raise
        with self._lock:
            self._held += 1
        return slot

    def give(self, slot: Slot) -> None:
        """A slot back, its chunk folded or dropped."""
        with self._lock:
            self._held -= 1
        self.pool.give(slot)
        self._share.release()

    def fold(self, offset: int, slot: Slot, length: int) -> None:
        """Hand a verified chunk's bytes to `consume`; the caller gives the slot back after."""
        self.consume(offset, slot.buffer[:length])
