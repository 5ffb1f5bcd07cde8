"""`fedrdma demo`: a local federation, once per mode, compared side by side.

Real processes on this host: one aggregator and a few silos per mode, each silo on its own
slice of the shipped demo corpus (non-IID by domain), the same seeds for every mode.
Because the mode must not change the math, the final global models of the modes are
compared byte for byte (max absolute difference). The result is a `DemoResult`
(fedrdma.fl.records), which keeps its key `transports` (one entry per mode) for scripts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from fedrdma.control.certs import DEFAULT_HOSTS, init_ca, issue
from fedrdma.core.addresses import LOOPBACK_HOST
from fedrdma.core.errors import RunError
from fedrdma.core.modes import Mode, Wire
from fedrdma.fl import checkpoint
from fedrdma.fl.inputs import CERTS_DIR, DEMO_EVAL, DEMO_MODES, DEMO_SILOS, demo_corpus
from fedrdma.fl.records import AggregatorRound, DemoMode, DemoResult
from fedrdma.transport.ports import free_port
from fedrdma.transport.tls import CA_FILE, CLIENT, SERVER

DEMO_MODEL = "gpt2-small"
"""GPT-2 small (124M, 475 MiB fp32): large enough that moving it shows next to training it."""

DEMO_ROUNDS = 3
DEMO_LOCAL_STEPS = 2
"""Few local steps: a CPU host trains GPT-2 small slowly, and the demo is about moving it."""

DEMO_SEQ_LEN = 64
DEMO_BATCH_SIZE = 2
DEMO_LR = 3e-4
PROCESS_TIMEOUT_S = 600.0
"""Longest one mode's federation may take before the demo calls it hung."""

AGGREGATOR_CERT = "aggregator"
"""The name of the aggregator's certificate (the aggregator's `cert_name` default)."""

ANY_HOST = "0.0.0.0"
"""A listen address that is no host name: not one a certificate can name."""


def _toml(values: dict[str, Any]) -> str:
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        elif isinstance(value, list):
            items = ", ".join("{" + ", ".join(f'{k} = "{v}"' for k, v in item.items()) + "}" for item in value)
            lines.append(f"{key} = [{items}]")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Hosts:
    """Where a federation's processes run: all on loopback, or in lab namespaces.

    `dial_hosts[k]` is how silo k reaches the aggregator; prefixes run a process inside a
    namespace (with its UCX device) and are empty on this host.
    """

    listen_host: str = LOOPBACK_HOST
    agg_prefix: Sequence[str] = ()
    silo_prefixes: Sequence[Sequence[str]] = ()
    dial_hosts: Sequence[str] = ()

    def silo(self, k: int) -> tuple[Sequence[str], str]:
        prefix = self.silo_prefixes[k] if self.silo_prefixes else ()
        host = self.dial_hosts[k] if self.dial_hosts else self.listen_host
        return prefix, host


LOCAL = Hosts()


def make_certs(directory: Path, silos: Sequence[str], hosts: Hosts = LOCAL, server: str = AGGREGATOR_CERT) -> Path:
    """A CA of the run's own, a certificate named `server` for the aggregator at every host silos
    dial (and loopback), one per silo."""
    if not (directory / CA_FILE).exists():
        init_ca(directory)
    names = {*DEFAULT_HOSTS, *hosts.dial_hosts, *([hosts.listen_host] if hosts.listen_host != ANY_HOST else [])}
    issue(directory, server, SERVER, hosts=sorted(names), force=True)
    for silo in silos:
        issue(directory, silo, CLIENT, force=True)
    return directory


def write_configs(
    root: Path, mode: Mode, rounds: int, model: str, lora: bool, silos: Sequence[str], port: int,
    hosts: Hosts = LOCAL, local_steps: int = DEMO_LOCAL_STEPS,
    aggregator_settings: Mapping[str, Any] | None = None, silo_settings: Mapping[str, Any] | None = None,
    wire: Wire = Wire.FP32,
) -> tuple[Path, list[Path]]:
    """The run's certificates and configs. `aggregator_settings` and `silo_settings` override
    the demo's values; a None value leaves the setting out (to its default)."""
    root.mkdir(parents=True, exist_ok=True)
    certs = make_certs(root / CERTS_DIR, silos, hosts)
    # The demo's and the lab's processes are all its own: one-sided modes may touch any of them.
    common = {"model": model, "lora": lora, "seed": 0, "certs": str(certs), "trusted_fabric": Mode(mode).one_sided,
              "wire": wire}
    agg = {
        **common,
        "listen": f"{hosts.listen_host}:{port}",
        "rounds": rounds,
        "min_silos": len(silos),
        "mode": mode,
        "silos": [{"id": s} for s in silos],
        "eval_data": str(demo_corpus(DEMO_EVAL)),
        "seq_len": DEMO_SEQ_LEN,
        "out_dir": str(root / "aggregator"),
        "round_deadline_s": PROCESS_TIMEOUT_S,
    }
    agg_path = root / "aggregator.toml"
    agg_path.write_text(_toml(_override(agg, aggregator_settings)))
    silo_paths = []
    for k, silo in enumerate(silos):
        cfg = {
            **common,
            "id": silo,
            "aggregator": f"{hosts.silo(k)[1]}:{port}",
            "data": str(demo_corpus(silo)) if silo_settings is None or "data" not in silo_settings else None,
            "local_steps": local_steps,
            "batch_size": DEMO_BATCH_SIZE,
            "seq_len": DEMO_SEQ_LEN,
            "lr": DEMO_LR,
            "out_dir": str(root / "silos"),
        }
        path = root / f"silo-{silo}.toml"
        path.write_text(_toml(_override(cfg, silo_settings)))
        silo_paths.append(path)
    return agg_path, silo_paths


