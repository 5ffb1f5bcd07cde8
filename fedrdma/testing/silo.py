"""A silo with a fault: `python -m fedrdma.testing.silo --fault nan --config silo.toml`.

Each fault is a `Silo` subclass that overrides one step of the round; the rest of the silo
is the production one, so the aggregator meets the fault exactly as it would meet a
broken or hostile silo.

Faults: `exit-after-broadcast:R` (dies in round R once the global arrived), `stall-once:R:S`
(round R's training takes S seconds longer, once per process), `nan` (a NaN in the update),
`scale` (the update times 1000), `claim:N` (reports N training samples, whatever it holds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from fedrdma.config import ConfigError, SiloConfig, load
from fedrdma.control.link import JoinRefused
from fedrdma.core.errors import FedRDMAError
from fedrdma.fl.silo import Silo
from fedrdma.transport.session import Session

EXIT_CODE = 17
"""The exit code of a silo that dies mid-round on purpose, so a test can tell it from a crash."""


class ExitAfterBroadcast(Silo):
    def __init__(self, cfg: SiloConfig, rnd: int) -> None:
        super().__init__(cfg)
        self.rnd = rnd

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        if rnd == self.rnd:
            os._exit(EXIT_CODE)
        return super().train(rnd, upload)


class StallOnce(Silo):
    """A slow round, once per process: a window in which a test can kill the aggregator."""

    def __init__(self, cfg: SiloConfig, rnd: int, seconds: float) -> None:
        super().__init__(cfg)
        self.rnd, self.seconds, self.stalled = rnd, seconds, False

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        if rnd == self.rnd and not self.stalled:
            self.stalled = True
            time.sleep(self.seconds)
        return super().train(rnd, upload)


class NanUpdate(Silo):
    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        result = super().train(rnd, upload)
        next(iter(self.state.views.values())).view(-1)[0] = float("nan")
        return result


class ScaledUpdate(Silo):
    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        result = super().train(rnd, upload)
        self.state.buffer.view(torch.float32).mul_(1000.0)
        return result


class ClaimSamples(Silo):
    """Trains honestly but claims `n` samples, to take a larger share of the FedAvg mean."""

    def __init__(self, cfg: SiloConfig, n: int) -> None:
        super().__init__(cfg)
        self.n = n

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        _, loss, seconds = super().train(rnd, upload)
        return self.n, loss, seconds


def faulty(cfg: SiloConfig, fault: str) -> Silo:
    name, _, rest = fault.partition(":")
    args = rest.split(":") if rest else []
    if name == "exit-after-broadcast":
        return ExitAfterBroadcast(cfg, int(args[0]))
    if name == "stall-once":
        return StallOnce(cfg, int(args[0]), float(args[1]))
    if name == "nan":
        return NanUpdate(cfg)
    if name == "scale":
        return ScaledUpdate(cfg)
    if name == "claim":
        return ClaimSamples(cfg, int(args[0]))
    raise SystemExit(f"unknown fault {fault!r}; see `python -m fedrdma.testing.silo --help`")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedrdma.testing.silo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fault", required=True)
    p.add_argument("--config", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        cfg = load(SiloConfig, args.config, {})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        faulty(cfg, args.fault).run()
    except (JoinRefused, FedRDMAError) as exc:
        print(f"silo {cfg.id} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
