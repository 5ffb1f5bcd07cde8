"""tcp-e: sealed chunks over TCP, landed in place by the receiver's own code. Real sockets, real ciphers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from fedrdma.bench.states import make_state, synthetic_layout
from fedrdma.core.chunks import state_digest
from fedrdma.core.errors import TransferError
from fedrdma.core.layout import FlatState
from fedrdma.core.modes import Mode, Role
from fedrdma.testing.faults import FaultyStreams
from fedrdma.transport import wire
from fedrdma.transport.channel import Listener, dial
from fedrdma.transport.seal import PIECE_BYTES, Header, Sealer, new_key
from fedrdma.transport.session import Session
from fedrdma.transport.slots import Slots
from fedrdma.transport.streams import DataListener
from fedrdma.transport.streams import dial as dial_data

SIZE, CHUNK, WINDOW = 8 << 20, 1 << 20, 4
THREAD_TIMEOUT_S = 60.0


class Folded:
    """A bounded inbox's consumer that rebuilds the state from its slots, to compare bytes."""

    def __init__(self, nbytes: int) -> None:
        self.bytes = torch.zeros(nbytes, dtype=torch.uint8)
        self.offsets: list[int] = []

    def __call__(self, offset: int, data: torch.Tensor) -> None:
        self.bytes[offset : offset + data.numel()].copy_(data)
        self.offsets.append(offset)


def _run(streams: DataListener, size: int = SIZE, slots: Slots | None = None):
    """One tcp-e transfer between two threads: (sent, got, errors, src, dst)."""
    layout = synthetic_layout(size)
    src, dst = make_state(layout, 1234), make_state(layout, None)
    listener = Listener()
    out: dict[str, Any] = {}
    errors: list[BaseException] = []

    def receiver() -> None:
        try:
            s = Session(None, dst, listener.accept(10), Mode.TCP_E, Role.RECEIVER, CHUNK, WINDOW, streams=streams,
                        slots=slots)
            s.open()
            out["got"] = s.receive()
            s.close()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=receiver)
    thread.start()
    try:
        s = Session(None, src, dial(listener.address), Mode.TCP_E, Role.SENDER, CHUNK, WINDOW)
        s.open()
        out["sent"] = s.send()
        s.close()
    except BaseException as exc:
        errors.append(exc)
    finally:
        thread.join(THREAD_TIMEOUT_S)
        listener.close()
        streams.close()
    return out.get("sent"), out.get("got"), errors, src, dst


def _landed(dst: FlatState, slots: Slots | None) -> bytes:
    """The digest of what the receiver holds: its state, or what its slots handed on (then
    its state must be untouched, every chunk folded once and every slot back)."""
    if slots is None:
        return state_digest(dst.memoryview())
    folded = slots.consume
    assert isinstance(folded, Folded)
    assert bool((dst.buffer == 0).all()), "a bounded inbox wrote into the session's state"
    assert slots.held == 0 and slots.pool.free == 2, "a slot was not given back"
    assert sorted(folded.offsets) == list(range(0, dst.nbytes, CHUNK)), "each chunk is folded exactly once"
    return state_digest(memoryview(folded.bytes.numpy()))


def _slots(size: int, bounded: bool) -> Slots | None:
    return Slots.own(2, CHUNK, Folded(size)) if bounded else None


@pytest.mark.parametrize("bounded", [False, True], ids=["in-place", "slots"])
def test_a_byte_flipped_on_the_line_fails_its_chunk_which_comes_again_intact(bounded):
    slots = _slots(SIZE, bounded)
    sent, got, errors, src, dst = _run(FaultyStreams(flip_after=1000), SIZE, slots)
    assert errors == []
    assert _landed(dst, slots) == state_digest(src.memoryview())
    assert got.corrupt == 1
    assert sent.bytes_posted == SIZE + CHUNK, "only the chunk whose tag failed went twice"


@pytest.mark.parametrize("bounded", [False, True], ids=["in-place", "slots"])
def test_a_connection_cut_mid_transfer_is_replaced_and_the_transfer_resumes(bounded):
    size = 32 << 20
    slots = _slots(size, bounded)
    sent, got, errors, src, dst = _run(FaultyStreams(cut_after=2 * CHUNK), size, slots)
    assert errors == []
    assert _landed(dst, slots) == state_digest(src.memoryview())
    assert sent.reconnects >= 1
    assert 0 <= sent.bytes_posted - size < size, "verified chunks were not sent again"


