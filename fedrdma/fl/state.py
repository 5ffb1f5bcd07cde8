"""The trainable state of a configured model, as a FlatState the model trains in."""

from __future__ import annotations

import torch

from fedrdma.config import ModelSettings
from fedrdma.core.layout import FlatState
from fedrdma.fl.model import apply_lora, build_model


def build_configured(cfg: ModelSettings) -> torch.nn.Module:
    """Model from config, LoRA applied if asked: what every process of a federation builds alike."""
    model = build_model(cfg.model, seed=cfg.seed)
    if cfg.lora:
        torch.manual_seed(cfg.seed)
        model = apply_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha)
    return model


def build_trainable(cfg: ModelSettings) -> tuple[torch.nn.Module, FlatState]:
    """Only trainable tensors enter the state, and the model trains in it."""
    model = build_configured(cfg)
    return model, FlatState.adopt(model)
