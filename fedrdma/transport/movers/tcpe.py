"""`tcp-e` (FedRDMA-E over TCP): pools, chunks landing in place, and the receiver placing every byte.

Where the fabric cannot enforce remote keys (UCX over TCP or shared memory does every
one-sided operation in software, on whatever address the request names), this mode keeps
FedRDMA-E's shape without one-sided access: the sender streams each chunk sealed
(`transport.seal`) over a few TCP connections (`transport.streams`); the receiver's own
code checks each chunk's header against its own plan, reads the chunk straight into its
final offset in its state (`recv_into` a view of it: no staging, no reassembly, no
serialization) and opens it there. Nothing outside the receiver's state can be reached.

Failures follow the scheduler's rule: a chunk whose tag fails is sent again; a connection
that breaks is the endpoint's problem, and the sender alone decides to rebuild: it sends
`Resume` on the control stream, both sides replace their connections, and the receiver's
answer names what it already holds.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import PeerLost, ProtocolError, TransferError
from fedrdma.core.liveness import Liveness
from fedrdma.core.modes import Mode
from fedrdma.core.receiver import Action, Corrupt, Lost, Receiver, Status, Verified
from fedrdma.core.scheduler import Post, Scheduler
from fedrdma.transport import wire
from fedrdma.transport.movers.base import Mover, Offered
from fedrdma.transport.movers.land import send_status
from fedrdma.transport.pacing import Pacer
from fedrdma.transport.seal import (
    HEADER_BYTES,
    PIECE_BYTES,
    SEAL_PIECE_BYTES,
    TAG_BYTES,
    Header,
    Opener,
    Sealer,
    new_key,
)
from fedrdma.transport.slots import Slot
from fedrdma.transport.stats import TransferStats
from fedrdma.transport.streams import MAX_STREAMS, close_all, dial, recv_exact, take

log = logging.getLogger(__name__)


EVENT_WAIT_S = 10e-3
"""Longest a loop waits for its connection threads before it looks at the control stream again."""


class Links:
    """A session's data connections, replaced whole whenever the endpoint is rebuilt.

    The mover is handed in on each call, not kept: a mover holding its links holding it
    back would be a cycle that keeps the session's state, often a mapped inbox, alive until
    the collector runs, which in a node idle between rounds may be never."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.epoch = 0

    def establish(self, mover: TcpMover) -> list[socket.socket]:
        """Close what there is, then dial the peer's data port or take what it dialed."""
        ctx = mover.ctx
        self.close()
        if ctx.channel.dialed:
            peer = ctx.peer
            assert peer is not None
            self.socks = dial(ctx.channel.host, peer.data_port, wire.unb64(peer.ticket), peer.data_streams)
        else:
            assert ctx.streams is not None and mover.arrivals is not None
            self.socks = list(take(mover.arrivals, mover.count, ctx.peer_timeout))
        self.epoch += 1
        return self.socks

    def closed_by_peer(self) -> bool:
        """Whether the peer closed one of our connections (readable at end of stream)."""
        if not self.socks:
            return False
        readable, _, _ = select.select(self.socks, [], [], 0)
        for sock in readable:
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    return True
            except BlockingIOError:
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        close_all(self.socks)
        self.socks = []


