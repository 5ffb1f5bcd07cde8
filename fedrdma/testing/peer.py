"""The benchmark's peer process with faults: `python -m fedrdma.testing.peer ... --corrupt-once 2,5`.

The same peer as `fedrdma.bench.peer`, given a `FaultyAgent` and, for a layout mismatch,
a state of another size. The fault tests start pairs of these.
"""

from __future__ import annotations

import argparse
import sys

from fedrdma.bench.peer import SENDER_SEED, build_state, parser, run
from fedrdma.bench.states import make_state, synthetic_layout
from fedrdma.core.layout import FlatState
from fedrdma.core.modes import Role
from fedrdma.testing.faults import Faults, FaultyAgent


def main(argv: list[str] | None = None) -> int:
    p = parser("python -m fedrdma.testing.peer")
    p.add_argument("--corrupt-once", default="", help="comma list of chunk indices to corrupt once")
    p.add_argument("--cut-after", type=int, default=None, help="tear down the endpoint after N operations")
    p.add_argument("--advertise-bytes", type=int, default=None, help="advertise a pool of N bytes")
    p.add_argument("--layout-skew", type=int, default=0, help="add bytes to the layout")
    args = p.parse_args(argv)
    faults = Faults(
        corrupt_once=frozenset(int(i) for i in args.corrupt_once.split(",") if i),
        cut_after=args.cut_after,
        advertise_bytes=args.advertise_bytes,
    )

    def build(a: argparse.Namespace) -> FlatState:
        state = build_state(a)
        if not a.layout_skew:
            return state
        seed = SENDER_SEED if a.role == Role.SENDER else None
        return make_state(synthetic_layout(state.nbytes + a.layout_skew), seed)

    return run(args, lambda: FaultyAgent(faults, args.chunk_size), build)


if __name__ == "__main__":
    sys.exit(main())
