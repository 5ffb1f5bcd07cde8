"""`fedrdma bench soak`: a federation under random faults, every round's mean recomputed apart.

Real processes throughout: an aggregator, and silos that skip training (a seeded
perturbation, `fedrdma.fl.silo.perturb`) and keep a copy of every update they upload
(`python -m fedrdma.testing.silo --fault record:DIR`). After each closed round the soak may
inject one fault, at a random moment of the next round: it SIGKILLs a silo and starts it
again, SIGSTOPs one for a while (shorter or longer than the heartbeat window) and SIGCONTs
it, or SIGKILLs the aggregator and restarts it with `--resume`. With `lab` (root) every
process runs in the WAN lab's namespaces, each silo on its own shaped path, and the soak
also cuts a silo's path (every packet dropped, both ways) or drops a burst of its packets
for a few seconds.

Then it checks, from files alone:
- each round's checkpoint equals the weighted mean of exactly the updates that round
  accepted (the weights the checkpoint records, the updates the silos saved), in float64;
- each accepted update is the previous round's global plus that silo's perturbation, bit for
  bit: an update built on a stale global, or a round applied twice, shows here;
- no round was recorded again after the aggregator resumed past it;
- nothing leaked: no process left, no descriptor of the soak's own left open, no `.tmp`
  checkpoint, and in the lab no namespace once it is down.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fedrdma.bench.records import SoakLeaks, SoakResult
from fedrdma.core.errors import RunError
from fedrdma.core.modes import Mode

if TYPE_CHECKING:
    from fedrdma.lab.lab import Lab

FAULTS = ("silo_kill", "silo_stop", "aggregator_kill")
"""What the soak injects, one at a time."""

LAB_FAULTS = ("link_cut", "loss_burst")
"""What it injects too when the federation runs in the lab."""

LAB_NAME = "frsoak"
"""The soak's own lab, up for the run and down afterwards."""

LAB_RATE = "1gbit"
LAB_RTT = "10ms"
"""Each silo's path: a wide-area line, fast enough that rounds stay short."""

CUT_S = (1.0, 6.0)
"""How long a cut lasts (uniform): within the heartbeat window or beyond it."""

BURST_S = (1.0, 4.0)
BURST_LOSS = 0.2
"""A loss burst: one packet in five dropped each way for a few seconds."""

FAULT_PROBABILITY = 0.5
"""Chance that a closed round is followed by a fault: half the rounds run under one."""

FAULT_DELAY_S = (0.0, 0.4)
"""A fault waits this long (uniform) after a round closed, so it lands in the next round's
broadcast, training or upload rather than always at its start."""

STOP_S = (1.0, 8.0)
"""How long a stopped silo stays stopped (uniform): sometimes within the heartbeat window
(it must carry on as if nothing happened), sometimes beyond (it is left out and rejoins)."""

HEARTBEAT_S = 1.0
"""The soak's heartbeat: a silo is left out after 3 s of silence, so a round with a hung silo
ends in seconds."""

ROUND_DEADLINE_S = 60.0
"""A round's limit; the faults end rounds sooner (a dead or hung silo is left out)."""

GATHER_S = 3.0
"""At a round's start, wait this long for silos that are rejoining."""

REJOIN_S = 600.0
"""Silos keep redialing a killed aggregator this long: the soak always restarts it."""

RESTART_PAUSE_S = 0.5
"""Between killing a process and starting its successor."""

SECONDS_PER_ROUND_BOUND = 60.0
"""Bounds the soak: no round, with its fault, should take longer than this."""

POLL_S = 0.1
"""How often the soak looks at the checkpoints for a closed round."""

EXIT_WAIT_S = 10.0
"""How long the silos get to leave once the run is over (those told Finish leave at once)."""

TOLERANCE = 1e-6
"""Float64 mean against the float32 checkpoint: float32's rounding of values of order 0.1."""

UPDATES_DIR = "updates"
"""Where the recording silos keep their updates, under the soak's directory."""

SILO_SEED = 0
"""The seed `write_configs` gives every silo: their perturbations are redone with it."""


def update_path(directory: Path, silo: str, rnd: int) -> Path:
    """Where a recording silo keeps its round-`rnd` update."""
    return directory / f"{silo}-{rnd:05d}.safetensors"


