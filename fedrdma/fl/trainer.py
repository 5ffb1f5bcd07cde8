"""Local training of a causal LM whose trainable parameters live in a FlatState.

The trainer never copies weights: the optimizer updates `p.data`, which is a view into the
silo's FlatState buffer, so after `train_round` the buffer *is* the update to send.

Determinism (the same seed, data and round give bit-identical weights in any process, so
the federated result cannot depend on which transport moved the bytes):
- every round reseeds torch's global RNG from `(seed, round_no)`: batch order, dropout
  (GPT-2's and LoRA's) and anything else random draw from it in a fixed order;
- the thread count is fixed (`TRAIN_THREADS`): CPU reductions split work per thread, so a
  different count changes the last bits, while two processes with the same count agree
  bit for bit (README: Measurements behind the defaults). So every silo, and every repetition of a run that is compared with
  another, must use the same `threads`;
- `torch.use_deterministic_algorithms(True)` during the round, so an op without a
  deterministic CPU kernel raises instead of silently varying;
- a fresh optimizer every round (see `LocalTrainer`).

What a step costs (gpt2-tiny, gpt2-small, one and two threads) is in the README's
"Measurements behind the defaults".
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from fedrdma.core.errors import FedRDMAError

TRAIN_THREADS = 1
"""Intra-op threads while training or evaluating: fixed for reproducible reductions, and 1
because the demo runs several silos on one small host, where more threads only contend."""

MAX_GRAD_NORM = 1.0
"""Gradient clipping, standard for LM fine-tuning: one bad batch cannot blow up a round."""

WEIGHT_DECAY = 0.0
"""No decay: rounds are short and FedAvg already pulls weights together; decay would also
shrink frozen-looking embeddings of byte ids a silo never sees."""

EVAL_BATCH_SIZE = 16
"""Blocks per forward pass in evaluation: bounds activation memory, does not change the loss."""

EVAL_LOGITS_BYTES = 32 << 20
"""Logits allowed per evaluation batch: GPT-2's 50257-word vocabulary makes logits, not
weights, the peak of an evaluation; this keeps it well inside the aggregator's budget."""

ROUND_SEED_STRIDE = 1_000_003
"""Round seeds are `seed * stride + round_no`: a prime stride keeps (seed, round) pairs from
colliding for any realistic number of rounds."""


class TrainingError(FedRDMAError, ValueError):
    """Training cannot run with the given model, data or settings."""


@contextmanager
def reproducible(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Fixed thread count and deterministic algorithms for the duration, restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Filling every torch.empty with NaN only helps find reads of uninitialised memory, and
    # costs a few per cent of a step; results do not depend on it.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = old_fill
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def round_seed(seed: int, round_no: int) -> int:
    return seed * ROUND_SEED_STRIDE + round_no


class LocalTrainer:
    """A silo's local steps of AdamW on its own blocks, one call per federated round.

    Optimizer state does not persist across rounds: each round starts a fresh AdamW. With
    FedAvg the global weights replace the local ones every round, so moments computed for
    the old local weights describe a point the model no longer sits at; a fresh optimizer
    is also the only choice that makes a round a pure function of (global weights, seed,
    round, data) - a silo that restarts or rejoins trains exactly as one that did not - and
    it frees the optimizer's memory (2x the trainable weights for Adam) between rounds.

    `n_samples` (the FedAvg weight) is the number of training blocks the silo holds, as in
    McMahan et al.'s FedAvg, not the number of blocks seen this round (which is
    `local_steps * batch_size` for every silo and would make all weights equal).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        blocks: torch.Tensor,
        lr: float,
        local_steps: int,
        batch_size: int,
        seed: int = 0,
        threads: int = TRAIN_THREADS,
    ) -> None:
        if blocks.dim() != 2 or blocks.dtype != torch.int64 or blocks.shape[0] == 0:
            raise TrainingError(
                f"blocks must be a non-empty [n_blocks, seq_len] int64 tensor, got {blocks.dtype} {tuple(blocks.shape)}; "
                "build them with fedrdma.fl.data.pack_blocks"
            )
        if local_steps < 1 or batch_size < 1:
            raise TrainingError(f"local_steps={local_steps} and batch_size={batch_size} must both be at least 1")
        if not (lr > 0 and math.isfinite(lr)):
            raise TrainingError(f"lr={lr} must be a positive number")
        config = getattr(model, "config", None)
        vocab = getattr(config, "vocab_size", None)
        positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if vocab is not None and int(blocks.max()) >= vocab:
            raise TrainingError(
                f"token id {int(blocks.max())} is outside the model's vocabulary of {vocab}; "
                "use the tokenizer that goes with the model (fedrdma.fl.data.load_tokenizer)"
            )
        if positions is not None and blocks.shape[1] > positions:
            raise TrainingError(
                f"seq_len {blocks.shape[1]} exceeds the model's {positions} positions; lower seq_len"
            )
        self.model = model
        self.blocks = blocks
        self.lr = lr
        self.local_steps = local_steps
        self.batch_size = min(batch_size, blocks.shape[0])
        self.seed = seed
        self.threads = threads

    @property
    def n_samples(self) -> int:
        return int(self.blocks.shape[0])

    def _batches(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """`local_steps` batches drawn without replacement, reshuffling when the data runs out."""
        order = torch.randperm(self.n_samples, generator=generator)
        pos = 0
        for _ in range(self.local_steps):
            if pos + self.batch_size > self.n_samples:
                order = torch.randperm(self.n_samples, generator=generator)
                pos = 0
            yield self.blocks[order[pos : pos + self.batch_size]]
            pos += self.batch_size

    def train_round(self, round_no: int) -> tuple[int, float, float]:
        """Run the round's local steps in place; returns (n_samples, mean training loss, seconds)."""
        start = time.perf_counter()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the model has no trainable parameters; did LoRA or freezing leave none?")
        losses: list[float] = []
        with reproducible(self.threads):
            seed = round_seed(self.seed, round_no)
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=WEIGHT_DECAY, foreach=False)
            self.model.train()
            for batch in self._batches(generator):
                loss = self.model(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=False)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
            del optimizer
        if not all(math.isfinite(x) for x in losses):
            raise TrainingError(f"training loss became non-finite in round {round_no}; lower lr")
        return self.n_samples, sum(losses) / len(losses), time.perf_counter() - start

    @torch.no_grad()
    def evaluate(self, eval_blocks: torch.Tensor) -> tuple[float, float]:
        """Mean next-token loss over `eval_blocks` (all the same length) and its perplexity."""
        if eval_blocks.dim() != 2 or eval_blocks.shape[0] == 0:
            raise TrainingError("eval_blocks must be a non-empty [n_blocks, seq_len] tensor")
        return evaluate(self.model, eval_blocks, self.threads)


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_blocks: torch.Tensor, threads: int = TRAIN_THREADS) -> tuple[float, float]:
    """Held-out loss and perplexity of any causal LM (the aggregator evaluates the global model)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    vocab = getattr(getattr(model, "config", None), "vocab_size", 0) or 0
    per_block = max(1, eval_blocks.shape[1] * vocab * 4)
    step = max(1, min(EVAL_BATCH_SIZE, EVAL_LOGITS_BYTES // per_block))
    try:
        with reproducible(threads), torch.no_grad():
            for i in range(0, eval_blocks.shape[0], step):
                batch = eval_blocks[i : i + step]
                loss = model(input_ids=batch, labels=batch).loss
                total += float(loss) * batch.shape[0]
                count += batch.shape[0]
    finally:
        model.train(was_training)
    loss = total / count
    return loss, math.exp(min(loss, 50.0))
