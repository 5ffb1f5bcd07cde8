"""`fedrdma bench flower`: one Flower app run twice in one go, its arrays moved by Flower and by fedrdma.

Real processes throughout: a SuperLink and a SuperNode per site (`flower.deploy`), a
`fedrdma node` per site, the app submitted with `flwr run`. The ServerApp writes each
training step's timing (`flower.timing.Timed`); a sampler reads every process's RSS from
/proc, by role, while a run goes. The two ways run one after the other, so neither slows
the other's figures (`parallel` is for tests, which check values, not times).

With a `shape` each site sits on its own lab path of that shape (root): the SuperLink, the
ServerApp and the aggregator's node in the aggregator's namespace, a site's SuperNode,
ClientApps and node in its silo's. Both ways then run under TLS with a CA of the run's own.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil

from fedrdma.bench.records import FlowerResult, FlowerRound, FlowerWay
from fedrdma.bench.wan import BENCH_LAB_NAME, LOOPBACK_PATH, federation_hosts
from fedrdma.core.errors import RunError
from fedrdma.fl.demo import LOCAL, Hosts, make_certs
from fedrdma.flower.deploy import Federation, LinkTLS
from fedrdma.flower.mod import RUNTIME_KEY, SITE_KEY
from fedrdma.lab.config import DEFAULT_MTU, LabConfig, PathShape
from fedrdma.lab.lab import lab as running_lab
from fedrdma.metrics import peak_rss_bytes, rss_bytes
from fedrdma.node.process import NodeProcess, start_node

SITES = ("hospital", "bank")
"""The example's two sites: partitions 0 and 1 of the shipped corpus."""

SERVER_SITE = "agg"

SAMPLE_S = 0.2
"""How often RSS is sampled: a ClientApp lives for seconds, a peak for less."""

RUN_TIMEOUT_S = 3600.0
"""A GPT-2-small run of a few rounds takes minutes; this bounds a hang."""

ROLES = (("flwr-serverapp", "serverapp"), ("flwr-clientapp", "clientapp"), ("flower-superlink", "superlink"),
         ("flower-supernode", "supernode"), ("fedrdma.cli node", "node"))
"""Which process is which, by its command line."""


def _role(cmdline: str) -> str | None:
    for needle, role in ROLES:
        if needle in cmdline:
            if role == "node":
                return "node-" + cmdline.split("--site", 1)[1].split()[0]
            return role
    return None


def _label(way: bool) -> str:
    return "fedrdma" if way else "flower"


PER_MESSAGE_ROLES = ("serverapp", "clientapp")
"""Processes Flower starts for a run or a message: none is idle before the arrays move."""


