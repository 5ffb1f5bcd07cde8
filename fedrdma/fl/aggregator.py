"""The aggregator process: rounds of broadcast, local training, upload and FedAvg.

Memory: the global state lives in two pools registered once (double buffering): round r
broadcasts from one while the silos' updates are folded, chunk by chunk as they land,
into the other, which becomes the global when the round closes. Each silo's upload lands
in a few chunk-sized slots (`transport.slots`; a push WRITEs into a window of landing slots
granted per silo and is copied into them), folded and reused, so memory does not grow with
the silo count times the model; a silo that must be taken back out is read again
(`fl.replay`). Nothing else holds a copy of the state, so the footprint is the pools, the
slots and evaluation's working set.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedrdma.config import AggregatorConfig
from fedrdma.control import messages as m
from fedrdma.control.beats import MISSED_BEATS
from fedrdma.control.hub import Hub, SiloLink
from fedrdma.core.addresses import split_host_port
from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import FedRDMAError, PeerLost
from fedrdma.core.fedavg import NotEnoughSilos, RoundAggregate
from fedrdma.core.layout import FlatState
from fedrdma.core.liveness import PEER_TIMEOUT_S
from fedrdma.core.modes import Mode, Role
from fedrdma.fl import checkpoint
from fedrdma.fl.broadcasts import Broadcasts
from fedrdma.fl.records import AggregatorRound, MemorySplit
from fedrdma.fl.rounds import SiloRound, SiloState
from fedrdma.fl.state import build_trainable
from fedrdma.fl.uploads import RoundUploads, Uploads
from fedrdma.memory import compute_heap, pin_mmap_threshold
from fedrdma.metrics import mark_runtime, memory_report, reset_peak
from fedrdma.transport import fabric
from fedrdma.transport.agent import Agent, Pool
from fedrdma.transport.session import Session
from fedrdma.transport.slots import SlotPool, receiver_share
from fedrdma.transport.streams import DataListener
from fedrdma.transport.tls import SERVER, Credentials

log = logging.getLogger(__name__)

MAX_ROUND_RETRIES = 3
"""A round that fails this often in a row (too few silos delivered) ends the run."""

READY_GRACE_S = 1.0
"""Poll interval while waiting for a silo's ready message (bounded by the round deadline)."""

DEADLINE_EXTENSION = 4.0
"""A silo whose upload still lands chunks at the round deadline gets up to this many times
the deadline in all: a slow line is not a dead silo, but a trickle must not hold a round for ever."""

PROGRESS_WINDOW_S = PEER_TIMEOUT_S
"""A broadcast or upload that verified a chunk this recently is making progress (the data
plane's own liveness bound: a longer silence fails the transfer anyway)."""

WAIT_STEP_S = 0.2
"""How often the round's wait looks at its silos' progress."""


