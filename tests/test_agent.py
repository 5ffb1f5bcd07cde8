"""The agent's registrations, with real NIXL agents in one process (UCX over TCP on loopback).

One buffer is registered at most once per agent: NIXL takes a second registration of the
same bytes silently, and a node's push once crashed in NIXL's transfer after one. These
tests pin the refusal, and that the registration already live keeps working.
"""

from __future__ import annotations

import time

import pytest
import torch

from fedrdma.core.chunks import state_digest
from fedrdma.core.errors import TransferError
from fedrdma.transport.agent import Agent, Pool

SIZE = 1 << 20
DEADLINE_S = 30.0
"""Bounds a WRITE of 1 MiB between two agents of this process (milliseconds when it works)."""


def _write(initiator: Agent, target: Agent, local: Pool, remote: Pool) -> None:
    """One raw WRITE of pool `local` into pool `remote`, registered with their agents."""
    operation = initiator.post_whole("WRITE", local.region, remote.region, initiator.add_peer(target.metadata()))
    deadline = time.monotonic() + DEADLINE_S
    while (status := operation.state()) == "PROC" and time.monotonic() < deadline:
        target.progress()
    operation.release()
    assert status == "DONE", operation.error


def test_a_buffer_is_registered_once_and_the_live_registration_keeps_working():
    agent, other = Agent(), Agent()
    buffer = torch.zeros(SIZE, dtype=torch.uint8)
    try:
        pool = agent.register(buffer)
        with pytest.raises(TransferError, match="registered once per agent"):
            agent.register(buffer)
        with pytest.raises(TransferError, match="overlap"):  # a view into it: the same bytes
            agent.register(buffer[SIZE // 2 :])
        with pytest.raises(TransferError, match="overlap"):  # staging over a pool's bytes
            agent.stage([buffer[:4096]])
        assert agent.registered_pools == 1

        src = torch.arange(SIZE, dtype=torch.int64).to(torch.uint8)
        _write(other, agent, other.register(src), pool)
        assert state_digest(memoryview(buffer.numpy())) == state_digest(memoryview(src.numpy()))

        pool.close()
        again = agent.register(buffer)  # closed, it may be registered afresh
        assert again.registered and agent.registered_pools == 1
    finally:
        agent.close()
        other.close()


def test_neighbours_register_side_by_side_and_a_staging_may_not_overlap_itself():
    agent = Agent()
    whole = torch.zeros(2 * SIZE, dtype=torch.uint8)
    try:
        agent.register(whole[:SIZE])
        agent.register(whole[SIZE:])  # adjacent, not overlapping
        assert agent.registered_pools == 2
        loose = torch.zeros(SIZE, dtype=torch.uint8)
        with pytest.raises(TransferError, match="overlap"):
            agent.stage([loose[:4096], loose[2048:8192]])
        staging = agent.stage([loose[:4096], loose[4096:8192]])
        with pytest.raises(TransferError, match="overlap"):
            agent.register(loose)
        staging.close()
        assert agent.register(loose).registered
    finally:
        agent.close()
