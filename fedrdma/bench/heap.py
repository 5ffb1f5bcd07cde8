"""`fedrdma bench heap`: what the malloc mmap threshold does to local training, in one run.

The RDMA modes pin glibc's mmap threshold (fedrdma.memory) and lift it while a model
computes. This benchmark trains the same rounds under each setting, each in a fresh child
process (the threshold is process-wide), alternating the settings so that a host whose
speed drifts treats them alike, and prints each one's time against glibc's default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

from fedrdma.bench.records import HeapResult, HeapVariant
from fedrdma.core.errors import RunError

VARIANTS = ("default", "pinned", "compute-heap")
"""glibc's dynamic threshold (the grpc baseline); pinned throughout (the RDMA modes before
compute_heap); pinned but lifted while training (the RDMA modes now)."""

BLOCKS = 32
"""Training blocks per child: enough for the rounds' batches without reshuffling."""

SEQ_LEN = 64
"""Tokens per block: T1's round is 2 steps of batch 2; what matters is the tensors' sizes."""

BATCH_SIZE = 2
"""Small, so a round takes seconds on 2 cores."""

LR = 1e-4
"""Any stable rate: only the time is read."""

DEFAULT_MODEL = "gpt2-small"
"""T1's model: the round whose compute share the pin distorted."""

DEFAULT_ROUNDS = 4
"""Rounds per child; its first is a warm-up (first-touch page faults) and is not counted."""

DEFAULT_REPEAT = 2
"""Child processes per setting: a second pass, interleaved, shows a drifting host."""

LOCAL_STEPS = 2
"""As in the paper's T1 (fedrdma.bench.paper.T1_LOCAL_STEPS; not imported: this module
stays light for the CLI, and that one pulls in torch)."""

PROBE_BYTES = 4 << 20
"""A chunk-sized allocation: whether malloc mmaps it shows the threshold in force."""


def child(variant: str, model_name: str, rounds: int) -> dict[str, Any]:
    """Train `rounds` local rounds under `variant`; seconds per round, and the heap it saw."""
    import torch

    from fedrdma.config import ModelSettings
    from fedrdma.fl.state import build_trainable
    from fedrdma.fl.trainer import LocalTrainer
    from fedrdma.memory import compute_heap, mmapped, pin_mmap_threshold

    model, _ = build_trainable(ModelSettings(model=model_name))
    vocab = int(model.config.vocab_size)
    blocks = torch.randint(0, vocab, (BLOCKS, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    trainer = LocalTrainer(model, blocks, LR, LOCAL_STEPS, BATCH_SIZE)
    if variant != "default":
        pin_mmap_threshold()
    seconds = []
    chunk_mmapped = None
    heap = compute_heap if variant == "compute-heap" else nullcontext
    for round_no in range(rounds):
        with heap():
            chunk_mmapped = mmapped(PROBE_BYTES)
            seconds.append(trainer.train_round(round_no)[2])
    return {"variant": variant, "seconds": seconds, "chunk_mmapped_while_training": chunk_mmapped}


def run(model: str, rounds: int, repeat: int,
        on_child: Callable[[str], None] = lambda v: None) -> HeapResult:
    """`repeat` children per variant, interleaved; medians over the counted rounds of all of them.

    `on_child` is told of each child as it finishes (progress).
    """
    if rounds < 2:
        raise ValueError(f"rounds={rounds}: at least 2, as the first round of each child is a warm-up")
    counted: dict[str, list[float]] = {v: [] for v in VARIANTS}
    seen: dict[str, Any] = {}
    for _ in range(repeat):
        for variant in VARIANTS:
            out = subprocess.run(
                [sys.executable, "-m", "fedrdma.bench.heap", "--variant", variant, "--model", model,
                 "--rounds", str(rounds)],
                capture_output=True, text=True,
            )
            if out.returncode != 0:
                raise RunError(f"bench heap: the {variant} child failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            counted[variant] += row["seconds"][1:]
            seen[variant] = row["chunk_mmapped_while_training"]
            on_child(variant)
    base = statistics.median(counted["default"])
    return HeapResult(
        model=model, rounds=rounds, repeat=repeat, local_steps=LOCAL_STEPS, batch_size=BATCH_SIZE, seq_len=SEQ_LEN,
        time=time.time(),
        variants={v: HeapVariant(seconds=statistics.median(s), seconds_min=min(s), rounds_counted=len(s),
                                 vs_default=statistics.median(s) / base, chunk_mmapped_while_training=seen[v])
                  for v, s in counted.items()},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one child of `fedrdma bench heap`")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(child(args.variant, args.model, args.rounds)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
