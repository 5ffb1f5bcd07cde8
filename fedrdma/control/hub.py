"""The aggregator's side of the control plane: who may join, who is alive.

Silos dial out to one gRPC listener. With credentials it is mutual TLS: only a client with
a certificate of the federation's CA gets a stream at all, and a silo is the name in its
certificate, checked against the configured silos. The first message on each stream says
what it is: `Join` opens a silo's control stream, `Attach` one of its data-plane streams.

A stream is a stranger until that first message is accepted, and strangers are bounded:
at most `MAX_STRANGERS_PER_PEER` per certificate and `MAX_STRANGERS` in all at once,
`AUTH_TIMEOUT_S` each, frames of at most 64 KiB, and a first message of any other kind
closes the stream. A refusal says why, to the silo and in
the aggregator's events, and never names another silo.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from fedrdma.control import messages as m
from fedrdma.control.beats import MISSED_BEATS, beat
from fedrdma.core.errors import PeerLost, ProtocolError
from fedrdma.core.modes import Wire
from fedrdma.transport import wire
from fedrdma.transport.channel import DATA_FRAME_BYTES, PRE_AUTH_FRAME_BYTES, Channel, Listener
from fedrdma.transport.tls import Credentials

log = logging.getLogger(__name__)

AUTH_TIMEOUT_S = 5.0
"""A stream that has not said what it is (a valid Join or Attach) this long after it opened is closed."""

MAX_STRANGERS = 64
"""Streams not yet joined or attached, at most, at once; beyond this a new one is closed at once."""

MAX_STRANGERS_PER_PEER = 8
"""The same, per certificate: a silo opens three streams when it joins, a few more while it rejoins.
So a certificate holder that floods the aggregator with silent streams locks out only itself."""

STREAMS_PER_SILO = 3
"""A joined silo holds its control stream and one stream per data-plane session."""

SPARE_STREAMS = 8
"""Streams beyond the silos' and the strangers': a silo rejoining while its old streams close."""

CONTROL_INBOX = 16
"""A silo's control messages waiting for its round: a few per round. A silo that sends more is
flooding, and its link is closed."""

REFUSE_LINGER_S = 2.0
"""After a refusal, how long the stream stays open so the refusal reaches the silo."""


@dataclass
class SiloLink:
    """One joined silo: its control stream, its data-plane streams, its liveness."""

    silo: str
    generation: int
    control: Channel
    heartbeat_s: float
    data: dict[str, Channel] = field(default_factory=dict)
    inbox: queue.Queue[wire.Message] = field(default_factory=lambda: queue.Queue(maxsize=CONTROL_INBOX))
    last_seen: float = field(default_factory=time.monotonic)
    attached: threading.Event = field(default_factory=threading.Event)
    digest: str = ""
    """What the silo said its state's digest was when it joined (`m.Join.digest`)."""

    def alive(self) -> bool:
        return not self.control.closed.is_set() and time.monotonic() - self.last_seen < MISSED_BEATS * self.heartbeat_s

    def read_control(self) -> None:
        """Pump the control stream: heartbeats refresh liveness, the rest is queued."""
        while True:
            try:
                msg = self.control.recv(MISSED_BEATS * self.heartbeat_s)
            except TimeoutError:
                log.warning("silo %s missed %d heartbeats; closing its streams", self.silo, MISSED_BEATS)
                self.close(f"silo {self.silo} missed {MISSED_BEATS} heartbeats ({MISSED_BEATS * self.heartbeat_s:g} s)")
                return
            except (PeerLost, ProtocolError) as exc:
                log.info("silo %s: control stream ended: %s", self.silo, exc)
                self.close()
                return
            self.last_seen = time.monotonic()
            if isinstance(msg, m.Heartbeat):
                continue
            try:
                self.inbox.put_nowait(msg)
            except queue.Full:
                log.warning("silo %s sent %d control messages nobody asked for; closing its streams",
                            self.silo, CONTROL_INBOX)
                self.close()
                return

    def close(self, reason: str = "closed locally") -> None:
        self.control.close(reason)
        for channel in self.data.values():
            channel.close(reason)


def listener_streams(silos: int) -> int:
    """Threads (and streams) a listener needs to serve `silos` silos and the strangers it admits."""
    return STREAMS_PER_SILO * silos + MAX_STRANGERS + SPARE_STREAMS


