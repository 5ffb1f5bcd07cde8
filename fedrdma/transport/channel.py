"""A duplex message channel between two peers over one gRPC bidirectional stream.

Session messages (JSON) and, for the gRPC baseline, raw blobs share the stream; a frame's
first byte says which. The dialing side is the client, so a silo behind a firewall can
reach an aggregator without opening a port. A broken stream (peer killed, link gone past
the keepalive) closes the channel, and every wait on it raises `PeerLost`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from fedrdma.core.addresses import LOOPBACK_HOST
from fedrdma.core.errors import PeerLost
from fedrdma.transport import wire

SERVICE = "fedrdma.Peer"
METHOD = f"/{SERVICE}/Session"

MAX_FRAME_BYTES = 64 << 20
"""Largest gRPC message either side accepts: a 4 MiB baseline frame with room to tune up."""

KEEPALIVE_MS = 5_000
"""gRPC pings a quiet stream this often, so a peer lost without a FIN is noticed in seconds."""

KEEPALIVE_TIMEOUT_MS = 5_000
"""A ping unanswered this long closes the stream."""

OUTBOUND_FRAMES = 16
"""Frames queued for sending before `send` blocks: bounds the baseline's memory in flight."""

SERVER_THREADS = 16
"""Concurrent sessions one server serves (the aggregator: one per silo)."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS),
]

_JSON = b"J"
_BLOB = b"B"
_CLOSED = object()


class Blob(bytes):
    """A raw payload frame (the baseline's model bytes)."""


class Channel:
    """Messages in and out; `recv` waits with a deadline, never for ever."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self._inbound: queue.Queue[Any] = queue.Queue()
        self._outbound: queue.Queue[Any] = queue.Queue(maxsize=OUTBOUND_FRAMES)
        self.closed = threading.Event()
        self.close_reason = ""

    # -- sending ---------------------------------------------------------------------
    def send(self, msg: wire._Msg) -> None:
        self._put(_JSON + wire.encode(msg))

    def send_blob(self, data: bytes | memoryview) -> None:
        self._put(_BLOB + bytes(data))

    def _put(self, frame: bytes) -> None:
        while True:
            if self.closed.is_set():
                raise PeerLost(f"channel to {self.peer} is closed: {self.close_reason}")
            try:
                self._outbound.put(frame, timeout=0.1)
                return
            except queue.Full:
                continue

    def _frames_out(self) -> Iterator[bytes]:
        while True:
            frame = self._outbound.get()
            if frame is _CLOSED:
                return
            yield frame

    # -- receiving -------------------------------------------------------------------
    def recv(self, timeout: float) -> wire.Message | Blob:
        """The next message; raises PeerLost when the channel closes, TimeoutError on silence."""
        try:
            item = self._inbound.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message from {self.peer} within {timeout:.1f} s") from None
        return self._unwrap(item)

    def wait(self, timeout: float) -> wire.Message | Blob | None:
        """The next message within `timeout`, or None; raises PeerLost when the channel closes."""
        try:
            item = self._inbound.get(timeout=timeout) if timeout > 0 else self._inbound.get_nowait()
        except queue.Empty:
            return None
        return self._unwrap(item)

    def poll(self) -> wire.Message | Blob | None:
        try:
            item = self._inbound.get_nowait()
        except queue.Empty:
            return None
        return self._unwrap(item)

    def _unwrap(self, item: Any) -> wire.Message | Blob:
        if item is _CLOSED:
            self._inbound.put(_CLOSED)  # every later wait sees the closure too
            raise PeerLost(f"lost the session with {self.peer}: {self.close_reason or 'stream ended'}")
        return item

    def _deliver(self, frame: bytes) -> None:
        kind, body = frame[:1], frame[1:]
        if kind == _JSON:
            self._inbound.put(wire.decode(body))
        elif kind == _BLOB:
            self._inbound.put(Blob(body))
        else:
            self._mark_closed(f"peer sent a frame of unknown kind {kind!r}")

    def _read(self, frames: Iterator[bytes]) -> None:
        try:
            for frame in frames:
                self._deliver(frame)
            self._mark_closed("peer closed the session")
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            self._mark_closed(f"stream failed ({code})")
        except Exception as exc:
            self._mark_closed(f"bad frame: {exc}")

    def _mark_closed(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
            self._inbound.put(_CLOSED)
            try:
                self._outbound.put_nowait(_CLOSED)
            except queue.Full:
                threading.Thread(target=self._outbound.put, args=(_CLOSED,), daemon=True).start()

    def close(self) -> None:
        self._mark_closed("closed locally")


class ClientChannel(Channel):
    """The dialing side."""

    def __init__(self, target: str, connect_timeout: float) -> None:
        super().__init__(target)
        self._grpc = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        try:
            grpc.channel_ready_future(self._grpc).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            self._grpc.close()
            raise PeerLost(f"could not reach {target} within {connect_timeout:.0f} s; is the peer running?") from None
        call = self._grpc.stream_stream(METHOD)
        self._call = call(self._frames_out())
        threading.Thread(target=self._read, args=(self._call,), daemon=True, name="channel-read").start()

    def close(self) -> None:
        super().close()
        self._call.cancel()
        self._grpc.close()


class Listener:
    """The accepting side: a gRPC server whose every Session call becomes a Channel."""

    def __init__(self, bind: str = f"{LOOPBACK_HOST}:0") -> None:
        self._accepted: queue.Queue[Channel] = queue.Queue()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=SERVER_THREADS), options=GRPC_OPTIONS)
        handler = grpc.stream_stream_rpc_method_handler(self._session)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Session": handler}),))
        self.port = self._server.add_insecure_port(bind)
        if self.port == 0:
            raise PeerLost(f"cannot listen on {bind}: address in use or not local")
        host = bind.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self._server.start()

    def _session(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        channel = Channel(context.peer())
        context.add_callback(lambda: channel._mark_closed("peer's stream ended"))
        threading.Thread(target=channel._read, args=(frames,), daemon=True, name="channel-read").start()
        self._accepted.put(channel)
        yield from channel._frames_out()

    def accept(self, timeout: float) -> Channel:
        try:
            return self._accepted.get(timeout=timeout)
        except queue.Empty:
            raise PeerLost(f"no peer connected to {self.address} within {timeout:.0f} s") from None

    def close(self, grace: float = 0.5) -> None:
        self._server.stop(grace)


def dial(target: str, connect_timeout: float = 30.0) -> Channel:
    return ClientChannel(target, connect_timeout)