class Aggregator:
    def __init__(self, cfg: AggregatorConfig, evaluate: Any = None) -> None:
        self.cfg = cfg
        self.fabric = fabric.detect()
        self.mode = fabric.resolve(cfg.mode, self.fabric)
        fabric.require_trust(self.mode, cfg.trusted_fabric, self.fabric)  # before any pool is registered
        fabric.require_checks(cfg.verify, self.mode, self.fabric)
        self.credentials = Credentials.of_process(cfg.certs, cfg.cert_name, SERVER,
                                                  "anyone on this host can join as any silo")
        if self.mode.one_sided:  # see fedrdma.memory for why not for grpc
            pin_mmap_threshold()
        mark_runtime()
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model, self.state = build_trainable(cfg)
        self.spare = FlatState.allocate(self.state.layout, fill=0)
        """The other half of the double-buffered global: the next average accumulates here."""
        self.chunk_size = min(cfg.chunk_size, self.state.nbytes)
        """A chunk larger than the state is the state: small (LoRA) states travel whole."""
        ChunkPlan.build(self.state.nbytes, self.chunk_size)  # a chunk size no plan can use stops us here, once
        self.uploads = Uploads(cfg.wire, self.state.layout, self.chunk_size)
        """What uploads travel as (`cfg.wire`): inboxes, slots and upload sessions hold its bytes."""
        self.agent = Agent(f"aggregator-{id(self):x}") if self.mode.one_sided else None
        self.streams = (DataListener(split_host_port(cfg.listen)[0], cfg.data_port)
                        if Mode.TCP_E in (self.mode, self.mode.broadcast) else None)
        self.bounded = cfg.inbox == "slots" and self.mode.receiver_places
        """Uploads land in slots (tcp-e's own code, a pull's READs or a push's grants choose where)."""
        self._unwritten = FlatState.allocate(self.uploads.layout, fill=None) if self.bounded else None
        """The layout a slotted upload session is made for; its bytes are never written, so never resident."""
        self.slot_pool = (SlotPool(max(1, (cfg.inbox_mb << 20) // self.uploads.chunk_size), self.uploads.chunk_size)
                          if self.bounded else None)
        """The slots every silo's upload lands in, shared: memory follows the line, not the silo count."""
        if self.slot_pool is not None and self.agent is not None and self.mode.registers_slots:
            self.slot_pool.register(self.agent)  # a pull READs into them
        self.pools: dict[int, Pool] = {}
        self._pool(self.state)
        self._pool(self.spare)
        self.broadcasts = Broadcasts(cfg.wire, self.state)
        """What the silos hold; with a compressed wire format, broadcasts after the first are deltas."""
        for extra in (self.broadcasts.held, self.broadcasts.delta):
            if extra is not None:
                self._pool(extra)
        self.evaluate = evaluate
        self.round = 0
        self.run_id = checkpoint.begin_run(self.out_dir, self.state.layout_id, cfg.resume)
        if cfg.resume:
            resumed = checkpoint.load_latest(self.out_dir, self.state, self.run_id)
            if resumed is not None:
                self.state.touch()
                self.round = resumed.round
                for damaged in resumed.skipped:
                    log.warning("skipped a damaged checkpoint: %s", damaged)
                log.info("resumed run %s from round %d", self.run_id, resumed.round)
        self._resumed = resumed if cfg.resume else None
        self.silos: dict[str, SiloState] = {}
        self._fold_lock = threading.Lock()
        self._folds: RoundUploads | None = None
        """The round's aggregate (`.aggregate`) and its way in from upload bytes, while a round is open."""
        self._progress: dict[str, float] = {}
        """When each silo's upload last verified a chunk this round (the deadline's progress)."""
        self._agreed = {s.id: s.weight for s in cfg.silos if s.weight is not None}
        """FedAvg weights from the configuration: these silos' reported counts are ignored."""
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.hub = Hub(cfg.listen, [s.id for s in cfg.silos], self.state.layout_id, self.state.nbytes,
                       self._welcome, self._event, self.credentials, cfg.wire)
        if self._resumed is not None:
            self._event({"event": "resumed", "run_id": self.run_id, "from_round": self._resumed.round,
                         "skipped": list(self._resumed.skipped)})
        self._event({"event": "security", "mode": self.mode, "tls": self.credentials is not None,
                     "fabric": self.fabric.describe(), "trusted_fabric": cfg.trusted_fabric})
        self._event({"event": "pools", "global": [p.region.digest() for p in self.pools.values()],
                     "nbytes": self.state.nbytes, "listen": self.hub.address, "wire": cfg.wire,
                     "upload_nbytes": self.uploads.layout.nbytes, "inbox": "slots" if self.bounded else "full",
                     "inbox_bytes": self.slot_pool.nbytes if self.slot_pool else 0})

    # -- plumbing ----------------------------------------------------------------------
    def _pool(self, state: FlatState) -> Pool | None:
        if self.agent is None or not self.mode.broadcast.registers_pool:
            return None
        key = state.address()
        if key not in self.pools:
            self.pools[key] = self.agent.register(state.buffer)
        return self.pools[key]

    def _accumulator(self) -> FlatState | None:
        """The spare half of the global pool holds the running sum, when the layout allows."""
        if all(spec.dtype == "float32" for spec in self.state.layout.specs):
            return self.spare
        return None

    def _welcome(self, silo: str, generation: int) -> m.Welcome:
        return m.Welcome(
            silo=silo,
            generation=generation,
            broadcast_mode=self.mode.broadcast,
            upload_mode=self.mode,
            chunk_size=self.chunk_size,
            window=self.cfg.window,
            heartbeat_s=self.cfg.heartbeat_s,
        )

    def _event(self, event: dict[str, Any]) -> None:
        event = {"time": time.time(), "round": self.round + 1, **event}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(event) + "\n")

    def _silo(self, link: SiloLink) -> SiloState:
        st = self.silos.get(link.silo)
        if st is None:
            if self.bounded:
                assert self.slot_pool is not None
                share = receiver_share(self.mode.one_sided, self.cfg.window, self.cfg.data_streams)
                slots = self.slot_pool.share(share,
                                             lambda off, data, silo=link.silo: self._land(silo, off, data))
                st = SiloState(link.silo, None, None, slots)
            else:
                inbox = FlatState.allocate(self.uploads.layout, fill=0)
                st = SiloState(link.silo, inbox, self._pool(inbox))
            self.silos[link.silo] = st
        if st.link is not link:
            st.abort()
            st.link, st.holds = link, 0
            data = {"streams": self.streams, "data_streams": self.cfg.data_streams,
                    "trusted_fabric": self.cfg.trusted_fabric, "verify": self.cfg.verify != fabric.VERIFY_FABRIC}
            whole = self.broadcasts.whole(self.state)
            st.broadcast = Session(
                self.agent, whole, link.data["broadcast"], self.mode.broadcast, Role.SENDER,
                self.chunk_size, self.cfg.window, pool=self._pool(whole),
                on_moved=lambda n, silo=link.silo: self._progressed(silo), **data,
            )
            delta = self.broadcasts.delta
            st.delta = None if delta is None else Session(
                self.agent, delta, link.data["delta"], self.mode.broadcast, Role.SENDER,
                self.uploads.chunk_size, self.cfg.window, pool=self._pool(delta),
                on_moved=lambda n, silo=link.silo: self._progressed(silo), **data,
            )
            inbox = st.inbox if st.inbox is not None else self._unwritten
            assert inbox is not None
            st.upload = Session(
                self.agent, inbox, link.data["upload"], self.mode, Role.RECEIVER,
                self.uploads.chunk_size, self.cfg.window, pool=st.pool, slots=st.slots,
                on_chunk=None if st.slots else lambda off, n, silo=link.silo: self._fold(silo, inbox, off, n), **data,
            )
            for session in (st.broadcast, st.delta, st.upload):
                if session is not None:
                    session.open()
            handed = st.upload.handed  # the only aggregator memory the silo holds a key to
            self._event({"event": "sessions", "silo": link.silo, "inbox": handed.digest() if handed else "",
                         "inbox_bytes": handed.length if handed else 0})
        return st

    def _fold(self, silo: str, inbox: FlatState, offset: int, length: int) -> None:
        with self._fold_lock:
            if self._folds is not None:
                self._folds.fold(silo, inbox, offset, length)
                self._progress[silo] = time.monotonic()

    def _progressed(self, silo: str) -> None:
        """The silo's broadcast moves: a slow line at the deadline, not a dead silo."""
        with self._fold_lock:
            if self._folds is not None:
                self._progress[silo] = time.monotonic()

    def _land(self, silo: str, offset: int, data: torch.Tensor) -> None:
        """A verified chunk in one of the silo's slots: for a retraction reading it again, or to fold."""
        replay = self.silos[silo].replay
        if replay is not None and replay.active:
            replay.land(offset, data)
            return
        with self._fold_lock:
            if self._folds is not None:
                self._folds.fold_chunk(silo, offset, data)
                self._progress[silo] = time.monotonic()

    # -- one silo's round --------------------------------------------------------------
    def _silo_round(self, link: SiloLink, rnd: int, deadline: float, out: SiloRound) -> None:
        st: SiloState | None = None
        try:
            st = self._silo(link)
            st.busy.set()
            assert st.broadcast is not None and st.upload is not None
            kind = self.broadcasts.kind(st.holds, link.digest)
            session = {"delta": st.delta, "whole": st.broadcast}.get(kind)
            link.control.send(m.RoundStart(round=rnd, broadcast=kind))
            out.broadcast = session.send() if session is not None else None
            st.holds = rnd
            ready = self._await_ready(link, rnd, deadline)
            out.ready = ready
            with self._fold_lock:
                assert self._folds is not None
                agreed = self._agreed.get(link.silo)
                self._folds.start_silo(link.silo, agreed or ready.n_samples, agreed=agreed is not None,
                                       source=st.replay_for(rnd) if st.slots is not None else None, inbox=st.inbox)
            out.n_samples = ready.n_samples
            out.upload = st.upload.receive()
            out.ok = True
        except Exception as exc:  # any failure is this silo's, never the round's
            out.reason = f"{type(exc).__name__}: {exc}"
            expected = isinstance(exc, (FedRDMAError, TimeoutError, OSError))
            log.warning("round %d: silo %s failed: %s", rnd, link.silo, out.reason, exc_info=not expected)
            self.hub.forget(link)
            if st is not None:
                st.link = None
        finally:
            out.finished_at = time.monotonic()
            if st is not None:
                st.busy.clear()

    def _await_ready(self, link: SiloLink, rnd: int, deadline: float) -> m.Ready:
        while True:
            if not link.alive():
                why = (link.control.close_reason if link.control.closed.is_set() else
                       f"silo {link.silo} missed {MISSED_BEATS} heartbeats ({MISSED_BEATS * link.heartbeat_s:g} s)")
                raise PeerLost(f"{why}, before reporting ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"silo {link.silo} did not finish training before the round's limit")
            try:
                msg = link.inbox.get(timeout=READY_GRACE_S)
            except Exception:
                continue
            if isinstance(msg, m.Ready) and msg.round == rnd:
                return msg
            if isinstance(msg, m.Leave):
                raise PeerLost(f"silo {link.silo} left: {msg.reason}")

    # -- rounds ----------------------------------------------------------------------------
    def run_round(self, rnd: int) -> AggregatorRound:
        cfg = self.cfg
        links = self._gather(rnd)
        reset_peak()  # the memory figures are this round's peak, not start-up's
        start = time.monotonic()
        # A silo's own wait for its Ready ends at the round's outer limit: whether it is still
        # worth waiting for past the deadline (a slow broadcast) is `_wait_for_silos`' call.
        deadline = start + cfg.round_deadline_s * DEADLINE_EXTENSION
        with self._fold_lock:
            self._folds = self.uploads.round(RoundAggregate(self.state, accumulator=self._accumulator()))
            self._progress = {}
        results = {link.silo: SiloRound(link.silo) for link in links}
        codec_start = time.monotonic()
        self.broadcasts.advance(self.state, rnd)
        codec_seconds = time.monotonic() - codec_start
        new = any(link.silo not in self.silos or not self.silos[link.silo].holds for link in links)
        self.broadcasts.offer_skip(self.state, new and cfg.first_broadcast == "unless-held")
        threads = [
            threading.Thread(target=self._silo_round, args=(link, rnd, deadline, results[link.silo]), daemon=True)
            for link in links
        ]
        for t in threads:
            t.start()
        self._wait_for_silos(threads, results, start)
        late = [r.silo for r in results.values() if r.finished_at == 0.0]
        for silo in late:
            results[silo].reason = "missed the round deadline"
            st = self.silos.get(silo)
            if st is not None and st.link is not None:
                self.hub.forget(st.link)
        with self._fold_lock:
            folds, self._folds = self._folds, None
        assert folds is not None
        aggregate = folds.aggregate
        agg_start = time.monotonic()
        for r in results.values():
            if not r.ok and r.n_samples:  # started, so it may have folded chunks: retract them
                aggregate.reject(r.silo, r.reason)
        try:
            outcome = aggregate.finish(into=self.spare, min_silos=cfg.min_silos, norm_factor=cfg.norm_factor,
                                       weight_factor=cfg.weight_factor)
        finally:
            self._replayed()
        for silo, weight in outcome.capped.items():
            log.warning("round %d: silo %s reported %d samples, more than %g x the others' median; it counts "
                        "as %d (agree its weight in `silos` if it really is that large)",
                        rnd, silo, outcome.n_samples[silo], cfg.weight_factor, weight)
        self.spare.touch()
        self.state, self.spare = self.spare, self.state
        self.state.bind(self.model)
        for st in self.silos.values():
            if st.broadcast is not None and self.broadcasts.held is None:  # else it sends `held`, always
                st.broadcast.rebind(self.state, self._pool(self.state))
        aggregation_seconds = time.monotonic() - agg_start
        for silo, reason in outcome.rejected.items():
            results[silo].ok = False
            results[silo].reason = f"update rejected: {reason}"
        checkpoint.save(self.out_dir, self.state, rnd, self.run_id, outcome.weights, cfg.keep_checkpoints)
        eval_loss = self._evaluate()
        for r in results.values():
            st = self.silos.get(r.silo)
            if st is not None and st.link is not None:
                try:
                    st.link.control.send(m.RoundEnd(round=rnd, included=r.silo in outcome.accepted, reason=r.reason))
                except PeerLost:
                    pass
        record = self._round_record(rnd, results, outcome, aggregation_seconds, eval_loss, time.monotonic() - start)
        record = record.model_copy(update={"codec_seconds": codec_seconds})
        self._event(record.model_dump(mode="json"))
        return record

    def _replayed(self) -> None:
        """After the round's close: a silo whose resend broke has a spent upload session, so it rejoins."""
        for st in self.silos.values():
            replay, st.replay = st.replay, None
            if replay is not None and replay.failed is not None and st.link is not None:
                self._event({"event": "resend_failed", "silo": st.silo, "reason": replay.failed})
                self.hub.forget(st.link)
                st.link = None

    def _gather(self, rnd: int) -> list[SiloLink]:
        """The silos round `rnd` starts with: ready, and not still busy with the last round.

        Waits up to `join_timeout_s` for `min_silos` of them, and `gather_s` more for the
        rest. A silo can drop out while the others are awaited (killed, cut off), so the
        count is taken again until it holds, rather than failing on a moment's shortfall.
        """
        cfg = self.cfg
        deadline = time.monotonic() + cfg.join_timeout_s
        while True:
            links = self.hub.wait_for(cfg.min_silos, max(0.0, deadline - time.monotonic()))
            if cfg.silos and len(links) < len(cfg.silos) and cfg.gather_s > 0:
                links = self.hub.wait_for(len(cfg.silos), cfg.gather_s)
            links = [link for link in links if not (link.silo in self.silos and self.silos[link.silo].busy.is_set())]
            if len(links) >= cfg.min_silos:
                return links
            if time.monotonic() >= deadline:
                raise FedRDMAError(
                    f"round {rnd}: only {len(links)} silo(s) ready within {cfg.join_timeout_s:.0f} s, "
                    f"min_silos is {cfg.min_silos}; start more silos or lower min_silos"
                )
            time.sleep(WAIT_STEP_S)  # a busy silo's last round is ending, or a silo is rejoining

    def _wait_for_silos(self, threads: list[threading.Thread], results: dict[str, SiloRound], start: float) -> None:
        """Until every silo is done, or the deadline: past it, only while an unfinished silo's
        broadcast or upload still verifies chunks (a slow path), and never past
        DEADLINE_EXTENSION times it. A silo with no verified chunk for PROGRESS_WINDOW_S at
        the deadline (training for long, or hung) is left out."""
        deadline = start + self.cfg.round_deadline_s
        limit = start + self.cfg.round_deadline_s * DEADLINE_EXTENSION
        while True:
            alive = [t for t in threads if t.is_alive()]
            now = time.monotonic()
            if not alive or now >= limit:
                return
            if now >= deadline:
                with self._fold_lock:
                    recent = [s for s, at in self._progress.items() if now - at < PROGRESS_WINDOW_S]
                if not any(results[s].finished_at == 0.0 for s in recent):
                    return
            alive[0].join(timeout=WAIT_STEP_S)

    def _round_record(self, rnd, results, outcome, aggregation_seconds, eval_loss, seconds) -> AggregatorRound:
        silos = [r.record().model_copy(update={"weight": outcome.weights.get(r.silo),
                                               "capped_samples": outcome.capped.get(r.silo)})
                 for r in results.values()]
        ok = [s for s in silos if s.silo in outcome.accepted]
        comm = [(s.broadcast_seconds or 0.0) + (s.upload_seconds or 0.0) for s in ok]
        train = [s.train_seconds or 0.0 for s in ok]
        comm_s = sum(comm) / len(comm) if comm else 0.0
        compute_s = (sum(train) / len(train) if train else 0.0) + aggregation_seconds
        return AggregatorRound(
            time=time.time(),
            round=rnd,
            mode=self.mode,
            wire=self.cfg.wire,
            accepted=sorted(outcome.accepted),
            rejected=outcome.rejected,
            eval_loss=eval_loss,
            eval_perplexity=float(torch.tensor(eval_loss).exp()) if eval_loss is not None else None,
            comm_seconds=comm_s,
            compute_seconds=compute_s,
            comm_share=comm_s / (comm_s + compute_s) if comm_s + compute_s > 0 else 0.0,
            aggregation_seconds=aggregation_seconds,
            round_seconds=seconds,
            state_bytes=self.state.nbytes,
            aggregator_memory=MemorySplit.model_validate(memory_report(
                self.model, None, self._pool_bytes(), pool_is_model=self.mode.broadcast.registers_pool
            )),
            silos=silos,
        )

    def _pool_bytes(self) -> int:
        return sum(p.region.length for p in self.pools.values() if p.registered)

    def _evaluate(self) -> float | None:
        """The global model's eval loss, computed outside the pinned heap (see fedrdma.memory)."""
        if not self.evaluate:
            return None
        with compute_heap():
            return self.evaluate(self.model)

    def run(self, on_round: Callable[[AggregatorRound], None] = lambda r: None) -> list[AggregatorRound]:
        """Rounds until `cfg.rounds`; `on_round` sees each round's record as it closes."""
        records: list[AggregatorRound] = []
        initial = self._evaluate() if self.round == 0 else None
        if initial is not None:
            records.append(AggregatorRound(time=time.time(), round=0, mode=self.mode, wire=self.cfg.wire,
                                           eval_loss=initial, state_bytes=self.state.nbytes))
            self._event(records[-1].model_dump(mode="json"))
            on_round(records[-1])
        failures = 0
        finished = False
        try:
            while self.round < self.cfg.rounds:
                try:
                    record = self.run_round(self.round + 1)
                except NotEnoughSilos as exc:
                    failures += 1
                    self._event({"event": "round_failed", "reason": str(exc)})
                    if failures > MAX_ROUND_RETRIES:
                        raise
                    log.warning("round %d failed (%s); running it again", self.round + 1, exc)
                    continue
                failures = 0
                self.round += 1
                records.append(record)
                on_round(record)
            finished = True
        finally:
            self.close(finished)
        return records

    def close(self, finished: bool = False) -> None:
        """Tell the silos the run is over only when it is; after a failure they see the aggregator gone,
        and rejoin if it comes back with --resume (or give up after their rejoin_s)."""
        self.hub.close(finished)
        for st in self.silos.values():
            st.abort()
        for pool in self.pools.values():
            pool.close()
        if self.streams is not None:
            self.streams.close()
