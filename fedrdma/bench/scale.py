"""`fedrdma bench scale`: one aggregator with 4, 16, 64 silos, in one run.

The silos are real: each joins over its own mutually authenticated control link, opens its
own data-plane endpoint and moves the whole state both ways every round. They skip local
training (`train = "none"`: a seeded perturbation instead), so what is measured is the
aggregator and the network, and many of them share a few processes (`fedrdma.fl.silos`) so
that 64 fit in this machine's memory. The aggregator is a process of its own, and its CPU
and peak RSS are read from the kernel when it exits (`wait4`), not sampled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedrdma.bench.records import ScaleResult, ScaleRound, ScaleRun
from fedrdma.core.errors import RunError
from fedrdma.core.modes import Mode
from fedrdma.fl.demo import forget_run, read_rounds, write_configs
from fedrdma.transport.ports import free_port

DEFAULT_COUNTS = (4, 16, 64)
"""The silo counts the issue asks for: a small consortium, a large one, and the ceiling."""

DEFAULT_ROUNDS = 2
"""Rounds per federation: the first includes the joins, the second is steady state."""

SILO_PROCESSES = 4
"""Processes the silos are spread over: enough that one interpreter's GIL is not the
bottleneck on 2 cores, few enough that 64 silos' interpreters fit in memory."""

RUN_TIMEOUT_S = 1800.0
"""Bounds one federation; 64 silos of gpt2-tiny take well under a minute here."""

JOIN_TIMEOUT_S = 600.0
"""Every silo must be in before the first round: starting 64 of them takes a while on 2 cores."""

ROUND_DEADLINE_S = 900.0
"""Generous: a silo left out for lateness would hide what is measured."""

POLL_S = 0.5
"""How often the runner looks at the aggregator's metrics for progress."""

MIB = 1 << 20


def silo_names(n: int) -> list[str]:
    return [f"s{i:03d}" for i in range(n)]


def groups(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """`items` dealt round-robin into at most `parts` non-empty groups."""
    out: list[list[Path]] = [[] for _ in range(min(parts, len(items)))]
    for i, item in enumerate(items):
        out[i % len(out)].append(item)
    return out


def run_one(
    root: Path, n: int, model: str, mode: Mode, rounds: int, on_round: Callable[[int], None] = lambda r: None,
    inbox: str = "slots",
) -> tuple[ScaleRun, int]:
    """One federation of `n` non-training silos: the aggregator's figures, and the state's bytes."""
    names = silo_names(n)
    agg_path, silo_paths = write_configs(
        root, mode, rounds, model, False, names, free_port(),
        aggregator_settings={"eval_data": None, "join_timeout_s": JOIN_TIMEOUT_S,
                             "round_deadline_s": ROUND_DEADLINE_S, "gather_s": JOIN_TIMEOUT_S, "inbox": inbox},
        silo_settings={"train": "none", "data": None},
    )
    metrics = root / "aggregator" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    forget_run(root / "aggregator")
    env = {**os.environ, "UCX_TLS": os.environ.get("UCX_TLS", "tcp")}
    logs = [open(root / "aggregator.log", "w")]  # noqa: SIM115 (closed in finally)
    agg = subprocess.Popen([sys.executable, "-m", "fedrdma.cli", "aggregator", "--config", str(agg_path)],
                           stdout=logs[0], stderr=subprocess.STDOUT, env=env)
    hosts: list[subprocess.Popen] = []
    try:
        for k, group in enumerate(groups(silo_paths, SILO_PROCESSES)):
            logs.append(open(root / f"silos-{k}.log", "w"))  # noqa: SIM115
            hosts.append(subprocess.Popen([sys.executable, "-m", "fedrdma.fl.silos", *map(str, group)],
                                          stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
        usage = _wait_reporting(agg, metrics, on_round, f"the aggregator of {n} silos")
        if agg.returncode != 0:
            raise RunError(f"the aggregator of {n} silos failed; see {root / 'aggregator.log'}")
        for host in hosts:
            host.wait(timeout=RUN_TIMEOUT_S)
    finally:
        for proc in (agg, *hosts):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    records = [r for r in read_rounds(metrics) if r.round > 0]
    if len(records) != rounds:
        raise RunError(f"the aggregator of {n} silos recorded {len(records)} of {rounds} rounds; see {root}")
    state_bytes = records[-1].state_bytes
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    return ScaleRun(
        silos=n,
        rounds=[ScaleRound(round=r.round, accepted=r.accepted, seconds=r.round_seconds,
                           aggregation_seconds=r.aggregation_seconds) for r in records],
        all_accepted=all(sorted(r.accepted) == names for r in records),
        aggregator_cpu_seconds=usage.ru_utime + usage.ru_stime,
        aggregator_peak_rss_mb=peak / MIB,
        aggregator_rss_above_globals_mb=(peak - 2 * state_bytes) / MIB,
    ), state_bytes


def _wait_reporting(
    proc: subprocess.Popen, metrics: Path, on_round: Callable[[int], None], what: str,
) -> os.struct_rusage:  # type: ignore[name-defined]
    """Reap `proc` with its resource usage, reporting each round it records meanwhile."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        done = [r.round for r in read_rounds(metrics) if r.round > 0]
        for rnd in done[seen:]:
            on_round(rnd)
        seen = len(done)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() > deadline:
            raise RunError(f"{what} took longer than {RUN_TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)


def run(
    out: Path, counts: Sequence[int], model: str, mode: Mode, rounds: int,
    on_round: Callable[[int, int], None] = lambda n, r: None, inbox: str = "slots",
) -> ScaleResult:
    results = [run_one(out / f"silos-{n}", n, model, mode, rounds, lambda r, n=n: on_round(n, r), inbox)
               for n in counts]
    return ScaleResult(model=model, mode=mode, inbox=inbox, state_mb=results[0][1] / MIB,
                       silo_processes=SILO_PROCESSES,
                       time=time.time(), runs=[run for run, _ in results])
