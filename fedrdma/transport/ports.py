"""Ports for the processes of a local run (the demo, the benchmarks, the Flower deployment,
the tests), chosen so that two runs on one machine never pick the same one.

A port the kernel hands out for `bind(0)` comes from its ephemeral range, the range every
outgoing connection takes its source port from too: a port probed free there may be some
connection's source port by the time the listener binds it, and two runs that probe at
once can be given the same one. These come from below that range instead, and a file
under the temp dir reserves each one for `HOLD_S`, across processes.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import tempfile
import time
from pathlib import Path

from fedrdma.core.errors import RunError

FLOOR = 20000
"""Lowest port handed out: above the well-known and most registered services' ports."""

EPHEMERAL_FLOOR = 32768
"""Where Linux's ephemeral range starts by default, when /proc does not say."""

HOLD_S = 3600.0
"""A reservation older than this is stale: the run that made it has long bound its port."""

TRIES = 200
"""Ports tried before giving up: the span holds thousands, so this many taken means a flood."""

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")

RESERVATIONS = Path(tempfile.gettempdir()) / "fedrdma-ports"


def free_port() -> int:
    """A port no process listens on and no other caller of this function holds."""
    ceiling = _ephemeral_floor()
    if ceiling - FLOOR < TRIES:  # a machine whose ephemeral range reaches down here: take the kernel's
        return _kernels_port()
    RESERVATIONS.mkdir(parents=True, exist_ok=True)
    pick = random.SystemRandom()
    for _ in range(TRIES):
        port = pick.randrange(FLOOR, ceiling)
        if _reserve(RESERVATIONS / str(port)) and _bindable(port):
            return port
    raise RunError(f"found no free port in {FLOOR}-{ceiling - 1} after {TRIES} tries; "
                   f"clear {RESERVATIONS} if no run of fedrdma is going on")


def _reserve(mark: Path) -> bool:
    """Create `mark` unless another caller holds it (a stale one is taken over)."""
    with contextlib.suppress(FileNotFoundError):
        if time.time() - mark.stat().st_mtime > HOLD_S:
            mark.unlink(missing_ok=True)
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _bindable(port: int) -> bool:
    """Whether a listener could bind `port` on every address now, as gRPC binds (SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _ephemeral_floor() -> int:
    try:
        return int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return EPHEMERAL_FLOOR


def _kernels_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
