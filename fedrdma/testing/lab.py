"""A lab whose `up` fails or crashes at a named step: `python -m fedrdma.testing.lab --kill-at shape ...`.

`Lab.checkpoint` is called before each step of `up`; these subclasses fail there (raise,
as a broken command would) or crash there (SIGKILL, as a killed process would), so a test
can check that what `up` left behind is taken down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from fedrdma.lab.config import LabConfig
from fedrdma.lab.errors import LabError
from fedrdma.lab.lab import Lab


def failing_at(step: str) -> type[Lab]:
    """A Lab whose `up` raises when it reaches `step` (e.g. "path:1", "ceiling", "done")."""

    class FailingLab(Lab):
        def checkpoint(self, at: str) -> None:
            if at == step:
                raise LabError(f"injected failure at step {at!r}")

    return FailingLab


def killed_at(step: str) -> type[Lab]:
    """A Lab whose `up` kills its own process when it reaches `step`."""

    class KilledLab(Lab):
        def checkpoint(self, at: str) -> None:
            if at == step:
                os.kill(os.getpid(), signal.SIGKILL)

    return KilledLab


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedrdma.testing.lab")
    p.add_argument("--kill-at", required=True, help="the step of `up` at which the process dies")
    p.add_argument("--name", required=True)
    p.add_argument("--rate", required=True)
    args = p.parse_args(argv)
    killed_at(args.kill_at).up(LabConfig.uniform(name=args.name, rate=args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
