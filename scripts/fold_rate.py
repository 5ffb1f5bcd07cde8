"""How fast the aggregator folds: a GPT-2-small-sized float32 state, 4 MiB chunks, one thread.

`python scripts/fold_rate.py [--repeat N]` prints GB/s for a fold from an inbox (the chunk is
copied first, since a peer could write there) and from a slot (read where it lies), the
float32 sum kept in place as the aggregator keeps it. Only the fold is timed. Run it with
PYTHONPATH pointing at another checkout to compare two builds in one sitting.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE
from fedrdma.core.fedavg import RoundAggregate
from fedrdma.core.layout import FlatState, Layout

GPT2_SMALL_PARAMS = 124_439_808
"""GPT-2 small's trainable values: the state the README's figures fold."""

DELTA = 0.01
"""About a fine-tuning round's change to a weight."""


def fold_rate(glob: FlatState, update: FlatState, spare: FlatState, from_slot: bool) -> float:
    """GB/s of one silo's update folded chunk by chunk."""
    agg = RoundAggregate(glob, accumulator=spare)
    agg.start_silo("silo", 1, agreed=True, source=lambda: None)
    slot = torch.empty(DEFAULT_CHUNK_SIZE, dtype=torch.uint8)
    spent = 0.0
    for offset in range(0, update.nbytes, DEFAULT_CHUNK_SIZE):
        length = min(DEFAULT_CHUNK_SIZE, update.nbytes - offset)
        if from_slot:
            slot[:length].copy_(update.buffer[offset : offset + length])  # the reader's work, not timed
            start = time.perf_counter()
            agg.fold_chunk("silo", offset, slot[:length])
        else:
            start = time.perf_counter()
            agg.fold("silo", update, offset, length)
        spent += time.perf_counter() - start
    return update.nbytes / spent / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    layout = Layout.from_shapes([("w", torch.float32, (GPT2_SMALL_PARAMS,))])
    glob, update, spare = (FlatState.allocate(layout, fill=0) for _ in range(3))
    glob.views["w"].normal_(generator=torch.Generator().manual_seed(0))
    update.views["w"].copy_(glob.views["w"] + DELTA)
    for _ in range(args.repeat):
        inbox, slot = fold_rate(glob, update, spare, False), fold_rate(glob, update, spare, True)
        print(f"from an inbox {inbox:.2f} GB/s   from a slot {slot:.2f} GB/s")


if __name__ == "__main__":
    main()
