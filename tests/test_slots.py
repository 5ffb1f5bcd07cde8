"""A bounded inbox's slots: one pool shared by every silo, each silo capped at its share, a
silo that waits holding none served before one that holds some."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fedrdma.core.errors import PeerLost, TransferError
from fedrdma.transport import slots as slots_module
from fedrdma.transport.slots import Slot, SlotPool, Slots

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


def test_a_silo_that_holds_slots_gets_none_more_while_another_waits_holding_none():
    """The trickle's side: it took every slot while nobody waited; once another silo waits,
    the slots it gives back go to that silo, not to it."""
    pool = SlotPool(3, SIZE)
    trickle, honest = pool.share(3, lambda off, data: None), pool.share(3, lambda off, data: None)
    held = [trickle.take_now() for _ in range(3)]
    assert None not in held and honest.take_now() is None  # it now waits, holding none
    assert pool.waiting == 1
    trickle.give(held.pop())
    assert trickle.take_now() is None, "a slot went back to the silo that holds two while another waits"
    slot = honest.take_now()
    assert slot is not None and pool.waiting == 0
    trickle.give(held.pop())
    again = trickle.take_now()  # nobody waits now: a free slot is anyone's
    assert again is not None
    for s in (*held, again):
        trickle.give(s)
    honest.give(slot)
    assert (trickle.held, honest.held, pool.free) == (0, 0, 3)


def test_a_blocked_reader_holding_none_gets_the_next_slot_back_before_a_holder_does():
    pool = SlotPool(2, SIZE)
    trickle, honest = pool.share(2, lambda off, data: None), pool.share(2, lambda off, data: None)
    held = [trickle.take(1.0), trickle.take(1.0)]
    got: list[Slot] = []
    reader = threading.Thread(target=lambda: got.append(honest.take(5.0)))
    reader.start()
    deadline = time.monotonic() + 5.0
    while pool.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    trickle.give(held.pop())
    assert trickle.take_now() is None  # whether or not the reader has woken yet, the slot is kept for it
    reader.join(5.0)
    assert len(got) == 1 and (trickle.held, honest.held) == (1, 1)


def test_a_silo_that_stopped_asking_stops_holding_a_slot_back(monkeypatch):
    monkeypatch.setattr(slots_module, "WAITING_TTL_S", 0.05)
    pool = SlotPool(2, SIZE)
    busy, gone = pool.share(2, lambda off, data: None), pool.share(2, lambda off, data: None)
    first = busy.take_now()
    second = busy.take_now()
    assert gone.take_now() is None and pool.waiting == 1  # then its transfer ends
    busy.give(second)
    time.sleep(0.1)
    assert pool.waiting == 0
    third = busy.take_now()
    assert third is not None, "a silo no longer asking still held a slot back"
    for slot in (first, third):
        busy.give(slot)  # type: ignore[arg-type]


def test_a_silo_that_holds_slots_while_others_wait_and_lands_nothing_is_given_up(monkeypatch):
    monkeypatch.setattr(slots_module, "hold_limit", lambda nbytes: 0.1)
    pool = SlotPool(2, SIZE)
    trickle, honest = pool.share(2, lambda off, data: None), pool.share(2, lambda off, data: None)
    held = [trickle.take_now(), trickle.take_now()]
    time.sleep(0.15)
    assert trickle.stalled() is None, "a silo alone may be as slow as its line"
    assert honest.take_now() is None  # now another waits
    assert "held 2 inbox slot(s)" in (trickle.stalled() or "")
    trickle.give(held.pop())  # it landed a chunk: its clock starts again
    assert trickle.stalled() is None
    assert honest.take_now() is not None


def test_a_pull_that_holds_slots_others_wait_for_and_reads_nothing_is_lost(monkeypatch):
    """Plain calls into a pull's side of the loop: its READ's slot is held, another silo waits,
    and the turn after the hold limit gives the pull up."""
    from fedrdma.core.chunks import ChunkPlan
    from fedrdma.core.receiver import Receiver
    from fedrdma.core.scheduler import Scheduler
    from fedrdma.transport.movers.pull import Pulling

    monkeypatch.setattr(slots_module, "hold_limit", lambda nbytes: 0.1)
    pool = SlotPool(1, SIZE)
    share = pool.share(2, lambda off, data: None)
    plan = ChunkPlan.build(4 * SIZE, SIZE)
    pulling = Pulling(None, Receiver(plan, 1, 0.0, status_interval_s=100.0), share)  # type: ignore[arg-type]
    sched = Scheduler(plan, 2)
    reading = share.take_now()  # a READ in flight that the holder serves slowly
    other = pool.share(1, lambda off, data: None)
    assert other.take_now() is None
    pulling.each_turn(sched, 0.0)  # within the limit
    time.sleep(0.15)
    other.take_now()  # it keeps asking
    with pytest.raises(PeerLost, match="without landing a chunk while other silos waited"):
        pulling.each_turn(sched, 0.2)
    share.give(reading)  # type: ignore[arg-type]


def test_the_hold_limit_is_what_the_pool_takes_to_drain_at_the_slowest_line_and_never_under_its_floor():
    assert slots_module.hold_limit(32 << 20) == pytest.approx((32 << 20) * 8 / 10e6)  # about 27 s
    assert slots_module.hold_limit(1 << 20) == slots_module.HOLD_LIMIT_S
