"""Global-state checkpoints of one run: safetensors files named by round, written durably.

`--resume` continues after the newest complete checkpoint of the run recorded in the
directory, so a round is never counted twice. Every checkpoint carries its run's id: a
fresh run into a directory that holds another run's checkpoints is refused (it would
otherwise prune them, and a later `--resume` would load the wrong run). A checkpoint is
written to a temporary file, fsynced, renamed into place and its directory fsynced; a
write that fails (a full disk) leaves no temporary file behind and says so. A damaged
newest checkpoint is skipped for the one before, out loud.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedrdma.config import KEEP_CHECKPOINTS
from fedrdma.core.errors import FedRDMAError, LayoutError
from fedrdma.core.layout import FlatState

log = logging.getLogger(__name__)

_NAME = re.compile(r"^global-round-(\d{5})\.safetensors$")

WEIGHTS_KEY = "weights"
"""Metadata key of a checkpoint's FedAvg weights (JSON: silo id -> weight, summing to 1)."""


def weights_of(path: Path) -> dict[str, float]:
    """The FedAvg weights a checkpoint records; empty for one written before they were kept."""
    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get(WEIGHTS_KEY, "{}"))


RUN_FILE = "run.json"
"""The run a directory's checkpoints belong to: its id, its layout, when it began."""

TMP_SUFFIX = ".tmp"
"""A checkpoint being written; never read, and removed when the write fails."""


class CheckpointError(FedRDMAError):
    """A checkpoint that cannot be written, or a directory that holds another run."""


@dataclass(frozen=True)
class Resumed:
    round: int
    skipped: tuple[str, ...]
    """Newer checkpoints that could not be read, with why: the run resumed from an older one."""


def path_for(out_dir: Path, rnd: int) -> Path:
    return Path(out_dir) / f"global-round-{rnd:05d}.safetensors"


def rounds(out_dir: Path) -> list[int]:
    if not Path(out_dir).is_dir():
        return []
    return sorted(int(match.group(1)) for p in Path(out_dir).iterdir() if (match := _NAME.match(p.name)))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _run_of(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("run_id")
    except (OSError, SafetensorError):
        return None


def begin_run(out_dir: Path, layout_id: str, resume: bool) -> str:
    """This run's id: the one recorded in `out_dir` when resuming, else a new one.

    Refuses a fresh run into a directory that holds another run's checkpoints, and a
    resume of a directory whose run record is for another model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / RUN_FILE
    existing = json.loads(record.read_text()) if record.exists() else None
    done = rounds(out_dir)
    if resume and existing is not None:
        for leftover in out_dir.glob(f"*{TMP_SUFFIX}"):  # a writer killed mid-write: never read, so never needed
            log.info("removing %s, left by a checkpoint write that was interrupted", leftover.name)
            leftover.unlink(missing_ok=True)
        if existing.get("layout_id") != layout_id:
            raise CheckpointError(
                f"{out_dir} holds run {existing.get('run_id')} of layout {existing.get('layout_id')}, and this "
                f"aggregator's layout is {layout_id}: resume with the same model and LoRA settings"
            )
        return str(existing["run_id"])
    if done or (existing is not None and not resume):
        owner = existing.get("run_id") if existing else _run_of(path_for(out_dir, done[-1]))
        raise CheckpointError(
            f"{out_dir} holds the checkpoints of run {owner or '(unrecorded)'} (rounds {done[0]}-{done[-1]}): "
            "continue it with --resume, or give this run another --out-dir"
        )
    run_id = uuid.uuid4().hex[:12]
    tmp = record.with_name(record.name + TMP_SUFFIX)
    tmp.write_text(json.dumps({"run_id": run_id, "layout_id": layout_id, "started": time.time()}) + "\n")
    os.replace(tmp, record)
    _fsync_dir(out_dir)
    return run_id


def save(
    out_dir: Path, state: FlatState, rnd: int, run_id: str, weights: dict[str, float] | None = None,
    keep: int = KEEP_CHECKPOINTS,
) -> Path:
    """Round `rnd`'s global state, durably; only this run's older checkpoints are pruned, to `keep`.

    `weights`: the round's FedAvg weights by silo, kept in the file's metadata, so that a
    checkpoint says which updates it is the mean of (an audit, or the soak, can recompute it).
    """
    out_dir = Path(out_dir)
    target = path_for(out_dir, rnd)
    tmp = target.with_name(target.name + TMP_SUFFIX)
    metadata = {"round": str(rnd), "layout_id": state.layout_id, "run_id": run_id}
    if weights is not None:
        metadata[WEIGHTS_KEY] = json.dumps(weights, sort_keys=True)
    try:
        save_file(dict(state.views), str(tmp), metadata=metadata)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(out_dir)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        target_left = " (the previous checkpoints are intact)" if rounds(out_dir) else ""
        raise CheckpointError(
            f"could not write round {rnd}'s checkpoint in {out_dir}: {exc}{target_left}; free space there "
            "(or give another --out-dir) and continue with --resume"
        ) from None
    mine = [r for r in rounds(out_dir) if _run_of(path_for(out_dir, r)) == run_id]
    for old in mine[:-keep]:
        path_for(out_dir, old).unlink(missing_ok=True)
    return target


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


def load_latest(out_dir: Path, state: FlatState, run_id: str) -> Resumed | None:
    """The newest readable checkpoint of `run_id`, loaded into `state`; damaged newer ones are skipped."""
    skipped: list[str] = []
    for rnd in reversed(rounds(out_dir)):
        path = path_for(out_dir, rnd)
        owner = _run_of(path)  # None: unreadable, tried below and skipped if it is damaged
        if owner is not None and owner != run_id:
            continue
        try:
            loaded = load(path, state)
        except (OSError, SafetensorError, KeyError, ValueError) as exc:
            skipped.append(f"round {rnd} ({path.name}): {exc}")
            log.warning("checkpoint %s cannot be read (%s); trying the one before", path, exc)
            continue
        return Resumed(loaded, tuple(skipped))
    if skipped:
        raise CheckpointError(f"no checkpoint in {out_dir} could be read: {'; '.join(skipped)}")
    return None
