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

**Waiting silos first.** While a silo that holds no slot waits for one, a silo that holds
some gets no more, unless more slots are free than silos wait: the next slot that comes
back goes to the waiting silo. So a silo that serves its chunks slowly (a trickle) cannot
grow its hold while others wait, and every silo that asks gets a slot as soon as any
comes back; a trickle holds only what it took while nobody waited, and gives those back
one by one as its chunks end.

**A hold that lands nothing ends.** A silo that holds slots while others wait, and gives
none of them back for `hold_limit`, is given up (`Slots.stalled`, which its transfer's loop
asks): a trickle may not keep the shared slots through the round.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fedrdma.core import chunks
from fedrdma.core.errors import PeerLost, TransferError

if TYPE_CHECKING:  # only a pull registers its slots; tcp-e's need no NIXL at all
    from fedrdma.transport.agent import Agent, Pool

SLOTS_PER_STREAM = 2
"""A silo's share, per data connection: one being read while the last one waits to be
folded, so a connection never waits for the fold of its previous chunk."""

PULL_SPARE_SLOTS = 2
"""A pull's share beyond its window: chunks that landed and wait for their hash and fold, while
the window's next READs are already posted."""

WAIT_STEP_S = 0.5
"""How often a reader waiting for a slot looks whether the pool is still moving."""

WAITING_TTL_S = 1.0
"""A silo counts as waiting this long after it last asked for a slot while holding none. Its
loop asks again every turn (a pull, a push) or every WAIT_STEP_S (a tcp-e reader), so one
that stopped asking (its transfer ended or failed) soon stops holding a slot back."""


def receiver_share(one_sided: bool, window: int, data_streams: int) -> int:
    """How many slots one receiver may hold: its window and PULL_SPARE_SLOTS more when its
    chunks land by one-sided operations (a pull's READs, a push's copies out of its landing
    slots), SLOTS_PER_STREAM per data connection for tcp-e."""
    return window + PULL_SPARE_SLOTS if one_sided else data_streams * SLOTS_PER_STREAM


HOLD_LIMIT_S = 20.0
"""The least time a silo may hold inbox slots while others wait without giving one back."""

SLOWEST_LINE_BITS_S = 10e6
"""The slowest aggregator line the hold limit allows for: with every slot busy, each chunk
moves at this line's rate over the number of slots, so the limit is at least the time the
whole pool takes to drain at this rate (27 s for the default 32 MiB), or honest silos on
such a line would be given up."""


def hold_limit(pool_bytes: int) -> float:
    """How long a silo may hold slots of a `pool_bytes` pool while others wait, landing nothing."""
    return max(HOLD_LIMIT_S, pool_bytes * 8 / SLOWEST_LINE_BITS_S)

Consume = Callable[[int, torch.Tensor], None]
"""(offset, the verified chunk's bytes): fold them before returning; the slot is reused after."""


class Slot:
    """One chunk-sized buffer, lent to one chunk at a time: the `number`-th of its pool's."""

    def __init__(self, buffer: torch.Tensor, number: int) -> None:
        self.buffer = buffer
        self.number = number

    def view(self, length: int) -> memoryview:
        """Where a reader receives a chunk of `length` bytes."""
        if not 0 < length <= self.buffer.numel():
            raise TransferError(f"a {length}-byte chunk does not fit a {self.buffer.numel()}-byte slot")
        return memoryview(self.buffer.numpy()).cast("B")[:length]


