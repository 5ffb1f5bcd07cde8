"""The silo's side of the control plane: dial out, join, attach, keep the heartbeat."""

from __future__ import annotations

import threading

from fedrdma.control import messages as m
from fedrdma.control.beats import MISSED_BEATS, beat
from fedrdma.core.errors import FedRDMAError, PeerLost
from fedrdma.transport import wire
from fedrdma.transport.channel import Channel, dial

CONNECT_TIMEOUT_S = 10.0
"""One dial attempt; the silo's rejoin loop retries for longer."""


class JoinRefused(FedRDMAError):
    """The aggregator said no; retrying will not help until the silo's config changes."""


class AggregatorLink:
    """A joined silo's control stream to the aggregator."""

    def __init__(self, address: str, silo: str, token: str, layout_id: str, nbytes: int) -> None:
        self.address = address
        self.silo = silo
        self._token = token
        self.control = dial(address, CONNECT_TIMEOUT_S)
        self.control.send(m.Join(silo=silo, token=token, layout_id=layout_id, nbytes=nbytes))
        try:
            reply = self.control.recv(CONNECT_TIMEOUT_S * 3)
        except TimeoutError:
            self.control.close()
            raise PeerLost(f"the aggregator at {address} did not answer the join") from None
        if isinstance(reply, wire.Refuse):
            self.control.close()
            raise JoinRefused(f"the aggregator refused silo {silo!r}: {reply.reason}")
        if not isinstance(reply, m.Welcome):
            self.control.close()
            raise PeerLost(f"expected a welcome from the aggregator, got {reply.type}")
        self.welcome = reply
        self._stop = threading.Event()
        threading.Thread(
            target=beat, args=(lambda: [self.control], reply.heartbeat_s, self._stop), daemon=True, name="silo-beat"
        ).start()

    def attach(self, purpose: str) -> Channel:
        channel = dial(self.address, CONNECT_TIMEOUT_S)
        channel.send(m.Attach(silo=self.silo, token=self._token, generation=self.welcome.generation, purpose=purpose))
        return channel

    def next(self) -> wire.Message:
        """The next control message other than a heartbeat; PeerLost when beats stop."""
        while True:
            try:
                msg = self.control.recv(MISSED_BEATS * self.welcome.heartbeat_s)
            except TimeoutError:
                raise PeerLost(f"the aggregator missed {MISSED_BEATS} heartbeats") from None
            if not isinstance(msg, m.Heartbeat):
                return msg

    def close(self) -> None:
        self._stop.set()
        self.control.close()
