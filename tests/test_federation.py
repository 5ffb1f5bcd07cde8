"""The federated runtime end to end: real aggregator and silo processes on loopback."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedrdma.cli import app
from fedrdma.control.beats import MISSED_BEATS
from fedrdma.control.certs import init_ca, issue
from fedrdma.core.rules import WEIGHT_FACTOR
from fedrdma.fl import checkpoint
from fedrdma.fl.demo import (
    DEMO_SILOS,
    max_abs_diff,
    run_federation,
    write_configs,
)
from fedrdma.fl.inputs import CERTS_DIR
from fedrdma.fl.records import AggregatorRound, DemoResult, SiloRoundRecord
from fedrdma.transport.ports import free_port
from fedrdma.transport.tls import CLIENT

MODEL = "gpt2-tiny"
WAIT_S = 180.0
"""Bounds a hang; a tiny federation round takes a few seconds here."""


def events(path: Path, kind: str) -> list[dict]:
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e.get("event") == kind]


def _sigint_as_at_a_terminal() -> None:
    """A suite started in the background (`nohup ... &`, no job control) hands every child
    SIGINT ignored, and Python then installs no handler: an interrupted aggregator would run
    on to its last round and exit 0. The processes here get SIGINT as Ctrl-C sends it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(kind: str, config: Path, log: Path, env_extra: dict[str, str] | None = None, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "UCX_TLS": "tcp", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "fedrdma.cli", kind, "--config", str(config), *flags],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, preexec_fn=_sigint_as_at_a_terminal,
    )


