"""The aggregator's held-out score of the global model, every round."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedrdma.config import AggregatorConfig
from fedrdma.fl.data import load_eval_blocks, load_tokenizer
from fedrdma.fl.trainer import evaluate


def evaluator(cfg: AggregatorConfig) -> Callable[[torch.nn.Module], float] | None:
    """A function model -> held-out loss, or None when no eval data is configured."""
    if cfg.eval_data is None:
        return None
    blocks = load_eval_blocks(cfg.eval_data, load_tokenizer(cfg.model), cfg.seq_len)

    def score(model: torch.nn.Module) -> float:
        loss, _ = evaluate(model, blocks)
        return float(loss)

    return score
