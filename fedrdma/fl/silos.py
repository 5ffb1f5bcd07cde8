"""Several silos in one process: `python -m fedrdma.fl.silos A.toml B.toml ...`.

A benchmark of scale needs more silos than one host has memory for as processes (each
imports torch: ~300 MiB before any model). Silos that do not train (`train = "none"`) spend
their time waiting on the network, so many share one interpreter well. Each keeps its own
control link, its own data-plane endpoint (NIXL agent or tcp-e connections) and its own
state, exactly as if it ran alone; only the interpreter is shared.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from fedrdma.config import ConfigError, SiloConfig, load
from fedrdma.core.errors import FedRDMAError
from fedrdma.fl.silo import Silo


def run_all(configs: list[SiloConfig]) -> dict[str, str]:
    """Run every silo to the end of the federation; the failures, by silo id."""
    failures: dict[str, str] = {}
    lock = threading.Lock()

    def one(cfg: SiloConfig) -> None:
        try:
            Silo(cfg).run()
        except (FedRDMAError, OSError, TimeoutError) as exc:
            with lock:
                failures[cfg.id] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=one, args=(cfg,), name=f"silo-{cfg.id}", daemon=True) for cfg in configs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedrdma.fl.silos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", type=Path, nargs="+", help="one silo config (TOML) per silo")
    args = p.parse_args(argv)
    try:
        configs = [load(SiloConfig, path, {}) for path in args.configs]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ids = [cfg.id for cfg in configs]
    if len(set(ids)) != len(ids):
        print(f"error: silo ids repeat in {ids}; each config must name another silo", file=sys.stderr)
        return 2
    failures = run_all(configs)
    for silo, reason in sorted(failures.items()):
        print(f"silo {silo} failed: {reason}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
