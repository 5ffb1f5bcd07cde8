"""The silo's side of the control plane: dial out, join, attach, keep the heartbeat.

With credentials every stream is mutual TLS: the silo checks the aggregator's certificate
against the host it dials, and is known to the aggregator by the name in its own.
"""

from __future__ import annotations

import queue
import threading
import time

from fedrdma.control import messages as m
from fedrdma.control.beats import MISSED_BEATS, beat
from fedrdma.core.errors import FedRDMAError, PeerLost, ProtocolError
from fedrdma.core.modes import Wire
from fedrdma.transport import wire
from fedrdma.transport.channel import Channel, HandshakeRefused, dial
from fedrdma.transport.tls import Credentials

CONNECT_TIMEOUT_S = 10.0
"""One dial attempt; the silo's rejoin loop retries for longer."""

CONTROL_INBOX = 16
"""Control messages waiting for the silo's round loop: the aggregator sends a few per round."""


class JoinRefused(FedRDMAError):
    """The aggregator said no; retrying will not help until the silo's config changes."""


class AggregatorLink:
    """A joined silo's control stream to the aggregator.

    A thread reads the stream, so heartbeats are heard while the silo trains, and keeps
    the other messages for `next`.
    """

    def __init__(self, address: str, silo: str, layout_id: str, nbytes: int,
                 credentials: Credentials | None = None, wire_format: Wire = Wire.FP32, digest: str = "") -> None:
        self.address = address
        self.silo = silo
        self._credentials = credentials
        self.control = self._dial()
        self.control.send(m.Join(silo=silo, layout_id=layout_id, nbytes=nbytes, wire=wire_format, digest=digest))
        try:
            reply = self.control.recv(CONNECT_TIMEOUT_S * 3)
        except TimeoutError:
            self.control.close()
            raise PeerLost(f"the aggregator at {address} did not answer the join") from None
        except PeerLost as exc:
            self.control.close()
            raise PeerLost(f"the aggregator at {address} closed the join: {exc}") from None
        if isinstance(reply, wire.Refuse):
            self.control.close()
            if reply.retry_after_s > 0:  # refused for now: the rejoin loop tries again
                time.sleep(min(reply.retry_after_s, CONNECT_TIMEOUT_S))
                raise PeerLost(f"the aggregator refused silo {silo!r} for now: {reply.reason}")
            raise JoinRefused(f"the aggregator refused silo {silo!r}: {reply.reason}")
        if not isinstance(reply, m.Welcome):
            self.control.close()
            raise PeerLost(f"expected a welcome from the aggregator, got {reply.type}")
        self.welcome = reply
        self._stop = threading.Event()
        self._inbox: queue.Queue[wire.Message] = queue.Queue(maxsize=CONTROL_INBOX)
        self._last_seen = time.monotonic()
        threading.Thread(target=self._pump, daemon=True, name="silo-control").start()
        threading.Thread(
            target=beat, args=(lambda: [self.control], reply.heartbeat_s, self._stop), daemon=True, name="silo-beat"
        ).start()

    def _dial(self) -> Channel:
        try:
            return dial(self.address, CONNECT_TIMEOUT_S, self._credentials)
        except HandshakeRefused as exc:
            raise JoinRefused(str(exc)) from None

    def attach(self, purpose: str) -> Channel:
        channel = self._dial()
        channel.send(m.Attach(silo=self.silo, generation=self.welcome.generation, purpose=purpose))
        return channel

    def _pump(self) -> None:
        """Heartbeats say the aggregator lives; everything else waits for the round loop."""
        while not self._stop.is_set():
            try:
                msg = self.control.recv(MISSED_BEATS * self.welcome.heartbeat_s)
            except (TimeoutError, PeerLost, ProtocolError):
                return  # `next` tells the round loop: the beats stopped
            self._last_seen = time.monotonic()
            if not isinstance(msg, m.Heartbeat):
                self._inbox.put(msg)

    def next(self) -> wire.Message:
        """The next control message other than a heartbeat; PeerLost when beats stop."""
        limit = MISSED_BEATS * self.welcome.heartbeat_s
        while True:
            try:
                return self._inbox.get(timeout=min(1.0, limit))
            except queue.Empty:
                if self.control.closed.is_set():
                    raise PeerLost(f"the aggregator closed the control stream: {self.control.close_reason}") from None
                if time.monotonic() - self._last_seen > limit:
                    raise PeerLost(f"the aggregator missed {MISSED_BEATS} heartbeats") from None

    def close(self) -> None:
        self._stop.set()
        self.control.close()
