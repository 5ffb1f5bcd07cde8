"""The silo process: join, receive the global state, train locally, upload, repeat.

The silo's pool is its model's own parameters (a FlatState the model trains in): the
aggregator's WRITE lands in the weights, training updates them in place, and the upload
reads them from the same memory. No second copy exists for sending.

With a compressed wire format (`wire = "bf16" | "int8"`) the upload is the delta from the
round's global, encoded into a pool of its own (`core.formats`): the silo keeps the global
it received (the delta's reference) and the rounding error it owes the next round, two
float32 states next to the model, and a diverged update is refused here, before a byte of
it leaves. Broadcasts after a join's first come encoded into the same pool, as the change
from the reference (`fl.broadcasts`), and are decoded into the model's parameters in place.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash

from fedrdma.config import SiloConfig
from fedrdma.control import messages as m
from fedrdma.control.link import AggregatorLink, JoinRefused
from fedrdma.core.chunks import state_digest
from fedrdma.core.errors import EncodingError, PeerLost
from fedrdma.core.formats import Codec, EncodedState
from fedrdma.core.modes import Role
from fedrdma.fl.data import load_silo_data, load_tokenizer
from fedrdma.fl.records import MemorySplit, SiloRoundRecord
from fedrdma.fl.state import build_trainable
from fedrdma.fl.trainer import LocalTrainer
from fedrdma.memory import compute_heap, pin_mmap_threshold
from fedrdma.metrics import mark_runtime, memory_report, reset_peak
from fedrdma.transport import fabric, wire
from fedrdma.transport.agent import Agent, Pool
from fedrdma.transport.session import Session
from fedrdma.transport.stats import TransferStats
from fedrdma.transport.tls import CLIENT, Credentials

log = logging.getLogger(__name__)

REJOIN_PAUSE_S = 1.0
"""Pause between attempts to reach a lost aggregator."""

ADAM_MOMENTS = 2
"""AdamW keeps two moments per trainable weight: the optimizer's share of memory."""

PERTURBATION = 1e-3
"""Scale of a non-training silo's update: about a fine-tuning step's size on GPT-2's weights."""

PERTURBED_SAMPLES = 1000
"""The count a non-training silo reports: equal for all, so their weights are equal."""

PERTURBATION_SEED_MASK = (1 << 63) - 1
"""torch seeds are non-negative 64-bit integers."""


