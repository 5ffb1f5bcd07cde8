"""The aggregator's side of the control plane: who may join, who is alive.

Silos dial out to one gRPC listener. The first message on each stream says what it is:
`Join` opens a silo's control stream, `Attach` one of its data-plane streams. Both are
checked against the configured silos (constant-time token compare) before anything else
happens, and a refusal says why, to the silo and in the aggregator's log.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fedrdma.config import SiloEntry
from fedrdma.control import messages as m
from fedrdma.control.beats import MISSED_BEATS, beat
from fedrdma.core.errors import PeerLost, ProtocolError
from fedrdma.transport import wire
from fedrdma.transport.channel import Channel, Listener

log = logging.getLogger(__name__)

FIRST_MESSAGE_TIMEOUT_S = 10.0
"""A stream that does not say what it is within this long is closed."""


@dataclass
class SiloLink:
    """One joined silo: its control stream, its data-plane streams, its liveness."""

    silo: str
    generation: int
    control: Channel
    heartbeat_s: float
    data: dict[str, Channel] = field(default_factory=dict)
    inbox: queue.Queue[wire.Message] = field(default_factory=queue.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    attached: threading.Event = field(default_factory=threading.Event)

    def alive(self) -> bool:
        return not self.control.closed.is_set() and time.monotonic() - self.last_seen < MISSED_BEATS * self.heartbeat_s

    def read_control(self) -> None:
        """Pump the control stream: heartbeats refresh liveness, the rest is queued."""
        while True:
            try:
                msg = self.control.recv(MISSED_BEATS * self.heartbeat_s)
            except TimeoutError:
                log.warning("silo %s missed %d heartbeats; closing its streams", self.silo, MISSED_BEATS)
                self.close()
                return
            except (PeerLost, ProtocolError) as exc:
                log.info("silo %s: control stream ended: %s", self.silo, exc)
                self.close()
                return
            self.last_seen = time.monotonic()
            if not isinstance(msg, m.Heartbeat):
                self.inbox.put(msg)

    def close(self) -> None:
        self.control.close()
        for channel in self.data.values():
            channel.close()


class Hub:
    """Accepts silos; `links` holds the current join of each."""

    def __init__(
        self,
        listen: str,
        silos: list[SiloEntry],
        layout_id: str,
        nbytes: int,
        welcome: Callable[[str, int], m.Welcome],
        on_event: Callable[[dict[str, object]], None] = lambda e: None,
    ) -> None:
        self._tokens = {s.id: s.token for s in silos}
        self.layout_id = layout_id
        self.nbytes = nbytes
        self._welcome = welcome
        self._on_event = on_event
        self._lock = threading.Lock()
        self._generation: dict[str, int] = {}
        self.links: dict[str, SiloLink] = {}
        self.changed = threading.Condition(self._lock)
        self.listener = Listener(listen)
        self.address = self.listener.address
        self._stop = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True, name="hub-accept").start()
        threading.Thread(
            target=beat, args=(self._controls, welcome("", 0).heartbeat_s, self._stop), daemon=True, name="hub-beat"
        ).start()

    def _controls(self) -> list[Channel]:
        with self._lock:
            return [link.control for link in self.links.values() if not link.control.closed.is_set()]

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                channel = self.listener.accept(timeout=0.5)
            except PeerLost:
                continue
            threading.Thread(target=self._greet, args=(channel,), daemon=True, name="hub-greet").start()

    def _refuse(self, channel: Channel, silo: str, reason: str) -> None:
        log.warning("refused %s: %s", silo or channel.peer, reason)
        self._on_event({"event": "refused", "silo": silo, "reason": reason})
        try:
            channel.send(wire.Refuse(reason=reason))
            channel.recv(2.0)  # let the refusal reach the silo before the stream closes
        except (PeerLost, TimeoutError, ProtocolError):
            pass
        channel.close()

    def _token_ok(self, silo: str, token: str) -> str:
        expected = self._tokens.get(silo)
        if expected is None:
            return f"unknown silo id {silo!r}; the aggregator's config lists {sorted(self._tokens)}"
        if not hmac.compare_digest(expected.encode(), token.encode()):
            return f"wrong token for silo {silo!r}; check the token in the silo's config"
        return ""

    def _greet(self, channel: Channel) -> None:
        try:
            first = channel.recv(FIRST_MESSAGE_TIMEOUT_S)
        except (PeerLost, TimeoutError, ProtocolError) as exc:
            self._refuse(channel, "", f"no valid first message: {exc}")
            return
        if isinstance(first, m.Join):
            self._join(channel, first)
        elif isinstance(first, m.Attach):
            self._attach(channel, first)
        else:
            self._refuse(channel, "", f"a stream must open with join or attach, not {first.type}")

    def _join(self, channel: Channel, join: m.Join) -> None:
        problem = self._token_ok(join.silo, join.token)
        if not problem and join.layout_id != self.layout_id:
            problem = (
                f"layout mismatch: the silo holds layout {join.layout_id} ({join.nbytes} bytes), the aggregator "
                f"holds {self.layout_id} ({self.nbytes} bytes); configure the same model and LoRA settings"
            )
        if problem:
            self._refuse(channel, join.silo, problem)
            return
        with self._lock:
            generation = self._generation.get(join.silo, 0) + 1
            self._generation[join.silo] = generation
            old = self.links.get(join.silo)
        if old is not None:
            old.close()
        welcome = self._welcome(join.silo, generation)
        link = SiloLink(join.silo, generation, channel, welcome.heartbeat_s)
        channel.send(welcome)
        with self._lock:
            self.links[join.silo] = link
        threading.Thread(target=link.read_control, daemon=True, name=f"control-{join.silo}").start()
        self._on_event({"event": "joined", "silo": join.silo, "generation": generation})

    def _attach(self, channel: Channel, attach: m.Attach) -> None:
        problem = self._token_ok(attach.silo, attach.token)
        with self._lock:
            link = self.links.get(attach.silo)
            if not problem and (link is None or link.generation != attach.generation):
                problem = f"no current join of generation {attach.generation} for silo {attach.silo!r}; join first"
            if not problem and attach.purpose in link.data:  # type: ignore[union-attr]
                problem = f"silo {attach.silo!r} already attached its {attach.purpose} stream"
            if not problem:
                link.data[attach.purpose] = channel  # type: ignore[union-attr]
                if len(link.data) == 2:  # type: ignore[union-attr]
                    link.attached.set()  # type: ignore[union-attr]
                    self.changed.notify_all()
        if problem:
            self._refuse(channel, attach.silo, problem)

    def ready_links(self) -> list[SiloLink]:
        """Silos joined, alive and with both data streams attached."""
        with self._lock:
            return [link for link in self.links.values() if link.attached.is_set() and link.alive()]

    def wait_for(self, count: int, timeout: float) -> list[SiloLink]:
        deadline = time.monotonic() + timeout
        while True:
            ready = self.ready_links()
            if len(ready) >= count or time.monotonic() >= deadline:
                return ready
            with self._lock:
                self.changed.wait(timeout=min(0.5, max(0.0, deadline - time.monotonic())))

    def forget(self, link: SiloLink) -> None:
        """Drop a silo's join (it failed mid-round); it may join again."""
        with self._lock:
            if self.links.get(link.silo) is link:
                del self.links[link.silo]
        link.close()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            links = list(self.links.values())
        for link in links:
            try:
                link.control.send(m.Finish())
            except PeerLost:
                pass
        time.sleep(0.2)  # let the finish messages flush before the server stops
        for link in links:
            link.close()
        self.listener.close()

