"""The initiator's loop: post, poll and retry chunk operations until the scheduler is done.

Shared by every side that posts one-sided operations: the sender of a push (`rdma-e`,
`rdma`) and the receiver of a pull (`rdma-e-pull`). The scheduler (`core.scheduler`)
decides what to post and when a failure means a reconnect; this loop executes it. What
differs between the modes comes in through an `Initiation`.
"""

from __future__ import annotations

import logging
import time

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import PeerLost, TransferError
from fedrdma.core.liveness import Liveness
from fedrdma.core.scheduler import Scheduler
from fedrdma.transport import wire
from fedrdma.transport.agent import Operation, RemotePeer
from fedrdma.transport.movers.base import Mover
from fedrdma.transport.pacing import Pacer

log = logging.getLogger(__name__)


class Initiation:
    """What one mode adds to the initiator's loop, called from the loop's thread."""

    op: str
    """"WRITE" (push) or "READ" (pull)."""

    def notice(self, index: int, generation: int) -> bytes:
        """The notification that travels with chunk `index`'s operation (b"" for none)."""
        return b""

    def room(self, sched: Scheduler) -> int | None:
        """How many chunks may be posted now (free landing places); None: no limit but the window."""
        return None

    def place(self, index: int) -> int | None:
        """The local entry chunk `index` is posted from or lands in (None: its own, in a pool)."""
        return None

    def target(self, index: int) -> int | None:
        """The peer's entry chunk `index` lands in (None: its own, in the peer's pool); called
        first for each post, before `notice`."""
        return None

    def remote_dlist(self, remote: RemotePeer, plan: ChunkPlan) -> object:
        """Descriptors of the peer's memory that `target` indexes: by default one per chunk."""
        return remote.dlist(plan)

    def kept(self, place: int) -> None:
        """NIXL would not release an operation on local entry `place`: that memory is not ours again."""

    def on_message(self, sched: Scheduler, msg: wire.Message, now: float) -> None:
        """A message from the peer arrived (a status, checksums)."""

    def on_landed(self, sched: Scheduler, index: int, now: float) -> None:
        """Chunk `index`'s operation completed."""

    def each_turn(self, sched: Scheduler, now: float) -> bool:
        """Work of the mode's own on every turn of the loop; True if anything progressed."""
        return False

    def resumed(self, sched: Scheduler) -> None:
        """After a reconnect: tell the scheduler what the peer already holds verified."""


def drive(mover: Mover, transfer: int, remote: RemotePeer, local: object, how: Initiation) -> Scheduler:
    """Run one transfer's operations to the end; the scheduler's figures are returned."""
    ctx = mover.ctx
    assert ctx.agent is not None
    sched = Scheduler(ctx.plan, ctx.window, ctx.policy)
    sched.generation = ctx.generation
    remote_dlist = how.remote_dlist(remote, ctx.plan)
    ops: dict[int, tuple[Operation, int]] = {}
    zombies: list[Operation] = []
    start = time.monotonic()
    liveness = Liveness(ctx.peer_timeout, start)
    pacer = Pacer(start)
    try:
        while not sched.done:
            now = time.monotonic()
            progressed = False
            for msg in mover.drain():
                progressed = True
                liveness.heard(now)
                how.on_message(sched, msg, now)
            for post in sched.poll(now, how.room(sched)):
                index = post.chunk.index
                try:
                    far = how.target(index)
                    operation = ctx.agent.post(how.op, local, remote_dlist, index, how.notice(index, post.generation),
                                               how.place(index), far)
                except Exception as exc:  # NIXL raises when the endpoint is gone
                    sched.failed(index, post.generation, now, f"posting failed: {exc}")
                    break
                if index in ops:  # a corrupt verdict overtook this chunk's last completion
                    zombies.append(ops[index][0])
                ops[index] = (operation, post.generation)
            for index, (operation, generation) in list(ops.items()):
                state = operation.state()
                if state == "PROC":
                    continue
                del ops[index]
                operation.release()
                progressed = True
                liveness.heard(now)
                if state == "DONE":
                    pacer.moved(ctx.plan.chunks[index].length, now)
                    ctx.moved(ctx.plan.chunks[index].length)
                    if sched.landed(index, generation):
                        how.on_landed(sched, index, now)
                else:
                    sched.failed(index, generation, now, operation.error or "failed on the wire")
            for index, generation in sched.expired(now):
                entry = ops.pop(index, None)
                if entry is not None:
                    zombies.append(entry[0])  # still NIXL's: released once its endpoint is rebuilt
                sched.failed(index, generation, now, f"missed its {ctx.policy.chunk_timeout_s:.0f} s deadline")
            if how.each_turn(sched, now):
                progressed = True
                liveness.heard(now)
            if sched.broken is not None:
                zombies.extend(operation for operation, _ in ops.values())
                ops.clear()
                _reconnect(mover, transfer, sched, remote, how, zombies)
                remote_dlist = how.remote_dlist(remote, ctx.plan)
                liveness.heard(time.monotonic())
            if sched.error:
                raise TransferError(f"transfer {transfer} failed: {sched.error}")
            mover.check_channel(transfer)
            if liveness.expired(now):
                raise PeerLost(
                    f"no progress for {ctx.peer_timeout:.0f} s during transfer {transfer} "
                    f"({len(sched.verified_indices())}/{len(ctx.plan)} chunks verified); is the peer alive?"
                )
            pacer(progressed)
    finally:
        _release([op for op, _ in ops.values()] + zombies, how)
    return sched


def _release(operations: list[Operation], how: Initiation) -> None:
    """Free operations that will never be waited on; one NIXL would not free keeps its local memory."""
    for operation in operations:
        if not operation.release():
            how.kept(operation.place)
    operations.clear()


def _reconnect(mover: Mover, transfer: int, sched: Scheduler, remote: RemotePeer, how: Initiation,
               zombies: list[Operation]) -> None:
    """Drop the broken endpoint, connect afresh, and learn what the peer already holds.

    The operations of the old endpoint (`zombies`) are released once it is gone, before the
    peer is asked again: what they would land in may then be lent to a chunk of the new one.
    """
    ctx = mover.ctx
    reason = sched.broken or "endpoint broken"
    while True:
        log.warning("transfer %d: %s; reconnecting", transfer, reason)
        sched.disconnected(time.monotonic(), reason)
        ctx.generation = sched.generation
        if sched.error:
            return
        mover.check_channel(transfer)
        try:
            remote.reconnect()
            break
        except Exception as exc:  # NIXL raises while the peer cannot be reached yet
            reason = f"reconnecting failed ({type(exc).__name__}: {exc})"
            time.sleep(ctx.policy.backoff(sched.reconnects))
    _release(zombies, how)
    how.resumed(sched)
