"""Causal LMs we fine-tune: the GPT-2 family built from config, or a local checkpoint.

Nothing is downloaded: sizes come from GPT-2's published configurations, weights are
initialised locally, and a checkpoint must be a local directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2-tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, "vocab_size": 259},
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "n_positions": 1024, "vocab_size": 50257},
}
"""GPT-2's own sizes (small 124M, medium 355M, large 774M); tiny is ours, for tests."""


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A GPT-2 of a named size from config, or a local Hugging Face checkpoint directory."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if name in GPT2_SIZES:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(**GPT2_SIZES[name]))
    path = Path(name)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(GPT2_SIZES)} or the path of a local checkpoint directory"
    )
