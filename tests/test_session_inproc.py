"""Sessions in one process: two agents, a real gRPC channel over loopback, real NIXL transfers.

Every process here is the test's own, so one-sided sessions run as a trusted fabric.

The process tests (test_transfer_procs.py) show each mode between processes; these pin
the session's and the movers' rules quickly, with every peer in reach of an assert.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pytest

from fedrdma.bench.states import make_state, synthetic_layout
from fedrdma.core import chunks, liveness
from fedrdma.core.chunks import state_digest
from fedrdma.core.errors import LayoutError, PeerLost, ProtocolError, TransferError
from fedrdma.core.layout import FlatState
from fedrdma.core.modes import Mode, Role
from fedrdma.testing.faults import Faults, FaultyAgent
from fedrdma.transport import wire
from fedrdma.transport.agent import Agent
from fedrdma.transport.channel import Channel, Listener, dial
from fedrdma.transport.movers import push
from fedrdma.transport.session import Session
from fedrdma.transport.slots import SlotPool, Slots
from fedrdma.transport.streams import DataListener
from tests.test_tcpe import Folded

SIZE, CHUNK, WINDOW = 6 << 20, 1 << 20, 4
THREAD_TIMEOUT_S = 60.0
"""Bounds a hang; these transfers take milliseconds."""


@pytest.fixture(autouse=True)
def _ucx_over_tcp(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")


def states(size: int = SIZE) -> tuple[FlatState, FlatState]:
    layout = synthetic_layout(size)
    return make_state(layout, 1234), make_state(layout, None)


def pair(
    mode: Mode, src: FlatState, dst: FlatState, transfers: int = 1,
    sender_agent: Agent | None = None, receiver_agent: Agent | None = None, **receiver_kw: Any,
) -> tuple[list, list, list[BaseException]]:
    """Run a sender and a receiver session on two threads; return both sides' stats and errors."""
    listener = Listener()
    sent: list = []
    got: list = []
    errors: list[BaseException] = []
    needs = mode.one_sided

    streams = DataListener() if mode is Mode.TCP_E else None

    def receiver() -> None:
        s = None
        try:
            agent = receiver_agent or (Agent() if needs else None)
            s = Session(agent, dst, listener.accept(10), mode, Role.RECEIVER, CHUNK, WINDOW, streams=streams,
                        trusted_fabric=True, **receiver_kw)
            s.open()
            for _ in range(transfers):
                got.append(s.receive())
            s.close()
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)
            if s is not None:
                s.abort()  # as a real receiver does: the peer learns at once

    thread = threading.Thread(target=receiver)
    thread.start()
    try:
        agent = sender_agent or (Agent() if needs else None)
        s = Session(agent, src, dial(listener.address), mode, Role.SENDER, CHUNK, WINDOW, trusted_fabric=True)
        s.open()
        for _ in range(transfers):
            sent.append(s.send())
        s.close()
    except BaseException as exc:
        errors.append(exc)
    finally:
        thread.join(THREAD_TIMEOUT_S)
        listener.close()
        if streams is not None:
            streams.close()
    return sent, got, errors