class HostileSender:
    """A peer that passes the handshake, then sends data chunks of its own making."""

    def __init__(self, listener: Listener, layout_id: str, nbytes: int) -> None:
        self.channel = dial(listener.address)
        self.channel.send(wire.Hello(mode=Mode.TCP_E, layout_id=layout_id, nbytes=nbytes))
        hello = self.channel.recv(10)
        assert isinstance(hello, wire.Hello) and hello.data_port and hello.ticket
        self.socks = dial_data("127.0.0.1", hello.data_port, wire.unb64(hello.ticket), hello.data_streams)
        self.key = new_key()
        self.begin = wire.Begin(transfer=1, chunk_size=CHUNK, nchunks=SIZE // CHUNK, key=wire.b64(self.key))
        self.channel.send(self.begin)

    def send_chunk(self, header: Header, body: bytes) -> None:
        sealer = Sealer(self.key, header)
        out = memoryview(bytearray(len(body)))
        sealed = bytes(sealer.seal_into(memoryview(body), out))
        self.socks[0].sendall(header.pack() + sealed + sealer.tag())

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.channel.close()


@contextmanager
def facing_hostile(dst: FlatState, **session_kw: Any) -> Iterator[tuple[HostileSender, dict[str, Any]]]:
    """A tcp-e receiver of `dst` on its own thread, and the hostile sender it faces; what the
    receiver raised ends up in the dict's "error". The thread is joined before anything closes."""
    streams = DataListener()
    listener = Listener()
    result: dict[str, Any] = {}

    def receiver() -> None:
        s = Session(None, dst, listener.accept(10), Mode.TCP_E, Role.RECEIVER, CHUNK, WINDOW, streams=streams,
                    peer_timeout=2.0, **session_kw)
        s.open()
        try:
            s.receive()
        except Exception as exc:  # noqa: BLE001  (reported to the test, which names the kind it expects)
            result["error"] = exc
        s.abort()

    thread = threading.Thread(target=receiver)
    thread.start()
    hostile = HostileSender(listener, dst.layout_id, dst.nbytes)
    try:
        yield hostile, result
        thread.join(THREAD_TIMEOUT_S)
    finally:
        hostile.close()
        listener.close()
        streams.close()


@pytest.mark.parametrize("header,reason", [
    (Header(1, 0, SIZE // CHUNK, 1, CHUNK), "chunk 8, outside the plan of 8 chunks"),
    (Header(1, 0, 2, 1, CHUNK // 2), "announced 524288 bytes for chunk 2; the plan has 1048576"),
    (Header(1, 0, 7, 1, SIZE), "announced 8388608 bytes for chunk 7"),
    (Header(9, 0, 0, 1, CHUNK), "transfer 9 generation 0 arrived, but no such transfer was begun"),
])
def test_a_chunk_this_side_did_not_plan_is_refused_and_nothing_lands(header, reason):
    layout = synthetic_layout(SIZE)
    dst = make_state(layout, None)
    with facing_hostile(dst) as (hostile, result):
        hostile.send_chunk(header, b"\x42" * min(header.length, PIECE_BYTES))
    assert isinstance(result["error"], TransferError) and reason in str(result["error"]), result
    assert state_digest(dst.memoryview()) == state_digest(make_state(layout, None).memoryview()), "nothing landed"


@pytest.mark.parametrize("bounded", [False, True], ids=["in-place", "slots"])
def test_a_chunk_sealed_with_another_key_never_counts(bounded):
    dst = make_state(synthetic_layout(SIZE), None)
    seen: list[tuple[int, int]] = []
    slots = Slots.own(1, CHUNK, lambda off, data: seen.append((off, data.numel()))) if bounded else None
    with facing_hostile(dst, on_chunk=lambda off, n: seen.append((off, n)), slots=slots) as (hostile, _):
        hostile.key = new_key()  # not the key its Begin announced
        hostile.send_chunk(Header(1, 0, 0, 1, CHUNK), b"\x42" * CHUNK)
        status = hostile.channel.recv(10)
        if bounded:  # the one slot came back, so the next chunk has somewhere to land
            hostile.key = wire.unb64(hostile.begin.key)
            hostile.send_chunk(Header(1, 0, 1, 1, CHUNK), b"\x42" * CHUNK)
            again = hostile.channel.recv(10)
            assert isinstance(again, wire.Status) and again.verified == [1], again
    assert isinstance(status, wire.Status) and status.corrupt == [0] and status.verified == []
    assert seen == ([(CHUNK, CHUNK)] if bounded else []), "a chunk that failed its tag is never folded"


@pytest.mark.parametrize("mode,begin,reason", [
    (Mode.TCP_E, wire.Begin(transfer=1, chunk_size=8, nchunks=SIZE // 8), "announced 8-byte chunks; this side set"),
    (Mode.RDMA_E, wire.Begin(transfer=1, chunk_size=CHUNK // 2, nchunks=16), "announced 524288-byte chunks"),
    (Mode.GRPC, wire.Begin(transfer=1, chunk_size=4 << 20, nchunks=10**6), "announced 1000000 frames"),
    (Mode.GRPC, wire.Begin(transfer=1, chunk_size=64, nchunks=2), "announced 2 frames of 64 bytes"),
])
def test_a_receiver_refuses_a_plan_it_did_not_set_before_anything_lands(mode, begin, reason):
    """The sender may not choose how many chunks (or frames) the receiver keeps track of."""
    from fedrdma.transport.agent import Agent

    layout = synthetic_layout(SIZE)
    dst = make_state(layout, None)
    streams = DataListener() if mode is Mode.TCP_E else None
    listener = Listener()
    result: dict[str, Any] = {}

    def receiver() -> None:
        agent = Agent() if mode.one_sided else None
        s = Session(agent, dst, listener.accept(10), mode, Role.RECEIVER, CHUNK, WINDOW, streams=streams,
                    peer_timeout=2.0, trusted_fabric=True)
        s.open()
        try:
            s.receive()
        except Exception as exc:  # noqa: BLE001  (the refusal is what the test looks at)
            result["error"] = exc
        s.abort()

    thread = threading.Thread(target=receiver)
    thread.start()
    channel = dial(listener.address)
    try:
        channel.send(wire.Hello(mode=mode, layout_id=layout.layout_id, nbytes=layout.nbytes))
        hello = channel.recv(10)
        assert isinstance(hello, wire.Hello)
        socks = (dial_data("127.0.0.1", hello.data_port, wire.unb64(hello.ticket), hello.data_streams)
                 if mode is Mode.TCP_E else [])
        channel.send(begin)
        thread.join(THREAD_TIMEOUT_S)
        for sock in socks:
            sock.close()
    finally:
        channel.close()
        listener.close()
        if streams is not None:
            streams.close()
    assert reason in str(result["error"]), result
    assert state_digest(dst.memoryview()) == state_digest(make_state(layout, None).memoryview())