def _override(values: dict[str, Any], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = {**values, **(settings or {})}
    return {key: value for key, value in merged.items() if value is not None}


def forget_run(out_dir: Path) -> None:
    """Remove an earlier run's record and checkpoints from a directory this code made for itself."""
    for rnd in checkpoint.rounds(out_dir):
        checkpoint.path_for(out_dir, rnd).unlink()
    (out_dir / checkpoint.RUN_FILE).unlink(missing_ok=True)


def _command(kind: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "fedrdma.cli", kind, "--config", str(config)]


def run_federation(
    root: Path, mode: Mode, rounds: int, model: str, lora: bool, silos: Sequence[str],
    on_round: Callable[[AggregatorRound], None] = lambda r: None,
    hosts: Hosts = LOCAL, local_steps: int = DEMO_LOCAL_STEPS,
    aggregator_settings: Mapping[str, Any] | None = None, wire: Wire = Wire.FP32,
) -> list[AggregatorRound]:
    """One aggregator and its silos as processes; returns the aggregator's round records."""
    agg_path, silo_paths = write_configs(
        root, mode, rounds, model, lora, silos, free_port(), hosts, local_steps, aggregator_settings, wire=wire
    )
    metrics = root / "aggregator" / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    forget_run(root / "aggregator")  # a demo reruns into its own directory: the last run's are its own too
    env = dict(os.environ)
    env.setdefault("UCX_TLS", "tcp")
    logs = [open(root / f"{name}.log", "w") for name in ["aggregator", *silos]]  # noqa: SIM115
    procs = [subprocess.Popen([*hosts.agg_prefix, *_command("aggregator", agg_path)], stdout=logs[0],
                              stderr=subprocess.STDOUT, env=env)]
    time.sleep(0.5)
    for k, (path, log) in enumerate(zip(silo_paths, logs[1:], strict=True)):
        prefix = hosts.silo(k)[0]
        procs.append(subprocess.Popen([*prefix, *_command("silo", path)], stdout=log, stderr=subprocess.STDOUT, env=env))
    seen = 0
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    try:
        while procs[0].poll() is None:
            if time.monotonic() > deadline:
                raise RunError(f"the {mode} federation took longer than {PROCESS_TIMEOUT_S:.0f} s")
            records = read_rounds(metrics)
            for record in records[seen:]:
                on_round(record)
            seen = len(records)
            time.sleep(0.5)
        if procs[0].returncode != 0:
            raise RunError(f"the {mode} aggregator failed; see {root / 'aggregator.log'}")
        for proc in procs[1:]:
            proc.wait(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for log in logs:
            log.close()
    records = read_rounds(metrics)
    for record in records[seen:]:
        on_round(record)
    return records


def read_rounds(metrics: Path) -> list[AggregatorRound]:
    """The round rows of an aggregator's metrics.jsonl (a row still being written is left for later)."""
    if not metrics.exists():
        return []
    out = []
    for line in metrics.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        event = json.loads(line)
        if event.get("event") == "round":
            out.append(AggregatorRound.model_validate(event))
    return out


def max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    if set(ta) != set(tb):
        raise ValueError("the transports' final models have different tensors")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def run_demo(
    out: Path, rounds: int = DEMO_ROUNDS, model: str = DEMO_MODEL, lora: bool = False,
    modes: Sequence[Mode] = DEMO_MODES, silos: Sequence[str] = DEMO_SILOS,
    on_round: Callable[[Mode, AggregatorRound], None] = lambda t, r: None,
) -> DemoResult:
    by_mode: dict[Mode, DemoMode] = {}
    finals = {}
    for mode in modes:
        root = out / mode
        records = run_federation(root, mode, rounds, model, lora, silos, on_round=lambda r, t=mode: on_round(t, r))
        by_mode[mode] = DemoMode(rounds=records)
        done = checkpoint.rounds(root / "aggregator")
        finals[mode] = checkpoint.path_for(root / "aggregator", done[-1])
    names = list(finals)
    difference = max((max_abs_diff(finals[a], finals[b]) for a in names for b in names if a < b), default=0.0)
    return DemoResult(model=model, lora=lora, silos=list(silos), transports=by_mode,
                      max_abs_diff_between_transports=difference)