class Hub:
    """Accepts silos; `links` holds the current join of each."""

    def __init__(
        self,
        listen: str,
        silos: Collection[str],
        layout_id: str,
        nbytes: int,
        welcome: Callable[[str, int], m.Welcome],
        on_event: Callable[[dict[str, object]], None] = lambda e: None,
        credentials: Credentials | None = None,
        wire_format: Wire = Wire.FP32,
    ) -> None:
        self.allowed = frozenset(silos)
        self.layout_id = layout_id
        self.nbytes = nbytes
        self.wire = wire_format
        self.purposes = frozenset({"broadcast", "upload"} | ({"delta"} if wire_format.compressed else set()))
        """The data streams each silo attaches before it is ready."""
        self._welcome = welcome
        self._on_event = on_event
        self._lock = threading.Lock()
        self._generation: dict[str, int] = {}
        self._strangers: dict[str, int] = {}
        """Streams still greeting, by the name in their certificate ("" without TLS)."""
        self.links: dict[str, SiloLink] = {}
        self.changed = threading.Condition(self._lock)
        self.listener = Listener(listen, credentials, max_streams=listener_streams(len(self.allowed)),
                                 frame_cap=PRE_AUTH_FRAME_BYTES)
        self.address = self.listener.address
        self.tls = credentials is not None
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
            who = channel.identity or ""
            with self._lock:
                admitted = (sum(self._strangers.values()) < MAX_STRANGERS
                            and self._strangers.get(who, 0) < MAX_STRANGERS_PER_PEER)
                if admitted:
                    self._strangers[who] = self._strangers.get(who, 0) + 1
            if not admitted:
                self._on_event({"event": "refused", "silo": "", "reason": "too many streams that have not joined "
                                f"yet (at most {MAX_STRANGERS_PER_PEER} per certificate, {MAX_STRANGERS} in all); "
                                "closed at once"})
                channel.close()
                continue
            threading.Thread(target=self._greet, args=(channel,), daemon=True, name="hub-greet").start()

    def _refuse(self, channel: Channel, silo: str, reason: str, retry_after_s: float = 0.0) -> None:
        log.warning("refused %s: %s", silo or channel.peer, reason)
        self._on_event({"event": "refused", "silo": silo, "reason": reason})
        try:
            channel.send(wire.Refuse(reason=reason, retry_after_s=retry_after_s))
            channel.recv(REFUSE_LINGER_S)  # let the refusal reach the silo before the stream closes
        except (PeerLost, TimeoutError, ProtocolError):
            pass
        channel.close()

    def _greet(self, channel: Channel) -> None:
        """A stranger's first message decides what its stream is; anything else closes it."""
        try:
            try:
                first = channel.recv(AUTH_TIMEOUT_S)
            except TimeoutError:
                self._on_event({"event": "refused", "silo": "", "reason": f"said nothing within {AUTH_TIMEOUT_S:.0f} s"})
                channel.close()
                return
            if isinstance(first, m.Join):
                self._join(channel, first)
            elif isinstance(first, m.Attach):
                self._attach(channel, first)
            else:
                kind = getattr(first, "type", type(first).__name__)
                self._refuse(channel, "", f"a stream must open with join or attach, not {kind}")
        except (PeerLost, ProtocolError) as exc:
            self._on_event({"event": "refused", "silo": "", "reason": f"no valid first message: {exc}"})
            channel.close()
        except Exception:  # a greeting must never leave a stream open
            log.exception("greeting %s failed", channel.peer)
            channel.close()
        finally:
            with self._lock:
                self._strangers[channel.identity or ""] -= 1

    def _who(self, channel: Channel, claimed: str) -> str:
        """Why this stream may not speak for silo `claimed` ("" if it may)."""
        if self.tls and channel.identity != claimed:
            return (f"this stream's certificate names {channel.identity!r}, not {claimed!r}: "
                    "a silo joins under the name in its certificate")
        if claimed not in self.allowed:
            return f"silo {claimed!r} is not part of this federation; ask its operator to list it in `silos`"
        return ""

    def _join(self, channel: Channel, join: m.Join) -> None:
        problem = self._who(channel, join.silo)
        if not problem and join.layout_id != self.layout_id:
            problem = (
                f"layout mismatch: the silo holds layout {join.layout_id} ({join.nbytes} bytes), the aggregator "
                f"holds {self.layout_id} ({self.nbytes} bytes); configure the same model and LoRA settings"
            )
        if not problem and join.wire != self.wire:
            problem = (f"wire format mismatch: the silo encodes its updates as {join.wire}, the federation "
                       f"moves {self.wire}; set wire = \"{self.wire}\" (--wire {self.wire}) on the silo")
        retry = 0.0
        with self._lock:
            old = self.links.get(join.silo)
            if not problem and old is not None and old.alive():
                problem = (f"silo {join.silo!r} is already joined and its link is alive; "
                           "a second join is refused (it may join again once the first is gone)")
                retry = old.heartbeat_s
            if not problem:
                generation = self._generation.get(join.silo, 0) + 1
                self._generation[join.silo] = generation
        if problem:
            self._refuse(channel, join.silo, problem, retry)
            return
        if old is not None:
            old.close()
        welcome = self._welcome(join.silo, generation)
        link = SiloLink(join.silo, generation, channel, welcome.heartbeat_s, digest=join.digest)
        channel.authenticated()
        channel.send(welcome)
        with self._lock:
            self.links[join.silo] = link
        threading.Thread(target=link.read_control, daemon=True, name=f"control-{join.silo}").start()
        self._on_event({"event": "joined", "silo": join.silo, "generation": generation})

    def _attach(self, channel: Channel, attach: m.Attach) -> None:
        problem = self._who(channel, attach.silo)
        with self._lock:
            link = self.links.get(attach.silo)
            if not problem and (link is None or link.generation != attach.generation):
                problem = f"no current join of generation {attach.generation} for silo {attach.silo!r}; join first"
            if not problem and attach.purpose not in self.purposes:
                problem = f"this federation's wire format is {self.wire}: it has no {attach.purpose} stream"
            if not problem and attach.purpose in link.data:  # type: ignore[union-attr]
                problem = f"silo {attach.silo!r} already attached its {attach.purpose} stream"
            if not problem:
                channel.authenticated(DATA_FRAME_BYTES)
                link.data[attach.purpose] = channel  # type: ignore[union-attr]
                if set(link.data) == self.purposes:  # type: ignore[union-attr]
                    link.attached.set()  # type: ignore[union-attr]
                    self.changed.notify_all()
        if problem:
            self._refuse(channel, attach.silo, problem)

    def ready_links(self) -> list[SiloLink]:
        """Silos joined, alive and with every data stream attached."""
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

    def close(self, finished: bool = True) -> None:
        """Stop serving; `finished` tells the silos the run is over (else they see the aggregator gone)."""
        self._stop.set()
        with self._lock:
            links = list(self.links.values())
        for link in links if finished else []:
            try:
                link.control.send(m.Finish())
            except PeerLost:
                pass
        time.sleep(0.2)  # let the finish messages flush before the server stops
        for link in links:
            link.close()
        self.listener.close()
