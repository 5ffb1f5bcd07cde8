"""Shared helpers for tests that run real peer processes."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any

import pytest

from fedrdma.bench.procs import PeerProcess, peer_env, start_pair

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # A suite started in the background by a shell without job control runs with SIGINT
    # ignored, and the processes the tests start would inherit that across exec: Python then
    # installs no KeyboardInterrupt, and an aggregator a test interrupts would run on. A
    # handler (unlike an ignored signal) is reset to the default on exec, which is what an
    # operator's processes have. Not with `preexec_fn`: it forks with gRPC's threads alive
    # in this process, and grpcio's fork handlers then abort the child before its exec
    # (epoll_wait: Bad file descriptor; grpc/grpc#43055).
    signal.signal(signal.SIGINT, signal.default_int_handler)

FAULTY_PEER = "fedrdma.testing.peer"
"""The benchmark's peer with the fault flags the tests use (--corrupt-once, --cut-after, ...)."""

PAIR_TIMEOUT_S = 120.0
"""A pair of small transfers finishes in seconds; this only bounds a hang."""


@dataclass
class PairResult:
    sender: PeerProcess
    receiver: PeerProcess
    sender_rc: int
    receiver_rc: int

    def transfers(self, role: str) -> list[dict[str, Any]]:
        return getattr(self, role).of("transfer")

    def error(self, role: str) -> dict[str, Any]:
        errors = getattr(self, role).of("error")
        assert errors, f"{role} reported no error; stderr:\n{getattr(self, role).stderr()}"
        return errors[0]


def run_pair(
    mode: str,
    size: int = 8 << 20,
    chunk: int = 1 << 20,
    transfers: int = 1,
    tls: str = "tcp",
    sender_extra: tuple[str, ...] = (),
    receiver_extra: tuple[str, ...] = (),
    common_extra: tuple[str, ...] = (),
) -> PairResult:
    common = ["--size-bytes", str(size), "--chunk-size", str(chunk), "--transfers", str(transfers),
              "--trusted-fabric", *common_extra]  # the test's peers are its own processes
    sender, receiver = start_pair(mode, common, sender_extra, receiver_extra, env=peer_env(tls), module=FAULTY_PEER)
    try:
        src = sender.finish(PAIR_TIMEOUT_S)
        rrc = receiver.finish(PAIR_TIMEOUT_S)
    finally:
        sender.kill()
        receiver.kill()
    return PairResult(sender, receiver, src, rrc)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces (CI runs as root)")


LAB_GROUP = pytest.mark.xdist_group("lab")
"""The mark of every module whose tests build network namespaces and delay elements: under
pytest-xdist (`make test`: --dist loadgroup) they run one after another on one worker, as
one lab at a time must, and test_lab's clean-slate check counts every delay element on the host."""
