"""How long a peer may stay silent: one deadline that restarts on every sign of life.

Every wait on a peer in the data plane is one of these, never a fixed clock from the start
of a transfer: a transfer over a slow line may last hours and still be healthy, while a
peer that stops answering is given up `timeout` seconds after its last sign of life.
"""

from __future__ import annotations

from dataclasses import dataclass

PEER_TIMEOUT_S = 20.0
"""A peer that shows no sign of life (no message, no landed chunk) this long is declared
lost: the transfer fails with a clear error instead of hanging on NIXL, which has no
deadline of its own."""


SLOW_HOST_BYTES_PER_S = 100e6
"""The slowest a peer is assumed to copy, (de)serialize or register memory: 100 MB/s, a
tenth of what these 2-core VMs do. A peer working on a whole state at once (the baseline
joining and loading what arrived, a staging receiver allocating and registering buffers)
sends nothing meanwhile; its silence may last this long per byte before it counts."""


def busy_allowance(nbytes: int) -> float:
    """Seconds a peer may be silent while it works on `nbytes` at once, beyond PEER_TIMEOUT_S:
    a 7B fp32 state (28 GB) gets ~5 minutes, GPT-2 small's (0.5 GB) 5 s."""
    return nbytes / SLOW_HOST_BYTES_PER_S


@dataclass
class Liveness:
    """The time of the peer's last sign of life, against a timeout. `now` is passed in."""

    timeout: float
    last: float

    def heard(self, now: float) -> None:
        """The peer did something: a message, a landed chunk, a completed operation."""
        self.last = max(self.last, now)

    def silent_for(self, now: float) -> float:
        return max(0.0, now - self.last)

    def expired(self, now: float) -> bool:
        return self.silent_for(now) > self.timeout

    def remaining(self, now: float) -> float:
        """Seconds until the peer would be declared lost, for a wait that blocks."""
        return max(0.0, self.timeout - self.silent_for(now))