class TcpMover(Mover):
    mode = Mode.TCP_E

    def __init__(self, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ctx)
        self.links = Links()
        self.arrivals: queue.Queue[socket.socket] | None = None
        self.ticket = b""
        self.count = 0
        self._events: queue.Queue[tuple] = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._lock = threading.Condition()
        self._current: tuple[Receiver, bytes] | None = None
        """Receiver: the transfer the connections may carry now, and its key."""
        self._finished: Receiver | None = None
        """Receiver: the last finished transfer, whose late duplicates are dropped."""

    # -- opening -------------------------------------------------------------------------
    def offer(self) -> Offered:
        """The listening side hands out its data port, a ticket and how many connections to open."""
        ctx = self.ctx
        if ctx.channel.dialed:
            return Offered()
        if ctx.streams is None:
            raise TransferError("tcp-e's listening side needs a data listener (the session's `streams`)")
        self.ticket, self.arrivals = ctx.streams.register()
        self.count = ctx.data_streams
        return Offered(data_port=ctx.streams.port, ticket=self.ticket, data_streams=self.count)

    def connect(self, peer: wire.Hello) -> None:
        if self.ctx.channel.dialed and (not peer.data_port or not peer.ticket or not 1 <= peer.data_streams <= MAX_STREAMS):
            raise ProtocolError("the peer offered no data port, ticket or connection count for tcp-e")
        self.links.establish(self)
        if self.ctx.role is self.mode.initiator.other:
            self._start_readers()

    # -- the sender ----------------------------------------------------------------------
    def send(self, transfer: int) -> TransferStats:
        ctx = self.ctx
        start = time.perf_counter()
        plan = ctx.plan
        key = new_key()
        ctx.channel.send(wire.Begin(transfer=transfer, chunk_size=plan.chunk_size, nchunks=len(plan),
                                    key=wire.b64(key)))
        sched = Scheduler(plan, ctx.window, ctx.policy)
        sched.generation = ctx.generation
        now = time.monotonic()
        liveness = Liveness(ctx.peer_timeout, now)
        pacer = Pacer(now)
        work, writers = self._start_writers(transfer, key, plan)
        try:
            while not sched.done:
                now = time.monotonic()
                for msg in self.drain():
                    liveness.heard(now)
                    if isinstance(msg, wire.Status) and msg.transfer == transfer:
                        for index in msg.verified:
                            sched.verified(index)
                        for index in msg.corrupt:
                            sched.corrupt(index, now)
                for post in sched.poll(now):
                    work.put(post)
                progressed = self._sent(sched, now, liveness, pacer, plan)
                for index, generation in sched.expired(now):
                    sched.failed(index, generation, now, f"not sent within {ctx.policy.chunk_timeout_s:.0f} s")
                if sched.broken is None and self.links.closed_by_peer():
                    sched.endpoint_lost("the peer closed a data connection")
                if sched.broken is not None:
                    self._stop_writers(work, writers)
                    self._reconnect(transfer, sched)
                    liveness.heard(time.monotonic())
                    work, writers = self._start_writers(transfer, key, plan)
                if sched.error:
                    raise TransferError(f"transfer {transfer} failed: {sched.error}")
                self.check_channel(transfer)
                if liveness.expired(now):
                    raise PeerLost(f"no progress for {ctx.peer_timeout:.0f} s during transfer {transfer} "
                                   f"({len(sched.verified_indices())}/{len(plan)} chunks verified)")
                if not progressed:
                    self._wait_event(pacer)
        finally:
            self._stop_writers(work, writers)
        return self.stats(transfer, start, bytes_posted=sched.bytes_posted, reconnects=sched.reconnects)

    def _sent(self, sched: Scheduler, now: float, liveness: Liveness, pacer: Pacer, plan: ChunkPlan) -> bool:
        progressed = False
        while True:
            try:
                kind, index, generation, reason = self._events.get_nowait()
            except queue.Empty:
                return progressed
            progressed = True
            liveness.heard(now)
            if kind == "sent":
                pacer.moved(plan.chunks[index].length, now)
                self.ctx.moved(plan.chunks[index].length)
                sched.landed(index, generation)
            else:
                sched.failed(index, generation, now, reason)

    def _start_writers(self, transfer: int, key: bytes, plan: ChunkPlan) -> tuple[queue.Queue, list[threading.Thread]]:
        work: queue.Queue[Post | None] = queue.Queue()
        writers = [threading.Thread(target=self._write, args=(sock, work, transfer, key), daemon=True,
                                    name="tcp-e-write") for sock in self.links.socks]
        for writer in writers:
            writer.start()
        return work, writers

    def _stop_writers(self, work: queue.Queue, writers: list[threading.Thread]) -> None:
        for _ in writers:
            work.put(None)
        for writer in writers:
            writer.join(self.ctx.peer_timeout)

    def _write(self, sock: socket.socket, work: queue.Queue, transfer: int, key: bytes) -> None:
        """One connection's sender: seal each posted chunk from the state and stream it."""
        state = self.ctx.state
        scratch = memoryview(bytearray(SEAL_PIECE_BYTES))
        while (post := work.get()) is not None:
            chunk = post.chunk
            header = Header(transfer, post.generation, chunk.index, post.attempt, chunk.length)
            try:
                sealer = Sealer(key, header)
                sock.sendall(header.pack())
                plain = state.memoryview(chunk.offset, chunk.length)
                for piece in range(0, chunk.length, SEAL_PIECE_BYTES):
                    sock.sendall(sealer.seal_into(plain[piece : piece + SEAL_PIECE_BYTES], scratch))
                sock.sendall(sealer.tag())
            except OSError as exc:
                self._report(("failed", chunk.index, post.generation, f"connection failed: {exc}"))
                return
            self._report(("sent", chunk.index, post.generation, ""))

    def _reconnect(self, transfer: int, sched: Scheduler) -> None:
        ctx = self.ctx
        reason = sched.broken or "endpoint broken"
        log.warning("transfer %d: %s; reconnecting", transfer, reason)
        sched.disconnected(time.monotonic(), reason)
        ctx.generation = sched.generation
        if sched.error:
            return
        ctx.channel.send(wire.Resume(transfer=transfer, generation=sched.generation))
        self.links.establish(self)
        while True:  # the receiver's first status of the new generation says what it holds
            msg = self.expect(wire.Status)
            assert isinstance(msg, wire.Status)
            if msg.transfer == transfer:
                sched.resume(msg.verified)
                if msg.generation == sched.generation:
                    return

    def _wait_event(self, pacer: Pacer) -> None:
        """Sleep until a connection thread reports, or the pacer's pause is over."""
        pause = min(EVENT_WAIT_S, pacer.next(False))
        with self._lock:
            if self._events.empty():
                self._lock.wait(pause)

    # -- the receiver ------------------------------------------------------------------------
    def receive(self) -> TransferStats:
        ctx = self.ctx
        begin, start, plan = self.begun()
        key = wire.unb64(begin.key)
        if len(key) != 32:
            raise ProtocolError(f"the sender's Begin carries a {len(key)}-byte key; tcp-e seals with 32")
        now = time.monotonic()
        receiver = Receiver(plan, begin.transfer, now, ctx.peer_timeout, generation=ctx.generation)
        pacer = Pacer(now)
        self._admit(receiver, key)
        ctx.state.touch()  # bytes land from the first chunk on
        try:
            while not receiver.complete:
                now = time.monotonic()
                progressed = self._landed(receiver, now, pacer, plan)
                for msg in self.drain():
                    progressed = True
                    if isinstance(msg, wire.Resume) and msg.transfer == begin.transfer and msg.generation > receiver.generation:
                        self._stop_readers()
                        self.links.establish(self)
                        ctx.generation = msg.generation
                        resumed = receiver.resume(msg.transfer, msg.generation, now)
                        self._admit(receiver, key)
                        self._start_readers()
                        self._execute(receiver, resumed, now, pacer)
                    else:
                        receiver.heard(now)
                self._execute(receiver, receiver.tick(now), now, pacer)
                self.check_channel(begin.transfer)
                if ctx.slots is not None and (why := ctx.slots.stalled()):
                    raise PeerLost(why)
                if not progressed:
                    self._wait_event(pacer)
        finally:
            self._admit(None)
        ctx.state.touch()
        return self.stats(begin.transfer, start, corrupt=receiver.corrupt_count)

    def _landed(self, receiver: Receiver, now: float, pacer: Pacer, plan: ChunkPlan) -> bool:
        progressed = False
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return progressed
            progressed = True
            kind, epoch = event[0], event[1]
            if kind == "piece":
                receiver.heard(now)
            elif kind == "checked":
                _, _, transfer, generation, index, good, slot = event
                try:
                    self._execute(receiver, receiver.checked(transfer, generation, index, good, now), now, pacer, slot)
                finally:
                    self._give(slot)
            elif kind == "refused" and epoch == self.links.epoch:
                self.links.close()
                raise TransferError(f"refused the sender's data: {event[2]}")
            elif kind == "broken" and epoch == self.links.epoch:
                self.links.close()  # the sender sees it too, and resumes on new connections
                receiver.heard(now)

    def _execute(self, receiver: Receiver, actions: list[Action], now: float, pacer: Pacer,
                 slot: Slot | None = None) -> None:
        """Carry out the receiver's decisions; `slot` holds the chunk a Verified names, if it landed in one."""
        for action in actions:
            if isinstance(action, Verified):
                chunk = receiver.plan.chunks[action.index]
                pacer.moved(chunk.length, now)
                self.ctx.verified(chunk.offset, chunk.length, slot)
            elif isinstance(action, Status):
                send_status(self, receiver, action)
            elif isinstance(action, Lost):
                raise PeerLost(action.reason)
            elif not isinstance(action, Corrupt):
                raise AssertionError(f"unknown action {action!r}")

    def _admit(self, receiver: Receiver | None, key: bytes = b"") -> None:
        """What the connections may carry from now on: chunks for `receiver`'s transfer and generation.

        Admitting nothing (between transfers) keeps the finished transfer's plan, so a late
        duplicate of one of its chunks is read and dropped, never landed on verified bytes.
        """
        with self._lock:
            if receiver is None and self._current is not None:
                self._finished = self._current[0]
            self._current = None if receiver is None else (receiver, key)
            self._lock.notify_all()

    def _where(self, header: Header) -> tuple[Receiver, bytes] | None:
        """Where a header's chunk goes: (its transfer's receiver, key), or None to read and drop it.

        Waits a while for a Begin or Resume still on its way over the control stream; refuses
        (ProtocolError) a chunk of no transfer this side began, or one its plan does not have.
        """
        deadline = time.monotonic() + self.ctx.peer_timeout
        with self._lock:
            while True:
                current, finished = self._current, self._finished
                if current is not None:
                    receiver, key = current
                    if (header.transfer, header.generation) == (receiver.transfer, receiver.generation):
                        header.check(receiver.transfer, receiver.generation, receiver.plan)
                        return None if receiver.is_verified(header.index) else current
                    if header.transfer == receiver.transfer and header.generation < receiver.generation:
                        header.check(receiver.transfer, header.generation, receiver.plan)
                        return None  # sent before a reconnect this side already followed
                    ahead = header.transfer == receiver.transfer and header.generation > receiver.generation
                else:
                    ahead = header.transfer == (finished.transfer + 1 if finished is not None else 1)
                if finished is not None and header.transfer == finished.transfer:
                    header.check(finished.transfer, header.generation, finished.plan)
                    return None
                remaining = deadline - time.monotonic()
                if not ahead or remaining <= 0:  # only the next Begin or Resume may still be on its way
                    raise ProtocolError(f"sealed chunk of transfer {header.transfer} generation "
                                        f"{header.generation} arrived, but no such transfer was begun")
                self._lock.wait(remaining)

    def _start_readers(self) -> None:
        epoch = self.links.epoch
        self._readers = [threading.Thread(target=self._read, args=(sock, epoch), daemon=True, name="tcp-e-read")
                         for sock in self.links.socks]
        for reader in self._readers:
            reader.start()

    def _stop_readers(self) -> None:
        self.links.close()
        for reader in self._readers:
            reader.join(self.ctx.peer_timeout)
        self._readers = []
        while not self._events.empty():  # what the old connections said is void now
            event = self._events.get_nowait()
            if event[0] == "checked":
                self._give(event[-1])

    def _give(self, slot: Slot | None) -> None:
        if slot is not None:
            assert self.ctx.slots is not None
            self.ctx.slots.give(slot)

    def _read(self, sock: socket.socket, epoch: int) -> None:
        """One connection's receiver: check each header against the plan, land the chunk in place
        (or in a slot of a bounded inbox), open it."""
        state, slots = self.ctx.state, self.ctx.slots
        raw = bytearray(HEADER_BYTES)
        tag = bytearray(TAG_BYTES)
        drop: memoryview | None = None  # duplicates are read into it; made on the first (most see none)
        try:
            while True:
                recv_exact(sock, memoryview(raw))
                header = Header.unpack(bytes(raw))
                where = self._where(header)
                if where is None:  # a duplicate: read past it without touching the state
                    drop = drop or memoryview(bytearray(PIECE_BYTES))
                    for piece in range(0, header.length, PIECE_BYTES):
                        recv_exact(sock, drop[: min(PIECE_BYTES, header.length - piece)])
                    recv_exact(sock, memoryview(tag))
                    continue
                receiver, key = where
                chunk = receiver.plan.chunks[header.index]
                slot = slots.take(self.ctx.peer_timeout) if slots is not None else None
                try:
                    view = slot.view(chunk.length) if slot is not None else state.memoryview(chunk.offset, chunk.length)
                    opener = Opener(key, header)
                    for piece in range(0, chunk.length, PIECE_BYTES):
                        part = view[piece : piece + PIECE_BYTES]
                        recv_exact(sock, part)
                        opener.open_in_place(part)
                        self._report(("piece", epoch))
                    recv_exact(sock, memoryview(tag))
                except BaseException:
                    if slot is not None:
                        slots.give(slot)  # type: ignore[union-attr]
                    raise
                self._report(("checked", epoch, header.transfer, header.generation, header.index,
                              opener.verify(bytes(tag)), slot))
        except ProtocolError as exc:
            self._report(("refused", epoch, str(exc)))
        except (OSError, PeerLost) as exc:
            self._report(("broken", epoch, str(exc)))

    def _report(self, event: tuple) -> None:
        self._events.put(event)
        with self._lock:
            self._lock.notify_all()

    def close(self) -> None:
        self._stop_readers()
        self.links.close()
        if self.ticket and self.ctx.streams is not None:
            self.ctx.streams.unregister(self.ticket)