def start_faulty(config: Path, log: Path, fault: str) -> subprocess.Popen:
    """A silo with `fault` injected from outside (`fedrdma.testing.silo`)."""
    env = {**os.environ, "UCX_TLS": "tcp"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedrdma.testing.silo", "--fault", fault, "--config", str(config)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )


def wait(proc: subprocess.Popen, timeout: float = WAIT_S) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_transports_give_the_same_model_and_loss_falls(tmp_path):
    """`fedrdma demo` as `make demo` runs it, small: its JSON, table and plot, and what they say."""
    out = tmp_path / "demo.json"
    shown = CliRunner().invoke(app, ["demo", "--model", MODEL, "--rounds", "2", "--silos", "2", "--modes",
                                     "rdma-e,tcp-e,grpc", "--out", str(tmp_path), "--json", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "federated rounds, side by side" in shown.output and (tmp_path / "demo.png").stat().st_size > 0
    said = " ".join(shown.output.split())  # as read, whatever the console's width folded
    assert "control plane: mutual TLS" in said and "one-sided modes run as a trusted fabric" in said
    result = DemoResult.model_validate_json(out.read_text())
    assert list(result.transports) == ["rdma-e", "tcp-e", "grpc"] and result.silos == list(DEMO_SILOS[:2])
    finals = {}
    for transport, run in result.transports.items():
        losses = [r.eval_loss for r in run.rounds]
        assert [r.round for r in run.rounds] == [0, 1, 2]
        assert losses[-1] < losses[0], losses
        assert all(sorted(r.accepted) == sorted(DEMO_SILOS[:2]) and r.mode == transport for r in run.rounds[1:])
        assert all(s.ok and s.upload_bytes == run.rounds[1].state_bytes for r in run.rounds[1:] for s in r.silos)
        finals[transport] = checkpoint.path_for(tmp_path / transport / "aggregator", 2)
    difference = max(max_abs_diff(finals[a], finals[b]) for a, b in [("rdma-e", "grpc"), ("rdma-e", "tcp-e"),
                                                                     ("grpc", "tcp-e")])
    assert difference < 1e-4 and result.max_abs_diff_between_transports == difference
    # every round line both sides wrote reads back into its record
    for transport in result.transports:
        rows = [AggregatorRound.model_validate(e) for e in events(tmp_path / transport / "aggregator" / "metrics.jsonl",
                                                                   "round")]
        assert [r.round for r in rows] == [0, 1, 2]
        for silo in DEMO_SILOS[:2]:
            mine = [SiloRoundRecord.model_validate(e) for e in events(tmp_path / transport / "silos" / f"{silo}.jsonl",
                                                                "round")]
            assert [r.round for r in mine] == [1, 2] and all(r.silo == silo for r in mine)


ADDRESS_FLOOR = 1 << 40
"""Process addresses on x86-64 Linux lie far above this; no byte count or time in a log reaches it."""


def _integers(value: object) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _integers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _integers(v)]
    return []


@pytest.mark.parametrize("mode", ["rdma-e", "rdma-e-pull"])
def test_what_each_silo_is_handed(tmp_path, mode):
    records = run_federation(tmp_path, mode, 1, MODEL, False, DEMO_SILOS[:2])
    assert records[-1].accepted == sorted(DEMO_SILOS[:2])
    agg_events = tmp_path / "aggregator" / "metrics.jsonl"
    pools = events(agg_events, "pools")[0]
    nbytes = pools["nbytes"]
    inboxes = {e["silo"]: e["inbox"] for e in events(agg_events, "sessions")}
    inbox_bytes = {e["silo"]: e["inbox_bytes"] for e in events(agg_events, "sessions")}
    handed = {s: events(tmp_path / "silos" / f"{s}.jsonl", "handed")[0] for s in DEMO_SILOS[:2]}
    for silo, h in handed.items():
        # the aggregator initiates the broadcast: no key to its memory comes with it
        assert h["broadcast"] == {"metadata_bytes": 0, "region": None}
        if mode == "rdma-e-pull":
            assert h["upload"] == {"metadata_bytes": 0, "region": None}
        else:
            digest, length = h["upload"]["region"]
            # its own landing slots, nothing more (test_inbox: a window of chunks, or the state if less)
            assert (digest, length) == (inboxes[silo], inbox_bytes[silo]) and length <= nbytes
            assert digest not in pools["global"]
            assert all(digest != d for s, d in inboxes.items() if s != silo)
            assert h["upload"]["metadata_bytes"] > 0
    # addresses of aggregator memory appear in no log, on either side
    logs = [agg_events, *(tmp_path / "silos" / f"{s}.jsonl" for s in DEMO_SILOS[:2])]
    numbers = [n for log in logs for line in log.read_text().splitlines() for n in _integers(json.loads(line))]
    assert numbers and max(numbers) < ADDRESS_FLOOR, "an integer the size of a memory address was logged"


@pytest.mark.parametrize("fault,reason", [("nan", "NaN"), ("scale", "norm")])
def test_a_bad_update_is_rejected_before_aggregation(tmp_path, fault, reason):
    port = free_port()
    agg_cfg, silo_cfgs = write_configs(tmp_path, "rdma-e", 1, MODEL, False, DEMO_SILOS[:3], port)
    agg = start("aggregator", agg_cfg, tmp_path / "agg.log", None, "--min-silos", "2")
    silos = [start_faulty(silo_cfgs[0], tmp_path / "bad.log", fault)]
    silos += [start("silo", c, tmp_path / f"s{i}.log") for i, c in enumerate(silo_cfgs[1:])]
    assert wait(agg) == 0, (tmp_path / "agg.log").read_text()
    for s in silos:
        wait(s)
    (record,) = events(tmp_path / "aggregator" / "metrics.jsonl", "round")[1:]
    assert sorted(record["accepted"]) == sorted(DEMO_SILOS[1:3])
    assert reason in record["rejected"][DEMO_SILOS[0]]
    final = load_file(str(checkpoint.path_for(tmp_path / "aggregator", 1)))
    assert all(bool(t.isfinite().all()) for t in final.values())
    assert max(float(t.abs().max()) for t in final.values()) < 100  # no x1000 update leaked in


def test_a_silo_claiming_2_29_samples_does_not_dominate_and_agreed_weights_win(tmp_path):
    liar, agreed, honest = DEMO_SILOS[:3]
    port = free_port()
    agg_cfg, silo_cfgs = write_configs(tmp_path, "rdma-e", 1, MODEL, False, DEMO_SILOS[:3], port)
    agg = start("aggregator", agg_cfg, tmp_path / "agg.log", None,
                "--silos", liar, "--silos", f"{agreed}=7", "--silos", honest)
    silos = [start_faulty(silo_cfgs[0], tmp_path / "liar.log", f"claim:{(1 << 29) - 1}")]
    silos += [start("silo", c, tmp_path / f"s{i}.log") for i, c in enumerate(silo_cfgs[1:])]
    assert wait(agg) == 0, (tmp_path / "agg.log").read_text()
    for s in silos:
        wait(s)
    (record,) = events(tmp_path / "aggregator" / "metrics.jsonl", "round")[1:]
    assert sorted(record["accepted"]) == sorted(DEMO_SILOS[:3])
    by_silo = {s["silo"]: s for s in record["silos"]}
    assert by_silo[liar]["n_samples"] == (1 << 29) - 1
    honest_n = by_silo[honest]["n_samples"]
    cap = math.floor(WEIGHT_FACTOR * (7 + honest_n) / 2)  # x the median of the others' weights
    assert by_silo[liar]["capped_samples"] == cap
    assert by_silo[liar]["weight"] == pytest.approx(cap / (cap + 7 + honest_n))
    assert by_silo[agreed]["weight"] == pytest.approx(7 / (cap + 7 + honest_n))  # its report is ignored
    assert by_silo[agreed]["capped_samples"] is None
    assert "counts as" in (tmp_path / "agg.log").read_text()


def test_refused_joins_name_the_reason_on_both_sides_and_the_round_goes_on(tmp_path):
    port = free_port()
    agg_cfg, silo_cfgs = write_configs(tmp_path, "rdma-e", 1, MODEL, False, DEMO_SILOS[:1], port)
    certs = tmp_path / CERTS_DIR
    issue(certs, "stranger", CLIENT)  # a certificate of this federation, for a silo it does not list
    foreign = tmp_path / "foreign"  # another federation's CA and a certificate named like ours
    init_ca(foreign)
    issue(foreign, DEMO_SILOS[0], CLIENT)
    agg = start("aggregator", agg_cfg, tmp_path / "agg.log")
    unknown = start("silo", silo_cfgs[0], tmp_path / "unknown.log", None, "--id", "stranger", "--rejoin-s", "0")
    other_layout = start("silo", silo_cfgs[0], tmp_path / "layout.log", None, "--lora", "--rejoin-s", "0")
    other_ca = start("silo", silo_cfgs[0], tmp_path / "ca.log", None, "--certs", str(foreign), "--rejoin-s", "0")
    for proc in (unknown, other_layout, other_ca):
        assert wait(proc) == 1
    good = start("silo", silo_cfgs[0], tmp_path / "good.log")
    assert wait(agg) == 0 and wait(good) == 0
    refused = {e["reason"] for e in events(tmp_path / "aggregator" / "metrics.jsonl", "refused")}
    assert any("silo 'stranger' is not part of this federation" in r for r in refused)
    assert any("layout mismatch" in r for r in refused)
    assert not any(DEMO_SILOS[0] in r for r in refused if "stranger" in r), "a refusal names no other silo"
    said = {name: " ".join((tmp_path / f"{name}.log").read_text().split()) for name in ("unknown", "layout", "ca")}
    assert "silo 'stranger' is not part of this federation" in said["unknown"]
    assert "layout mismatch" in said["layout"]
    assert "was not issued by this side's CA" in said["ca"], said["ca"]  # (test_control_tls: the other side)
    rounds = events(tmp_path / "aggregator" / "metrics.jsonl", "round")
    assert rounds[-1]["accepted"] == [DEMO_SILOS[0]]


def test_a_killed_silo_is_left_out_and_rejoins(tmp_path):
    port = free_port()
    agg_cfg, silo_cfgs = write_configs(tmp_path, "rdma-e", 2, MODEL, False, DEMO_SILOS[:3], port)
    agg = start("aggregator", agg_cfg, tmp_path / "agg.log", None,
                "--min-silos", "2", "--round-deadline-s", "60", "--gather-s", "60")
    steady = [start("silo", c, tmp_path / f"steady{i}.log") for i, c in enumerate(silo_cfgs[:2])]
    victim = start_faulty(silo_cfgs[2], tmp_path / "victim.log", "exit-after-broadcast:1")
    assert wait(victim) == 17, (tmp_path / "victim.log").read_text()  # died in round 1, after the broadcast
    again = start("silo", silo_cfgs[2], tmp_path / "again.log")
    assert wait(agg) == 0, (tmp_path / "agg.log").read_text()
    for s in (*steady, again):
        wait(s)
    rounds = events(tmp_path / "aggregator" / "metrics.jsonl", "round")[1:]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["accepted"] == sorted(DEMO_SILOS[:2])
    assert DEMO_SILOS[2] in rounds[0]["rejected"] or any(
        s["silo"] == DEMO_SILOS[2] and not s["ok"] for s in rounds[0]["silos"]
    )
    assert sorted(rounds[1]["accepted"]) == sorted(DEMO_SILOS[:3])  # it rejoined the next round


def test_a_silo_lost_while_the_others_are_awaited_is_waited_for_again(tmp_path):
    """The first silo is ready, the second never comes, and while the aggregator gathers the
    rest the first one dies: the round waits for it to rejoin instead of failing at once."""
    port = free_port()
    agg_cfg, silo_cfgs = write_configs(tmp_path, "tcp-e", 1, MODEL, False, DEMO_SILOS[:2], port)
    agg = start("aggregator", agg_cfg, tmp_path / "agg.log", None,
                "--min-silos", "1", "--gather-s", "3", "--join-timeout-s", "90")
    first = start("silo", silo_cfgs[0], tmp_path / "first.log")
    metrics = tmp_path / "aggregator" / "metrics.jsonl"
    wait_for("the first silo to join", lambda: events(metrics, "joined"))
    time.sleep(1.0)  # attached: ready, and the aggregator gathers the second one for 3 s
    first.kill()
    first.wait()
    time.sleep(5.0)  # past the gather: no silo is ready when it ends
    again = start("silo", silo_cfgs[0], tmp_path / "again.log")
    assert wait(agg) == 0, (tmp_path / "agg.log").read_text()
    wait(again)
    (record,) = events(metrics, "round")[1:]
    assert record["accepted"] == [DEMO_SILOS[0]]
    assert len(events(metrics, "joined")) >= 2, "the silo that died mid-gather joined again"


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (T: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_for(what: str, predicate, timeout: float = WAIT_S) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("phase,mode,chunk", [
    ("broadcast", "rdma-e", 16384), ("train", "rdma-e", 16384),
    # WRITE into granted landing slots, or READ into the shared slots; pull chunks small enough
    # for statuses before the last one
    ("upload", "rdma-e", 16384),
    ("upload", "rdma-e-pull", 4096),
], ids=["broadcast", "train", "upload", "upload-pull"])
def test_a_hung_silo_is_left_out_on_its_heartbeats_and_rejoins_after_sigcont(tmp_path, phase, mode, chunk):
    port = free_port()
    agg_cfg, silo_cfgs = write_configs(tmp_path, mode, 3, MODEL, False, DEMO_SILOS[:3], port)
    metrics = tmp_path / "aggregator" / "metrics.jsonl"
    # A deadline far beyond the heartbeat window: only the missed heartbeats can end the round early.
    agg = start("aggregator", agg_cfg, tmp_path / "agg.log", None, "--min-silos", "2", "--round-deadline-s",
                "150", "--gather-s", "30", "--chunk-size", str(chunk), "--window", "2")
    steady = [start("silo", c, tmp_path / f"steady{i}.log") for i, c in enumerate(silo_cfgs[:2])]
    victim = start_faulty(silo_cfgs[2], tmp_path / "victim.log", f"stop:{phase}:1")
    try:
        wait_for("the silo to stop itself", lambda: process_state(victim.pid) == "T")
        wait_for("round 1 to close", lambda: len(events(metrics, "round")) >= 2)
        (first,) = events(metrics, "round")[1:2]
        assert first["accepted"] == sorted(DEMO_SILOS[:2])
        (left_out,) = [s for s in first["silos"] if s["silo"] == DEMO_SILOS[2]]
        assert not left_out["ok"] and f"missed {MISSED_BEATS} heartbeats" in left_out["reason"], left_out["reason"]
    finally:
        victim.send_signal(signal.SIGCONT)
    assert wait(agg) == 0, (tmp_path / "agg.log").read_text()
    for s in (*steady, victim):
        assert wait(s) == 0
    rounds = events(metrics, "round")[1:]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert sorted(rounds[-1]["accepted"]) == sorted(DEMO_SILOS[:3]), "it rejoined after SIGCONT"
    if phase == "upload":  # its folded chunks (slots: push or pull) could not be read again: the others were,
        # to rebuild the sum
        assert [len(events(tmp_path / "silos" / f"{s}.jsonl", "resent")) for s in DEMO_SILOS[:2]] == [1, 1]


def test_aggregator_restarted_with_resume_continues_without_repeating_a_round(tmp_path):
    port = free_port()
    agg_cfg, silo_cfgs = write_configs(tmp_path, "rdma-e", 3, MODEL, False, DEMO_SILOS[:2], port)
    out = tmp_path / "aggregator"
    agg = start("aggregator", agg_cfg, tmp_path / "agg1.log")
    # round 2 takes 8 s longer: the aggregator dies in it
    silos = [start_faulty(c, tmp_path / f"s{i}.log", "stall-once:2:8") for i, c in enumerate(silo_cfgs)]
    deadline = time.monotonic() + WAIT_S
    while checkpoint.rounds(out) != [1] or not events(out / "metrics.jsonl", "round")[1:]:
        assert time.monotonic() < deadline and agg.poll() is None, (tmp_path / "agg1.log").read_text()
        time.sleep(0.05)
    agg.kill()
    agg.wait()
    saved = load_file(str(checkpoint.path_for(out, 1)))
    agg = start("aggregator", agg_cfg, tmp_path / "agg2.log", None, "--resume")
    assert wait(agg) == 0, (tmp_path / "agg2.log").read_text()
    for s in silos:
        wait(s)
    rounds = [r["round"] for r in events(out / "metrics.jsonl", "round") if r["round"] > 0]
    assert rounds.count(1) == 1 and rounds[-2:] == [2, 3], rounds
    assert checkpoint.rounds(out)[-1] == 3
    assert any(not bool((saved[k] == v).all()) for k, v in load_file(str(checkpoint.path_for(out, 3))).items())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["killed", "interrupted"])
def test_silos_of_a_dead_aggregator_exit_non_zero_after_their_rejoin_limit(tmp_path, sig):
    """An interrupted aggregator closes its links without saying the run is finished."""
    port = free_port()
    # more rounds than can finish before the signal: gpt2-tiny's rounds take tens of milliseconds
    agg_cfg, silo_cfgs = write_configs(tmp_path, "rdma-e", 50, MODEL, False, DEMO_SILOS[:2], port)
    out = tmp_path / "aggregator"
    agg = start("aggregator", agg_cfg, tmp_path / "agg.log")
    silos = [start("silo", c, tmp_path / f"s{i}.log", None, "--rejoin-s", "3") for i, c in enumerate(silo_cfgs)]
    deadline = time.monotonic() + WAIT_S
    while not events(out / "metrics.jsonl", "round")[1:]:
        assert time.monotonic() < deadline and agg.poll() is None, (tmp_path / "agg.log").read_text()
        time.sleep(0.05)
    agg.send_signal(sig)
    assert agg.wait(WAIT_S) != 0
    for i, s in enumerate(silos):
        log = (tmp_path / f"s{i}.log").read_text
        assert wait(s) == 1, log()
        assert "gave up on the aggregator after 3 s" in log() and "took part in rounds" not in log(), log()


def test_a_malformed_config_names_the_field_and_the_form(tmp_path):
    bad = tmp_path / "agg.toml"
    bad.write_text('rounds = "three"\nwindow = 0\n')
    proc = subprocess.run(
        [sys.executable, "-m", "fedrdma.cli", "aggregator", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "`rounds`" in proc.stderr and "integer" in proc.stderr
    assert "`window`" in proc.stderr and "greater than or equal to 1" in proc.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = [\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedrdma.cli", "silo", "--config", str(broken)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr
