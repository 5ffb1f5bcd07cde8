"""What a lab made, on disk, written as it goes.

`lab up` records each namespace before creating it and the delay element right after
starting it, so `lab down` after a crash anywhere in `up` removes exactly what the lab
made and nothing else. Files live under /run: they describe kernel state that a reboot
wipes, so they should vanish with it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from fedrdma.lab.config import LabConfig

STATE_DIR_ENV = "FEDRDMA_LAB_STATE_DIR"
"""Overrides STATE_DIR, e.g. for tests that must not see a real lab's records."""

STATE_DIR = Path("/run/fedrdma-lab")
"""tmpfs, root-owned, cleared at boot: the same lifetime as the namespaces it records."""

CEILING_FILE = "ceilings.json"
"""The delay element's measured ceilings, shared by all labs on this host."""


def state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, STATE_DIR))


class ElementRecord(BaseModel):
    """Enough to find the element again and not to kill a stranger that reused its pid."""

    pid: int
    start_ticks: int = Field(description="/proc/<pid>/stat field 22: tells a reused pid apart")
    argv: list[str]
    log: str


class LabState(BaseModel):
    name: str
    config: LabConfig | None = None
    namespaces: list[str] = Field(default_factory=list, description="recorded before each is created")
    element: ElementRecord | None = None
    backend: str | None = None
    ceiling_bps: float | None = None
    complete: bool = False
    """True once `up` finished; a file with False is a crashed or running `up`."""

    @staticmethod
    def path_for(name: str) -> Path:
        return state_dir() / f"{name}.json"

    @classmethod
    def load(cls, name: str) -> "LabState | None":
        path = cls.path_for(name)
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            return None

    def save(self) -> None:
        """Atomic replace, so a crash mid-write never leaves a record `down` cannot read."""
        path = self.path_for(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)

    def remove(self) -> None:
        self.path_for(self.name).unlink(missing_ok=True)


def ceiling_key(mtu: int, rtt_s: float, helper: Path) -> str:
    """A ceiling holds for one MTU, RTT and build of the helper; a rebuild re-measures."""
    try:
        build = helper.stat().st_mtime_ns
    except FileNotFoundError:
        build = 0
    return f"mtu={mtu},rtt_us={round(rtt_s * 1e6)},helper={build}"


def load_ceiling(key: str) -> float | None:
    entry = _read_ceilings().get(key)
    return float(entry["bps"]) if entry else None


def store_ceiling(key: str, bps: float) -> None:
    data = _read_ceilings()
    data[key] = {"bps": bps, "measured_at": time.time()}
    path = state_dir() / CEILING_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_ceilings() -> dict[str, Any]:
    try:
        return json.loads((state_dir() / CEILING_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
