"""Local runs' ports: never one another process listens on or another run holds, and a
listener that finds its port taken says so instead of sharing it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from fedrdma.core.errors import PeerLost, RunError
from fedrdma.transport import ports
from fedrdma.transport.channel import Listener, dial


class Sequence:
    """Stands in for SystemRandom: hands out the given ports in order."""

    def __init__(self, picks: list[int]) -> None:
        self.picks = list(picks)

    def randrange(self, low: int, high: int) -> int:
        port = self.picks.pop(0)
        assert low <= port < high
        return port


def test_a_second_listener_on_a_port_is_refused_and_names_the_fix():
    first = Listener("127.0.0.1:0")
    try:
        with pytest.raises(PeerLost, match=rf"cannot listen on 127.0.0.1:{first.port}: another process listens"):
            Listener(f"127.0.0.1:{first.port}")
        # ... and every connection still reaches the first (with SO_REUSEPORT the kernel would share them)
        for _ in range(8):
            client = dial(first.address, 5.0)
            try:
                first.accept(5.0).close()
            finally:
                client.close()
    finally:
        first.close()


def test_ports_come_from_below_the_ephemeral_range_and_two_processes_never_share_one():
    code = "from fedrdma.transport.ports import free_port; print(*(free_port() for _ in range(300)))"
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    given = [[int(p) for p in run.communicate(timeout=60)[0].split()] for run in runs]
    assert [len(g) for g in given] == [300, 300]
    together = given[0] + given[1]
    assert len(set(together)) == 600
    floor = int(ports.RANGE_FILE.read_text().split()[0])
    assert all(ports.FLOOR <= p < floor for p in together)


def test_a_port_that_is_listened_on_or_held_is_passed_over_and_a_stale_hold_is_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "RESERVATIONS", tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        held, stale, fresh = 21001, 21002, 21003
        (tmp_path / str(held)).touch()
        (tmp_path / str(stale)).touch()
        old = os.stat(tmp_path / str(stale)).st_mtime - ports.HOLD_S - 1
        os.utime(tmp_path / str(stale), (old, old))
        monkeypatch.setattr(ports, "_ephemeral_floor", lambda: max(taken + 1, fresh + 1))
        monkeypatch.setattr(ports.random, "SystemRandom", lambda: Sequence([taken, held, stale]))
        assert ports.free_port() == stale
        monkeypatch.setattr(ports.random, "SystemRandom", lambda: Sequence([held, stale, fresh]))
        assert ports.free_port() == fresh  # the stale hold is this caller's now, and fresh again


def test_running_out_of_ports_names_the_directory_to_clear(tmp_path, monkeypatch):
    monkeypatch.setattr(ports, "RESERVATIONS", tmp_path)
    for port in range(ports.FLOOR, ports.FLOOR + ports.TRIES):
        (tmp_path / str(port)).touch()
    monkeypatch.setattr(ports, "_ephemeral_floor", lambda: ports.FLOOR + ports.TRIES)
    with pytest.raises(RunError, match=rf"found no free port .* clear {tmp_path}"):
        ports.free_port()