class Silo:
    def __init__(self, cfg: SiloConfig) -> None:
        mark_runtime()
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.state = build_trainable(cfg)
        self.trainer: LocalTrainer | None = None
        """None with `train = "none"`: the round's update is a seeded perturbation."""
        if cfg.train == "local":
            assert cfg.data is not None  # the config's validator requires it
            data = load_silo_data(cfg.data, load_tokenizer(cfg.model), cfg.seq_len)
            self.trainer = LocalTrainer(self.model, data.train, cfg.lr, cfg.local_steps, cfg.batch_size, seed=cfg.seed)
        self.credentials = Credentials.of_process(cfg.certs, cfg.id, CLIENT, "for one host only")
        self.agent: Agent | None = None
        self.pool: Pool | None = None
        self.coded = EncodedState(Codec.of(cfg.wire, self.state.layout), self.state) if cfg.wire.compressed else None
        """None with wire fp32: the upload is the state itself."""
        self.upload_state = self.coded.encoded if self.coded else self.state
        """What the upload session sends."""
        self.encoded_pool: Pool | None = None
        self._holds = False
        """Whether the encoded state's reference is the last broadcast of this join (a delta needs one to add to)."""
        self._delta: Session | None = None
        """This join's encoded broadcasts, with a compressed wire format."""
        self._coming = "whole"
        """How the global of the round that starts comes (its RoundStart says)."""
        self._decode_seconds = 0.0
        """This round's decoding of the broadcast (0 for a whole one)."""
        self.rounds_done: list[int] = []
        self.metrics_path = self.out_dir / f"{cfg.id}.jsonl"

    def _event(self, event: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps({"time": time.time(), "silo": self.cfg.id, **event}) + "\n")

    def run(self) -> list[int]:
        """Take part until the aggregator says finish; rejoin after a lost aggregator."""
        lost_since: float | None = None
        while True:
            try:
                finished = self._session()
                if finished:
                    return self.rounds_done
                lost_since = None
            except JoinRefused:
                raise
            except (PeerLost, TimeoutError, OSError) as exc:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > self.cfg.rejoin_s:
                    raise PeerLost(f"gave up on the aggregator after {self.cfg.rejoin_s:.0f} s: {exc}") from exc
                log.info("silo %s: %s; rejoining", self.cfg.id, exc)
                self._event({"event": "lost", "reason": str(exc)})
                time.sleep(REJOIN_PAUSE_S)

    def _session(self) -> bool:
        cfg = self.cfg
        link = AggregatorLink(cfg.aggregator, cfg.id, self.state.layout_id, self.state.nbytes, self.credentials,
                              cfg.wire, state_digest(self.state.memoryview()))
        welcome = link.welcome
        self._event({"event": "joined", "generation": welcome.generation, "tls": self.credentials is not None})
        mode = welcome.broadcast_mode
        here = fabric.detect()
        try:
            fabric.require_checks(cfg.verify, mode, here)
        except fabric.UntrustedFabric as exc:
            link.close()
            raise JoinRefused(str(exc)) from None
        for asked in (mode, welcome.upload_mode):  # before this silo registers any memory
            try:
                fabric.require_trust(asked, cfg.trusted_fabric, here)
            except fabric.UntrustedFabric as exc:
                link.close()
                raise JoinRefused(f"the aggregator asks for {asked}, which this silo refuses: {exc}") from None
        if mode.one_sided:  # see fedrdma.memory for why not for grpc
            pin_mmap_threshold()
            if self.agent is None:
                self.agent = Agent(f"silo-{cfg.id}-{int(time.time() * 1000) % 10**9}")
        if mode.registers_pool and self.pool is None:
            assert self.agent is not None
            self.pool = self.agent.register(self.state.buffer)
        pool = self.pool if mode.registers_pool else None
        upload_pool = pool
        if self.coded is not None and (mode.registers_pool or welcome.upload_mode.registers_pool):
            if self.encoded_pool is None:
                assert self.agent is not None
                self.encoded_pool = self.agent.register(self.coded.encoded.buffer)
            upload_pool = self.encoded_pool if welcome.upload_mode.registers_pool else None
        if self.coded is not None:
            self.coded.feedback.reset()  # a new join starts from a whole broadcast: no error is owed
        self._holds = False
        upload_chunk = self.coded.codec.chunk_size(welcome.chunk_size) if self.coded else welcome.chunk_size
        verify = cfg.verify != fabric.VERIFY_FABRIC
        broadcast = upload = self._delta = None
        try:
            broadcast = Session(
                self.agent, self.state, link.attach("broadcast"), mode, Role.RECEIVER,
                welcome.chunk_size, welcome.window, pool=pool, trusted_fabric=cfg.trusted_fabric, verify=verify,
            )
            upload = Session(
                self.agent, self.upload_state, link.attach("upload"), welcome.upload_mode, Role.SENDER,
                upload_chunk, welcome.window, pool=upload_pool, trusted_fabric=cfg.trusted_fabric,
            )
            if self.coded is not None:
                self._delta = Session(
                    self.agent, self.coded.encoded, link.attach("delta"), mode, Role.RECEIVER, upload_chunk,
                    welcome.window, pool=self.encoded_pool if mode.registers_pool else None,
                    trusted_fabric=cfg.trusted_fabric, verify=verify,
                )
            for session in (broadcast, self._delta, upload):
                if session is not None:
                    session.open()
            self._event({"event": "handed", "generation": welcome.generation,
                         "broadcast": _handed(broadcast), "upload": _handed(upload)})
            while True:
                msg = link.next()
                if isinstance(msg, m.Finish):
                    return True
                if isinstance(msg, m.RoundEnd):
                    self._event({"event": "round_end", "round": msg.round, "included": msg.included,
                                 "reason": msg.reason})
                    if not msg.included and self.coded is not None:
                        self.coded.feedback.reset()  # an update left out owes no rounding error
                    continue
                if isinstance(msg, m.Resend):
                    self._resend(upload, msg.round)
                    continue
                if isinstance(msg, wire.Refuse):
                    raise JoinRefused(f"the aggregator refused: {msg.reason}")
                if not isinstance(msg, m.RoundStart):
                    continue
                self._coming = msg.broadcast
                self._round(link, broadcast, upload, msg.round)
        finally:
            for session in (broadcast, self._delta, upload):
                if session is not None:
                    session.abort()
            link.close()

    def _resend(self, upload: Session, rnd: int) -> None:
        """The update of the round still open, once more: the state holds it until the next broadcast."""
        if not self.rounds_done or self.rounds_done[-1] != rnd:
            log.warning("silo %s: asked to resend round %d, whose update it no longer holds", self.cfg.id, rnd)
            return
        sent = upload.send()
        self._event({"event": "resent", "round": rnd, "seconds": sent.seconds})

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        """Round `rnd`'s local training on the received global: (samples, loss, seconds).

        `upload` is the session the update will leave by, for a subclass that wants it
        (`fedrdma.testing.silo` poisons or attacks here).
        """
        if self.trainer is None:
            return self._perturb(rnd)
        with compute_heap():
            return self.trainer.train_round(rnd)

    def _perturb(self, rnd: int) -> tuple[int, float, float]:
        start = time.perf_counter()
        perturb(self.state.views, self.cfg.seed, self.cfg.id, rnd)
        return PERTURBED_SAMPLES, 0.0, time.perf_counter() - start

    def _round(self, link: AggregatorLink, broadcast: Session, upload: Session, rnd: int) -> None:
        cpu0 = time.process_time()
        reset_peak()  # the memory figures are this round's peak, not start-up's
        got = self._receive(broadcast)
        n_samples, loss, train_seconds = self.train(rnd, upload)
        pool_bytes = self.pool.region.length if self.pool else 0
        memory = memory_report(self.model, None, pool_bytes, pool_is_model=self.pool is not None)
        memory["optimizer"] = ADAM_MOMENTS * self.state.nbytes if self.trainer is not None else 0
        memory["rest"] = max(0, memory["rest"] - memory["optimizer"])
        self.state.touch()  # training changed the bytes
        encode_seconds = self._encode(link, rnd)
        link.control.send(
            m.Ready(
                round=rnd, n_samples=n_samples, train_loss=loss, train_seconds=train_seconds,
                broadcast_seconds=got.seconds, cpu_seconds=time.process_time() - cpu0, memory=memory,
                codec_seconds=self._decode_seconds + encode_seconds,
            )
        )
        sent = upload.send()
        self.rounds_done.append(rnd)
        row = SiloRoundRecord(time=time.time(), silo=self.cfg.id, round=rnd, train_loss=loss,
                              train_seconds=train_seconds, broadcast_seconds=got.seconds, upload_seconds=sent.seconds,
                              codec_seconds=self._decode_seconds + encode_seconds,
                              memory=MemorySplit.model_validate(memory))
        self._event(row.model_dump(mode="json"))


    def _receive(self, broadcast: Session) -> TransferStats:
        """This round's global into the model: whole, or as a delta decoded onto the last one."""
        self._decode_seconds = 0.0
        if self._coming == "skip":  # the aggregator compared digests: this state is the global
            got = TransferStats(0, broadcast.mode, 0.0, 0)
        elif self._coming == "whole":
            got = broadcast.receive()
        else:
            if self._delta is None or self.coded is None or not self._holds:
                raise PeerLost("the aggregator sent a delta broadcast to a silo that holds no broadcast "
                               "of this join; rejoining for a whole one")
            got = self._delta.receive()
            start = time.perf_counter()
            try:
                self.coded.decode()
            except EncodingError as exc:
                raise PeerLost(f"the broadcast's delta does not decode ({exc}); rejoining for a whole one") from None
            self._decode_seconds = time.perf_counter() - start
        if self.coded is not None:
            self.coded.take()
            self._holds = True
        return got

    def _encode(self, link: AggregatorLink, rnd: int) -> float:
        """The round's update into the encoded pool: its seconds. A delta that is not finite is
        not sent: the silo leaves the round, takes the global back, and rejoins."""
        if self.coded is None:
            return 0.0
        start = time.perf_counter()
        try:
            self.coded.encode()
        except EncodingError as exc:
            self.coded.restore()
            self._event({"event": "update_refused", "round": rnd, "reason": str(exc)})
            link.control.send(m.Leave(reason=f"round {rnd}: its update was refused before encoding: {exc}"))
            raise PeerLost(f"left round {rnd}: {exc}") from None
        return time.perf_counter() - start


def perturb(views: Mapping[str, torch.Tensor], seed: int, silo: str, rnd: int) -> None:
    """A stand-in for training that costs no compute: every weight moves by seeded noise of
    PERTURBATION's scale, different per silo and round, so updates differ and pass the checks.
    A pure function of (each weight, its name, seed, silo, round), whatever order the tensors
    come in: a check can redo it bit for bit from a checkpoint."""
    with torch.no_grad():
        for name, view in views.items():
            key = xxhash.xxh3_64_intdigest(f"{seed}:{silo}:{rnd}:{name}".encode()) & PERTURBATION_SEED_MASK
            noise = torch.randn(view.shape, generator=torch.Generator().manual_seed(key))
            view.add_(noise.to(view.dtype), alpha=PERTURBATION)


def _handed(session: Session) -> dict[str, Any]:
    """What the aggregator handed this silo for a session: keys in bytes, memory by its digest (never an address)."""
    hello = session.peer_hello
    assert hello is not None
    return {
        "metadata_bytes": len(hello.metadata),
        "region": [hello.region.region().digest(), hello.region.length] if hello.region else None,
    }
