"""Flower's deployment runtime on this host: a SuperLink, SuperNodes, `flwr run`, as real processes.

What the tests and `bench flower` start: `flower-superlink` (one HTTP port for the fleet, the
CLI and the ServerApp), a `flower-supernode` per site (each with its own port for its
ClientApps and its node config), and runs submitted with `flwr run`. Everything of Flower's
lives in the federation's own FLWR_HOME, so a user's `~/.flwr` is never touched.

A run's status comes from `flwr ls`, not from `flwr run`'s exit code: a ServerApp that
crashed still lets `flwr run --stream` exit 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fedrdma.core.addresses import LOOPBACK_HOST
from fedrdma.core.errors import RunError
from fedrdma.fl.demo import free_port

LINK_TIMEOUT_S = 60.0
"""The SuperLink answers on its port within a few seconds of starting."""

POLL_S = 1.0
"""How often a run's status is asked for once its app's last file is there (or none is named)."""

IDLE_POLL_S = 15.0
"""How often it is asked for before that file appears. Each ask is a `flwr ls` process of about
1.4 CPU-seconds: asked every second it took half of one of two cores from the apps it watched,
and a round's replies in CI came too late for their timeout. A crashed ServerApp writes no file
and is seen within this long."""

FILE_POLL_S = 0.2
"""How often the last file is looked for: a stat, nothing to spare."""

STOP_TIMEOUT_S = 10.0
"""A SuperNode or SuperLink stops in about 2 s after SIGTERM; then it is killed."""

QUIET_ENV = {"FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
"""No update checks or telemetry: these hosts reach no internet, and a test must not try."""


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def toml_value(value: object) -> str:
    """A run-config override as `flwr run -c` reads it (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


@dataclass
class Federation:
    """A SuperLink and SuperNodes on loopback; `run` submits an app and waits for its end."""

    home: Path
    link_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    server_log: str = ""
    """The last finished run's ServerApp output (`flwr log`): Flower keeps it nowhere else."""

    @property
    def env(self) -> dict[str, str]:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # Flower spawns its own tools
        return {**os.environ, **QUIET_ENV, "FLWR_HOME": str(self.home), "PATH": path}

    def start_link(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.link_port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{LOOPBACK_HOST}:{self.link_port}"\n'
            "insecure = true\n")
        self._spawn("superlink", [_tool("flower-superlink"), "--insecure", "--port", str(self.link_port),
                                  "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + LINK_TIMEOUT_S
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((LOOPBACK_HOST, self.link_port)) == 0:
                    return
            if self.procs["superlink"].poll() is not None:
                break
            time.sleep(0.2)
        raise RunError(f"flower-superlink did not listen on port {self.link_port}:\n{self.log('superlink')}")

    def start_node(self, name: str, node_config: Mapping[str, object]) -> None:
        config = " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())
        self._spawn(name, [_tool("flower-supernode"), "--insecure", "--superlink", f"{LOOPBACK_HOST}:{self.link_port}",
                           "--port", str(free_port()), "--node-config", config])

    def _spawn(self, name: str, args: list[str]) -> None:
        self.logs[name] = self.home / f"{name}.log"
        with self.logs[name].open("wb") as out:
            self.procs[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def run(self, app: Path, config: Mapping[str, object], timeout: float, last_file: Path | None = None) -> str:
        """Submit `app` with run-config overrides; returns the run's final status (`finished:completed`, ...)."""
        return self.wait(self.submit(app, config), timeout, last_file)

    def submit(self, app: Path, config: Mapping[str, object]) -> int:
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
        submitted = subprocess.run([_tool("flwr"), "run", str(app), "local", "--format", "json", "-c", overrides],
                                   capture_output=True, text=True, env=self.env, timeout=120)
        try:
            return int(json.loads(submitted.stdout)["run-id"])
        except (ValueError, KeyError):
            raise RunError(f"flwr run did not submit {app}:\n{submitted.stdout}\n{submitted.stderr}") from None

    def wait(self, run_id: int, timeout: float, last_file: Path | None = None) -> str:
        """Until run `run_id` finished; its status, with its ServerApp's output kept in `server_log`.

        `last_file`, if the app writes one as it ends, is looked for between the asks, which
        are then rare until it appears (IDLE_POLL_S)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listed = subprocess.run([_tool("flwr"), "ls", "local", "--run-id", str(run_id), "--format", "json"],
                                    capture_output=True, text=True, env=self.env, timeout=60)
            try:
                status = json.loads(listed.stdout)["runs"][0]["status"]
            except (ValueError, KeyError, IndexError):
                status = ""
            if status.startswith("finished"):
                shown = subprocess.run([_tool("flwr"), "log", str(run_id), "local", "--show"], capture_output=True,
                                       text=True, env=self.env, timeout=60)
                self.server_log = shown.stdout + shown.stderr
                return status
            _pause(last_file, deadline)
        subprocess.run([_tool("flwr"), "stop", str(run_id), "local"], capture_output=True, env=self.env, timeout=60)
        raise RunError(f"run {run_id} did not finish within {timeout:.0f} s")

    def run_log(self) -> str:
        """The last run's ServerApp output, then the tail of every process's log."""
        return f"--- serverapp\n{self.server_log[-6000:]}\n" + "\n".join(f"--- {name}\n{self.log(name)[-4000:]}" for name in self.logs)

    def stop(self) -> None:
        """SuperNodes first (they leave the SuperLink), then the SuperLink; their children follow them."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            proc = self.procs[name]
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def _pause(last_file: Path | None, deadline: float) -> None:
    """Until the next ask for a run's status: POLL_S after `last_file` exists, or IDLE_POLL_S at most."""
    until = min(deadline, time.monotonic() + IDLE_POLL_S)
    while last_file is not None and not last_file.exists() and time.monotonic() < until:
        time.sleep(FILE_POLL_S)
    time.sleep(POLL_S)
