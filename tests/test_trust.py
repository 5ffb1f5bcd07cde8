"""Who can touch what: the hole a software fabric leaves, shown from the attacker's side, and the
policy that follows from it (one-sided modes there only on the operator's word)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from fedrdma.bench.states import make_state, synthetic_layout
from fedrdma.core.modes import Mode, Role
from fedrdma.transport import fabric
from fedrdma.transport.agent import Agent
from fedrdma.transport.channel import Listener, dial
from fedrdma.transport.session import Session

WAIT_S = 60.0


def _start(role: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedrdma.testing.trust", role], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "UCX_TLS": "tcp"})


def _line(proc: subprocess.Popen) -> dict:
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else "no output"
        if line.startswith("{"):
            return json.loads(line)


def test_over_ucx_tcp_a_peer_handed_only_its_inbox_writes_past_it():
    """What rdma, rdma-e and rdma-e-pull cannot promise on UCX's TCP transport.

    The victim hands out NIXL partial metadata for one 1 MiB inbox. The attacker edits the
    inbox's address in it to another buffer's and WRITEs: the bytes land, in a buffer that
    was registered apart and never handed out, and in one that was never registered at all.
    (Unedited, NIXL refuses such a WRITE on the attacker's own side: that local check is
    all an honest peer's library can offer.)
    """
    victim = _start("victim")
    attacker = None
    try:
        offer = _line(victim)
        assert offer["event"] == "offer"
        attacker = _start("attacker")
        assert attacker.stdin is not None and victim.stdin is not None
        attacker.stdin.write(json.dumps(offer) + "\n")
        attacker.stdin.flush()
        attacked = _line(attacker)
        assert attacked["results"] == {"global": "status DONE", "unregistered": "status DONE"}, attacked
        victim.stdin.write("check\n")
        victim.stdin.flush()
        memory = _line(victim)
    finally:
        for proc in (victim, attacker):
            if proc is not None:
                proc.kill()
                proc.wait(10)
    assert memory["changed"] == {"global": True, "inbox": False, "unregistered": True}


def test_one_sided_modes_across_a_software_fabric_refuse_before_any_pool_is_registered(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")
    state = make_state(synthetic_layout(1 << 20), None)
    listener = Listener()
    agent = Agent()
    peer: list = []
    thread = threading.Thread(target=lambda: peer.append(listener.accept(10)))
    thread.start()
    channel = dial(listener.address)
    thread.join(10)
    try:
        for mode in (Mode.RDMA, Mode.RDMA_E, Mode.RDMA_E_PULL):
            session = Session(agent, state, channel, mode, Role.RECEIVER, 1 << 20, 2)
            with pytest.raises(fabric.UntrustedFabric, match=f"mode {mode} needs a fabric that enforces remote keys"):
                session.open()
            assert agent.registered_pools == 0, "nothing was registered before the refusal"
    finally:
        channel.close()
        listener.close()


def test_an_aggregator_asked_for_rdma_e_over_tcp_refuses_at_start_naming_the_fabric_and_the_ways_out(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedrdma.cli", "aggregator", "--mode", "rdma-e", "--insecure", "--silos", "hospital",
         "--model", "gpt2-tiny", "--out-dir", str(tmp_path / "agg")],
        capture_output=True, text=True, timeout=WAIT_S, env={**os.environ, "UCX_TLS": "tcp"},
    )
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1, said
    assert "software RMA" in said and "--mode tcp-e" in said and "trusted_fabric = true" in said
    assert not (tmp_path / "agg" / "metrics.jsonl").exists() or "pools" not in (tmp_path / "agg" / "metrics.jsonl").read_text()


def test_an_aggregator_told_to_trust_a_tcp_fabrics_crc_refuses_at_start(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fedrdma.cli", "aggregator", "--mode", "rdma-e", "--trusted-fabric", "--verify",
         "fabric", "--insecure", "--silos", "hospital", "--model", "gpt2-tiny", "--out-dir", str(tmp_path / "agg")],
        capture_output=True, text=True, timeout=WAIT_S, env={**os.environ, "UCX_TLS": "tcp"},
    )
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 1, said
    assert "verify = fabric" in said and "software RMA" in said and "keep verify = xxh3" in said


@pytest.mark.parametrize("devices,tls,hardware", [
    ([], "rc,self", False),
    (["mlx5_0"], "", False),
    (["mlx5_0"], "tcp,rc", False),
    (["mlx5_0"], "^tcp", False),
    (["mlx5_0"], "rc,self", True),
    (["mlx5_0", "mlx5_1"], "rc_mlx5,dc_mlx5,ud,self", True),
])
def test_the_fabric_is_hardware_only_when_ucx_cannot_fall_back_to_software(tmp_path, devices, tls, hardware):
    for name in devices:
        (tmp_path / name).mkdir()
    found = fabric.detect({"UCX_TLS": tls} if tls else {}, tmp_path)
    assert found.hardware is hardware, found.reason
    assert fabric.resolve("auto", found) is (Mode.RDMA_E if hardware else Mode.TCP_E)
    if not hardware:
        with pytest.raises(fabric.UntrustedFabric):
            fabric.require_trust(Mode.RDMA_E_PULL, False, found)
    fabric.require_trust(Mode.RDMA_E_PULL, True, found)
    fabric.require_trust(Mode.TCP_E, False, found)
    if not hardware:  # no per-packet CRC end to end: every landed chunk must be hashed
        with pytest.raises(fabric.UntrustedFabric, match="keep verify = xxh3"):
            fabric.require_checks("fabric", Mode.RDMA_E, found)
    else:
        fabric.require_checks("fabric", Mode.RDMA_E, found)
    fabric.require_checks("fabric", Mode.TCP_E, found)  # sealed chunks are checked by their tags
    fabric.require_checks("xxh3", Mode.RDMA_E_PULL, found)
