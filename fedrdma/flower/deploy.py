"""Flower's deployment runtime on this host: a SuperLink, SuperNodes, `flwr run`, as real processes.

What the tests and `bench flower` start: `flower-superlink` (one HTTP port for the fleet, the
CLI and the ServerApp), a `flower-supernode` per site (each with its own port for its
ClientApps and its node config), and runs submitted with `flwr run`. Everything of Flower's
lives in the federation's own FLWR_HOME, so a user's `~/.flwr` is never touched.

A run's status comes from `flwr ls`, not from `flwr run`'s exit code: a ServerApp that
crashed still lets `flwr run --stream` exit 0.

On a lab (`hosts` from `bench.wan.federation_hosts`) the SuperLink, the `flwr` CLI and so the
ServerApps run in the aggregator's namespace, each SuperNode and its ClientApps in its silo's,
and Flower's traffic crosses the shaped paths under TLS (`tls`): the CA's `ca.pem` and the
SuperLink's pair, named for every address the silos dial and for loopback, where the CLI
and the ServerApps reach it.
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
from fedrdma.fl.demo import LOCAL, Hosts
from fedrdma.transport.ports import free_port
from fedrdma.transport.tls import CA_FILE, cert_file, key_file

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


LISTEN_PROBE = ("import socket, sys; s = socket.socket(); s.settimeout(1); "
                "sys.exit(s.connect_ex(('127.0.0.1', int(sys.argv[1]))))")
"""Run where the SuperLink runs (its namespace): exit 0 once something listens on its port."""


@dataclass(frozen=True)
class LinkTLS:
    """The SuperLink's certificate and key, and the CA the SuperNodes and the CLI check it against."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def of(cls, certs: Path, name: str) -> LinkTLS:
        """`name`'s pair in a `fedrdma certs` directory: a server certificate for the aggregator's hosts."""
        return cls(certs / CA_FILE, cert_file(certs, name), key_file(certs, name))


@dataclass
class Federation:
    """A SuperLink and SuperNodes, on loopback or in a lab's namespaces; `run` submits an app and waits."""

    home: Path
    hosts: Hosts = LOCAL
    tls: LinkTLS | None = None
    """Without it Flower runs `--insecure`, which only loopback may carry."""
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
        security = (f'root-certificates = "{self.tls.ca}"\n' if self.tls else "insecure = true\n")
        (self.home / "config.toml").write_text(  # the CLI runs beside the SuperLink, so loopback reaches it
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{LOOPBACK_HOST}:{self.link_port}"\n'
            + security)
        tls = (["--ssl-ca-certfile", str(self.tls.ca), "--ssl-certfile", str(self.tls.cert),
                "--ssl-keyfile", str(self.tls.key)] if self.tls else ["--insecure"])
        self._spawn("superlink", [*self.hosts.agg_prefix, _tool("flower-superlink"), *tls,
                                  "--host", self.hosts.listen_host, "--port", str(self.link_port),
                                  "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + LINK_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._listening():
                return
            if self.procs["superlink"].poll() is not None:
                break
            time.sleep(0.2)
        raise RunError(f"flower-superlink did not listen on port {self.link_port}:\n{self.log('superlink')}")

    def _listening(self) -> bool:
        if not self.hosts.agg_prefix:
            with socket.socket() as s:
                return s.connect_ex((LOOPBACK_HOST, self.link_port)) == 0
        probe = [*self.hosts.agg_prefix, sys.executable, "-c", LISTEN_PROBE, str(self.link_port)]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0

    def start_node(self, name: str, node_config: Mapping[str, object], silo: int = 0) -> None:
        """SuperNode `name` where silo `silo` (0-based) of `hosts` runs, dialing the SuperLink as it does."""
        config = " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())
        prefix, host = self.hosts.silo(silo)
        tls = ["--root-certificates", str(self.tls.ca)] if self.tls else ["--insecure"]
        self._spawn(name, [*prefix, _tool("flower-supernode"), *tls, "--superlink", f"{host}:{self.link_port}",
                           "--port", str(free_port()), "--node-config", config])

    def _spawn(self, name: str, args: list[str]) -> None:
        self.logs[name] = self.home / f"{name}.log"
        with self.logs[name].open("wb") as out:
            self.procs[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def _flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The `flwr` CLI, run beside the SuperLink."""
        return subprocess.run([*self.hosts.agg_prefix, _tool("flwr"), *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout)

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace") if name in self.logs else ""

    def run(self, app: Path, config: Mapping[str, object], timeout: float, last_file: Path | None = None) -> str:
        """Submit `app` with run-config overrides; returns the run's final status (`finished:completed`, ...)."""
        return self.wait(self.submit(app, config), timeout, last_file)

    def submit(self, app: Path, config: Mapping[str, object]) -> int:
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in config.items())
        submitted = self._flwr("run", str(app), "local", "--format", "json", "-c", overrides, timeout=120)
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
            listed = self._flwr("ls", "local", "--run-id", str(run_id), "--format", "json")
            try:
                status = json.loads(listed.stdout)["runs"][0]["status"]
            except (ValueError, KeyError, IndexError):
                status = ""
            if status.startswith("finished"):
                shown = self._flwr("log", str(run_id), "local", "--show")
                self.server_log = shown.stdout + shown.stderr
                return status
            _pause(last_file, deadline)
        self._flwr("stop", str(run_id), "local")
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
