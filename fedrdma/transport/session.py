"""A data-plane session: one peer, one mode, one state, any number of transfers.

`open()` does the handshake once (layouts compared before a byte moves, pools registered,
metadata exchanged); then the sending side calls `send()` and the receiving side
`receive()` for each transfer. Mode-specific movers execute the core's decisions:

- `rdma-e` (push): the sender WRITEs chunks from its pool straight into the receiver's pool
  at their final offsets; each WRITE carries a notification with the chunk's checksum.
- `rdma-e-pull`: the receiver READs chunks from the holder's pool into its own; the holder
  streams the chunk checksums over the channel meanwhile.
- `rdma` (FedRDMA): per-transfer staging buffers on both sides, registered per transfer;
  the receiver reassembles the chunks, then rebuilds the tensors.
- `grpc`: the baseline; see `fedrdma.transport.baseline`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from fedrdma.core.chunks import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_WINDOW,
    ChunkPlan,
    Region,
    check_window,
    chunk_checksum,
)
from fedrdma.core.errors import LayoutError, PeerLost, ProtocolError, TransferError
from fedrdma.core.layout import FlatState
from fedrdma.core.modes import Mode, Role
from fedrdma.core.scheduler import Ledger, RetryPolicy, Scheduler
from fedrdma.transport import wire
from fedrdma.transport.agent import Agent, Operation, Pool, RemotePool
from fedrdma.transport.channel import Blob, Channel

log = logging.getLogger(__name__)

PEER_TIMEOUT_S = 20.0
"""A peer that shows no sign of life (no message, no landed chunk) this long is declared
lost: the transfer fails with a clear error instead of hanging on NIXL."""

HANDSHAKE_TIMEOUT_S = 60.0
"""Opening waits this long for the peer's hello: a peer may still be building its model."""

REFUSE_LINGER_S = 2.0
"""After refusing, wait this long for the peer's own refusal, so ours is not lost on close."""

STATUS_EVERY_CHUNKS = 32
"""The receiver reports verified chunks in batches of this many (corrupt ones at once, and
all at completion): the sender needs them only to resume, and each report is a gRPC send."""

CHECKSUM_BATCH = 64
"""Pull mode: chunk checksums travel in batches this large (one small message each)."""

IDLE_MIN_S = 5e-6
"""First poll pause after progress: completions of a window arrive in bursts."""

IDLE_MAX_S = 200e-6
"""Longest poll pause during a transfer. Without a progress thread our polls are what
moves UCX (it refills the socket and drains the receive side only when polled), so the
pause must stay below the time a socket buffer takes to drain at line rate; on a WAN path
every poll also takes CPU from the network stack (5 Gbit/s, 20 ms in the lab: 0.88 of
line at 50 us, 0.92 at 200 us, no better beyond)."""


def recv_progressing(channel: Channel, agent: Agent | None, timeout: float) -> wire.Message | Blob:
    """`channel.recv`, while driving NIXL progress so that one-sided peers are served.

    Without a progress thread (see `agent.PROGRESS_THREAD`) the memory owner's UCX worker
    moves only when polled: over TCP it must answer emulated READs and connection set-up.
    """
    if agent is None:
        return channel.recv(timeout)
    deadline = time.monotonic() + timeout
    idle = _Idle()
    while True:
        msg = channel.poll()
        if msg is not None:
            return msg
        if channel.closed.is_set():
            return channel.recv(0)  # raises PeerLost with the reason
        if time.monotonic() > deadline:
            raise TimeoutError(f"no message from {channel.peer} within {timeout:.1f} s")
        agent.progress()
        idle(False)


class ChunkHasher:
    """The sender's chunk checksums: from the state's cache, or computed ahead of the posts.

    xxh3 releases the GIL, so hashing runs on the second core instead of delaying each post
    (and, without a progress thread, each poll that moves UCX). Results are cached on the
    state under its version, so an unchanged state is hashed once for any number of sends.
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


class _Idle:
    """Poll pauses that double while nothing happens and reset on progress."""

    def __init__(self) -> None:
        self.pause = IDLE_MIN_S

    def __call__(self, progressed: bool) -> None:
        if progressed:
            self.pause = IDLE_MIN_S
            return
        time.sleep(self.pause)
        self.pause = min(IDLE_MAX_S, self.pause * 2)

PUSH_MODES = ("rdma", "rdma-e")


@dataclass
class Faults:
    """Faults a test injects into a real session; all off by default."""

    corrupt_once: frozenset[int] = frozenset()
    """Chunk indices whose landed bytes are flipped once before their first verification."""
    cut_after: int | None = None
    """Initiator: tear down the peer's endpoint once this many chunks have landed."""
    advertise_bytes: int | None = None
    """Target: advertise a pool of this many bytes instead of the real length."""


