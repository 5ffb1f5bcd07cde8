"""`rdma-e-pull` (FedRDMA-E pull, the paper's "reversed receiving"): the receiver READs each chunk.

The holder advertises its pool and streams the chunk checksums; the receiver posts READs
into its own pool, hashes what landed and vouches for it. The holder hands the receiver
keys to its pool and receives no key at all. Over UCX TCP a READ is emulated by the
holder's worker, so the holder keeps driving UCX until the receiver says it is done, and
the receiver's statuses on the way are what tells the holder it is alive.

A receiver with a bounded inbox (`transport.slots`, the aggregator's default) READs into a
few registered chunk-sized slots instead: it posts no more chunks than slots are free,
folds each verified chunk from its slot and lends the slot to the next chunk.
"""

from __future__ import annotations

import logging
import time

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import PeerLost, ProtocolError
from fedrdma.core.liveness import Liveness
from fedrdma.core.modes import Mode
from fedrdma.core.receiver import Action, Corrupt, Hash, Lost, Receiver, Status, Verified
from fedrdma.core.scheduler import Scheduler
from fedrdma.transport import wire
from fedrdma.transport.agent import Pool, RemotePeer
from fedrdma.transport.hashing import ChunkHasher, LandedHashes
from fedrdma.transport.movers.base import Mover, Offered, refused
from fedrdma.transport.movers.initiate import Initiation, drive
from fedrdma.transport.movers.land import send_status
from fedrdma.transport.pacing import Pacer
from fedrdma.transport.slots import Slot, Slots
from fedrdma.transport.stats import TransferStats

log = logging.getLogger(__name__)

CHECKSUM_BATCH = 64
"""Chunk checksums per message from the holder: one small message each, 256 MiB of 4 MiB chunks."""


class Pulling(Initiation):
    """The receiver's side of a pull, inside the initiator's loop.

    With `slots` (a bounded inbox) each READ lands in a slot taken as it is posted, instead
    of at the chunk's offset in the state: the chunk is hashed there, folded from there once
    verified, and the slot goes back. No more chunks are posted than slots are free.
    """

    op = "READ"

    def __init__(self, mover: Mover, receiver: Receiver, slots: Slots | None = None) -> None:
        self.mover = mover
        self.receiver = receiver
        self.hashes = LandedHashes()
        self.slots = slots
        self._placed: dict[int, Slot] = {}
        """Chunk index -> the slot its READ lands in, from its post until its verdict."""
        self._reserve: list[Slot] = []
        """Slots taken for this turn's posts; what the turn did not use goes back."""
        self._kept: set[int] = set()
        """Numbers of slots NIXL did not let go of: never lent again."""
        self._pool_moved = slots.pool.moved if slots is not None else 0.0

    def local_dlist(self, pool: Pool | None) -> object:
        """Where the READs land: the slots, one entry per (chunk length, slot), or else `pool`,
        one entry per chunk."""
        if self.slots is None:
            assert pool is not None
            return pool.local_dlist(self.receiver.plan)
        assert self.slots.pool.registration is not None
        return self.slots.pool.registration.slot_dlist(self.slots.size, self.receiver.plan.lengths)

    def room(self, sched: Scheduler) -> int | None:
        """Slots for as many chunks as the window has room for, if that many are free."""
        if self.slots is None:
            return None
        while len(self._reserve) < sched.window - sched.in_flight and (slot := self.slots.take_now()) is not None:
            self._reserve.append(slot)
        return len(self._reserve)

    def place(self, index: int) -> int | None:
        if self.slots is None:
            return None
        slot = self._reserve.pop()
        self._placed[index] = slot
        return self.receiver.plan.slot_entry(index, slot.number, self.slots.pool.count)

    def kept(self, place: int) -> None:
        if self.slots is not None:
            number = place % self.slots.pool.count
            self._kept.add(number)
            log.warning("inbox slot %d is still NIXL's after its READ was given up: it is not lent again", number)

    def on_message(self, sched: Scheduler, msg: wire.Message, now: float) -> None:
        if isinstance(msg, wire.Checksums) and msg.transfer == self.receiver.transfer:
            for k, value in enumerate(msg.values):
                self._execute(sched, self.receiver.expect(msg.start + k, value, now), now)
        else:
            self.receiver.heard(now)

    def on_landed(self, sched: Scheduler, index: int, now: float) -> None:
        self._execute(sched, self.receiver.landed(index, now), now)

    def each_turn(self, sched: Scheduler, now: float) -> bool:
        finished = self.hashes.finished()
        for index, generation, value in finished:
            self._execute(sched, self.receiver.hashed(index, generation, value, now), now)
        self._give_back_reserve()
        if self.slots is not None and (why := self.slots.stalled()):
            raise PeerLost(why)
        progressed = bool(finished) or self._waiting_moved(now)
        self._execute(sched, self.receiver.tick(now), now)
        return progressed

    def _give_back_reserve(self) -> None:
        """The slots this turn reserved and did not post into: others may have them."""
        if self.slots is not None:
            for slot in self._reserve:
                self.slots.give(slot, used=False)
        self._reserve.clear()

    def _waiting_moved(self, now: float) -> bool:
        """True when this side holds no slot at all and other receivers gave some back since
        the last turn: a wait on the shared slots that moves, which the liveness deadlines
        must not take for a silent peer."""
        if self.slots is None:
            return False
        before, self._pool_moved = self._pool_moved, self.slots.pool.moved
        if self._placed or self._pool_moved == before:
            return False
        self.receiver.heard(now)
        return True

    def resumed(self, sched: Scheduler) -> None:
        """We verify ourselves, so we know what we hold: resume from that."""
        self.receiver.reconnected(sched.generation)
        self._free(list(self._placed))  # the old endpoint's operations are released: nothing lands there now
        sched.resume(self.receiver.verified_indices())

    def close(self) -> None:
        """After the transfer (or its failure): every slot back but those NIXL kept."""
        self.hashes.close()
        self._free(list(self._placed))
        self._give_back_reserve()

    def _free(self, indices: list[int]) -> None:
        for index in indices:
            slot = self._placed.pop(index, None)
            if slot is not None and slot.number not in self._kept:
                assert self.slots is not None
                self.slots.give(slot)

    def _execute(self, sched: Scheduler, actions: list[Action], now: float) -> None:
        plan = self.receiver.plan
        for action in actions:
            if isinstance(action, Hash):
                chunk = plan.chunks[action.index]
                slot = self._placed.get(action.index)
                if slot is None and self.slots is not None:
                    raise ProtocolError(f"chunk {action.index} is to be hashed but landed in no slot")
                view = (slot.view(chunk.length) if slot is not None
                        else self.mover.ctx.state.memoryview(chunk.offset, chunk.length))
                self.hashes.submit(action.index, action.generation, view)
            elif isinstance(action, Verified):
                sched.verified(action.index)
                chunk = plan.chunks[action.index]
                slot = self._placed.get(action.index)
                try:
                    self.mover.ctx.verified(chunk.offset, chunk.length, slot)
                finally:
                    self._free([action.index])
            elif isinstance(action, Corrupt):
                sched.corrupt(action.index, now)
                self._free([action.index])
            elif isinstance(action, Status):
                send_status(self.mover, self.receiver, action, sched.bytes_posted if action.complete else 0)
            elif isinstance(action, Lost):
                raise PeerLost(action.reason)


