"""`grpc`, the baseline, the way FATE and Flower move a model: serialize, stream, join, load.

Kept honest: safetensors (no pickle, a fast serializer), frames large enough to amortize
gRPC's per-message cost, and timings split so a reader sees what the wire costs apart from
(de)serialization.
"""

from __future__ import annotations

import time

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedrdma.core.errors import LayoutError, PeerLost, ProtocolError
from fedrdma.core.liveness import busy_allowance
from fedrdma.core.modes import Mode
from fedrdma.transport import wire
from fedrdma.transport.channel import Blob
from fedrdma.transport.movers.base import Mover
from fedrdma.transport.stats import TransferStats

FRAME_BYTES = 4 << 20
"""4 MiB per gRPC message: what FATE and Flower default to, and as good as any size the
baseline was tried with (README: Measurements behind the defaults)."""


HEADER_BYTES_PER_TENSOR = 1024
"""A safetensors header entry (name, dtype, shape, offsets) per tensor, with room: a GPT-2's
entries are a few dozen bytes each."""

HEADER_BYTES_BASE = 4096
"""The header's own frame (its length, braces, metadata) with room."""


def header_bound(tensors: int) -> int:
    """At most how large the baseline's safetensors header of `tensors` tensors may be."""
    return HEADER_BYTES_BASE + HEADER_BYTES_PER_TENSOR * tensors


class GrpcMover(Mover):
    mode = Mode.GRPC

    def send(self, transfer: int) -> TransferStats:
        ctx = self.ctx
        start = time.perf_counter()
        payload = st_save(dict(ctx.state.views))
        serialized = time.perf_counter()
        nframes = (len(payload) + FRAME_BYTES - 1) // FRAME_BYTES
        ctx.channel.send(wire.Begin(transfer=transfer, chunk_size=FRAME_BYTES, nchunks=nframes))
        view = memoryview(payload)
        for off in range(0, len(payload), FRAME_BYTES):
            ctx.channel.send_blob(view[off : off + FRAME_BYTES])
        del view, payload
        # The receiver is silent while it joins, deserializes and loads the whole state.
        status = self.expect(wire.Status, ctx.peer_timeout + busy_allowance(ctx.state.nbytes))
        assert isinstance(status, wire.Status)
        end = time.perf_counter()
        decode = sum(status.seconds.values())
        stats = TransferStats(transfer, self.mode, end - start, ctx.state.nbytes, bytes_posted=ctx.state.nbytes)
        stats.extra = {
            "serialize_seconds": serialized - start,
            "deserialize_seconds": decode,
            "wire_seconds": max(1e-9, end - serialized - decode),
        }
        return stats

    def receive(self) -> TransferStats:
        ctx = self.ctx
        begin = self.expect(wire.Begin)
        assert isinstance(begin, wire.Begin)
        start = time.perf_counter()
        limit = ctx.state.nbytes + header_bound(len(ctx.state.layout.specs))
        if begin.chunk_size != FRAME_BYTES or begin.nchunks > -(-limit // FRAME_BYTES):
            raise ProtocolError(
                f"the sender announced {begin.nchunks} frames of {begin.chunk_size} bytes; this side takes "
                f"{FRAME_BYTES}-byte frames and at most {limit} bytes (its state and a safetensors header)"
            )
        frames: list[bytes] = []
        received = 0
        while len(frames) < begin.nchunks:
            try:
                frame = ctx.channel.recv(ctx.peer_timeout)
            except TimeoutError:
                raise PeerLost(f"the sender went silent mid-stream ({len(frames)}/{begin.nchunks} frames)") from None
            if not isinstance(frame, Blob):
                raise ProtocolError(f"expected a data frame, got {type(frame).__name__}")
            received += len(frame)
            if len(frame) > FRAME_BYTES or received > limit:
                raise ProtocolError(f"the sender sent {received} bytes in {len(frames) + 1} frames; this side "
                                    f"takes frames of at most {FRAME_BYTES} bytes and {limit} in all")
            frames.append(frame)
        arrived = time.perf_counter()
        payload = b"".join(frames)
        del frames
        tensors = st_load(payload)
        del payload
        if set(tensors) != set(ctx.state.views):
            raise LayoutError("the baseline payload names other tensors than this side's layout")
        with torch.no_grad():
            for name, tensor in tensors.items():
                ctx.state.views[name].copy_(tensor)
        ctx.state.touch()
        del tensors
        done = time.perf_counter()
        ctx.channel.send(
            wire.Status(transfer=begin.transfer, complete=True, seconds={"join_deserialize_load": done - arrived})
        )
        ctx.verified(0, ctx.state.nbytes)
        return TransferStats(begin.transfer, self.mode, done - start, ctx.state.nbytes)