@dataclass
class _Proc:
    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    stopped_until: float | None = None

    def launch(self) -> None:
        self.proc = self.start()

    def kill(self) -> None:
        assert self.proc is not None
        if self.stopped_until is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.stopped_until = None
        self.proc.kill()
        self.proc.wait()


@dataclass
class _Tally:
    faults: dict[str, int]
    injected_at: list[tuple[str, int]] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)


class Soak:
    """One soak: its processes, the faults in force, and what the checks need afterwards."""

    def __init__(self, root: Path, rounds: int, silos: int, seed: int, mode: Mode, model: str,
                 lab: Lab | None = None) -> None:
        from fedrdma.bench.wan import federation_hosts
        from fedrdma.fl.demo import LOCAL, write_configs
        from fedrdma.transport.ports import free_port

        self.root, self.rounds, self.seed, self.model, self.mode = root, rounds, seed, model, mode
        self.names = [f"s{i:02d}" for i in range(silos)]
        self.updates = root / UPDATES_DIR
        self.agg_dir = root / "aggregator"
        for stale in (self.updates, self.agg_dir):
            if stale.exists():
                for path in stale.iterdir():
                    path.unlink()
        self.lab = lab
        self.kinds = FAULTS + (LAB_FAULTS if lab is not None else ())
        self.hosts = federation_hosts(lab) if lab is not None else LOCAL
        self.restores: list[tuple[float, int, float]] = []
        """(when, silo index, loss) of the path faults in force."""
        self.agg_cfg, silo_cfgs = write_configs(
            root, mode, rounds, model, False, self.names, free_port(), self.hosts,
            aggregator_settings={"eval_data": None, "min_silos": 1, "round_deadline_s": ROUND_DEADLINE_S,
                                 "gather_s": GATHER_S, "heartbeat_s": HEARTBEAT_S, "keep_checkpoints": rounds},
            silo_settings={"train": "none", "data": None, "rejoin_s": REJOIN_S, "heartbeat_s": HEARTBEAT_S},
        )
        self.env = {**os.environ, "UCX_TLS": os.environ.get("UCX_TLS", "tcp")}
        self.logs: list = []
        self.aggregator = _Proc("aggregator", lambda: self._spawn("aggregator", self._agg_command(False)))
        self.silos = {
            name: _Proc(name, lambda c=cfg, n=name, k=k: self._spawn(n, [
                *self.hosts.silo(k)[0], sys.executable, "-m", "fedrdma.testing.silo",
                "--fault", f"record:{self.updates}", "--config", str(c)]))
            for k, (name, cfg) in enumerate(zip(self.names, silo_cfgs, strict=True))
        }

    def _agg_command(self, resume: bool) -> list[str]:
        return [*self.hosts.agg_prefix, sys.executable, "-m", "fedrdma.cli", "aggregator", "--config",
                str(self.agg_cfg), *(["--resume"] if resume else [])]

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "a")  # noqa: SIM115 (closed when the soak ends)
        self.logs.append(log)
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def _restart_aggregator(self) -> None:
        self.aggregator.kill()
        time.sleep(RESTART_PAUSE_S)
        self.aggregator.start = lambda: self._spawn("aggregator", self._agg_command(True))
        self.aggregator.launch()

    def run(self, on_round: Callable[[int], None] = lambda r: None) -> SoakResult:
        from fedrdma.fl import checkpoint

        fds_before = len(os.listdir("/proc/self/fd"))
        tally = _Tally(faults=dict.fromkeys(self.kinds, 0))
        start = time.monotonic()
        self.aggregator.launch()
        for silo in self.silos.values():
            silo.launch()
        seen = 0
        deadline = start + SECONDS_PER_ROUND_BOUND * (self.rounds + 1)
        try:
            while True:
                now = time.monotonic()
                if now > deadline:
                    raise RunError(f"the soak took longer than {deadline - start:.0f} s; see {self.root}")
                self._restore_paths(now)
                for silo in self.silos.values():
                    if silo.stopped_until is not None and now >= silo.stopped_until:
                        assert silo.proc is not None
                        silo.proc.send_signal(signal.SIGCONT)
                        silo.stopped_until = None
                assert self.aggregator.proc is not None
                if self.aggregator.proc.poll() is not None:
                    if self.aggregator.proc.returncode == 0:
                        break
                    raise RunError(f"the aggregator failed (exit {self.aggregator.proc.returncode}); "
                                   f"see {self.root / 'aggregator.log'}")
                for silo in self.silos.values():
                    assert silo.proc is not None
                    code = silo.proc.poll()
                    if code not in (None, 0):  # not ours: a silo leaves only when told the run is over
                        tally.unexpected_exits.append(f"{silo.name} (exit {code})")
                        silo.launch()
                done = len(checkpoint.rounds(self.agg_dir))
                for rnd in range(seen + 1, done + 1):
                    on_round(rnd)
                    # Each round's fault is drawn from its own stream: the plan is the seed's
                    # alone, however many rounds one look at the checkpoints finds closed.
                    draw = random.Random(f"{self.seed}:{rnd}")
                    if rnd < self.rounds and draw.random() < FAULT_PROBABILITY:
                        self._inject(draw, tally, rnd)
                seen = max(seen, done)
                time.sleep(POLL_S)
            for silo in self.silos.values():
                if silo.stopped_until is not None:
                    assert silo.proc is not None
                    silo.proc.send_signal(signal.SIGCONT)
                    silo.stopped_until = None
            leftover = self._reap()
        finally:
            self._restore_paths(float("inf"))
            for proc in (self.aggregator, *self.silos.values()):
                if proc.proc is not None and proc.proc.poll() is None:
                    proc.kill()
            for log in self.logs:
                log.close()
        seconds = time.monotonic() - start
        return self._check(tally, leftover, len(os.listdir("/proc/self/fd")) - fds_before, seconds)

    def _inject(self, rng: random.Random, tally: _Tally, done: int) -> None:
        time.sleep(rng.uniform(*FAULT_DELAY_S))
        kind = rng.choice(self.kinds)
        running = [s for s in self.silos.values() if s.stopped_until is None]
        if kind != "aggregator_kill" and not running:
            return
        if kind == "silo_kill":
            victim = rng.choice(running)
            victim.kill()
            time.sleep(RESTART_PAUSE_S)
            victim.launch()
        elif kind in LAB_FAULTS:
            busy = {index for _, index, _ in self.restores}  # one path fault at a time per path
            free = [k for k in range(len(self.names)) if k not in busy]
            if not free:
                return
            k = rng.choice(free)
            loss, span = (1.0, CUT_S) if kind == "link_cut" else (BURST_LOSS, BURST_S)
            self._path_loss(k, loss, add=True)
            self.restores.append((time.monotonic() + rng.uniform(*span), k, loss))
        elif kind == "silo_stop":
            victim = rng.choice(running)
            assert victim.proc is not None
            victim.proc.send_signal(signal.SIGSTOP)
            victim.stopped_until = time.monotonic() + rng.uniform(*STOP_S)
        else:
            self._restart_aggregator()
        tally.faults[kind] += 1
        tally.injected_at.append((kind, done))

    def _path_loss(self, k: int, loss: float, add: bool) -> None:
        from fedrdma.lab.netns import PathLinks
        from fedrdma.lab.shaping import clear_loss, directions, set_loss

        assert self.lab is not None
        for direction in directions(PathLinks(self.lab.config.name, k + 1)):
            (set_loss if add else clear_loss)(direction, loss)

    def _restore_paths(self, now: float) -> None:
        due = [r for r in self.restores if r[0] <= now]
        self.restores = [r for r in self.restores if r[0] > now]
        for _, k, loss in due:
            self._path_loss(k, loss, add=False)

    def _reap(self) -> list[str]:
        """Let every silo leave, then look for any process of this soak still running.

        A silo that was dead or hung when the run ended never hears Finish: it redials the
        finished aggregator until its rejoin limit, as it should. Those are stopped after
        EXIT_WAIT_S; a leak is a process still alive after that (a child nobody reaped)."""
        deadline = time.monotonic() + EXIT_WAIT_S
        for proc in self.silos.values():
            assert proc.proc is not None
            try:
                proc.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.proc.terminate()
                proc.proc.wait(timeout=EXIT_WAIT_S)
        return _processes_under(self.root)

    def _check(self, tally: _Tally, leftover: list[str], fds: int, seconds: float) -> SoakResult:
        mismatched, stale = verify_rounds(self.agg_dir, self.updates, self.rounds)
        double_counted = _double_counted(self.agg_dir / "metrics.jsonl")
        retried = _count_events(self.agg_dir / "metrics.jsonl", "round_failed") + tally.faults["aggregator_kill"]
        finished = not mismatched
        survived = dict.fromkeys(tally.faults, 0)
        for kind, at in tally.injected_at:
            if finished and self.rounds > at:
                survived[kind] += 1
        tmp_files = sorted(str(p) for p in self.agg_dir.glob("*.tmp"))
        return SoakResult(
            rounds=self.rounds, silos=len(self.names), seed=self.seed, model=self.model, mode=self.mode,
            lab=self.lab is not None,
            seconds=seconds,
            faults=tally.faults, survived=survived, rounds_retried=retried,
            mismatched_rounds=sorted(set(mismatched)), stale_updates=stale, double_counted=double_counted,
            unexpected_exits=tally.unexpected_exits,
            leaks=SoakLeaks(processes=leftover, fds=max(0, fds), tmp_files=tmp_files),
        )


