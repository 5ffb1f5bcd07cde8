"""What a hostile silo tries against the aggregator, from the silo's own process.

These go around the project's own checks (`Region.slice`, the session's plan) and call the
agent the way any peer holding NIXL could; what stands in their way is only what the
aggregator enforces, or the fabric.
"""

from __future__ import annotations

import struct
import time

import torch

from fedrdma.core.chunks import Region
from fedrdma.transport.agent import Agent

ATTACK_BYTES = 4096
"""Bytes an attack writes: one page of an unmistakable value."""

ATTACK_VALUE = 1e6
"""What the attack writes, as float32: far outside anything training produces."""

ATTACK_DEADLINE_S = 5.0
"""How long the attack waits for its WRITE to finish."""


def write_outside(agent: Agent, peer: str, address: int, nbytes: int = ATTACK_BYTES) -> str:
    """WRITE `nbytes` to `address` at `peer`, an address this side was never handed.

    Returns what happened, for the test to judge: "status DONE" if the WRITE completed,
    "refused: ..." if NIXL refused it (which, on this side, is only NIXL's own local check).
    """
    junk = torch.full((nbytes // 4,), ATTACK_VALUE, dtype=torch.float32)
    scratch = agent.stage([junk.view(torch.uint8)])
    try:
        remote = agent.remote_dlist(peer, [(address, nbytes)])  # no Region.slice: that is the point
        operation = agent.post("WRITE", scratch.local_dlist(), remote, 0, b"")
        deadline = time.monotonic() + ATTACK_DEADLINE_S
        while (state := operation.state()) == "PROC" and time.monotonic() < deadline:
            time.sleep(1e-3)
        operation.release()
        return f"status {state}"
    except Exception as exc:  # noqa: BLE001  (any refusal is the outcome under test)
        return f"refused: {type(exc).__name__}: {exc}"
    finally:
        scratch.close()


def forge_metadata(metadata: bytes, handed: Region, target: int) -> bytes:
    """NIXL partial metadata that was handed for `handed`, edited to describe memory at `target`.

    All a peer needs to name memory it was never handed: the metadata carries the region's
    address as 8 little-endian bytes, and nothing on a software fabric checks it.
    """
    packed = struct.pack("<Q", handed.address)
    at = metadata.find(packed)
    if at < 0:
        raise ValueError("the handed region's address is not in the metadata: NIXL's format changed")
    return metadata[:at] + struct.pack("<Q", target) + metadata[at + len(packed):]