class RssSampler:
    """The largest peak RSS of every process under the given roots, by role, until stopped.

    Each sample reads the kernel's high-water mark (`metrics.peak_rss_bytes`), so a spike
    between samples is not missed; a process that lives less than a sample is. As it starts
    it notes the resident memory of the long-lived processes, idle then: their baselines."""

    def __init__(self, roots: list[int]) -> None:
        self.roots = roots
        self.peak: dict[str, float] = {}
        self.baseline: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> RssSampler:
        for role, proc in self._procs():
            if role not in PER_MESSAGE_ROLES and role not in self.baseline:
                try:
                    self.baseline[role] = rss_bytes(proc.pid) / 2**20
                except (OSError, RuntimeError):
                    continue  # gone before it was read
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _procs(self) -> Iterator[tuple[str, psutil.Process]]:
        for root in self.roots:
            try:
                parent = psutil.Process(root)
                procs = [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for proc in procs:
                try:
                    role = _role(" ".join(proc.cmdline()))
                except psutil.Error:
                    continue
                if role is not None:
                    yield role, proc

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for role, proc in self._procs():
                try:
                    rss = peak_rss_bytes(proc.pid) / 2**20
                except (OSError, RuntimeError):
                    continue  # gone, or a zombie: its status has no VmHWM any more
                self.peak[role] = max(self.peak.get(role, 0.0), rss)


def run_flower_bench(app: Path, model: str, rounds: int, out_dir: Path | None = None, parallel: bool = False,
                     say: Callable[[str], None] = lambda _: None, extra: dict[str, object] | None = None,
                     shape: PathShape | None = None, mtu: int = DEFAULT_MTU) -> FlowerResult:
    """On loopback, or with `shape` on a lab of one such path per site (up for the run, down after)."""
    root = (Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fedrdma-bench-flower-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)  # absolute: Flower's config takes no relative certificate path
    if shape is None:
        return _run(app, model, rounds, root, parallel, say, extra, LOCAL, None)
    with running_lab(LabConfig(name=BENCH_LAB_NAME, mtu=mtu, paths=(shape,) * len(SITES)), say) as lab:
        hosts = federation_hosts(lab)
        certs = make_certs(root / "certs", SITES, hosts, server=SERVER_SITE)  # the node's and the SuperLink's pair
        result = _run(app, model, rounds, root, parallel, say, extra, hosts, certs)
    return result.model_copy(update={"path": f"a lab path each, {shape.describe()}, MTU {mtu}"})


def _run(app: Path, model: str, rounds: int, root: Path, parallel: bool, say: Callable[[str], None],
         extra: dict[str, object] | None, hosts: Hosts, certs: Path | None) -> FlowerResult:
    started = time.time()
    nodes: dict[str, NodeProcess] = {}
    tls = LinkTLS.of(certs, SERVER_SITE) if certs else None
    feds = {way: Federation(root / f"flwr-home-{_label(way)}", hosts, tls) for way in (False, True)}
    try:
        nodes[SERVER_SITE] = start_node(SERVER_SITE, root / f"node-{SERVER_SITE}", certs, serve=True,
                                        listen=f"{hosts.listen_host}:0", prefix=hosts.agg_prefix)
        for k, site in enumerate(SITES):
            prefix, dial = hosts.silo(k)  # a lab's aggregator listens on all its paths and names none of them
            nodes[site] = start_node(site, root / f"node-{site}", certs, prefix=prefix,
                                     extra=["--peer-host", dial] if hosts.dial_hosts else ())
        for fed in feds.values():
            fed.start_link()
            for k, site in enumerate(SITES):
                fed.start_node(site, {"partition-id": k, SITE_KEY: site, RUNTIME_KEY: str(root / f"node-{site}")}, k)
        config = {"model": model, "num-server-rounds": rounds, "min-nodes": len(SITES), **(extra or {})}
        ways: dict[bool, FlowerWay] = {}
        outs = {way: root / f"final-{_label(way)}.npz" for way in feds}
        timings = {way: root / f"timings-{_label(way)}.jsonl" for way in feds}
        order = [[False, True]] if parallel else [[False], [True]]
        for batch in order:
            roots = [p.pid for way in batch for p in feds[way].procs.values()] + [n.pid for n in nodes.values()]
            with RssSampler(roots) as sampler:
                t0 = time.perf_counter()
                runs = {}
                for way in batch:
                    timings[way].unlink(missing_ok=True)
                    outs[way].unlink(missing_ok=True)  # its appearance ends the wait below
                    say(f"{_label(way)}: {rounds} round(s) of {app.name} ({model})")
                    runs[way] = feds[way].submit(app, {**config, "fedrdma": way, "out-path": str(outs[way]),
                                                       "timings-path": str(timings[way]),
                                                       "fedrdma-runtime-dir": str(root / f"node-{SERVER_SITE}")})
                for way in batch:
                    status = feds[way].wait(runs[way], RUN_TIMEOUT_S, last_file=outs[way])
                    if status != "finished:completed":
                        raise RunError(f"the {_label(way)} run ended {status}:\n"
                                       f"{feds[way].run_log()}")
                seconds = time.perf_counter() - t0
            for way in batch:
                rows = [FlowerRound(**json.loads(line)) for line in timings[way].read_text().splitlines()]
                first = rows[0].rss_mb if rows else None
                baseline = {**sampler.baseline, **({"serverapp": first} if first is not None else {})}
                ways[way] = FlowerWay(rounds=rows, peak_rss_mb=dict(sorted(sampler.peak.items())),
                                      baseline_rss_mb=dict(sorted(baseline.items())), seconds=seconds)
        with np.load(outs[False]) as a, np.load(outs[True]) as b:
            diff = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
            state_mb = sum(a[k].nbytes for k in a.files) / 2**20
        return FlowerResult(app=str(app), model=model, rounds_asked=rounds, state_mb=state_mb, flower=ways[False],
                            fedrdma=ways[True], max_abs_diff=diff, time=started, path=LOOPBACK_PATH)
    finally:
        for fed in feds.values():
            fed.stop()
        for node in nodes.values():
            node.stop()
