"""What every mover is: the interface a session drives, and the channel helpers they share.

A mover moves one mode's bytes for one session; the session does the handshake and the
lifecycle. The session calls, in this order:

1. `offer()` before its hello: what this side hands the peer (NIXL metadata, a region).
2. `connect(peer)` once both hellos agree: reach the peer with what it handed us.
3. Per transfer, `send(transfer)` on the sending side or `receive()` on the receiving side.
4. `replan(plan)` between transfers when the chunk size changes.
5. `close()` once, after the peer's goodbye or its loss.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from fedrdma.core.chunks import ChunkPlan, Region
from fedrdma.core.errors import PeerLost, ProtocolError, TransferError
from fedrdma.core.layout import FlatState
from fedrdma.core.modes import Mode, Role
from fedrdma.core.scheduler import RetryPolicy
from fedrdma.transport import wire
from fedrdma.transport.agent import Agent, Pool
from fedrdma.transport.channel import Blob, Channel
from fedrdma.transport.pacing import IDLE_CAP_S, Pacer, recv_serving
from fedrdma.transport.slots import Slot, Slots
from fedrdma.transport.stats import TransferStats
from fedrdma.transport.streams import DEFAULT_STREAMS, DataListener


@dataclass(frozen=True)
class Offered:
    """What one side hands its peer in its hello: only what the mode lets the peer use."""

    metadata: bytes = b""
    """NIXL partial metadata: connection info and keys to one pool."""
    region: Region | None = None
    """The range of that pool."""
    data_port: int = 0
    """tcp-e: the listening side's data port."""
    ticket: bytes = b""
    """tcp-e: what the dialing side's data connections present."""
    data_streams: int = 0
    """tcp-e: how many data connections to open."""
    slots: int = 0
    """rdma-e into a bounded inbox: `region` is this many landing slots, WRITEn where granted."""


@dataclass
class Context:
    """What a session shares with its mover; `rebind` and `retune` change it between transfers."""

    agent: Agent | None
    state: FlatState
    channel: Channel
    mode: Mode
    role: Role
    plan: ChunkPlan
    window: int
    policy: RetryPolicy
    peer_timeout: float
    on_chunk: Callable[[int, int], None] | None = None
    """Called as (offset, length) for every verified chunk: streaming aggregation hooks here."""
    pool: Pool | None = None
    peer: wire.Hello | None = None
    """The peer's hello, once the session is open."""
    generation: int = 0
    """This connection's generation: it advances with every reconnect, across transfers."""
    streams: DataListener | None = None
    """tcp-e, the listening side: the data port its peers' connections arrive on."""
    data_streams: int = DEFAULT_STREAMS
    """tcp-e, the listening side: how many data connections the peer opens."""
    follow_plan: bool = False
    """A receiver that takes the chunk size each Begin announces (a sweep), not only its own."""
    slots: Slots | None = None
    """The receiving side of tcp-e, a pull or a push: land chunks in these slots (a bounded
    inbox), not in `state` (a push lands in granted landing slots and is copied into them)."""
    verify: bool = True
    """The receiving side: hash every landed chunk against the holder's checksum (False: the
    fabric's own CRC is trusted, `verify = fabric`); sealed chunks are always checked."""
    on_moved: Callable[[int], None] | None = None
    """The sending side: called with the bytes of each chunk that left (sent, WRITE done) or,
    when the peer pulls, that it vouched for, so a wait on the whole transfer (the round's
    deadline) can follow its progress."""

    def moved(self, nbytes: int) -> None:
        if nbytes and self.on_moved is not None:
            self.on_moved(nbytes)

    def verified(self, offset: int, length: int, slot: Slot | None = None) -> None:
        """A chunk is verified: fold it from its slot, or tell `on_chunk` where it lies in `state`."""
        if slot is not None:
            assert self.slots is not None
            self.slots.fold(offset, slot, length)
        elif self.on_chunk is not None:
            self.on_chunk(offset, length)


