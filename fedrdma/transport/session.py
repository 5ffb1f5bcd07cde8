"""A data-plane session: one peer, one mode, one state, any number of transfers.

The session does the handshake and the lifecycle; the mode's mover (`transport.movers`)
moves the bytes, chosen once when the session is made. `open()` exchanges hellos once:
layouts are compared before a byte moves, the pool is registered, and each side hands the
peer exactly what the mode lets it touch. Then the sending side calls `send()` and the
receiving side `receive()` for each transfer. `close()` says goodbye and releases the pool
only after the peer's goodbye: a peer doing one-sided operations gets no other signal.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, ChunkPlan, Region, check_window
from fedrdma.core.errors import LayoutError, PeerLost, ProtocolError, TransferError
from fedrdma.core.layout import FlatState
from fedrdma.core.liveness import PEER_TIMEOUT_S
from fedrdma.core.modes import Mode, Role
from fedrdma.core.scheduler import RetryPolicy
from fedrdma.transport import fabric, wire
from fedrdma.transport.agent import Agent, Pool
from fedrdma.transport.channel import Channel
from fedrdma.transport.movers import Context, mover_for
from fedrdma.transport.slots import Slots
from fedrdma.transport.stats import TransferStats
from fedrdma.transport.streams import DEFAULT_STREAMS, DataListener

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 60.0
"""Opening waits this long for the peer's hello: a peer may still be building its model."""

REFUSE_LINGER_S = 2.0
"""After refusing, wait this long for the peer's own refusal, so ours is not lost on close."""

CLOSE_TIMEOUT_S = 5.0
"""How long `close` waits for the peer's goodbye before releasing the pool anyway."""


