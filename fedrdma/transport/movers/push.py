"""`rdma-e` (FedRDMA-E, push): the holder WRITEs each chunk straight into the receiver's pool.

Pools are registered once per peer and reused for every transfer; each chunk lands at its
final offset, so there is no staging and no reassembly. Each WRITE carries a notification
with the chunk's checksum; the receiver hashes what landed and reports in batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import ProtocolError
from fedrdma.core.modes import Mode
from fedrdma.core.scheduler import Scheduler
from fedrdma.transport import wire
from fedrdma.transport.agent import RemotePeer
from fedrdma.transport.hashing import ChunkHasher
from fedrdma.transport.movers.base import Mover, Offered
from fedrdma.transport.movers.initiate import Initiation, drive
from fedrdma.transport.movers.land import land
from fedrdma.transport.stats import TransferStats


class StatusFollower(Initiation):
    """The pushing side's reading of the receiver's statuses, and its resume after a reconnect."""

    op = "WRITE"

    def __init__(self, mover: Mover, transfer: int, notice: Callable[[int, int], bytes]) -> None:
        self.mover = mover
        self.transfer = transfer
        self.notice = notice

    def on_message(self, sched: Scheduler, msg: wire.Message, now: float) -> None:
        if isinstance(msg, wire.Status) and msg.transfer == self.transfer:
            for index in msg.verified:  # checked against the plan: a bad index is an error
                sched.verified(index)
            for index in msg.corrupt:
                sched.corrupt(index, now)

    def on_landed(self, sched: Scheduler, index: int, now: float) -> None:
        """The receiver vouches for the bytes, not our completion."""

    def resumed(self, sched: Scheduler) -> None:
        """Ask the receiver what it holds; its first status of the new generation answers."""
        self.mover.ctx.channel.send(wire.Resume(transfer=self.transfer, generation=sched.generation))
        while True:
            msg = self.mover.expect(wire.Status)
            assert isinstance(msg, wire.Status)
            if msg.transfer == self.transfer:
                sched.resume(msg.verified)
                if msg.generation == sched.generation:
                    return


class PushMover(Mover):
    mode = Mode.RDMA_E

    remote: RemotePeer | None = None

    def offer(self) -> Offered:
        """The receiver hands keys to its pool alone (NIXL partial metadata) and the pool's range."""
        ctx = self.ctx
        if ctx.role is not ctx.mode.initiator.other:
            return Offered()
        assert ctx.agent is not None and ctx.pool is not None
        return Offered(ctx.agent.partial_metadata(ctx.pool), ctx.pool.region)

    def connect(self, peer: wire.Hello) -> None:
        if self.ctx.role is not self.ctx.mode.initiator:
            return
        assert self.ctx.agent is not None
        if not peer.metadata or peer.region is None:
            raise ProtocolError("the peer advertised no pool; it cannot be written to")
        self.remote = RemotePeer(self.ctx.agent, wire.unb64(peer.metadata), [peer.region.region()])
        self.remote.dlist(self.ctx.plan)  # every range checked against the advertised pool now

    def send(self, transfer: int) -> TransferStats:
        ctx = self.ctx
        assert self.remote is not None and ctx.pool is not None
        start = time.perf_counter()
        plan = ctx.plan
        ctx.channel.send(wire.Begin(transfer=transfer, chunk_size=plan.chunk_size, nchunks=len(plan)))
        hasher = ChunkHasher(ctx.state, plan)  # checksums run ahead on another core
        follower = StatusFollower(
            self, transfer, lambda index, gen: wire.chunk_notice(transfer, gen, index, hasher.checksum(index))
        )
        try:
            sched = drive(self, transfer, self.remote, ctx.pool.local_dlist(plan), follower)
        finally:
            hasher.close()
        return self.stats(transfer, start, bytes_posted=sched.bytes_posted, reconnects=sched.reconnects)

    def receive(self) -> TransferStats:
        ctx = self.ctx
        begin, start, plan = self.begun()

        def on_verified(index: int) -> None:
            chunk = plan.chunks[index]
            ctx.verified(chunk.offset, chunk.length)

        ctx.state.touch()  # bytes land from the first WRITE on
        receiver = land(self, begin.transfer, plan, lambda i: ctx.state.memoryview(
            plan.chunks[i].offset, plan.chunks[i].length), on_verified)
        ctx.state.touch()
        return self.stats(begin.transfer, start, corrupt=receiver.corrupt_count)

    def replan(self, plan: ChunkPlan) -> None:
        super().replan(plan)
        if self.remote is not None:
            self.remote.dlist(plan)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None
