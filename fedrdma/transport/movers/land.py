"""The target's loop of a push: chunks land by the peer's WRITEs, and this side vouches for them.

Shared by `rdma-e` (chunks land in the pool) and `rdma` (in staging buffers). Every rule is
`core.receiver.Receiver`'s; this loop feeds it the peer's notifications and messages,
hashes what it asks for, and sends what it says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import PeerLost, ProtocolError
from fedrdma.core.receiver import Action, Corrupt, Hash, Lost, Receiver, Status, Verified
from fedrdma.transport import wire
from fedrdma.transport.hashing import LandedHashes
from fedrdma.transport.movers.base import Mover
from fedrdma.transport.movers.granting import Landing
from fedrdma.transport.pacing import Pacer

log = logging.getLogger(__name__)


def send_status(mover: Mover, receiver: Receiver, status: Status, bytes_posted: int = 0) -> None:
    mover.ctx.channel.send(wire.Status(
        transfer=receiver.transfer, generation=receiver.generation, verified=list(status.verified),
        corrupt=list(status.corrupt), complete=status.complete, bytes_posted=bytes_posted,
    ))


def land(
    mover: Mover, transfer: int, plan: ChunkPlan, view: Callable[[int], memoryview],
    on_verified: Callable[[int], None], landing: Landing | None = None,
) -> Receiver:
    """Receive one pushed transfer until every chunk is verified and the final status sent.

    With `landing` (a push into a bounded inbox) the sender WRITEs into granted landing slots:
    each landed chunk is copied into the inbox, and `view` and `on_verified` see the copy.
    """
    ctx = mover.ctx
    assert ctx.agent is not None and ctx.peer is not None
    start = time.monotonic()
    receiver = Receiver(plan, transfer, start, ctx.peer_timeout, generation=ctx.generation, verify=ctx.verify)
    hashes = LandedHashes()
    pacer = Pacer(start)

    def execute(actions: list[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, Hash):
                fill = landing.fill(action.index) if landing is not None else None
                hashes.submit(action.index, action.generation, view(action.index), fill)
            elif isinstance(action, Verified):
                pacer.moved(plan.chunks[action.index].length, now)
                on_verified(action.index)
            elif isinstance(action, Status):
                send_status(mover, receiver, action)
            elif isinstance(action, Lost):
                raise PeerLost(action.reason)
            elif isinstance(action, Corrupt):  # reported by the status; its copy is not kept
                if landing is not None:
                    landing.drop(action.index)
            else:
                raise AssertionError(f"unknown action {action!r}")

    def noticed(notice: wire.Notice, now: float) -> None:
        actions = receiver.notice(notice.transfer, notice.generation, notice.index, notice.checksum, now)
        if landing is not None:
            landing.settle(notice.index, actions)
        execute(actions, now)

    try:
        while not receiver.complete:
            now = time.monotonic()
            progressed = False
            for note in ctx.agent.notifications(ctx.peer.agent):
                try:
                    notice = wire.parse_notice(note)
                except ProtocolError as exc:
                    log.warning("dropping notification from %s: %s", ctx.peer.agent, exc)
                    continue
                progressed = True
                if landing is None:
                    noticed(notice, now)
                elif notice.transfer == transfer:  # a late one of an earlier transfer holds no slot now
                    landing.landed(notice)
            if landing is not None:
                for notice in landing.admit():
                    noticed(notice, now)
                if landing.waiting_moved():
                    progressed = True
                    receiver.heard(now)
            for index, generation, value in hashes.finished():
                progressed = True
                if landing is not None:
                    landing.filled(index, generation)
                execute(receiver.hashed(index, generation, value, now), now)
            for msg in mover.drain():
                progressed = True
                if isinstance(msg, wire.Resume):
                    execute(receiver.resume(msg.transfer, msg.generation, now), now)
                    ctx.generation = receiver.generation
                    if landing is not None:
                        hashes.settle()  # no copy may still run into what the reconnect gives back
                        landing.reconnected(receiver.generation)
                else:
                    receiver.heard(now)
            execute(receiver.tick(now), now)
            if landing is not None and not receiver.complete and (fresh := landing.grant()):
                ctx.channel.send(wire.Grant(transfer=transfer, generation=receiver.generation, slots=fresh))
            mover.check_channel(transfer)
            pacer(progressed)
    finally:
        hashes.close()
        if landing is not None:
            landing.close()
    return receiver