class Mover:
    """Base of every mode's mover; see the module docstring for the order of calls."""

    mode: ClassVar[Mode]

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # -- the interface -----------------------------------------------------------------
    def offer(self) -> Offered:
        """What this side hands the peer; by default nothing at all."""
        return Offered()

    def connect(self, peer: wire.Hello) -> None:
        """Reach the peer with what its hello handed us."""

    def send(self, transfer: int) -> TransferStats:
        raise NotImplementedError

    def receive(self) -> TransferStats:
        raise NotImplementedError

    def replan(self, plan: ChunkPlan) -> None:
        """Use `plan` from the next transfer on."""
        self.ctx.plan = plan

    def close(self) -> None:
        """Forget the peer; the session releases the pool."""

    # -- shared helpers ----------------------------------------------------------------
    def begun(self) -> tuple[wire.Begin, float, ChunkPlan]:
        """A chunked receiver's start: the sender's Begin, when it arrived (perf_counter), and
        the plan it announces, refused unless it is this side's own (`plan_for`)."""
        begin = self.expect(wire.Begin)
        assert isinstance(begin, wire.Begin)
        start = time.perf_counter()
        return begin, start, self.plan_for(begin.chunk_size, begin.nchunks)

    def plan_for(self, chunk_size: int, nchunks: int) -> ChunkPlan:
        """The plan a peer's Begin or Offer announces, refused unless it is this side's own.

        A receiver does not let the sender choose how many chunks it keeps track of: the
        chunk size is the one this side was made with (the aggregator's, fixed at join),
        unless the session follows the sender's (a benchmark's sweep over chunk sizes).
        """
        if chunk_size != self.ctx.plan.chunk_size and not self.ctx.follow_plan:
            raise ProtocolError(
                f"the peer announced {chunk_size}-byte chunks; this side set {self.ctx.plan.chunk_size} "
                "(a receiver takes only the chunk size it was made with)"
            )
        plan = ChunkPlan.build(self.ctx.state.nbytes, chunk_size)
        if len(plan) != nchunks:
            raise ProtocolError(f"peer plans {nchunks} chunks, but {chunk_size}-byte chunks make {len(plan)}")
        if plan.chunk_size != self.ctx.plan.chunk_size:
            self.replan(plan)
        return plan

    def recv(self, timeout: float, pacer: Pacer | None = None) -> wire.Message | Blob:
        """The next message, serving one-sided peers meanwhile (`pacing.recv_serving`).

        A wait with nothing in flight paces itself up to the longest pause; one that serves
        a peer's operations passes a pacer that follows the line.
        """
        return recv_serving(self.ctx.channel, self.ctx.agent, timeout, pacer or Pacer(floor=IDLE_CAP_S))

    def expect(self, kind: type | tuple[type, ...], timeout: float | None = None) -> wire.Message:
        """The next message, which must be of `kind` (or one of them); a Refuse or Abort from
        the peer becomes an error."""
        wait = self.ctx.peer_timeout if timeout is None else timeout
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        try:
            msg = self.recv(wait)
        except TimeoutError:
            raise PeerLost(f"the peer sent no {names} within {wait:.0f} s; is it alive?") from None
        refused(msg)
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected {names} from the peer, got {type(msg).__name__}")
        return msg

    def drain(self) -> list[wire.Message | Blob]:
        """Every message that has arrived, without waiting."""
        out = []
        while (msg := self.ctx.channel.poll()) is not None:
            refused(msg)
            out.append(msg)
        return out

    def check_channel(self, transfer: int) -> None:
        if self.ctx.channel.closed.is_set():
            raise PeerLost(f"lost the peer during transfer {transfer}: {self.ctx.channel.close_reason}")

    def stats(self, transfer: int, start: float, **fields: int) -> TransferStats:
        return TransferStats(transfer, self.mode, time.perf_counter() - start, self.ctx.plan.nbytes, **fields)


def refused(msg: object) -> None:
    """A peer's Refuse or Abort, as the error this side raises."""
    if isinstance(msg, (wire.Abort, wire.Refuse)):
        raise TransferError(f"peer aborted: {msg.reason}")