class SlotPool:
    """`count` slots of `size` bytes that every silo's uploads share.

    One buffer, allocated untouched: pages fault in as chunks land, so slots never used cost
    address space, not memory. One buffer so that it can be registered once (`register`),
    for a pull that READs into the slots. Slots are lent by the rule in the module docstring.
    """

    def __init__(self, count: int, size: int) -> None:
        if count < 1 or size < 1:
            raise ValueError(f"a bounded inbox needs at least one slot of at least one byte, not {count} x {size}")
        self.size, self.count = size, count
        self.buffer = torch.empty(count * size, dtype=torch.uint8)
        self._free = deque(Slot(self.buffer[n * size : (n + 1) * size], n) for n in range(count))
        self._cond = threading.Condition()
        self._waiting: dict[int, float] = {}
        """id of a share that holds no slot -> when it last asked for one (time.monotonic)."""
        self._moved = time.monotonic()
        """When a slot last came back: a wait restarts on that, not on a fixed clock."""
        self.registration: Pool | None = None
        """The NIXL pool over `buffer`, once registered: where a pull's READs land."""

    def register(self, agent: Agent) -> Pool:
        """Register the slots once with `agent`, so that READs can land in them."""
        if self.registration is None:
            if self.buffer.numel() > chunks.REGISTRATION_SLICE:
                raise ValueError(f"{self.buffer.numel()} bytes of slots exceed one {chunks.REGISTRATION_SLICE}-byte "
                                 "registration slice, which a slot may not straddle; lower inbox_mb")
            self.registration = agent.register(self.buffer)
        return self.registration

    @property
    def moved(self) -> float:
        """When a slot last came back (time.monotonic)."""
        return self._moved

    @property
    def nbytes(self) -> int:
        """What the slots take once every one has held a chunk (memory accounting)."""
        return self.size * self.count

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def waiting(self) -> int:
        """Silos that hold no slot and asked for one within WAITING_TTL_S."""
        with self._cond:
            return self._others_waiting(None, time.monotonic())

    def share(self, cap: int, consume: Consume) -> Slots:
        """One receiver's use of the pool: at most `cap` slots at once, verified chunks to `consume`."""
        return Slots(self, min(cap, self.count), consume)

    def take(self, timeout: float, since: float, share: Slots | None = None) -> Slot:
        """A free slot, waiting while slots keep coming back; PeerLost once none came back for
        `timeout` (and the wait, begun at `since`, is that old): the pool is stuck."""
        with self._cond:
            while (slot := self._lend(share)) is None:
                self._cond.wait(WAIT_STEP_S)
                now = time.monotonic()
                if now - max(self._moved, since) > timeout:
                    raise PeerLost(f"no inbox slot came free within {timeout:.0f} s "
                                   f"(all {self.count} hold chunks not yet verified)") from None
            return slot

    def take_now(self, share: Slots | None = None) -> Slot | None:
        """A free slot if the rule lends one now, without waiting (an initiator's loop must not block)."""
        with self._cond:
            return self._lend(share)

    def give(self, slot: Slot, used: bool = True, share: Slots | None = None) -> None:
        """A slot back; `used` False for one taken and returned unused, which is no progress."""
        with self._cond:
            if used:
                self._moved = time.monotonic()
            if share is not None:
                share._held -= 1
                if used:
                    share._since = self._moved
            self._free.append(slot)
            self._cond.notify_all()

    def _lend(self, share: Slots | None) -> Slot | None:
        """Under the lock: a slot for `share` (None: a caller outside any share) if the rule allows."""
        now = time.monotonic()
        holds = share is not None and share._held > 0
        if self._free and (not holds or len(self._free) > self._others_waiting(share, now)):
            if share is not None:
                self._waiting.pop(id(share), None)
                if share._held == 0:
                    share._since = now  # its hold begins
                share._held += 1
            return self._free.popleft()
        if share is not None and not holds:
            self._waiting[id(share)] = now  # it holds none: the next slot back is kept for it
        return None

    def _others_waiting(self, share: Slots | None, now: float) -> int:
        for key in [k for k, asked in self._waiting.items() if now - asked > WAITING_TTL_S]:
            del self._waiting[key]
        return sum(1 for key in self._waiting if share is None or key != id(share))


class Slots:
    """One receiver's share of a SlotPool: at most `cap` slots, and what to do with each verified chunk."""

    def __init__(self, pool: SlotPool, cap: int, consume: Consume) -> None:
        if cap < 1:
            raise ValueError(f"a receiver needs at least one slot, not {cap}")
        self.pool, self.cap, self.consume = pool, cap, consume
        self.size = pool.size
        self._share = threading.BoundedSemaphore(cap)
        self._held = 0
        """Slots this share holds; changed under the pool's lock."""
        self._since = time.monotonic()
        """When its hold began or last gave a slot back: the hold limit counts from there."""

    @classmethod
    def own(cls, count: int, size: int, consume: Consume) -> Slots:
        """`count` slots of a pool of its own (a receiver that shares with no one)."""
        return SlotPool(count, size).share(count, consume)

    @property
    def held(self) -> int:
        """Slots this receiver holds now (0 between transfers, once every chunk was folded or dropped)."""
        return self._held

    def stalled(self) -> str | None:
        """Why this receiver is to be given up, if it held slots for `hold_limit` while other
        receivers waited, without giving one back (None: it is not)."""
        now, limit = time.monotonic(), hold_limit(self.pool.nbytes)
        if self._held == 0 or now - self._since <= limit:
            return None  # asked every turn of a transfer's loop: the pool's lock only past these
        with self.pool._cond:
            if self._held == 0 or now - self._since <= limit or not self.pool._others_waiting(self, now):
                return None
            return (f"held {self._held} inbox slot(s) for {now - self._since:.0f} s without landing a chunk while "
                    f"other silos waited (the limit is {limit:.0f} s)")

    def take(self, timeout: float) -> Slot:
        """A slot for the next chunk: first this receiver's share, then the pool's; waits as
        long as slots keep coming back (PeerLost after `timeout` without any)."""
        since = time.monotonic()
        while not self._share.acquire(timeout=WAIT_STEP_S):
            if time.monotonic() - since > timeout:
                raise PeerLost(f"none of this peer's {self.cap} inbox slots came free within {timeout:.0f} s")
        try:
            return self.pool.take(timeout, since, self)
        except BaseException:
            self._share.release()
            raise

    def take_now(self) -> Slot | None:
        """A slot within this receiver's share if the pool lends one now; None without waiting."""
        if not self._share.acquire(blocking=False):
            return None
        slot = self.pool.take_now(self)
        if slot is None:
            self._share.release()
        return slot

    def give(self, slot: Slot, used: bool = True) -> None:
        """A slot back, its chunk folded or dropped (`used` False: taken and never lent)."""
        self.pool.give(slot, used, self)
        self._share.release()

    def fold(self, offset: int, slot: Slot, length: int) -> None:
        """Hand a verified chunk's bytes to `consume`; the caller gives the slot back after."""
        self.consume(offset, slot.buffer[:length])