@dataclass
class TransferStats:
    transfer: int
    mode: str
    seconds: float
    nbytes: int
    bytes_posted: int = 0
    reconnects: int = 0
    retries: int = 0
    corrupt: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def goodput_gb_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def bytes_resent(self) -> int:
        return max(0, self.bytes_posted - self.nbytes)


class Session:
    """The data plane between this process and one peer, for one FlatState."""

    def __init__(
        self,
        agent: Agent | None,
        state: FlatState,
        channel: Channel,
        mode: str,
        role: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        window: int = DEFAULT_WINDOW,
        policy: RetryPolicy | None = None,
        faults: Faults | None = None,
        peer_timeout: float = PEER_TIMEOUT_S,
        on_chunk: Callable[[int, int], None] | None = None,
        pool: Pool | None = None,
    ) -> None:
        mode, role = Mode(mode), Role(role)
        if mode.one_sided and agent is None:
            raise ValueError(f"mode {mode} needs a NIXL agent")
        self.plan = ChunkPlan.build(state.nbytes, chunk_size)
        self.window = check_window(window)
        self.agent = agent
        self.state = state
        self.channel = channel
        self.mode = mode
        self.role = role
        self.policy = policy or RetryPolicy()
        self.faults = faults or Faults()
        self.peer_timeout = peer_timeout
        self.on_chunk = on_chunk
        """Called as (offset, length) for every verified chunk: streaming aggregation hooks here."""
        self.pool: Pool | None = pool
        self._owns_pool = pool is None
        """A pool handed in (one buffer serving several sessions) outlives this session."""
        self.remote: RemotePool | None = None
        self._remote_dlist: object | None = None
        self.peer_name = ""
        self._peer_metadata = b""
        self._transfer = 0
        self._generation = 0
        self.peer_agent = ""
        self._opened = False

    # -- roles -----------------------------------------------------------------------
    @property
    def initiator(self) -> bool:
        """Whether this side posts the one-sided operations."""
        if self.mode == "rdma-e-pull":
            return self.role == "receiver"
        return self.role == "sender"

    @property
    def _target(self) -> bool:
        return self.mode != "grpc" and not self.initiator

    # -- handshake -------------------------------------------------------------------
    def open(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Exchange hellos; refuse a different layout or mode before any byte moves."""
        if self.mode in ("rdma-e", "rdma-e-pull"):
            assert self.agent is not None
            if self.pool is None:
                self.pool = self.agent.register(self.state.buffer)
            elif self.pool.buffer.data_ptr() != self.state.buffer.data_ptr():
                raise TransferError("the pool handed to the session is not the state's buffer")
        hello = wire.Hello(
            mode=self.mode,  # type: ignore[arg-type]
            layout_id=self.state.layout_id,
            nbytes=self.state.nbytes,
            agent=self.agent.name if self.agent else "",
            metadata=wire.b64(self._metadata_for_peer()) if self._target and self.agent else "",
            region=self._advertised() if self._target and self.pool else None,
        )
        self.channel.send(hello)
        peer = self.channel.recv(timeout)
        if isinstance(peer, wire.Refuse):
            raise LayoutError(f"peer refused the session: {peer.reason}")
        if not isinstance(peer, wire.Hello):
            raise ProtocolError(f"expected the peer's hello, got {type(peer).__name__}")
        problem = ""
        if peer.layout_id != self.state.layout_id or peer.nbytes != self.state.nbytes:
            problem = (
                f"layout mismatch: this side holds layout {self.state.layout_id} ({self.state.nbytes} bytes), "
                f"the peer holds layout {peer.layout_id} ({peer.nbytes} bytes); "
                "both sides must build the same model with the same trainable tensors"
            )
        elif peer.mode != self.mode:
            problem = f"mode mismatch: this side speaks {self.mode}, the peer speaks {peer.mode}"
        self.peer_agent = peer.agent
        self.peer_hello = peer
        """What the peer handed us: the trust model's tests read it."""
        """The peer's NIXL agent name: whose notifications are ours."""
        if problem:
            self.channel.send(wire.Refuse(reason=problem))
            try:  # let the refusal reach the peer before this side closes the stream
                self.channel.recv(REFUSE_LINGER_S)
            except (PeerLost, TimeoutError):
                pass
            raise LayoutError(problem)
        if self.initiator and self.mode != "grpc":
            assert self.agent is not None
            if not peer.metadata:
                raise ProtocolError("the peer sent no agent metadata; it cannot be reached one-sided")
            self._peer_metadata = wire.unb64(peer.metadata)
            self.peer_name = self.agent.add_peer(self._peer_metadata)
            if self.mode != "rdma":
                if peer.region is None:
                    raise ProtocolError("the peer advertised no pool")
                self.remote = RemotePool(self.agent, self.peer_name, [peer.region.region()])
                self._set_remote_dlist(self.remote.dlist(self.plan))  # validates every range now
        self._opened = True

    def rebind(self, state: FlatState, pool: Pool | None) -> None:
        """Send from another buffer of the same layout from the next transfer on.

        The aggregator double-buffers its global state: the pool that collected a round's
        average becomes the one it broadcasts from. Only a sender's local buffer can move;
        the peer never learns this side's addresses when it is the initiator.
        """
        if not self.initiator or self.role != "sender":
            raise TransferError("only the initiating sender can switch buffers between transfers")
        if state.layout_id != self.state.layout_id:
            raise LayoutError(f"cannot rebind to layout {state.layout_id}; the session moves {self.state.layout_id}")
        if self.mode == "rdma-e" and (pool is None or pool.buffer.data_ptr() != state.buffer.data_ptr()):
            raise TransferError("rdma-e needs the registered pool of the new buffer")
        self.state = state
        self.pool = pool

    def retune(self, chunk_size: int, window: int) -> None:
        """Use another chunk size and window from the next transfer on.

        A sweep (T2, `tune --probe`) tries many settings on one warm connection: a fresh
        connection per setting would measure TCP's slow start, not the setting. The
        receiver follows the chunk size each transfer's Begin announces.
        """
        if self.role != "sender" or self.mode not in PUSH_MODES:
            raise TransferError("only a pushing sender sets the chunk size; a receiver follows its Begin")
        plan = ChunkPlan.build(self.state.nbytes, chunk_size)
        self.window = check_window(window)
        self._use_plan(plan)

    def _metadata_for_peer(self) -> bytes:
        """Connection info plus this session's pool only (NIXL partial metadata).

        A peer is handed keys to exactly the memory it may touch: an aggregator's other
        inboxes and its global pool stay out of what a silo receives.
        """
        assert self.agent is not None
        return self.agent.partial_metadata(self.pool)

    def _advertised(self) -> wire.RegionMsg:
        assert self.pool is not None
        region = self.pool.region
        if self.faults.advertise_bytes is not None:
            region = Region(region.address, self.faults.advertise_bytes)
        return wire.RegionMsg.of(region)

    # -- public API ------------------------------------------------------------------
    def send(self) -> TransferStats:
        self._require("sender")
        self._transfer += 1
        if self.mode == "grpc":
            from fedrdma.transport.baseline import send_serialized

            return send_serialized(self)
        if self.mode == "rdma-e-pull":
            return self._offer()
        return self._push()

    def receive(self) -> TransferStats:
        self._require("receiver")
        self._transfer += 1
        if self.mode == "grpc":
            from fedrdma.transport.baseline import receive_serialized

            return receive_serialized(self)
        if self.mode == "rdma-e-pull":
            return self._pull()
        return self._accept_push()

    def close(self, timeout: float = 5.0) -> None:
        """Say goodbye, wait for the peer's (it may still touch our pool until then), release."""
        try:
            if not self.channel.closed.is_set():
                self.channel.send(wire.Bye())
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    msg = self.recv_progressing(max(0.0, deadline - time.monotonic()))
                    if isinstance(msg, wire.Bye):
                        break
        except (PeerLost, TimeoutError):
            pass
        finally:
            if self.agent and self.peer_name:
                self.agent.remove_peer(self.peer_name)
            if self.pool is not None and self._owns_pool:
                self.pool.close()
            self.channel.close()

    def abort(self) -> None:
        """After a failure: forget the peer and release our registrations without waiting.

        Only for a peer that is gone or refused: a live peer may still touch our pool, which
        is why `close` waits for its goodbye first.
        """
        if self.agent and self.peer_name:
            self.agent.remove_peer(self.peer_name)
        if self.pool is not None and self._owns_pool:
            self.pool.close()
        self.channel.close()

    def _require(self, role: str) -> None:
        if not self._opened:
            raise TransferError("open() the session before moving bytes")
        if self.role != role:
            raise TransferError(f"this session's side is the {self.role}, not the {role}")

    # -- channel helpers -------------------------------------------------------------
    def expect(self, kind: type, timeout: float | None = None) -> object:
        """The next message of `kind`; a Refuse or Abort from the peer becomes an error."""
        wait = self.peer_timeout if timeout is None else timeout
        try:
            msg = self.recv_progressing(wait)
        except TimeoutError:
            raise PeerLost(f"the peer sent no {kind.__name__} within {wait:.0f} s; is it alive?") from None
        if isinstance(msg, (wire.Abort, wire.Refuse)):
            raise TransferError(f"peer aborted: {msg.reason}")
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected {kind.__name__} from the peer, got {type(msg).__name__}")
        return msg

    def recv_progressing(self, timeout: float) -> wire.Message | Blob:
        return recv_progressing(self.channel, self.agent, timeout)

    def _drain(self) -> list[wire.Message | Blob]:
        out = []
        while (msg := self.channel.poll()) is not None:
            if isinstance(msg, (wire.Abort, wire.Refuse)):
                raise TransferError(f"peer aborted: {msg.reason}")
            out.append(msg)
        return out

    # -- push: sender (rdma-e, rdma) -------------------------------------------------
    def _push(self) -> TransferStats:
        assert self.agent is not None
        start = time.perf_counter()
        transfer = self._transfer
        plan = self.plan
        self.channel.send(wire.Begin(transfer=transfer, chunk_size=plan.chunk_size, nchunks=len(plan)))
        staging: list[torch.Tensor] = []
        staged_pool = None
        if self.mode == "rdma":
            stage = self.expect(wire.Stage)
            assert isinstance(stage, wire.Stage)
            self.agent.add_peer(wire.unb64(stage.metadata))
            self.remote = RemotePool(self.agent, self.peer_name, [r.region() for r in stage.regions])
            self._set_remote_dlist(self.remote.dlist(plan))
            staging = [torch.empty(c.length, dtype=torch.uint8) for c in plan.chunks]
            staged_pool = self.agent.nixl.register_memory(staging)
            local = self.agent.nixl.prep_xfer_dlist("NIXL_INIT_AGENT", staging)
        else:
            assert self.pool is not None
            local = self.pool.local_dlist(plan)
        hasher = ChunkHasher(self.state, plan)  # checksums run ahead on another core
        staged: set[int] = set()  # rdma: chunks already copied into their staging buffer

        def notice(index: int, generation: int) -> bytes:
            if staging and index not in staged:
                staged.add(index)
                chunk = plan.chunks[index]
                staging[index].copy_(self.state.buffer[chunk.offset : chunk.end])
            return wire.chunk_notice(transfer, generation, index, hasher.checksum(index))

        def on_message(sched: Scheduler, msg: object, now: float) -> None:
            if isinstance(msg, wire.Status) and msg.transfer == transfer:
                for i in msg.verified:
                    sched.verified(i)
                for i in msg.corrupt:
                    sched.corrupt(i, now)

        try:
            sched = self._drive("WRITE", local, notice, on_message, ledger=None)
        finally:
            hasher.close()
            if staged_pool is not None:
                local.release()  # type: ignore[attr-defined]
                self.agent.nixl.deregister_memory(staged_pool)
        return self._stats(transfer, start, sched)

    # -- push: receiver (rdma-e, rdma) -----------------------------------------------
    def _accept_push(self) -> TransferStats:
        assert self.agent is not None
        begin = self.expect(wire.Begin)
        assert isinstance(begin, wire.Begin)
        start = time.perf_counter()
        plan = self._plan_for(begin.chunk_size, begin.nchunks)
        transfer = begin.transfer
        self._transfer = transfer
        ledger = Ledger(plan)
        staging: list[torch.Tensor] = []
        staged_pool = None
        if self.mode == "rdma":
            staging = [torch.empty(c.length, dtype=torch.uint8) for c in plan.chunks]
            staged_pool = self.agent.nixl.register_memory(staging)
            meta = self.agent.nixl.get_partial_agent_metadata(staged_pool, True)
            regions = [wire.RegionMsg(address=int(t.data_ptr()), length=t.numel()) for t in staging]
            self.channel.send(wire.Stage(transfer=transfer, metadata=wire.b64(bytes(meta)), regions=regions))
        pending: list[int] = []
        corrupt: list[int] = []
        flipped: set[int] = set()
        last_sign = time.monotonic()
        idle = _Idle()

        def view(index: int) -> memoryview:
            chunk = plan.chunks[index]
            if staging:
                return memoryview(staging[index].numpy()).cast("B")
            return self.state.memoryview(chunk.offset, chunk.length)

        checks: dict[int, Future[int]] = {}
        verifier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-verify")

        def verify(index: int) -> None:
            """Hash the landed chunk on a helper thread, so this loop keeps polling UCX."""
            if index in self.faults.corrupt_once and index not in flipped:
                flipped.add(index)
                v = view(index)
                v[0] ^= 0xFF
            checks[index] = verifier.submit(chunk_checksum, view(index))

        def settle() -> bool:
            """Record the verdicts of finished hashes; True if there were any."""
            finished = [i for i, f in checks.items() if f.done()]
            for index in finished:
                if ledger.check(index, checks.pop(index).result()):
                    pending.append(index)
                    if self.on_chunk and not staging:
                        chunk = plan.chunks[index]
                        self.on_chunk(chunk.offset, chunk.length)
                else:
                    corrupt.append(index)
            return bool(finished)

        try:
            while True:
                progressed = False
                for note in self.agent.notifications(self.peer_agent):
                    try:
                        t, gen, index, checksum = wire.parse_notice(note)
                    except ProtocolError as exc:
                        log.warning("dropping notification from %s: %s", self.peer_agent, exc)
                        continue
                    if t != transfer or gen != self._generation:
                        continue  # an older transfer's or connection's late arrival
                    progressed = True
                    ledger.expect(index, checksum)
                    if ledger.land(index):
                        verify(index)
                progressed = settle() or progressed
                for msg in self._drain():
                    progressed = True
                    if isinstance(msg, wire.Resume) and msg.transfer == transfer:
                        self._generation = msg.generation
                        for future in checks.values():
                            future.result()  # let hashes of torn chunks finish; their verdicts are void
                        checks.clear()
                        ledger.reset_unverified()
                        self.channel.send(wire.Status(transfer=transfer, verified=ledger.verified_indices()))
                        pending.clear()
                now = time.monotonic()
                if progressed:
                    last_sign = now
                if ledger.complete:
                    self.channel.send(wire.Status(transfer=transfer, verified=pending, corrupt=corrupt, complete=True))
                    break
                if corrupt or len(pending) >= STATUS_EVERY_CHUNKS:
                    self.channel.send(wire.Status(transfer=transfer, verified=pending, corrupt=corrupt))
                    pending, corrupt = [], []
                if self.channel.closed.is_set():
                    raise PeerLost(f"lost the sender during transfer {transfer}: {self.channel.close_reason}")
                if now - last_sign > self.peer_timeout:
                    raise PeerLost(
                        f"the sender went silent for {self.peer_timeout:.0f} s during transfer {transfer} "
                        f"({ledger.verified_count}/{len(plan)} chunks verified)"
                    )
                idle(progressed)
            self.state.touch()
            if staging:
                self._rebuild(staging)
        finally:
            verifier.shutdown(wait=True, cancel_futures=True)
            if staged_pool is not None:
                self.agent.nixl.deregister_memory(staged_pool)
        return TransferStats(transfer, self.mode, time.perf_counter() - start, plan.nbytes, corrupt=ledger.corrupt_count)

    def _rebuild(self, staging: list[torch.Tensor]) -> None:
        """FedRDMA without pools: join the chunks, then rebuild each tensor, then load it."""
        joined = torch.cat(staging)
        tensors = {
            s.name: joined[s.offset : s.offset + s.nbytes].view(s.torch_dtype).view(s.shape).clone()
            for s in self.state.layout.specs
        }
        del joined
        with torch.no_grad():
            for name, tensor in tensors.items():
                self.state.views[name].copy_(tensor)
        if self.on_chunk:
            self.on_chunk(0, self.state.nbytes)

    # -- pull: holder ----------------------------------------------------------------
    def _offer(self) -> TransferStats:
        start = time.perf_counter()
        transfer = self._transfer
        plan = self.plan
        self.channel.send(wire.Offer(transfer=transfer, chunk_size=plan.chunk_size, nchunks=len(plan)))
        hasher = ChunkHasher(self.state, plan)
        try:
            for first in range(0, len(plan), CHECKSUM_BATCH):
                values = [hasher.checksum(i) for i in range(first, min(len(plan), first + CHECKSUM_BATCH))]
                self.channel.send(wire.Checksums(transfer=transfer, start=first, values=values))
        finally:
            hasher.close()
        # The receiver may READ our pool until it says it is done: wait for that word, and
        # meanwhile let UCX serve the READs (over TCP the memory owner's worker answers them).
        while True:
            try:
                msg = self.recv_progressing(self.peer_timeout)
            except TimeoutError:
                raise PeerLost(f"the receiver went silent for {self.peer_timeout:.0f} s during transfer {transfer}") from None
            if isinstance(msg, (wire.Abort, wire.Refuse)):
                raise TransferError(f"peer aborted: {msg.reason}")
            if isinstance(msg, wire.Status) and msg.transfer == transfer and msg.complete:
                return TransferStats(
                    transfer, self.mode, time.perf_counter() - start, plan.nbytes, bytes_posted=msg.bytes_posted
                )

    # -- pull: receiver (initiator) ----------------------------------------------------
    def _pull(self) -> TransferStats:
        assert self.pool is not None
        offer = self.expect(wire.Offer)
        assert isinstance(offer, wire.Offer)
        start = time.perf_counter()
        plan = self._plan_for(offer.chunk_size, offer.nchunks)
        transfer = offer.transfer
        self._transfer = transfer
        ledger = Ledger(plan)
        flipped: set[int] = set()

        def verify(sched: Scheduler, index: int, now: float) -> None:
            chunk = plan.chunks[index]
            view = self.state.memoryview(chunk.offset, chunk.length)
            if index in self.faults.corrupt_once and index not in flipped:
                flipped.add(index)
                view[0] ^= 0xFF
            if ledger.check(index, chunk_checksum(view)):
                sched.verified(index)
                if self.on_chunk:
                    self.on_chunk(chunk.offset, chunk.length)
            else:
                sched.corrupt(index, now)

        def on_message(sched: Scheduler, msg: object, now: float) -> None:
            if isinstance(msg, wire.Checksums) and msg.transfer == transfer:
                for k, value in enumerate(msg.values):
                    if ledger.expect(msg.start + k, value):
                        verify(sched, msg.start + k, now)

        def on_landed(sched: Scheduler, index: int, now: float) -> None:
            if ledger.land(index):
                verify(sched, index, now)

        self.state.touch()  # bytes land from the first READ on
        sched = self._drive("READ", self.pool.local_dlist(plan), lambda i, g: b"", on_message, ledger, on_landed)
        self.channel.send(wire.Status(transfer=transfer, complete=True, bytes_posted=sched.bytes_posted))
        stats = self._stats(transfer, start, sched)
        stats.corrupt = ledger.corrupt_count
        return stats

    def _plan_for(self, chunk_size: int, nchunks: int) -> ChunkPlan:
        plan = ChunkPlan.build(self.state.nbytes, chunk_size)
        if len(plan) != nchunks:
            raise ProtocolError(f"peer plans {nchunks} chunks, but {chunk_size}-byte chunks make {len(plan)}")
        self._use_plan(plan)
        return plan

    def _use_plan(self, plan: ChunkPlan) -> None:
        """Switch to `plan` for the next transfer; remote descriptors follow a new chunk size."""
        if plan.chunk_size != self.plan.chunk_size:
            self.plan = plan
            if self.remote is not None:
                self._set_remote_dlist(self.remote.dlist(plan))

    # -- the initiator's loop ----------------------------------------------------------
    def _drive(
        self,
        op: str,
        local: object,
        notice: Callable[[int, int], bytes],
        on_message: Callable[[Scheduler, object, float], None],
        ledger: Ledger | None,
        on_landed: Callable[[Scheduler, int, float], None] | None = None,
    ) -> Scheduler:
        """Post, poll and retry chunk operations until the scheduler says done."""
        assert self.agent is not None
        sched = Scheduler(self.plan, self.window, self.policy)
        sched.generation = self._generation
        ops: dict[int, Operation] = {}
        zombies: list[Operation] = []
        landed_total = 0
        cut_done = False
        last_sign = time.monotonic()
        idle = _Idle()
        try:
            while not sched.done:
                now = time.monotonic()
                progressed = False
                for msg in self._drain():
                    progressed = True
                    on_message(sched, msg, now)
                broken = ""
                for post in sched.poll(now):
                    index = post.chunk.index
                    try:
                        ops[index] = Operation(
                            self.agent, op, local, self._remote_dlist, index, notice(index, post.generation)
                        )
                    except Exception as exc:  # NIXL raises when the endpoint is gone
                        sched.failed(index, post.generation, now, str(exc))
                        broken = broken or f"posting chunk {index} failed: {exc}"
                        break
                for index, operation in list(ops.items()):
                    state = operation.state()
                    if state == "PROC":
                        continue
                    del ops[index]
                    operation.release()
                    progressed = True
                    if state == "DONE":
                        landed_total += 1
                        if sched.landed(index, sched.generation) and on_landed:
                            on_landed(sched, index, now)
                    else:
                        broken = broken or f"chunk {index} failed on the wire"
                for index, _ in sched.expired(now):
                    broken = broken or f"chunk {index} missed its {self.policy.chunk_timeout_s:.0f} s deadline"
                if self.faults.cut_after is not None and not cut_done and landed_total >= self.faults.cut_after:
                    cut_done = True
                    self.agent.remove_peer(self.peer_name)  # the fault: our endpoint to the peer is gone
                if progressed:
                    last_sign = now
                if broken:
                    zombies.extend(ops.values())
                    ops.clear()
                    self._reconnect(sched, ledger, broken)
                    last_sign = time.monotonic()
                if sched.error:
                    raise TransferError(f"transfer {self._transfer} failed: {sched.error}")
                if self.channel.closed.is_set():
                    raise PeerLost(f"lost the peer during transfer {self._transfer}: {self.channel.close_reason}")
                if now - last_sign > self.peer_timeout:
                    raise PeerLost(
                        f"no progress for {self.peer_timeout:.0f} s during transfer {self._transfer} "
                        f"({len(sched.verified_indices())}/{len(self.plan)} chunks verified); is the peer alive?"
                    )
                idle(progressed)
        finally:
            for operation in list(ops.values()) + zombies:
                operation.release()
        return sched

    def _reconnect(self, sched: Scheduler, ledger: Ledger | None, reason: str) -> None:
        """Drop the broken endpoint, connect afresh, and learn what the peer already holds."""
        assert self.agent is not None and self.remote is not None
        while True:
            log.warning("transfer %d: %s; reconnecting", self._transfer, reason)
            sched.disconnected(time.monotonic(), reason)
            self._generation = sched.generation
            if sched.error:
                return
            if self.channel.closed.is_set():
                raise PeerLost(f"lost the peer during transfer {self._transfer}: {self.channel.close_reason}")
            self.agent.remove_peer(self.peer_name)
            time.sleep(self.policy.backoff(sched.reconnects))
            try:
                self.peer_name = self.agent.add_peer(self._peer_metadata)
                self.remote.peer = self.peer_name
                self._set_remote_dlist(self.remote.dlist(self.plan))
                break
            except Exception as exc:  # NIXL raises when the peer cannot be reached yet
                reason = f"reconnecting failed ({type(exc).__name__}: {exc})"
        if ledger is not None:  # pull: we verify ourselves, so we know what we hold
            ledger.reset_unverified()
            sched.resume(ledger.verified_indices())
            return
        self.channel.send(wire.Resume(transfer=self._transfer, generation=sched.generation))
        while True:  # the first status of this transfer; later ones (our reply among them) only add
            msg = self.expect(wire.Status)
            assert isinstance(msg, wire.Status)
            sched.resume(msg.verified)
            if msg.transfer == self._transfer:
                return

    def _set_remote_dlist(self, dlist: object) -> None:
        old, self._remote_dlist = self._remote_dlist, dlist
        if old is not None:
            try:
                old.release()  # type: ignore[attr-defined]
            except Exception as exc:  # a dlist of a removed peer may already be void
                log.debug("releasing an old remote descriptor list: %s", exc)

    def _stats(self, transfer: int, start: float, sched: Scheduler) -> TransferStats:
        return TransferStats(
            transfer,
            self.mode,
            time.perf_counter() - start,
            self.plan.nbytes,
            bytes_posted=sched.bytes_posted,
            reconnects=sched.reconnects,
        )

