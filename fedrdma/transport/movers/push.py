"""`rdma-e` (FedRDMA-E, push): the holder WRITEs each chunk straight into the receiver's pool.

Pools are registered once per peer and reused for every transfer; each chunk lands at its
final offset, so there is no staging and no reassembly. Each WRITE carries a notification
with the chunk's checksum; the receiver hashes what landed and reports in batches.

A receiver with a bounded inbox (the aggregator's default) hands the sender a few landing
slots instead of a pool and grants them chunk by chunk (`transport.movers.granting`): the
sender WRITEs each chunk into a slot it holds a grant for and names the slot in its notice.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import ProtocolError
from fedrdma.core.modes import Mode
from fedrdma.core.scheduler import Scheduler
from fedrdma.transport import wire
from fedrdma.transport.agent import RemotePeer
from fedrdma.transport.hashing import ChunkHasher
from fedrdma.transport.movers.base import Mover, Offered
from fedrdma.transport.movers.granting import GRANT_SPARE_SLOTS, Landing, LandingArea
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


class GrantFollower(StatusFollower):
    """A push into a bounded inbox: each chunk goes into a landing slot the receiver granted
    (`transport.movers.granting`), named in its notice, and only as many chunks are posted
    as grants are in hand."""

    def __init__(self, mover: Mover, transfer: int, checksum: Callable[[int], int], count: int) -> None:
        super().__init__(mover, transfer, self._notice)
        self.checksum, self.count = checksum, count
        self._granted: deque[int] = deque()
        self._slot_of: dict[int, int] = {}

    def _notice(self, index: int, generation: int) -> bytes:
        return wire.chunk_notice(self.transfer, generation, index, self.checksum(index), self._slot_of[index])

    def room(self, sched: Scheduler) -> int | None:
        return len(self._granted)

    def target(self, index: int) -> int | None:
        slot = self._granted.popleft()
        self._slot_of[index] = slot
        return self.mover.ctx.plan.slot_entry(index, slot, self.count)

    def remote_dlist(self, remote: RemotePeer, plan: ChunkPlan) -> object:
        return remote.slot_dlist(self.count, plan.lengths)

    def on_message(self, sched: Scheduler, msg: wire.Message, now: float) -> None:
        if isinstance(msg, wire.Grant):
            self._grant(sched, msg)
        else:
            super().on_message(sched, msg, now)

    def _grant(self, sched: Scheduler, grant: wire.Grant) -> None:
        if grant.transfer != self.transfer or grant.generation != sched.generation:
            return  # an older connection's: its slots are void
        for slot in grant.slots:
            if not 0 <= slot < self.count or slot in self._granted:
                raise ProtocolError(f"the receiver granted landing slot {slot}, outside its {self.count} "
                                    "or already granted")
            self._granted.append(slot)

    def resumed(self, sched: Scheduler) -> None:
        """Grants of the old connection are void; the receiver grants anew after its status."""
        self._granted.clear()
        self.mover.ctx.channel.send(wire.Resume(transfer=self.transfer, generation=sched.generation))
        while True:
            msg = self.mover.expect((wire.Status, wire.Grant))
            if isinstance(msg, wire.Grant):
                self._grant(sched, msg)
            elif isinstance(msg, wire.Status) and msg.transfer == self.transfer:
                sched.resume(msg.verified)
                if msg.generation == sched.generation:
                    return


class PushMover(Mover):
    mode = Mode.RDMA_E

    remote: RemotePeer | None = None
    landing: LandingArea | None = None
    """A receiver with a bounded inbox: the landing slots the sender is granted."""
    remote_slots = 0
    """A sender: how many landing slots the receiver's region holds (0: a whole pool)."""

    def offer(self) -> Offered:
        """The receiver hands keys to its pool alone (NIXL partial metadata) and the pool's range,
        or, with a bounded inbox, to its landing slots alone."""
        ctx = self.ctx
        if ctx.role is not ctx.mode.initiator.other:
            return Offered()
        assert ctx.agent is not None
        if ctx.slots is not None:
            count = min(ctx.window + GRANT_SPARE_SLOTS, len(ctx.plan))  # a small state needs fewer
            self.landing = LandingArea(ctx.agent, count, max(ctx.plan.lengths))
            return Offered(ctx.agent.partial_metadata(self.landing.pool), self.landing.region,
                           slots=self.landing.count)
        assert ctx.pool is not None
        return Offered(ctx.agent.partial_metadata(ctx.pool), ctx.pool.region)

    def connect(self, peer: wire.Hello) -> None:
        if self.ctx.role is not self.ctx.mode.initiator:
            return
        assert self.ctx.agent is not None
        if not peer.metadata or peer.region is None:
            raise ProtocolError("the peer advertised no pool; it cannot be written to")
        self.remote = RemotePeer(self.ctx.agent, wire.unb64(peer.metadata), [peer.region.region()])
        self.remote_slots = peer.slots
        self._check_remote()

    def _check_remote(self) -> None:
        """Every range checked against the advertised pool now, before a byte moves."""
        assert self.remote is not None
        plan = self.ctx.plan
        if not self.remote_slots:
            self.remote.dlist(plan)
            return
        size = self.remote.regions[0].length // self.remote_slots
        if max(plan.lengths) > size:
            raise ProtocolError(f"the peer's {self.remote_slots} landing slots of {size} bytes cannot hold "
                                f"this side's {max(plan.lengths)}-byte chunks")
        self.remote.slot_dlist(self.remote_slots, plan.lengths)

    def send(self, transfer: int) -> TransferStats:
        ctx = self.ctx
        assert self.remote is not None and ctx.pool is not None
        start = time.perf_counter()
        plan = ctx.plan
        ctx.channel.send(wire.Begin(transfer=transfer, chunk_size=plan.chunk_size, nchunks=len(plan)))
        hasher = ChunkHasher(ctx.state, plan)  # checksums run ahead on another core
        follower = (GrantFollower(self, transfer, hasher.checksum, self.remote_slots) if self.remote_slots
                    else StatusFollower(self, transfer, lambda index, gen: wire.chunk_notice(
                        transfer, gen, index, hasher.checksum(index))))
        try:
            sched = drive(self, transfer, self.remote, ctx.pool.local_dlist(plan), follower)
        finally:
            hasher.close()
        return self.stats(transfer, start, bytes_posted=sched.bytes_posted, reconnects=sched.reconnects)

    def receive(self) -> TransferStats:
        ctx = self.ctx
        begin, start, plan = self.begun()
        if ctx.slots is not None:
            return self._receive_slotted(begin.transfer, start, plan)

        def on_verified(index: int) -> None:
            chunk = plan.chunks[index]
            ctx.verified(chunk.offset, chunk.length)

        ctx.state.touch()  # bytes land from the first WRITE on
        receiver = land(self, begin.transfer, plan, lambda i: ctx.state.memoryview(
            plan.chunks[i].offset, plan.chunks[i].length), on_verified)
        ctx.state.touch()
        return self.stats(begin.transfer, start, corrupt=receiver.corrupt_count)

    def _receive_slotted(self, transfer: int, start: float, plan: ChunkPlan) -> TransferStats:
        """Chunks land in granted landing slots and are folded from their copies in the inbox."""
        ctx = self.ctx
        assert ctx.slots is not None and self.landing is not None
        if max(plan.lengths) > self.landing.size:
            raise ProtocolError(f"{max(plan.lengths)}-byte chunks do not fit the {self.landing.size}-byte landing slots")
        landing = Landing(self.landing, ctx.slots, plan, ctx.generation)

        def on_verified(index: int) -> None:
            chunk = plan.chunks[index]
            try:
                ctx.verified(chunk.offset, chunk.length, landing.copy(index))
            finally:
                landing.drop(index)

        receiver = land(self, transfer, plan, landing.view, on_verified, landing)
        return self.stats(transfer, start, corrupt=receiver.corrupt_count)

    def replan(self, plan: ChunkPlan) -> None:
        super().replan(plan)
        if self.remote is not None:
            self._check_remote()

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None
        if self.landing is not None:
            self.landing.close()
            self.landing = None
