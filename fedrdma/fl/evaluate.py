"""The aggregator's held-out score of the global model, every round."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedrdma.config import AggregatorConfig
from fedrdma.fl.data import load_eval_blocks, load_tokenizer
from fedrdma.fl.trainer import evaluate

EVAL_MAX_BLOCKS = 64
"""Held-out blocks scored per round: the same first blocks every round (comparable), few
enough that scoring GPT-2 small on a CPU takes seconds, not minutes."""


def evaluator(cfg: AggregatorConfig) -> Callable[[torch.nn.Module], float] | None:
    """A function model -> held-out loss, or None when no eval data is configured."""
    if cfg.eval_data is None:
        return None
    blocks = load_eval_blocks(cfg.eval_data, load_tokenizer(cfg.model), cfg.seq_len)[:EVAL_MAX_BLOCKS]

    def score(model: torch.nn.Module) -> float:
        loss, _ = evaluate(model, blocks)
        return float(loss)

    return score
