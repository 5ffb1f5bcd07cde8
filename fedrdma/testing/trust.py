"""Who can touch what, tried from the attacker's side: `python -m fedrdma.testing.trust victim|attacker`.

The victim registers two buffers as an aggregator does (a global pool and one silo's
inbox), keeps a third unregistered, and hands out NIXL partial metadata for the inbox
alone. The attacker edits that metadata to name the other buffers and WRITEs into them.
Each process prints JSON lines; the test relays the victim's offer to the attacker and
asks the victim what its memory holds afterwards. Real processes, real NIXL over UCX.
"""

from __future__ import annotations

import base64
import json
import select
import sys
import time

import torch

from fedrdma.core.chunks import Region
from fedrdma.testing.attacks import ATTACK_BYTES, forge_metadata, write_outside
from fedrdma.transport.agent import Agent

BUFFER_BYTES = 1 << 20
"""Each of the victim's buffers: like an inbox, small."""

SERVE_POLL_S = 1e-3
"""How often the victim drives UCX while it waits: over TCP its worker answers the attacker's WRITEs."""

FILL = {"global": 0x11, "inbox": 0x00, "unregistered": 0x22}
"""What each buffer of the victim holds before the attack."""


def _say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def victim() -> int:
    agent = Agent("victim")
    buffers = {name: torch.full((BUFFER_BYTES,), value, dtype=torch.uint8) for name, value in FILL.items()}
    agent.register(buffers["global"])
    inbox = agent.register(buffers["inbox"])
    _say(event="offer", metadata=base64.b64encode(agent.partial_metadata(inbox)).decode(),
         inbox=inbox.region.address, **{name: int(t.data_ptr()) for name, t in buffers.items() if name != "inbox"})
    while True:
        agent.progress()
        ready, _, _ = select.select([sys.stdin], [], [], SERVE_POLL_S)
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:
            return 0
        _say(event="memory", changed={name: bool((t != FILL[name]).any()) for name, t in buffers.items()})


def attacker(offer: dict) -> int:
    agent = Agent("attacker")
    metadata = base64.b64decode(offer["metadata"])
    handed = Region(offer["inbox"], BUFFER_BYTES)
    results = {}
    for target in ("global", "unregistered"):
        peer = agent.add_peer(forge_metadata(metadata, handed, offer[target]))
        results[target] = write_outside(agent, peer, offer[target], ATTACK_BYTES)
        agent.remove_peer(peer)
        time.sleep(0.2)
    _say(event="attacked", results=results)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args == ["victim"]:
        return victim()
    if args == ["attacker"]:
        return attacker(json.loads(sys.stdin.readline()))
    raise SystemExit("usage: python -m fedrdma.testing.trust victim|attacker")


if __name__ == "__main__":
    sys.exit(main())
