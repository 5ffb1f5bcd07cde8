"""The gRPC baseline, the way FATE and Flower move a model: serialize, stream, join, load.

Kept honest: safetensors (no pickle, a fast serializer), frames large enough to amortize
gRPC's per-message cost, and timings split so a reader sees what the wire costs apart from
(de)serialization.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedrdma.core.errors import LayoutError, PeerLost, ProtocolError
from fedrdma.transport import wire
from fedrdma.transport.channel import Blob

if TYPE_CHECKING:
    from fedrdma.transport.session import Session, TransferStats

FRAME_BYTES = 4 << 20
"""4 MiB per gRPC message: what FATE and Flower default to, and the best cell measured here."""


def send_serialized(session: Session) -> TransferStats:
    from fedrdma.transport.session import TransferStats

    start = time.perf_counter()
    payload = st_save(dict(session.state.views))
    serialized = time.perf_counter()
    nframes = (len(payload) + FRAME_BYTES - 1) // FRAME_BYTES
    transfer = session._transfer
    session.channel.send(wire.Begin(transfer=transfer, chunk_size=FRAME_BYTES, nchunks=nframes))
    view = memoryview(payload)
    for off in range(0, len(payload), FRAME_BYTES):
        session.channel.send_blob(view[off : off + FRAME_BYTES])
    del view, payload
    status = session.expect(wire.Status)
    assert isinstance(status, wire.Status)
    end = time.perf_counter()
    decode = sum(status.seconds.values())
    stats = TransferStats(transfer, session.mode, end - start, session.state.nbytes, bytes_posted=session.state.nbytes)
    stats.extra = {
        "serialize_seconds": serialized - start,
        "deserialize_seconds": decode,
        "wire_seconds": max(1e-9, end - serialized - decode),
    }
    return stats


def receive_serialized(session: Session) -> TransferStats:
    from fedrdma.transport.session import TransferStats

    begin = session.expect(wire.Begin)
    assert isinstance(begin, wire.Begin)
    start = time.perf_counter()
    frames: list[bytes] = []
    while len(frames) < begin.nchunks:
        try:
            frame = session.channel.recv(session.peer_timeout)
        except TimeoutError:
            raise PeerLost(f"the sender went silent mid-stream ({len(frames)}/{begin.nchunks} frames)") from None
        if not isinstance(frame, Blob):
            raise ProtocolError(f"expected a data frame, got {type(frame).__name__}")
        frames.append(frame)
    arrived = time.perf_counter()
    payload = b"".join(frames)
    del frames
    tensors = st_load(payload)
    del payload
    if set(tensors) != set(session.state.views):
        raise LayoutError("the baseline payload names other tensors than this side's layout")
    with torch.no_grad():
        for name, tensor in tensors.items():
            session.state.views[name].copy_(tensor)
    session.state.touch()
    del tensors
    done = time.perf_counter()
    session.channel.send(
        wire.Status(transfer=begin.transfer, complete=True, seconds={"join_deserialize_load": done - arrived})
    )
    if session.on_chunk:
        session.on_chunk(0, session.state.nbytes)
    return TransferStats(begin.transfer, session.mode, done - start, session.state.nbytes)
