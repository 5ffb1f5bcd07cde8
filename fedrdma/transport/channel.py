"""A duplex message channel between two peers over one gRPC bidirectional stream.

Session messages (JSON) and, for the gRPC baseline, raw blobs share the stream; a frame's
first byte says which. The dialing side is the client, so a silo behind a firewall can
reach an aggregator without opening a port. A broken stream (peer killed, link gone past
the keepalive) closes the channel, and every wait on it raises `PeerLost`.

With credentials the stream is mutual TLS (gRPC's own): the listening side admits only
peers with a certificate of the federation's CA and learns the name in it (`identity`);
the dialing side checks the listener's certificate against the host it dialed. A listener
may cap the frames of new streams (the aggregator: `PRE_AUTH_FRAME_BYTES`) until it knows
who is on one (`authenticated`): what a stranger may send is small and bounded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from fedrdma.core.addresses import LOOPBACK_HOST, split_host_port
from fedrdma.core.errors import FedRDMAError, PeerLost
from fedrdma.transport import wire
from fedrdma.transport.tls import Credentials, peer_name

SERVICE = "fedrdma.Peer"
METHOD = f"/{SERVICE}/Session"

MAX_FRAME_BYTES = 8 << 20
"""Largest gRPC message either side accepts: a 4 MiB baseline frame with room to spare."""

PRE_AUTH_FRAME_BYTES = 64 << 10
"""Largest frame of a stream not yet authenticated, and of every control message: a join, a
hello with NIXL metadata, a status of a few thousand chunks."""

DATA_FRAME_BYTES = MAX_FRAME_BYTES
"""Largest frame of an authenticated data-plane stream (the baseline's model bytes)."""

KEEPALIVE_MS = 5_000
"""gRPC pings a quiet stream this often, so a peer lost without a FIN is noticed in seconds."""

KEEPALIVE_TIMEOUT_MS = 5_000
"""A ping unanswered this long closes the stream."""

OUTBOUND_FRAMES = 16
"""Frames queued for sending before `send` blocks: bounds the baseline's memory in flight."""

INBOUND_FRAMES = 16
"""Frames received but not yet read before the stream stops taking more: gRPC's flow control
then holds the peer back, so a peer that floods us costs at most this many frames."""

CLOSE_FLUSH_S = 5.0
"""How long a closing client waits for its queued frames to leave before it cancels the stream."""

SERVER_THREADS = 16
"""Concurrent streams a listener serves unless told how many (each stream holds a thread)."""

CONNECT_POLL_S = 0.02
"""How often a dialing side looks at its channel's state while it connects."""

REFUSAL_REPEATS = 3
"""A failed handshake is taken for a refusal once it fails so on this many fresh connections
in a row: a refusal repeats, while a handshake cut by a lossy path or a peer going down does not."""

REFUSAL_PAUSE_S = 0.3
"""Between those connections."""

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS),
]

CLIENT_OPTIONS = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
"""A channel with a connection of its own: a fresh one after a failed handshake must dial
again, not inherit the failed connection of the one before."""

SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.so_reuseport", 0)]
"""gRPC binds with SO_REUSEPORT unless told not to: a second aggregator on the same port would
then start without an error and take a share of the silos' connections from the first."""

_JSON = b"J"
_BLOB = b"B"
_CLOSED = object()


class Blob(bytes):
    """A raw payload frame (the baseline's model bytes)."""


class HandshakeRefused(FedRDMAError):
    """The listening side refused this side's TLS, or this side refused the listener's:
    retrying will not help until a certificate or a setting changes."""


