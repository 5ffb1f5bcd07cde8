"""`rdma` (FedRDMA): chunked one-sided WRITEs through staging buffers registered per transfer.

Kept honest so that its costs show, not sabotaged: each transfer allocates and registers
a staging buffer per chunk on both sides, the sender copies each chunk into its staging
buffer before the WRITE, and the receiver reassembles the chunks, then rebuilds the tensors
and loads them. That is what FedRDMA-E's pools and in-place landing take away.
"""

from __future__ import annotations

import time

import torch

from fedrdma.core.liveness import busy_allowance
from fedrdma.core.modes import Mode
from fedrdma.transport import wire
from fedrdma.transport.agent import RemotePeer
from fedrdma.transport.hashing import ChunkHasher
from fedrdma.transport.movers.base import Mover
from fedrdma.transport.movers.initiate import drive
from fedrdma.transport.movers.land import land
from fedrdma.transport.movers.push import StatusFollower
from fedrdma.transport.stats import TransferStats


class StagedMover(Mover):
    mode = Mode.RDMA

    remote: RemotePeer | None = None

    def send(self, transfer: int) -> TransferStats:
        ctx = self.ctx
        assert ctx.agent is not None
        start = time.perf_counter()
        plan = ctx.plan
        ctx.channel.send(wire.Begin(transfer=transfer, chunk_size=plan.chunk_size, nchunks=len(plan)))
        # The receiver is silent while it allocates and registers a staging buffer per chunk.
        stage = self.expect(wire.Stage, ctx.peer_timeout + busy_allowance(ctx.state.nbytes))
        assert isinstance(stage, wire.Stage)
        metadata, regions = wire.unb64(stage.metadata), [r.region() for r in stage.regions]
        if self.remote is None:
            self.remote = RemotePeer(ctx.agent, metadata, regions)
        else:
            self.remote.advertise(metadata, regions)
        self.remote.dlist(plan)  # every staging range checked against the plan before a byte moves
        buffers = [torch.empty(c.length, dtype=torch.uint8) for c in plan.chunks]
        staging = ctx.agent.stage(buffers)
        hasher = ChunkHasher(ctx.state, plan)
        staged: set[int] = set()

        def notice(index: int, generation: int) -> bytes:
            if index not in staged:  # the copy FedRDMA-E does not make
                staged.add(index)
                chunk = plan.chunks[index]
                buffers[index].copy_(ctx.state.buffer[chunk.offset : chunk.end])
            return wire.chunk_notice(transfer, generation, index, hasher.checksum(index))

        try:
            sched = drive(self, transfer, self.remote, staging.local_dlist(), StatusFollower(self, transfer, notice))
        finally:
            hasher.close()
            staging.close()
        return self.stats(transfer, start, bytes_posted=sched.bytes_posted, reconnects=sched.reconnects)

    def receive(self) -> TransferStats:
        ctx = self.ctx
        assert ctx.agent is not None
        begin, start, plan = self.begun()
        buffers = [torch.empty(c.length, dtype=torch.uint8) for c in plan.chunks]
        staging = ctx.agent.stage(buffers)
        try:
            ctx.channel.send(wire.Stage(
                transfer=begin.transfer, metadata=wire.b64(staging.partial_metadata()),
                regions=[wire.RegionMsg.of(r) for r in staging.regions()],
            ))
            receiver = land(self, begin.transfer, plan, lambda i: memoryview(buffers[i].numpy()).cast("B"),
                            lambda i: None)
            self._rebuild(buffers)
        finally:
            staging.close()
        return self.stats(begin.transfer, start, corrupt=receiver.corrupt_count)

    def _rebuild(self, buffers: list[torch.Tensor]) -> None:
        """FedRDMA without pools: join the chunks, then rebuild each tensor, then load it."""
        state = self.ctx.state
        joined = torch.cat(buffers)
        tensors = {
            s.name: joined[s.offset : s.offset + s.nbytes].view(s.torch_dtype).view(s.shape).clone()
            for s in state.layout.specs
        }
        del joined
        with torch.no_grad():
            for name, tensor in tensors.items():
                state.views[name].copy_(tensor)
        state.touch()
        self.ctx.verified(0, state.nbytes)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None