class Session:
    """The data plane between this process and one peer, for one FlatState."""

    def __init__(
        self,
        agent: Agent | None,
        state: FlatState,
        channel: Channel,
        mode: Mode | str,
        role: Role | str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        window: int = DEFAULT_WINDOW,
        policy: RetryPolicy | None = None,
        peer_timeout: float = PEER_TIMEOUT_S,
        on_chunk: Callable[[int, int], None] | None = None,
        pool: Pool | None = None,
        streams: DataListener | None = None,
        data_streams: int = DEFAULT_STREAMS,
        trusted_fabric: bool = False,
        follow_plan: bool = False,
        slots: Slots | None = None,
        on_moved: Callable[[int], None] | None = None,
        verify: bool = True,
    ) -> None:
        mode, role = Mode(mode), Role(role)
        if mode.one_sided and agent is None:
            raise ValueError(f"mode {mode} needs a NIXL agent")
        if slots is not None and (not mode.receiver_places or role is not Role.RECEIVER or follow_plan
                                  or slots.size < min(chunk_size, state.nbytes)):
            raise TransferError(f"a bounded inbox lands only a tcp-e, rdma-e or rdma-e-pull receiver's own chunks, "
                                f"each at most its {slots.size}-byte slots ({mode} {role}, {chunk_size}-byte chunks)")
        if slots is not None and mode.registers_slots and (agent is None or slots.pool.registration is None
                                                           or slots.pool.registration.agent is not agent):
            raise TransferError("a pull's bounded inbox must be registered with the session's agent "
                                "(SlotPool.register) before READs can land in it")
        self.ctx = Context(
            agent, state, channel, mode, role, ChunkPlan.build(state.nbytes, chunk_size), check_window(window),
            policy or RetryPolicy(), peer_timeout, on_chunk, pool, streams=streams, data_streams=data_streams,
            follow_plan=follow_plan, slots=slots, on_moved=on_moved, verify=verify,
        )
        self.trusted_fabric = trusted_fabric
        """The operator's statement that the peer may reach this whole process (see `transport.fabric`)."""
        self._owns_pool = pool is None
        """A pool handed in (one buffer serving several sessions) outlives this session."""
        self.mover = mover_for(self.ctx)
        self._transfer = 0
        self._opened = False

    # -- what callers read -------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self.ctx.mode

    @property
    def role(self) -> Role:
        return self.ctx.role

    @property
    def plan(self) -> ChunkPlan:
        return self.ctx.plan

    handed: Region | None = None
    """The memory of this side that the peer was handed keys to at open (None: none)."""

    @property
    def peer_hello(self) -> wire.Hello | None:
        """What the peer handed us at open: the trust model's tests read it."""
        return self.ctx.peer

    # -- handshake -------------------------------------------------------------------
    def open(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Exchange hellos; refuse a different layout or mode before any byte moves."""
        ctx = self.ctx
        fabric.require_trust(ctx.mode, self.trusted_fabric, fabric.detect())  # before anything is registered
        if ctx.mode.registers_pool and ctx.slots is None:  # a bounded inbox lands in its slots alone
            assert ctx.agent is not None
            if ctx.pool is None:
                ctx.pool = ctx.agent.register(ctx.state.buffer)
            elif ctx.pool.buffer.data_ptr() != ctx.state.buffer.data_ptr():
                raise TransferError("the pool handed to the session is not the state's buffer")
        offered = self.mover.offer()
        self.handed = offered.region
        ctx.channel.send(wire.Hello(
            mode=ctx.mode, layout_id=ctx.state.layout_id, nbytes=ctx.state.nbytes,
            agent=ctx.agent.name if ctx.agent else "",
            metadata=wire.b64(offered.metadata) if offered.metadata else "",
            region=wire.RegionMsg.of(offered.region) if offered.region is not None else None,
            data_port=offered.data_port, ticket=wire.b64(offered.ticket) if offered.ticket else "",
            data_streams=offered.data_streams, slots=offered.slots,
        ))
        peer = ctx.channel.recv(timeout)
        if isinstance(peer, wire.Refuse):
            raise LayoutError(f"peer refused the session: {peer.reason}")
        if not isinstance(peer, wire.Hello):
            raise ProtocolError(f"expected the peer's hello, got {type(peer).__name__}")
        problem = ""
        if peer.layout_id != ctx.state.layout_id or peer.nbytes != ctx.state.nbytes:
            problem = (
                f"layout mismatch: this side holds layout {ctx.state.layout_id} ({ctx.state.nbytes} bytes), "
                f"the peer holds layout {peer.layout_id} ({peer.nbytes} bytes); "
                "both sides must build the same model with the same trainable tensors"
            )
        elif peer.mode != ctx.mode:
            problem = f"mode mismatch: this side speaks {ctx.mode}, the peer speaks {peer.mode}"
        if problem:
            ctx.channel.send(wire.Refuse(reason=problem))
            try:  # let the refusal reach the peer before this side closes the stream
                ctx.channel.recv(REFUSE_LINGER_S)
            except (PeerLost, TimeoutError):
                pass
            raise LayoutError(problem)
        ctx.peer = peer
        self.mover.connect(peer)
        self._opened = True

    def rebind(self, state: FlatState, pool: Pool | None) -> None:
        """Send from another buffer of the same layout from the next transfer on.

        The aggregator double-buffers its global state: the pool that collected a round's
        average becomes the one it broadcasts from. Only a sender's local buffer can move;
        the peer never learns this side's addresses when it is the initiator.
        """
        ctx = self.ctx
        if ctx.role is not Role.SENDER or ctx.mode.initiator is not Role.SENDER:
            raise TransferError("only the initiating sender can switch buffers between transfers")
        if state.layout_id != ctx.state.layout_id:
            raise LayoutError(f"cannot rebind to layout {state.layout_id}; the session moves {ctx.state.layout_id}")
        if ctx.mode.registers_pool and (pool is None or pool.buffer.data_ptr() != state.buffer.data_ptr()):
            raise TransferError(f"{ctx.mode} needs the registered pool of the new buffer")
        ctx.state = state
        ctx.pool = pool

    def retune(self, chunk_size: int, window: int) -> None:
        """Use another chunk size and window from the next transfer on.

        A sweep (T2, `tune --probe`) tries many settings on one warm connection: a fresh
        connection per setting would measure TCP's slow start, not the setting. The
        receiver follows the chunk size each transfer's Begin announces.
        """
        ctx = self.ctx
        if ctx.role is not Role.SENDER or not ctx.mode.one_sided or ctx.mode.initiator is not Role.SENDER:
            raise TransferError("only a pushing sender sets the chunk size; a receiver follows its Begin")
        plan = ChunkPlan.build(ctx.state.nbytes, chunk_size)
        ctx.window = check_window(window)
        if plan.chunk_size != ctx.plan.chunk_size:
            self.mover.replan(plan)

    # -- transfers -------------------------------------------------------------------
    def send(self) -> TransferStats:
        self._require(Role.SENDER)
        self._transfer += 1
        return self.mover.send(self._transfer)

    def receive(self) -> TransferStats:
        self._require(Role.RECEIVER)
        stats = self.mover.receive()
        self._transfer = stats.transfer
        return stats

    def _require(self, role: Role) -> None:
        if not self._opened:
            raise TransferError("open() the session before moving bytes")
        if self.ctx.role is not role:
            raise TransferError(f"this session's side is the {self.ctx.role}, not the {role}")

    # -- lifecycle ---------------------------------------------------------------------
    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Say goodbye, wait for the peer's (it may still touch our pool until then), release."""
        channel = self.ctx.channel
        try:
            if not channel.closed.is_set():
                channel.send(wire.Bye())
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if isinstance(self.mover.recv(max(0.0, deadline - time.monotonic())), wire.Bye):
                        break
        except (PeerLost, TimeoutError):
            pass
        finally:
            self._release()

    def abort(self) -> None:
        """After a failure: forget the peer and release our registrations without waiting.

        Only for a peer that is gone or refused: a live peer may still touch our pool, which
        is why `close` waits for its goodbye first.
        """
        self._release()

    def _release(self) -> None:
        ctx = self.ctx
        try:
            self.mover.close()
        finally:
            if ctx.pool is not None and self._owns_pool:
                ctx.pool.close()
            ctx.channel.close()
