"""What the aggregator keeps per silo: across rounds and rejoins (SiloState), and within one
round (SiloRound, which becomes the round record's SiloOutcome)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from fedrdma.control import messages as m
from fedrdma.control.hub import SiloLink
from fedrdma.core.errors import PeerLost
from fedrdma.core.layout import FlatState
from fedrdma.core.liveness import PEER_TIMEOUT_S
from fedrdma.fl.records import SiloOutcome
from fedrdma.fl.replay import Replay
from fedrdma.transport.agent import Pool
from fedrdma.transport.session import Session
from fedrdma.transport.slots import Slots
from fedrdma.transport.stats import TransferStats


@dataclass
class SiloState:
    """What the aggregator keeps per silo across rounds and rejoins."""

    silo: str
    inbox: FlatState | None
    """A whole-state inbox, or None when the upload lands in `slots`."""
    pool: Pool | None
    slots: Slots | None = None
    replay: Replay | None = None
    """This round's way to read the silo's update again, with slots."""
    link: SiloLink | None = None
    broadcast: Session | None = None
    upload: Session | None = None
    delta: Session | None = None
    """With a compressed wire format: the encoded broadcasts (`fl.broadcasts`)."""
    holds: int = 0
    """The round whose broadcast this silo's current join took last (0: none)."""
    busy: threading.Event = field(default_factory=threading.Event)
    """Set while this silo's round thread owns its sessions."""

    def abort(self) -> None:
        """Release this join's sessions without waiting (the silo is gone or replaced)."""
        for session in (self.broadcast, self.delta, self.upload):
            if session is not None:
                session.abort()

    def replay_for(self, rnd: int) -> Replay:
        """Round `rnd`'s way to read this silo's update again (its `core.fedavg` Source)."""

        def ask() -> bool:
            link = self.link
            if link is None or self.busy.is_set() or not link.alive() or self.upload is None:
                return False  # gone, or its own round's thread still owns the session
            try:
                link.control.send(m.Resend(round=rnd))
            except PeerLost:
                return False
            return True

        def receive() -> object:
            assert self.upload is not None
            return self.upload.receive()

        self.replay = Replay(self.silo, ask, receive, PEER_TIMEOUT_S)
        return self.replay


@dataclass
class SiloRound:
    silo: str
    ok: bool = False
    reason: str = ""
    n_samples: int = 0
    train_loss: float = float("nan")
    broadcast: TransferStats | None = None
    upload: TransferStats | None = None
    ready: m.Ready | None = None
    finished_at: float = 0.0

    def record(self) -> SiloOutcome:
        out: dict[str, Any] = {"silo": self.silo, "ok": self.ok, "reason": self.reason}
        if self.ready is not None:
            out.update(
                n_samples=self.ready.n_samples,
                train_loss=self.ready.train_loss,
                train_seconds=self.ready.train_seconds,
                silo_broadcast_seconds=self.ready.broadcast_seconds,
                silo_cpu_seconds=self.ready.cpu_seconds,
                silo_codec_seconds=self.ready.codec_seconds,
                silo_memory=self.ready.memory,
            )
        for name, stats in (("broadcast", self.broadcast), ("upload", self.upload)):
            if stats is not None:
                out[f"{name}_seconds"] = stats.seconds
                out[f"{name}_bytes"] = stats.nbytes
                out[f"{name}_goodput_gb_s"] = stats.goodput_gb_s
                out[f"{name}_resent_bytes"] = stats.bytes_resent
        if self.ready is not None and self.broadcast is not None and self.upload is not None:
            comm = self.broadcast.seconds + self.upload.seconds
            out["comm_share"] = comm / (comm + self.ready.train_seconds)
        return SiloOutcome.model_validate(out)
