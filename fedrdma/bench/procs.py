"""Start peer processes and read their JSON lines: shared by the benchmark and the tests."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedrdma.core.addresses import LOOPBACK_HOST
from fedrdma.core.errors import RunError

RAW_MODES = ("raw-write", "raw-read")
"""References: the whole state in one NIXL operation, no chunks, no checks."""

PEER_MODULE = "fedrdma.bench.peer"
"""The peer process a pair runs (the tests run `fedrdma.testing.peer`, the same with faults)."""

STACKS_WAIT_S = 1.0
"""How long a hung peer gets to print its threads' stacks."""

READY_TIMEOUT_S = 120.0
"""A peer builds its state before it listens: GPT-2 small from config takes ~10 s here."""


@dataclass
class PeerProcess:
    """A running `fedrdma.bench.peer`; its stdout is parsed line by line as it arrives."""

    args: list[str]
    prefix: Sequence[str] = ()
    env: dict[str, str] | None = None
    module: str = PEER_MODULE
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", self.module, *self.args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=self.env,
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                try:
                    self._lines.put(json.loads(line))
                except json.JSONDecodeError:
                    pass
        self._lines.put(None)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON line, or None once the process closed its output."""
        try:
            event = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"peer {self.proc.pid} ({' '.join(self.args[:4])}) printed nothing for {timeout:.0f} s; "
                f"where its threads were:\n{self.stacks()}"
            ) from None
        if event is None:
            self._lines.put(None)
            return None
        self.events.append(event)
        return event

    def events_now(self) -> tuple[list[dict[str, Any]], bool]:
        """The JSON lines printed since the last call, without waiting, and whether output ended."""
        new: list[dict[str, Any]] = []
        while True:
            try:
                event = self._lines.get_nowait()
            except queue.Empty:
                return new, False
            if event is None:
                self._lines.put(None)
                return new, True
            self.events.append(event)
            new.append(event)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> int:
        event = self.next_event(timeout)
        if event is None or event.get("event") != "ready":
            raise RunError(f"peer did not start: {event}\n{self.stderr()}")
        return int(event["port"])

    def finish(self, timeout: float) -> int:
        """Read every remaining event, wait for exit, return the exit code."""
        while self.next_event(timeout) is not None:
            pass
        return self.proc.wait(timeout)

    def stacks(self) -> str:
        """Ask a hung peer where its threads are (`faulthandler` on SIGUSR1), and return its stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(STACKS_WAIT_S)
        return self.stderr()

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]


def peer_env(tls: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if tls is not None:
        env["UCX_TLS"] = tls
    return env


def start_pair(
    mode: str,
    common: Sequence[str],
    sender_extra: Sequence[str] = (),
    receiver_extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    receiver_prefix: Sequence[str] = (),
    sender_prefix: Sequence[str] = (),
    listen_host: str = LOOPBACK_HOST,
    module: str = PEER_MODULE,
) -> tuple[PeerProcess, PeerProcess]:
    """A listening receiver and a dialing sender of `mode`, both started."""
    receiver = PeerProcess(
        ["--role", "receiver", "--mode", mode, "--listen", f"{listen_host}:0", *common, *receiver_extra],
        prefix=receiver_prefix,
        env=env,
        module=module,
    )
    try:
        port = receiver.wait_ready()
    except Exception:
        receiver.kill()
        raise
    sender = PeerProcess(
        ["--role", "sender", "--mode", mode, "--connect", f"{listen_host}:{port}", *common, *sender_extra],
        prefix=sender_prefix,
        env=env,
        module=module,
    )
    return sender, receiver
