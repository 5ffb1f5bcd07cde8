"""States to move in benchmarks and tests: synthetic of a given size, or a GPT-2 from config."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from fedrdma.core.layout import FlatState, Layout

SYNTHETIC_TENSOR_BYTES = 16 << 20
"""Synthetic states are cut into float32 tensors of 16 MiB (the last shorter), roughly a
GPT-2 small weight matrix, so layouts have many tensors as real models do."""

GPT2_SMALL = "gpt2-small"


def synthetic_layout(nbytes: int) -> Layout:
    if nbytes < 4 or nbytes % 4:
        raise ValueError(f"a synthetic state needs a positive multiple of 4 bytes, got {nbytes}")
    items = []
    remaining = nbytes
    while remaining:
        size = min(SYNTHETIC_TENSOR_BYTES, remaining)
        items.append((f"layer{len(items)}.weight", torch.float32, (size // 4,)))
        remaining -= size
    return Layout.from_shapes(items)


def gpt2_layout(name: str = GPT2_SMALL, lora: bool = False) -> Layout:
    """The trainable state the runtime would move: all weights, or the LoRA adapters only.

    A named size is built on torch's meta device, shapes without storage: 0.1 s rather
    than 10 s for GPT-2 medium, paid by both processes of every benchmark pair. A local
    checkpoint is loaded for real (transformers refuses to load one onto meta).
    """
    from fedrdma.config import ModelSettings
    from fedrdma.fl.model import GPT2_SIZES
    from fedrdma.fl.state import build_configured

    with torch.device("meta") if name in GPT2_SIZES else nullcontext():
        model = build_configured(ModelSettings(model=name, lora=lora))
    return Layout.from_tensors({n: p for n, p in model.named_parameters() if p.requires_grad})


def make_state(layout: Layout, seed: int | None) -> FlatState:
    """`seed=None`: zeros (a receiver). Otherwise reproducible random values (a sender)."""
    state = FlatState.allocate(layout, fill=0)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        for view in state.views.values():
            view.copy_(torch.randn(view.shape, generator=gen, dtype=torch.float32).to(view.dtype))
    return state