def verify_rounds(agg_dir: Path, updates_dir: Path, rounds: int) -> tuple[list[int], list[str]]:
    """Rounds whose checkpoint is not the weighted mean of the updates it accepted, and the
    accepted updates (SILO@ROUND) not built on the previous round's checkpoint."""
    import torch
    from safetensors.torch import load_file

    from fedrdma.fl import checkpoint
    from fedrdma.fl.silo import perturb

    mismatched: list[int] = []
    stale: list[str] = []
    previous: dict[str, torch.Tensor] | None = None
    for rnd in range(1, rounds + 1):
        path = checkpoint.path_for(agg_dir, rnd)
        if not path.exists():
            mismatched.append(rnd)
            previous = None
            continue
        glob = load_file(str(path))
        weights = checkpoint.weights_of(path)
        updates = {s: update_path(updates_dir, s, rnd) for s in weights}
        if not weights or not all(p.exists() for p in updates.values()):
            mismatched.append(rnd)
            previous = glob
            continue
        loaded = {s: load_file(str(p)) for s, p in updates.items()}
        for name, tensor in glob.items():
            mean = sum(w * loaded[s][name].double() for s, w in weights.items())
            if float((mean - tensor.double()).abs().max()) > TOLERANCE:
                mismatched.append(rnd)
                break
        if previous is not None:
            for silo, update in loaded.items():
                expected = {name: t.clone() for name, t in previous.items()}
                perturb(expected, SILO_SEED, silo, rnd)
                if not all(torch.equal(expected[n], update[n]) for n in expected):
                    stale.append(f"{silo}@{rnd}")
        previous = glob
    return mismatched, stale


