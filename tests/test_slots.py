"""A bounded inbox's slots: one pool shared by every silo, each silo capped at its share."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fedrdma.core.errors import PeerLost, TransferError
from fedrdma.transport.slots import SlotPool, Slots

SIZE = 64


def test_a_silo_at_its_cap_waits_while_another_still_gets_a_slot():
    pool = SlotPool(3, SIZE)
    stalled, other = pool.share(2, lambda off, data: None), pool.share(2, lambda off, data: None)
    held = [stalled.take(1.0), stalled.take(1.0)]  # a silo stuck mid-chunk on both
    with pytest.raises(PeerLost, match="none of this peer's 2 inbox slots came free"):
        stalled.take(0.6)
    slot = other.take(0.6)  # the stalled silo cannot starve the others beyond its cap
    assert (stalled.held, other.held, pool.free) == (2, 1, 0)
    for s in held:
        stalled.give(s)
    other.give(slot)
    assert (stalled.held, other.held, pool.free) == (0, 0, 3)


def test_a_reader_waits_for_a_slot_another_silo_gives_back():
    pool = SlotPool(1, SIZE)
    first, second = pool.share(1, lambda off, data: None), pool.share(1, lambda off, data: None)
    slot = first.take(1.0)
    threading.Timer(0.3, first.give, args=(slot,)).start()
    start = time.monotonic()
    again = second.take(5.0)  # back-pressure: it waits for the pool, and gets the same memory
    assert again.buffer.data_ptr() == slot.buffer.data_ptr() and time.monotonic() - start >= 0.25
    with pytest.raises(PeerLost, match="no inbox slot came free within 1 s"):
        first.take(1.0)  # the pool's one slot is held and nothing comes back


def test_a_verified_chunk_is_handed_on_from_its_slot_and_a_chunk_too_big_is_refused():
    seen: list[tuple[int, bytes]] = []
    slots = Slots.own(1, SIZE, lambda off, data: seen.append((off, bytes(data.numpy()))))
    slot = slots.take(1.0)
    slot.view(5)[:] = b"hello"
    slots.fold(4096, slot, 5)
    assert seen == [(4096, b"hello")]
    with pytest.raises(TransferError, match="a 65-byte chunk does not fit a 64-byte slot"):
        slot.view(SIZE + 1)
    assert isinstance(slot.buffer, torch.Tensor) and slot.buffer.numel() == SIZE


def test_a_pull_that_waits_on_slots_others_give_back_is_alive_and_one_on_a_stuck_pool_is_lost():
    """Plain calls into a pull's side of the loop, with `now` injected: another silo holds the
    only slot; while it gives slots back the wait is progress, once it stops the peer is lost."""
    from fedrdma.core.chunks import ChunkPlan
    from fedrdma.core.receiver import Receiver
    from fedrdma.core.scheduler import Scheduler
    from fedrdma.transport.movers.pull import Pulling

    pool = SlotPool(1, SIZE)
    plan = ChunkPlan.build(4 * SIZE, SIZE)
    receiver = Receiver(plan, 1, 0.0, peer_timeout=1.0, status_interval_s=100.0)
    pulling = Pulling(None, receiver, pool.share(2, lambda off, data: None))  # type: ignore[arg-type]
    sched = Scheduler(plan, 2)
    other = pool.take(1.0, time.monotonic())
    try:
        assert pulling.room(sched) == 0 and sched.poll(0.0, 0) == []
        assert pulling.each_turn(sched, 0.5) is False, "nothing moved: no progress"
        time.sleep(0.01)
        pool.give(other)  # the other silo folded a chunk and took the slot again at once
        other = pool.take(1.0, time.monotonic())
        assert pulling.each_turn(sched, 0.9) is True
        assert pulling.each_turn(sched, 1.5) is False, "heard at 0.9: alive until 1.9"
        with pytest.raises(PeerLost, match="went silent for 1 s"):
            pulling.each_turn(sched, 2.0)
    finally:
        pool.give(other)
        pulling.close()
    assert pool.free == 1
