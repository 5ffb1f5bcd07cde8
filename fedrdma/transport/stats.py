"""What one transfer cost: the figures a session returns and the runtime and benchmarks record."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedrdma.core.modes import Mode


@dataclass
class TransferStats:
    transfer: int
    mode: Mode
    seconds: float
    nbytes: int
    bytes_posted: int = 0
    """Bytes the initiator moved, retries included (0 where no chunk is posted: grpc's receiver)."""
    reconnects: int = 0
    corrupt: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    """Timings only one mode has (the baseline's serialize, wire and deserialize seconds)."""

    @property
    def goodput_gb_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def bytes_resent(self) -> int:
        return max(0, self.bytes_posted - self.nbytes)
