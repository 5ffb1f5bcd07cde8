"""Certificates for a benchmark's peers: a CA made for the run, a listener's and a dialer's.

A benchmark compares secure modes with a secure baseline, so its peers speak mutual TLS
like a federation does; their certificates live in a temporary directory for the run.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from fedrdma.control.certs import DEFAULT_HOSTS, init_ca, issue
from fedrdma.transport.tls import CLIENT, SERVER

LISTENER, DIALER = "listener", "dialer"
"""The certificate names of the peer that listens (a benchmark's receiver) and the one that dials."""

_made: dict[str, Path] = {}


def bench_certs(listen_host: str) -> Path:
    """A directory with a CA, a listener's certificate for `listen_host` and a dialer's, made once per run."""
    if listen_host not in _made:
        directory = Path(tempfile.mkdtemp(prefix="fedrdma-bench-certs-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        init_ca(directory)
        issue(directory, LISTENER, SERVER, hosts=sorted({*DEFAULT_HOSTS, listen_host}))
        issue(directory, DIALER, CLIENT)
        _made[listen_host] = directory
    return _made[listen_host]
