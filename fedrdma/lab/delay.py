"""The userspace delay element's process: find the helper, start it, stop it.

The helper is C (delay.c) because a Python element fell far short of the lab's rates
(README: Measurements behind the defaults); scripts/lab-deps.sh compiles it. Nothing here compiles at import or run time: a lab
that silently built code as root on first use would be hard to reason about.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedrdma.lab.errors import LabError
from fedrdma.lab.netns import in_ns, kill_pids, pid_alive, start_ticks
from fedrdma.lab.state import ElementRecord

HELPER_ENV = "FEDRDMA_DELAY_HELPER"
"""Path to a helper built elsewhere (e.g. packaged installs without the repo's build/)."""

HELPER_NAME = "fedrdma-delay"
"""The binary's name, also its /proc comm, which `down` checks before killing a pid."""

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout this package runs from (editable install); build/ lives at its top."""

DEFAULT_HELPER = REPO_ROOT / "build" / HELPER_NAME
"""Where scripts/lab-deps.sh puts the compiled helper (git-ignored)."""

READY_TIMEOUT_S = 5.0
"""Binding a few queues takes milliseconds; longer means the helper is stuck or broken."""

RT_PRIORITY = 10
"""SCHED_FIFO priority for the element: above normal tasks, far below kernel threads."""

QUEUE_MAXLEN = 65536
"""Packets the kernel may hold per queue: ~0.9 s of 5 Gbit/s at MTU 9000 (see MAX_RTT_S)."""


def helper_path() -> Path:
    return Path(os.environ.get(HELPER_ENV, DEFAULT_HELPER))


def require_helper() -> Path:
    path = helper_path()
    if not os.access(path, os.X_OK):
        raise LabError(f"delay element {path} is not built (this kernel has no netem, so the lab needs it): "
                       f"run `sudo scripts/lab-deps.sh` in {REPO_ROOT}, or point {HELPER_ENV} at a built "
                       "fedrdma-delay")
    return path


def start_element(ns: str, queues: Sequence[tuple[int, float]], log: Path,
                  on_started: Callable[[ElementRecord], None]) -> ElementRecord:
    """Start the helper in `ns` serving `(queue, one-way delay s)` pairs; return once bound.

    `on_started` runs as soon as the pid is known, before the wait for "ready", so a crash
    in between still leaves the pid on record for `lab down`.
    """
    helper = require_helper()
    argv = [str(helper), "--maxlen", str(QUEUE_MAXLEN), "--rt", str(RT_PRIORITY),
            *(f"{q}:{round(d * 1e6)}" for q, d in queues)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as err:
        proc = subprocess.Popen(in_ns(ns, argv), stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    ticks = start_ticks(proc.pid)
    record = ElementRecord(pid=proc.pid, start_ticks=ticks or 0, argv=argv, log=str(log))
    on_started(record)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
    line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
    proc.stdout.close()
    if line != "ready":
        proc.kill()
        proc.wait()
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise LabError(f"delay element did not start ({'; '.join(tail) or 'no output'}); see {log}")
    # The element outlives this process (lab up returns); Popen must not reap or warn about it.
    proc.returncode = 0
    return record


def element_alive(record: ElementRecord) -> bool:
    return pid_alive(record.pid) and start_ticks(record.pid) == record.start_ticks and _comm(record.pid) in (
        HELPER_NAME, "ip")


def stop_element(record: ElementRecord) -> None:
    """Kill the element only if the pid still is the element we started."""
    if element_alive(record):
        kill_pids([record.pid])
    # Reap it if it happens to be our child (same Python process ran up and down).
    try:
        os.waitpid(record.pid, os.WNOHANG)
    except ChildProcessError:
        pass
    deadline = time.monotonic() + 1.0
    while pid_alive(record.pid) and start_ticks(record.pid) == record.start_ticks and time.monotonic() < deadline:
        time.sleep(0.02)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""