class PullMover(Mover):
    mode = Mode.RDMA_E_PULL

    remote: RemotePeer | None = None

    def offer(self) -> Offered:
        """The holder hands keys to its pool alone, and the pool's range."""
        ctx = self.ctx
        if ctx.role is ctx.mode.initiator:
            return Offered()
        assert ctx.agent is not None and ctx.pool is not None
        return Offered(ctx.agent.partial_metadata(ctx.pool), ctx.pool.region)

    def connect(self, peer: wire.Hello) -> None:
        if self.ctx.role is not self.ctx.mode.initiator:
            return
        assert self.ctx.agent is not None
        if not peer.metadata or peer.region is None:
            raise ProtocolError("the peer advertised no pool; it cannot be read from")
        self.remote = RemotePeer(self.ctx.agent, wire.unb64(peer.metadata), [peer.region.region()])
        self.remote.dlist(self.ctx.plan)

    # -- the holder ----------------------------------------------------------------------
    def send(self, transfer: int) -> TransferStats:
        ctx = self.ctx
        start = time.perf_counter()
        plan = ctx.plan
        ctx.channel.send(wire.Offer(transfer=transfer, chunk_size=plan.chunk_size, nchunks=len(plan)))
        hasher = ChunkHasher(ctx.state, plan)
        try:
            for first in range(0, len(plan), CHECKSUM_BATCH):
                values = [hasher.checksum(i) for i in range(first, min(len(plan), first + CHECKSUM_BATCH))]
                ctx.channel.send(wire.Checksums(transfer=transfer, start=first, values=values))
        finally:
            hasher.close()
        # The receiver may READ our pool until it says it is done: meanwhile let UCX serve the
        # READs (over TCP the memory owner's worker answers them), and take each of its
        # statuses as a sign of life, so a long transfer over a slow line is not cut short.
        now = time.monotonic()
        liveness = Liveness(ctx.peer_timeout, now)
        pacer = Pacer(now)
        while True:
            try:
                msg = self.recv(liveness.remaining(time.monotonic()), pacer)
            except TimeoutError:
                raise PeerLost(
                    f"the receiver went silent for {ctx.peer_timeout:.0f} s during transfer {transfer}"
                ) from None
            now = time.monotonic()
            liveness.heard(now)
            refused(msg)
            if isinstance(msg, wire.Status) and msg.transfer == transfer:
                vouched = sum(plan.chunks[i].length for i in msg.verified if 0 <= i < len(plan))
                pacer.moved(vouched, now)
                ctx.moved(vouched)
                if msg.complete:
                    return self.stats(transfer, start, bytes_posted=msg.bytes_posted)

    # -- the receiver ----------------------------------------------------------------------
    def receive(self) -> TransferStats:
        ctx = self.ctx
        assert self.remote is not None and (ctx.pool is not None or ctx.slots is not None)
        offer = self.expect(wire.Offer)
        assert isinstance(offer, wire.Offer)
        start = time.perf_counter()
        plan = self.plan_for(offer.chunk_size, offer.nchunks)
        receiver = Receiver(plan, offer.transfer, time.monotonic(), ctx.peer_timeout, generation=ctx.generation,
                            verify=ctx.verify)
        pulling = Pulling(self, receiver, ctx.slots)
        ctx.state.touch()  # bytes land from the first READ on
        try:
            sched = drive(self, offer.transfer, self.remote, pulling.local_dlist(ctx.pool), pulling)
        finally:
            pulling.close()
        ctx.state.touch()
        return self.stats(offer.transfer, start, bytes_posted=sched.bytes_posted, reconnects=sched.reconnects,
                          corrupt=receiver.corrupt_count)

    def replan(self, plan: ChunkPlan) -> None:
        super().replan(plan)
        if self.remote is not None:
            self.remote.dlist(plan)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None
