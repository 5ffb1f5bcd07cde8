"""Causal LMs we fine-tune: the GPT-2 family built from config, or a local checkpoint.

Nothing is downloaded: sizes come from GPT-2's published configurations, weights are
initialised locally, and a checkpoint must be a local directory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

GPT2_SIZES: dict[str, dict[str, int]] = {
    "gpt2-tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, "vocab_size": 259,
                  "bos_token_id": 256, "eos_token_id": 257},
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024, "vocab_size": 50257},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "n_positions": 1024, "vocab_size": 50257},
}
"""GPT-2's own sizes (small 124M, medium 355M, large 774M); tiny is ours, for tests."""


def build_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A GPT-2 of a named size from config, or a local Hugging Face checkpoint directory."""
    if name in GPT2_SIZES:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(**GPT2_SIZES[name]))
    path = Path(name)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    raise ValueError(
        f"unknown model {name!r}: use one of {', '.join(GPT2_SIZES)} or the path of a local checkpoint directory"
    )


LORA_TARGETS_GPT2: tuple[str, ...] = ("c_attn",)
"""GPT-2's fused q/k/v projection: the adapter placement of the LoRA paper (query and value)
at the smallest size; add "c_proj" to adapt attention and MLP outputs too."""

LORA_SEED = 0
"""Seed of the adapters' initialisation (lora_A is random, lora_B zero): every silo and the
aggregator must build byte-identical adapters so layouts and round-0 weights agree."""

_FAN_IN_FAN_OUT = {"gpt2"}
"""Model types whose linear layers are transformers' Conv1D (weights stored transposed)."""


def apply_lora(
    model: torch.nn.Module,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    target_modules: tuple[str, ...] | None = None,
    seed: int = LORA_SEED,
) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters; only the adapters stay trainable (and travel).

    Call before `FlatState.adopt`, which then takes only the adapter weights. Dropout > 0
    is reproducible because the trainer reseeds torch's RNG every round; 0 (the default)
    also makes rounds cheaper.
    """
    if r < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1; got r={r}, alpha={alpha}, dropout={dropout}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules is None:
        if model_type != "gpt2":
            raise ValueError(
                f"no default LoRA target modules for model type {model_type!r}; pass target_modules, "
                "e.g. ('q_proj', 'v_proj') for Llama-style models"
            )
        target_modules = LORA_TARGETS_GPT2
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        fan_in_fan_out=model_type in _FAN_IN_FAN_OUT,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)
