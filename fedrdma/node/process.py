"""A node as a child process: how benchmarks, examples and tests start one and learn its address."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedrdma.core.errors import RunError

READY_PREFIX = "node ready:"
"""The line `fedrdma node` prints once both its doors are open (cli/node.py)."""

READY_TIMEOUT_S = 60.0
"""A node is ready in about a second (the CLI's imports); this bounds a hang."""

STOP_TIMEOUT_S = 10.0
"""A node stops in well under a second after SIGTERM; then it is killed."""

OUTPUT_LINES = 200
"""Lines of a node's output kept for an error report."""


@dataclass
class NodeProcess:
    proc: subprocess.Popen[str]
    site: str
    runtime_dir: Path
    address: str
    """Where peer nodes reach it; "" for a node that serves none."""
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES))
    """Its last lines, for a report when it fails."""
    ready_line: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_node(site: str, runtime_dir: Path, certs: Path | None, serve: bool = False,
               listen: str = "127.0.0.1:0", extra: Sequence[str] = (), prefix: Sequence[str] = ()) -> NodeProcess:
    """`fedrdma node` for `site`, returned once it is ready; `prefix` runs it elsewhere (a lab namespace)."""
    args = [*prefix, sys.executable, "-m", "fedrdma.cli", "node", "--site", site, "--runtime-dir", str(runtime_dir),
            *(["--certs", str(certs)] if certs else ["--insecure"]), *(["--serve", "--listen", listen] if serve else []),
            *extra]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    node = NodeProcess(proc, site, Path(runtime_dir), "")
    ready = threading.Event()
    threading.Thread(target=_pump, args=(node, ready), daemon=True, name=f"node-{site}-out").start()
    if ready.wait(READY_TIMEOUT_S) and node.ready_line:
        address = dict(f.split("=", 1) for f in node.ready_line.split()[2:])["address"]
        node.address = "" if address == "-" else address
        return node
    node.stop()
    raise RunError(f"`fedrdma node --site {site}` was not ready within {READY_TIMEOUT_S:.0f} s "
                   f"(exit code {proc.returncode}):\n{''.join(node.output)}")


def _pump(node: NodeProcess, ready: threading.Event) -> None:
    """The node's output, line by line, until it exits: read on, so its pipe never fills."""
    assert node.proc.stdout is not None
    for line in node.proc.stdout:
        node.output.append(line)
        if line.startswith(READY_PREFIX) and not node.ready_line:
            node.ready_line = line
            ready.set()
    ready.set()
