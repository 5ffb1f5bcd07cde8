"""Global-state checkpoints: safetensors files named by round, written atomically.

`--resume` continues after the newest complete checkpoint, so a round is never counted
twice: a crash while saving leaves only a temporary file, which is ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fedrdma.core.errors import LayoutError
from fedrdma.core.layout import FlatState

_NAME = re.compile(r"^global-round-(\d{5})\.safetensors$")
KEEP = 3
"""Checkpoints kept on disk: the newest few, so a bad round can still be rolled back."""


def path_for(out_dir: Path, rnd: int) -> Path:
    return Path(out_dir) / f"global-round-{rnd:05d}.safetensors"


def save(out_dir: Path, state: FlatState, rnd: int) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = path_for(out_dir, rnd)
    tmp = target.with_suffix(".tmp")
    save_file(dict(state.views), str(tmp), metadata={"round": str(rnd), "layout_id": state.layout_id})
    os.replace(tmp, target)
    for old in sorted(rounds(out_dir))[:-KEEP]:
        path_for(out_dir, old).unlink(missing_ok=True)
    return target


def rounds(out_dir: Path) -> list[int]:
    if not Path(out_dir).is_dir():
        return []
    return sorted(int(match.group(1)) for p in Path(out_dir).iterdir() if (match := _NAME.match(p.name)))


def load(path: Path, state: FlatState) -> int:
    """Load a checkpoint into `state` in place; returns its round."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("layout_id") != state.layout_id:
            raise LayoutError(
                f"checkpoint {path} holds layout {meta.get('layout_id')}, this model has {state.layout_id}; "
                "resume with the same model and LoRA settings"
            )
        with torch.no_grad():
            for name, view in state.views.items():
                view.copy_(fh.get_tensor(name))
        return int(meta["round"])


def load_latest(out_dir: Path, state: FlatState) -> int | None:
    done = rounds(out_dir)
    return load(path_for(out_dir, done[-1]), state) if done else None