def _processes_under(root: Path) -> list[str]:
    """Processes (other than this one) whose command line names `root`: the soak's, if any are left."""
    out = []
    ours = _ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it left meanwhile
        if str(root) in cmdline:
            out.append(f"{entry.name}: {cmdline.strip()[:200]}")
    return out


def _ancestors() -> set[int]:
    """This process and those above it (a wrapper that ran the soak names its directory too)."""
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _events(metrics: Path) -> list[dict]:
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []


def _count_events(metrics: Path, kind: str) -> int:
    return sum(1 for e in _events(metrics) if e.get("event") == kind)


def _double_counted(metrics: Path) -> list[int]:
    """Rounds recorded again after the aggregator resumed past them."""
    resumed_past = 0
    out = []
    for event in _events(metrics):
        if event.get("event") == "resumed":
            resumed_past = max(resumed_past, int(event["from_round"]))
        elif event.get("event") == "round" and 0 < int(event["round"]) <= resumed_past:
            out.append(int(event["round"]))
    return sorted(set(out))


def run(root: Path, rounds: int, silos: int, seed: int, mode: Mode, model: str, lab: bool = False,
        on_round: Callable[[int], None] = lambda r: None) -> SoakResult:
    """The soak; with `lab` (root) in the WAN lab, which is taken down afterwards and checked gone."""
    root.mkdir(parents=True, exist_ok=True)
    if not lab:
        return Soak(root, rounds, silos, seed, mode, model).run(on_round)
    from fedrdma.lab.config import LabConfig
    from fedrdma.lab.lab import lab as running_lab
    from fedrdma.lab.netns import list_namespaces

    config = LabConfig.uniform(silos=silos, rate=LAB_RATE, rtt=LAB_RTT, name=LAB_NAME)
    with running_lab(config) as up:
        result = Soak(root, rounds, silos, seed, mode, model, up).run(on_round)
    result.leaks.namespaces = sorted(ns for ns in list_namespaces() if ns.startswith(f"{LAB_NAME}-"))
    return result
