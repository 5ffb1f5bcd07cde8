"""The README's commands run as written, from the repository's root."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fedrdma.transport.ports import free_port

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
LAUNCHER = ".venv/bin/fedrdma"
"""How the README starts the command; here the same program runs as `python -m fedrdma.cli`."""

WAIT_S = 180.0
"""Bounds a hang; the README's small federation takes seconds."""


def readme_commands(section: str, block: int = 0) -> list[list[str]]:
    """The commands of sh block number `block` under `section`, continuation lines joined."""
    text = README.read_text()
    code = text[text.index(section):].split("```sh\n")[1 + block].split("```", 1)[0]
    commands = [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines()]
    return [c for c in commands if c]


def _moved(args: list[str], certs: Path) -> list[str]:
    """The README's `certs` directory, moved out of the repository for a test."""
    return [args[0], *(str(certs) if a == "certs" else a for a in args[1:])]  # args[0] is the command itself


def test_a_federation_in_three_commands_runs_as_written(tmp_path: Path) -> None:
    """Only the address and the output directories are added, and the certificates' directory
    moved: the README's example uses the default port, `runs/` and `certs/`, which a test must
    not share with anything on this host. The silos may start before the aggregator
    listens: they keep dialing until it does."""
    certs = tmp_path / "certs"
    for _, *args in readme_commands("## A federation in three commands"):
        made = subprocess.run([sys.executable, "-m", "fedrdma.cli", *_moved(args, certs)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in certs.iterdir()) == ["aggregator.key", "aggregator.pem", "bank.key", "bank.pem",
                                                       "ca.key", "ca.pem", "hospital.key", "hospital.pem"]
    commands = [_moved(c, certs) for c in readme_commands("## A federation in three commands", block=1)]
    assert [c[:2] for c in commands] == [[LAUNCHER, "aggregator"], [LAUNCHER, "silo"], [LAUNCHER, "silo"]]
    address = f"127.0.0.1:{free_port()}"
    where = {"aggregator": ["--listen", address, "--out-dir", str(tmp_path / "aggregator")],
             "silo": ["--aggregator", address, "--out-dir", str(tmp_path / "silos")]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCX_")}  # as a fresh shell has it
    procs = []
    try:
        for k, (_, kind, *args) in enumerate(commands):
            log = (tmp_path / f"{k}-{kind}.log").open("w")
            procs.append(subprocess.Popen([sys.executable, "-m", "fedrdma.cli", kind, *args, *where[kind]], cwd=REPO,
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [proc.wait(WAIT_S) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.log")))
    assert codes == [0, 0, 0], logs
    rounds = [e for e in map(json.loads, (tmp_path / "aggregator" / "metrics.jsonl").read_text().splitlines())
              if e["event"] == "round" and e["round"] > 0]
    assert [r["round"] for r in rounds] == [1]
    assert rounds[0]["accepted"] == ["bank", "hospital"] and rounds[0]["rejected"] == {}


def test_the_node_commands_run_as_written(tmp_path: Path) -> None:
    """The README's two nodes, started as written but for the aggregator's host (loopback
    here: the certificate and the listen address name it) and the runtime directory (a
    test's own, through XDG_RUNTIME_DIR as a login manager sets it); then its app snippet's
    fetch and delivery between them."""
    import secrets

    import torch

    from fedrdma.core.layout import Layout
    from fedrdma.node.client import NodeClient
    from fedrdma.node.process import READY_PREFIX

    certs = tmp_path / "certs"
    commands = [[a.replace("agg.example.org:7710", f"127.0.0.1:{free_port()}").replace("agg.example.org", "127.0.0.1")
                 for a in [c[0], *_moved(c[1:], certs)]] for c in readme_commands("## A node per site (`fedrdma node`)")]
    assert [c[1:3] for c in commands] == [["certs", "init"], ["certs", "issue"], ["certs", "issue"], ["node", "--site"],
                                          ["node", "--site"]]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    for _, *args in commands[:3]:
        made = subprocess.run([sys.executable, "-m", "fedrdma.cli", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert made.returncode == 0, made.stderr
    procs = [subprocess.Popen([sys.executable, "-m", "fedrdma.cli", *args], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _, *args in commands[3:]]
    try:
        for proc in procs:
            assert proc.stdout is not None
            said = []
            while not said or not said[-1].startswith(READY_PREFIX):
                said.append(proc.stdout.readline())  # the node prints a few lines, then this one
                assert said[-1], "".join(said)  # or it exited
        os.environ["XDG_RUNTIME_DIR"], before = env["XDG_RUNTIME_DIR"], os.environ.get("XDG_RUNTIME_DIR")
        try:
            layout = Layout.from_shapes([("w", torch.float32, (1000, 300))])
            token = secrets.token_hex(16)
            with NodeClient.attach("agg") as server, NodeClient.attach("hospital") as site:
                glob = server.pool("global", layout)
                glob.buffer.random_(0, 256)
                offer, upload = server.publish("global", 1, token), server.collect(1, layout.layout_id, token, sites=2)
                local = site.pool("global", layout)
                site.fetch("global", offer)
                assert torch.equal(local.buffer, glob.buffer)
                local.buffer.add_(1)
                site.deliver("global", upload)
                assert torch.equal(server.take(1, layout)["hospital"].buffer, local.buffer)
        finally:
            if before is None:
                del os.environ["XDG_RUNTIME_DIR"]
            else:
                os.environ["XDG_RUNTIME_DIR"] = before
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