class Channel:
    """Messages in and out; `recv` waits with a deadline, never for ever."""

    dialed = False
    """Whether this side dialed (a silo, a benchmark's sender): it dials data connections too."""
    host = ""
    """The host this side dialed, where its peer's data port is."""

    def __init__(self, peer: str, identity: str | None = None, max_frame: int = DATA_FRAME_BYTES) -> None:
        self.peer = peer
        self.identity = identity
        """The name in the certificate the peer presented (None without TLS)."""
        self.max_frame = max_frame
        self._inbound: queue.Queue[Any] = queue.Queue(maxsize=INBOUND_FRAMES)
        self._outbound: queue.Queue[Any] = queue.Queue(maxsize=OUTBOUND_FRAMES)
        self.closed = threading.Event()
        self.close_reason = ""
        self._flushed = threading.Event()
        """Set once every frame queued before the close went to gRPC."""

    def authenticated(self, max_frame: int = PRE_AUTH_FRAME_BYTES) -> None:
        """The listening side knows who this is: frames up to `max_frame` are taken from now on."""
        self.max_frame = max_frame

    # -- sending ---------------------------------------------------------------------
    def send(self, msg: wire._Msg) -> None:
        self._put(_JSON + wire.encode(msg))

    def offer(self, msg: wire._Msg) -> bool:
        """Send `msg` unless the peer is not reading: for what may be skipped (a heartbeat)."""
        if self.closed.is_set():
            return False
        try:
            self._outbound.put_nowait(_JSON + wire.encode(msg))
        except queue.Full:
            return False
        return True

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
        try:
            while True:
                frame = self._outbound.get()
                if frame is _CLOSED:
                    return
                yield frame
        finally:
            self._flushed.set()

    # -- receiving -------------------------------------------------------------------
    def recv(self, timeout: float) -> wire.Message | Blob:
        """The next message; raises PeerLost when the channel closes, TimeoutError on silence."""
        msg = self.wait(timeout)
        if msg is None:
            raise TimeoutError(f"no message from {self.peer} within {timeout:.1f} s")
        return msg

    def wait(self, timeout: float) -> wire.Message | Blob | None:
        """The next message within `timeout`, or None; raises PeerLost when the channel closes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self._inbound.get(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if self.closed.is_set():
                    self._lost()
                if time.monotonic() >= deadline:
                    return None
                continue
            return self._unwrap(item)

    def poll(self) -> wire.Message | Blob | None:
        try:
            item = self._inbound.get_nowait()
        except queue.Empty:
            if self.closed.is_set():
                self._lost()
            return None
        return self._unwrap(item)

    def _unwrap(self, item: Any) -> wire.Message | Blob:
        if item is _CLOSED:
            self._lost()
        return item

    def _lost(self) -> None:
        raise PeerLost(f"lost the session with {self.peer}: {self.close_reason or 'stream ended'}")

    def _deliver(self, frame: bytes) -> None:
        if len(frame) > self.max_frame:
            self._mark_closed(f"peer sent a frame of {len(frame)} bytes; this stream takes at most {self.max_frame}")
            return
        kind, body = frame[:1], frame[1:]
        if kind == _JSON:
            item: Any = wire.decode(body)
        elif kind == _BLOB:
            item = Blob(body)
        else:
            self._mark_closed(f"peer sent a frame of unknown kind {kind!r}")
            return
        while not self.closed.is_set():  # a full queue holds the peer back through gRPC's flow control
            try:
                self._inbound.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _read(self, frames: Iterator[bytes]) -> None:
        try:
            for frame in frames:
                self._deliver(frame)
                if self.closed.is_set():
                    return
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
            try:
                self._inbound.put_nowait(_CLOSED)
            except queue.Full:
                pass  # waits see `closed` once the queue is empty
            try:
                self._outbound.put_nowait(_CLOSED)
            except queue.Full:
                threading.Thread(target=self._outbound.put, args=(_CLOSED,), daemon=True).start()

    def close(self, reason: str = "closed locally") -> None:
        """`reason` is what a wait on this channel reports (a peer that missed its heartbeats)."""
        self._mark_closed(reason)


class ClientChannel(Channel):
    """The dialing side."""

    dialed = True

    def __init__(self, target: str, connect_timeout: float, credentials: Credentials | None = None) -> None:
        super().__init__(target)  # the listening side is who we chose to dial: its frames are not capped low
        self.host = split_host_port(target)[0]
        deadline = time.monotonic() + connect_timeout
        for attempt in range(1, REFUSAL_REPEATS + 1):
            if credentials is None:
                self._grpc = grpc.insecure_channel(target, options=CLIENT_OPTIONS)
            else:
                self._grpc = grpc.secure_channel(target, _channel_credentials(credentials), options=CLIENT_OPTIONS)
            try:
                self._connect(target, deadline - time.monotonic(), credentials is not None)
                break
            except HandshakeRefused:
                self._grpc.close()
                if attempt == REFUSAL_REPEATS or time.monotonic() + REFUSAL_PAUSE_S >= deadline:
                    raise
                time.sleep(REFUSAL_PAUSE_S)
            except BaseException:
                self._grpc.close()
                raise
        call = self._grpc.stream_stream(METHOD)
        self._call = call(self._frames_out())
        self._reader = threading.Thread(target=self._read, args=(self._call,), daemon=True, name="channel-read")
        self._reader.start()

    def _connect(self, target: str, timeout: float, tls: bool) -> None:
        """Wait until the channel is ready; a failed handshake is raised at once, not after the timeout."""
        states: list[grpc.ChannelConnectivity] = []
        watch = states.append
        self._grpc.subscribe(watch, try_to_connect=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if grpc.ChannelConnectivity.READY in states:
                    return
                if grpc.ChannelConnectivity.TRANSIENT_FAILURE in states:
                    refusal = _refusal(self._why(), target, tls)
                    if refusal:
                        raise HandshakeRefused(refusal)
                    states.clear()  # nobody listens yet: keep trying until the deadline
                time.sleep(CONNECT_POLL_S)
        finally:
            self._grpc.unsubscribe(watch)
        raise PeerLost(f"could not reach {target} within {timeout:.0f} s; is the peer running?")

    def _why(self) -> str:
        """What gRPC says went wrong: a call that fails fast carries the last connection error."""
        try:
            self._grpc.unary_unary(f"/{SERVICE}/Probe")(b"", timeout=1.0, wait_for_ready=False)
        except grpc.RpcError as exc:
            return exc.details() or ""
        return ""

    def close(self, reason: str = "closed locally") -> None:
        """Half-close after every queued frame (cancelling at once would drop the last ones), then end."""
        super().close(reason)
        if self._flushed.wait(CLOSE_FLUSH_S) and threading.current_thread() is not self._reader:
            self._reader.join(CLOSE_FLUSH_S)  # the peer ends the call once it read our half-close
        self._call.cancel()
        self._grpc.close()


def _refusal(details: str, target: str, tls: bool) -> str:
    """A connection failure in words, or "" for one that retrying may cure (nobody listens yet)."""
    if "Connection refused" in details or "connect: " in details or not details:
        return ""
    if "Hostname Verification" in details or "not in peer certificate" in details:
        return (f"the aggregator's certificate does not name {split_host_port(target)[0]}: dial a host its "
                "certificate names, or issue it with `fedrdma certs issue DIR aggregator --role aggregator --host H`")
    if "unable to get local issuer certificate" in details:
        return f"the certificate {target} presented was not issued by this side's CA (ca.pem): another federation?"
    if "certificate has expired" in details:
        return f"the certificate {target} presented has expired: it must issue a new one"
    if "WRONG_VERSION_NUMBER" in details or "handshake" in details.lower():
        return (f"{target} does not speak TLS: it runs with --insecure, and this side with certificates"
                if tls else f"{target} speaks TLS: this side needs certificates (--certs), not --insecure")
    if "Socket closed" in details:
        return (f"{target} closed the connection during the handshake: it refused this side's certificate "
                "(issued by another CA, expired, or not a silo certificate; its log names which)"
                if tls else f"{target} closed the connection at once: it runs with certificates; start this side "
                "with --certs DIR instead of --insecure")
    return ""


class Listener:
    """The accepting side: a gRPC server whose every Session call becomes a Channel."""

    def __init__(self, bind: str = f"{LOOPBACK_HOST}:0", credentials: Credentials | None = None,
                 max_streams: int = SERVER_THREADS, frame_cap: int = DATA_FRAME_BYTES) -> None:
        """`frame_cap`: the largest frame a new stream may send (`Channel.authenticated` raises it)."""
        self._frame_cap = frame_cap
        self._accepted: queue.Queue[Channel] = queue.Queue()
        # One thread per stream, and no more streams than threads: a stream beyond them is
        # refused at once (RESOURCE_EXHAUSTED) instead of waiting behind the others.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_streams), options=SERVER_OPTIONS,
                                   maximum_concurrent_rpcs=max_streams)
        handler = grpc.stream_stream_rpc_method_handler(self._session)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Session": handler}),))
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(bind)
            else:
                self.port = self._server.add_secure_port(bind, _server_credentials(credentials))
        except RuntimeError:  # gRPC's "Failed to bind"; older releases returned port 0 instead
            self.port = 0
        if self.port == 0:
            raise PeerLost(f"cannot listen on {bind}: another process listens on that port, or the host is not "
                           "this machine's; stop the other process or choose another port")
        host = bind.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"
        self.tls = credentials is not None
        self._server.start()

    def _session(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        channel = Channel(context.peer(), peer_name(context.auth_context()) if self.tls else None, self._frame_cap)
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


def _server_credentials(credentials: Credentials) -> grpc.ServerCredentials:
    """A TLS server that admits only clients with a certificate of the federation's CA."""
    return grpc.ssl_server_credentials([(credentials.key, credentials.cert)], root_certificates=credentials.ca,
                                       require_client_auth=True)


def _channel_credentials(credentials: Credentials) -> grpc.ChannelCredentials:
    """A TLS client that presents its certificate and checks the server's against the CA and host."""
    return grpc.ssl_channel_credentials(root_certificates=credentials.ca, private_key=credentials.key,
                                        certificate_chain=credentials.cert)


def dial(target: str, connect_timeout: float = 30.0, credentials: Credentials | None = None) -> Channel:
    return ClientChannel(target, connect_timeout, credentials)