@pytest.mark.parametrize("mode", list(Mode))
def test_every_mode_moves_identical_bytes_and_reports_every_chunk_once(mode):
    src, dst = states()
    seen: list[tuple[int, int]] = []
    sent, got, errors = pair(mode, src, dst, transfers=2, on_chunk=lambda off, n: seen.append((off, n)))
    assert errors == []
    assert state_digest(dst.memoryview()) == state_digest(src.memoryview())
    assert [s.transfer for s in got] == [1, 2] and [s.mode for s in got] == [mode, mode]
    assert sorted(seen) == sorted(seen[: len(seen) // 2] * 2), "each transfer reports the same ranges"
    covered = sorted(seen[: len(seen) // 2])
    assert sum(n for _, n in covered) == SIZE and all(a + n <= b for (a, n), (b, _) in zip(covered, covered[1:]))


@pytest.mark.parametrize("mode", list(Mode))
def test_a_finished_session_holds_no_state_for_the_collector_to_free(mode):
    """A node lands each round's delivery in a fresh mapped inbox and keeps running: a
    reference cycle through a session would keep every inbox mapped until the collector
    happened to run (tcp-e's mover and its links once held each other)."""
    src, dst = states()
    held = weakref.ref(dst)
    gc.collect()
    gc.disable()
    try:
        sent, got, errors = pair(mode, src, dst)
        assert errors == [] and len(got) == 1
        del dst, sent, got
        assert held() is None, "the received state outlived its session: a cycle holds it"
    finally:
        gc.enable()


@pytest.mark.parametrize("mode", [Mode.RDMA_E, Mode.RDMA_E_PULL, Mode.RDMA])
def test_a_state_registered_in_several_slices_moves_bit_identical(mode, monkeypatch):
    """States above 4 GiB are registered in slices; lowered to 2 MiB, a 6 MiB state spans three."""
    monkeypatch.setattr(chunks, "REGISTRATION_SLICE", 2 << 20)
    assert len(chunks.registration_slices(SIZE)) == 3
    src, dst = states()
    sent, got, errors = pair(mode, src, dst, transfers=2)
    assert errors == []
    assert state_digest(dst.memoryview()) == state_digest(src.memoryview())
    assert [s.nbytes for s in got] == [SIZE, SIZE]


@pytest.mark.parametrize("op", ["WRITE", "READ"])
def test_the_raw_reference_moves_a_multi_slice_pool_in_one_request(op, monkeypatch):
    monkeypatch.setattr(chunks, "REGISTRATION_SLICE", 2 << 20)
    src, dst = states()
    near, far = (src, dst) if op == "WRITE" else (dst, src)
    initiator, target = Agent(), Agent()
    try:
        local, remote = initiator.register(near.buffer), target.register(far.buffer)
        peer = initiator.add_peer(target.metadata())
        operation = initiator.post_whole(op, local.region, remote.region, peer)
        deadline = time.monotonic() + THREAD_TIMEOUT_S
        while (status := operation.state()) == "PROC" and time.monotonic() < deadline:
            target.progress()
        operation.release()
        assert status == "DONE", operation.error
        assert state_digest(dst.memoryview()) == state_digest(src.memoryview())
    finally:
        initiator.close()
        target.close()


def test_a_layout_mismatch_is_refused_on_both_sides_before_a_byte_moves():
    src, _ = states()
    dst = make_state(synthetic_layout(SIZE + 4096), None)
    sent, got, errors = pair(Mode.RDMA_E, src, dst)
    assert sent == [] and got == []
    assert len(errors) == 2 and all(isinstance(e, LayoutError) for e in errors)
    assert all("layout mismatch" in str(e) for e in errors)
    assert state_digest(dst.memoryview()) == state_digest(make_state(dst.layout, None).memoryview())


@pytest.mark.parametrize("mode", [Mode.RDMA_E, Mode.RDMA_E_PULL, Mode.RDMA])
def test_corrupt_landings_are_fetched_again_and_the_result_is_identical(mode):
    src, dst = states()
    faulty = FaultyAgent(Faults(corrupt_once=frozenset({1, 4})), CHUNK)
    initiator_is_receiver = mode.initiator is Role.RECEIVER
    sent, got, errors = pair(mode, src, dst, receiver_agent=faulty)
    assert errors == []
    assert state_digest(dst.memoryview()) == state_digest(src.memoryview())
    assert got[0].corrupt == 2
    initiator = got[0] if initiator_is_receiver else sent[0]
    assert initiator.bytes_posted == SIZE + 2 * CHUNK


@pytest.mark.parametrize("mode", [Mode.RDMA_E, Mode.RDMA_E_PULL])
def test_a_cut_endpoint_reconnects_and_resends_only_unverified_chunks(mode):
    size = 16 << 20
    src, dst = states(size)
    cutter = FaultyAgent(Faults(cut_after=5), CHUNK)
    kw = {"receiver_agent": cutter} if mode.initiator is Role.RECEIVER else {"sender_agent": cutter}
    sent, got, errors = pair(mode, src, dst, **kw)
    assert errors == []
    assert state_digest(dst.memoryview()) == state_digest(src.memoryview())
    initiator = got[0] if mode.initiator is Role.RECEIVER else sent[0]
    assert initiator.reconnects >= 1
    assert 0 < initiator.bytes_posted - size < size


def test_a_receiver_whose_sender_falls_silent_mid_transfer_gives_up_within_its_deadline():
    src, dst = states()
    listener = Listener()
    result: dict[str, Any] = {}

    def receiver() -> None:
        s = Session(Agent(), dst, listener.accept(10), Mode.RDMA_E, Role.RECEIVER, CHUNK, WINDOW, peer_timeout=1.0,
                    trusted_fabric=True)
        s.open()
        started = time.monotonic()
        try:
            s.receive()
        except PeerLost as exc:
            result["error"], result["after"] = exc, time.monotonic() - started
        s.abort()

    thread = threading.Thread(target=receiver)
    thread.start()
    channel = dial(listener.address)  # a sender that says hello and Begin, then nothing
    channel.send(wire.Hello(mode=Mode.RDMA_E, layout_id=src.layout_id, nbytes=src.nbytes))
    channel.send(wire.Begin(transfer=1, chunk_size=CHUNK, nchunks=SIZE // CHUNK))
    thread.join(THREAD_TIMEOUT_S)
    channel.close()
    listener.close()
    assert "went silent for 1 s during transfer 1 (0/6 chunks verified)" in str(result["error"])
    assert result["after"] < 5.0


def test_a_pull_holder_waits_as_long_as_the_receiver_reports_progress():
    """A pull upload longer than the peer timeout completes: the receiver's statuses keep the holder."""
    src, _ = states()
    listener = Listener()
    out: dict[str, Any] = {}

    def holder() -> None:
        s = Session(Agent(), src, listener.accept(10), Mode.RDMA_E_PULL, Role.SENDER, CHUNK, WINDOW, peer_timeout=1.0,
                    trusted_fabric=True)
        s.open()
        out["stats"] = s.send()
        s.abort()

    thread = threading.Thread(target=holder)
    thread.start()
    channel = dial(listener.address)  # a receiver that reports progress every 0.4 s for 3 s
    channel.send(wire.Hello(mode=Mode.RDMA_E_PULL, layout_id=src.layout_id, nbytes=src.nbytes))
    assert isinstance(channel.recv(10), wire.Hello)
    offer = channel.recv(10)
    assert isinstance(offer, wire.Offer) and offer.nchunks == SIZE // CHUNK
    for k in range(7):
        time.sleep(0.4)
        channel.send(wire.Status(transfer=offer.transfer, verified=[k % offer.nchunks]))
    channel.send(wire.Status(transfer=offer.transfer, complete=True, bytes_posted=SIZE))
    thread.join(THREAD_TIMEOUT_S)
    channel.close()
    listener.close()
    assert out["stats"].seconds > 2.5 and out["stats"].bytes_posted == SIZE


@pytest.mark.parametrize("bytes_per_s,completes", [(SIZE / 5, True), (SIZE * 4, False)])
def test_a_baseline_sender_waits_for_the_load_as_long_as_the_state_size_allows(bytes_per_s, completes, monkeypatch):
    """The baseline's receiver says nothing while it joins and loads the whole state: the sender's
    wait for its status is the peer timeout plus what the state's size allows, not the timeout alone."""
    monkeypatch.setattr(liveness, "SLOW_HOST_BYTES_PER_S", bytes_per_s)  # allows 5 s, or 0.25 s
    src, _ = states()
    listener = Listener()
    out: dict[str, Any] = {}

    def sender() -> None:
        s = Session(None, src, listener.accept(10), Mode.GRPC, Role.SENDER, CHUNK, WINDOW, peer_timeout=1.0)
        s.open()
        out["result"] = _call(s.send)
        s.abort()

    thread = threading.Thread(target=sender)
    thread.start()
    channel = dial(listener.address)  # a receiver that takes 2.5 s to load what arrived
    channel.send(wire.Hello(mode=Mode.GRPC, layout_id=src.layout_id, nbytes=src.nbytes))
    assert isinstance(channel.recv(10), wire.Hello)
    begin = channel.recv(10)
    assert isinstance(begin, wire.Begin)
    frames = [channel.recv(10) for _ in range(begin.nchunks)]
    assert sum(len(f) for f in frames) > SIZE
    time.sleep(2.5)
    _call(lambda: channel.send(wire.Status(transfer=begin.transfer, complete=True)))  # a sender that gave up is gone
    thread.join(THREAD_TIMEOUT_S)
    channel.close()
    listener.close()
    if completes:
        assert out["result"] is None
    else:
        assert isinstance(out["result"], PeerLost) and "no Status within 1 s" in str(out["result"])


def _call(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


def test_only_the_side_that_owns_a_choice_may_make_it():
    src, dst = states()
    receiver = Session(None, dst, _closed(), Mode.GRPC, Role.RECEIVER)
    assert "only a pushing sender sets the chunk size" in str(_call(lambda: receiver.retune(CHUNK, 2)))
    assert "only the initiating sender can switch buffers" in str(_call(lambda: receiver.rebind(src, None)))
    assert isinstance(_call(receiver.send), TransferError)
    assert "open() the session before moving bytes" in str(_call(receiver.receive))
    with pytest.raises(ValueError, match="mode rdma-e needs a NIXL agent"):
        Session(None, dst, _closed(), Mode.RDMA_E, Role.RECEIVER)


def _closed() -> Channel:
    channel = Channel("nobody")
    channel.close()
    return channel


def slotted(agent: Agent | None, count: int, nbytes: int) -> Slots:
    """A receiver's bounded inbox: `count` slots of a pool of its own, registered with `agent`
    for a pull's READs (a push lands in granted slots of its own and is copied into these)."""
    pool = SlotPool(count, CHUNK)
    if agent is not None:
        pool.register(agent)
    return pool.share(count, Folded(nbytes))


def assert_folded_once(slots: Slots, src: FlatState, dst: FlatState, transfers: int = 1) -> None:
    """Every chunk folded once per transfer from the slots, bytes identical, the state never
    written, and every slot back in the pool."""
    folded = slots.consume
    assert isinstance(folded, Folded)
    assert state_digest(memoryview(folded.bytes.numpy())) == state_digest(src.memoryview())
    assert sorted(folded.offsets) == sorted(list(range(0, src.nbytes, CHUNK)) * transfers)
    assert bool((dst.buffer == 0).all()), "a bounded inbox's chunks landed in the session's state"
    assert slots.held == 0 and slots.pool.free == slots.pool.count, "a slot was not given back"


BOUNDED = [Mode.RDMA_E_PULL, Mode.RDMA_E]
"""The one-sided modes with a bounded inbox: a pull READs into the slots, a push WRITEs into
granted landing slots."""


def bounded_pair(mode: Mode, src: FlatState, dst: FlatState, count: int, faults: Faults | None = None,
                 transfers: int = 1) -> tuple[Slots, Any, list[BaseException]]:
    """A transfer into `count` inbox slots; `faults` on the initiator's agent (a cut endpoint)
    or, for corruption, on the side where chunks land. (slots, the initiator's stats, errors)."""
    pull = mode is Mode.RDMA_E_PULL
    faulty = FaultyAgent(faults, CHUNK) if faults is not None else None
    receiver_agent = faulty if faulty is not None and (pull or faults.corrupt_once) else Agent()
    sender_agent = faulty if faulty is not None and not pull and faults.cut_after is not None else None
    slots = slotted(receiver_agent if pull else None, count, src.nbytes)
    sent, got, errors = pair(mode, src, dst, transfers, sender_agent, receiver_agent, slots=slots)
    stats = got if pull else sent
    return slots, stats[0] if stats else None, errors


@pytest.mark.parametrize("mode", BOUNDED)
def test_a_bounded_inbox_lands_in_fewer_slots_than_its_window_and_folds_every_chunk_once(mode):
    src, dst = states()
    slots, first, errors = bounded_pair(mode, src, dst, WINDOW - 1, transfers=2)
    assert errors == []
    assert first.bytes_posted == SIZE
    assert_folded_once(slots, src, dst, transfers=2)


@pytest.mark.parametrize("mode", BOUNDED)
def test_a_corrupt_landing_in_a_slot_is_fetched_again_and_folded_once(mode):
    src, dst = states()
    slots, first, errors = bounded_pair(mode, src, dst, WINDOW, Faults(corrupt_once=frozenset({1, 4}), slots=True))
    assert errors == []
    assert first.bytes_posted == SIZE + 2 * CHUNK
    assert_folded_once(slots, src, dst)


@pytest.mark.parametrize("mode", BOUNDED)
def test_a_cut_endpoint_under_a_bounded_inbox_resumes_and_gives_every_slot_back(mode):
    size = 16 << 20
    src, dst = states(size)
    slots, first, errors = bounded_pair(mode, src, dst, WINDOW + 2, Faults(cut_after=5))
    assert errors == []
    assert first.reconnects >= 1 and 0 < first.bytes_posted - size < size
    assert_folded_once(slots, src, dst)


@pytest.mark.parametrize("mode", BOUNDED)
def test_a_bounded_inbox_without_verification_still_folds_every_chunk_once(mode):
    """`verify = fabric` into slots: a push's chunk is copied out of its landing slot at its
    notice (no hash job to copy it), and the landing slot comes back all the same."""
    src, dst = states()
    agent = Agent() if mode is Mode.RDMA_E_PULL else None  # a pull READs into its slots
    slots = slotted(agent, WINDOW - 1, SIZE)
    sent, got, errors = pair(mode, src, dst, 2, receiver_agent=agent, slots=slots, verify=False)
    assert errors == []
    assert_folded_once(slots, src, dst, transfers=2)


@pytest.mark.parametrize("lie,refusal", [
    ("slot", f"landing slot {WINDOW + 2 + 1}, outside the {WINDOW + 2}"),  # past the slots it was granted
    ("index", f"chunk {SIZE // CHUNK + 3}, outside the plan"),  # a chunk the plan does not have
])
def test_a_pushing_peer_whose_notices_lie_is_refused_and_nothing_is_folded(monkeypatch, lie, refusal):
    """The attacker's side: its notices name a landing slot past the ones it was granted, or a
    chunk past the plan."""
    def lying(self: push.GrantFollower, index: int, generation: int) -> bytes:
        slot = self._slot_of[index] if lie == "index" else self.count + 1
        told = SIZE // CHUNK + 3 if lie == "index" else index
        return wire.chunk_notice(self.transfer, generation, told, self.checksum(index), slot)

    monkeypatch.setattr(push.GrantFollower, "_notice", lying)
    src, dst = states()
    slots = slotted(None, WINDOW, SIZE)
    sent, got, errors = pair(Mode.RDMA_E, src, dst, slots=slots)
    assert any(isinstance(e, ProtocolError) and refusal in str(e) for e in errors), errors
    assert got == [] and slots.consume.offsets == []  # type: ignore[attr-defined]
    assert slots.pool.free == slots.pool.count


def test_a_pulls_slots_must_be_registered_with_its_agent():
    _, dst = states()
    listener = Listener()
    try:
        with pytest.raises(TransferError, match="must be registered with the session's agent"):
            Session(Agent(), dst, dial(listener.address), Mode.RDMA_E_PULL, Role.RECEIVER, CHUNK, WINDOW,
                    slots=SlotPool(2, CHUNK).share(2, Folded(SIZE)), trusted_fabric=True)
    finally:
        listener.close()


@pytest.mark.parametrize("mode", [Mode.RDMA_E, Mode.RDMA_E_PULL])
def test_without_verification_bytes_move_unhashed_and_a_corrupt_landing_goes_unseen(mode):
    """What `verify = fabric` gives up, shown: only a fabric whose CRC checks every packet may use it."""
    src, dst = states()
    sent, got, errors = pair(mode, src, dst, verify=False)
    assert errors == [] and state_digest(dst.memoryview()) == state_digest(src.memoryview())
    src, dst = states()
    faulty = FaultyAgent(Faults(corrupt_once=frozenset({1})), CHUNK)  # flips chunk 1 where it lands
    sent, got, errors = pair(mode, src, dst, receiver_agent=faulty, verify=False)
    assert errors == [] and got[0].corrupt == 0
    assert state_digest(dst.memoryview()) != state_digest(src.memoryview()), "the flipped byte was folded unseen"
