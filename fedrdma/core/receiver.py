"""The verifying side of a transfer: which chunks hold good bytes, what to tell the peer, when to give up.

In the manner of h11's `Connection` and beside `core.scheduler` (the initiator's side): the
transport feeds events in by plain method calls and executes the actions that come out;
nothing here touches a socket, a clock or NIXL. Time is passed in as `now`.

The receiver is whoever ends up holding the bytes and must vouch for them: the target of
a push (`rdma-e`, `rdma`: each chunk's notice carries its checksum) and the initiator of a
pull (`rdma-e-pull`: the holder streams the checksums, the bytes land by our own READs).

Call order, for one transfer:

1. `Receiver(plan, transfer, now, peer_timeout)`.
2. Push: each chunk notice goes to `notice(transfer, generation, index, checksum, now)`.
   Pull: each checksum from the holder to `expect(index, checksum, now)`, each completed
   READ to `landed(index, now)`. Sealed chunks: each opened chunk to `checked(...)`, which
   carries the bytes' verdict itself.
3. For each `Hash` action, the transport hashes the landed bytes (off its polling loop)
   and reports `hashed(index, generation, value, now)`.
4. Push: when the initiator reconnected, its `Resume` goes to `resume(transfer, generation, now)`.
5. Any other sign of the peer (a message) to `heard(now)`; and `tick(now)` whenever the
   transport's loop wakes, so deadlines and timed status reports fire.
6. The transfer is received when `complete` is true (a final `Status` with `complete` was
   emitted); a `Lost` action means the peer is given up.

Rules this machine owns:

- **Generations.** A notice or a hash of an older connection (generation) or another
  transfer is void: after a reconnect, bytes that landed unverified may be torn.
- **Status batching.** Verified chunks are reported in batches of `status_every`, corrupt
  chunks at once, all that remain with the final report, and a report (empty if need be)
  goes out at least every `status_interval_s`. The initiator needs them to resume; the
  holder of a pull, which sees nothing of the READs it serves, needs them to know the
  receiver is alive, however slow the line.
- **Liveness.** The peer is lost after `peer_timeout` without any sign of life.
- **Verification.** A chunk counts once its landed bytes hash to the holder's checksum;
  with `verify` off (a fabric whose per-packet CRC covers the bytes end to end) once they
  landed in the current generation.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import ProtocolError
from fedrdma.core.liveness import PEER_TIMEOUT_S, Liveness

STATUS_EVERY_CHUNKS = 32
"""Verified chunks per status report: each report is one control message, and the initiator
needs them only to resume; 32 x 4 MiB chunks is 128 MiB that a reconnect need not resend."""

STATUS_INTERVAL_S = 1.0
"""A report goes out at least this often: on a slow line 32 chunks take minutes, and the
peer's own liveness deadline restarts on each report."""


@dataclass(frozen=True)
class Hash:
    """Action: hash the landed bytes of chunk `index`, then report `hashed(index, generation, ...)`."""

    index: int
    generation: int


@dataclass(frozen=True)
class Verified:
    """Action: chunk `index` holds the holder's bytes (fold it; an initiator marks it done)."""

    index: int


@dataclass(frozen=True)
class Corrupt:
    """Action: chunk `index` landed with other bytes than its checksum says; it must come again."""

    index: int


@dataclass(frozen=True)
class Status:
    """Action: tell the peer which chunks are verified and which were corrupt."""

    verified: tuple[int, ...]
    corrupt: tuple[int, ...] = ()
    complete: bool = False


@dataclass(frozen=True)
class Lost:
    """Action: the peer is given up; `reason` says why, for the error the transport raises."""

    reason: str


Action = Hash | Verified | Corrupt | Status | Lost


class Receiver:
    """The verifier's record and protocol for one transfer."""

    def __init__(
        self,
        plan: ChunkPlan,
        transfer: int,
        now: float,
        peer_timeout: float = PEER_TIMEOUT_S,
        generation: int = 0,
        status_every: int = STATUS_EVERY_CHUNKS,
        status_interval_s: float = STATUS_INTERVAL_S,
        verify: bool = True,
    ) -> None:
        n = len(plan)
        self.plan = plan
        self.transfer = transfer
        self.generation = generation
        self.status_every = status_every
        self.status_interval_s = status_interval_s
        self.verify = verify
        """False: a landed chunk is taken as good without hashing it (`verify = fabric`: the
        fabric's own per-packet CRC checked the bytes end to end). Generations still apply."""
        self.liveness = Liveness(peer_timeout, now)
        self.corrupt_count = 0
        self.lost: str | None = None
        self._expected: list[int | None] = [None] * n
        self._landed = [False] * n
        self._verified = [False] * n
        self._hashing: dict[int, int] = {}
        """Chunk index -> generation of the hash in progress for it."""
        self._verified_count = 0
        self._pending: list[int] = []
        self._pending_corrupt: list[int] = []
        self._reported_at = now
        self._finished = False

    # -- queries ---------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        """Every chunk verified and the final report emitted."""
        return self._finished

    @property
    def verified_count(self) -> int:
        return self._verified_count

    def is_verified(self, index: int) -> bool:
        return self._verified[index]

    def verified_indices(self) -> list[int]:
        return [i for i, v in enumerate(self._verified) if v]

    # -- events ----------------------------------------------------------------------
    def notice(self, transfer: int, generation: int, index: int, checksum: int, now: float) -> list[Action]:
        """Push: chunk `index` landed in connection `generation`, and should hash to `checksum`."""
        self.liveness.heard(now)
        if transfer != self.transfer or generation != self.generation:
            return []  # an older transfer's or connection's late arrival
        self._check_index(index)
        self._expected[index] = checksum
        self._landed[index] = True
        return self._ready(index, now)

    def expect(self, index: int, checksum: int, now: float) -> list[Action]:
        """Pull: the holder says chunk `index` hashes to `checksum`."""
        self.liveness.heard(now)
        self._check_index(index)
        self._expected[index] = checksum
        return self._ready(index, now)

    def landed(self, index: int, now: float) -> list[Action]:
        """Pull: our READ of chunk `index` completed; its bytes are in our pool."""
        self.liveness.heard(now)
        self._check_index(index)
        self._landed[index] = True
        return self._ready(index, now)

    def hashed(self, index: int, generation: int, value: int, now: float) -> list[Action]:
        """The landed bytes of chunk `index` hash to `value` (as of connection `generation`)."""
        if self._hashing.get(index) != generation or generation != self.generation:
            return []  # a hash of bytes that a reconnect made void
        del self._hashing[index]
        return self._verdict(index, value == self._expected[index], now)

    def checked(self, transfer: int, generation: int, index: int, good: bool, now: float) -> list[Action]:
        """Sealed chunks (`tcp-e`): chunk `index` landed and was opened where it lies; `good` is
        whether its authentication tag held, so bytes and verdict arrive together."""
        self.liveness.heard(now)
        if transfer != self.transfer or generation != self.generation:
            return []
        self._check_index(index)
        return self._verdict(index, good, now)

    def _verdict(self, index: int, good: bool, now: float) -> list[Action]:
        if self._verified[index]:
            return []
        if good:
            self._verified[index] = True
            self._verified_count += 1
            self._pending.append(index)
            return [Verified(index), *self._report(now)]
        self._landed[index] = False
        self.corrupt_count += 1
        self._pending_corrupt.append(index)
        return [Corrupt(index), *self._report(now)]

    def resume(self, transfer: int, generation: int, now: float) -> list[Action]:
        """Push: the initiator reconnected as `generation`; tell it everything verified so far."""
        self.liveness.heard(now)
        if transfer != self.transfer or generation <= self.generation:
            return []  # a resume of another transfer, or one we already followed
        self.generation = generation
        self._landed = list(self._verified)  # unverified landings may be torn: wait for them again
        self._hashing.clear()
        self._pending, self._pending_corrupt = [], []
        self._reported_at = now
        done = self._verified_count == len(self.plan)
        self._finished = done
        return [Status(tuple(self.verified_indices()), (), done)]

    def reconnected(self, generation: int) -> None:
        """Pull: our own endpoint was rebuilt; landings of the old one may be torn."""
        if generation > self.generation:
            self.generation = generation
            self._landed = list(self._verified)
            self._hashing.clear()

    def heard(self, now: float) -> None:
        """Any other sign that the peer is alive (a message on the channel)."""
        self.liveness.heard(now)

    def tick(self, now: float) -> list[Action]:
        """Deadlines: a timed status report, or the peer given up."""
        if self._finished or self.lost is not None:
            return []
        if self.liveness.expired(now):
            self.lost = (
                f"the peer went silent for {self.liveness.timeout:.0f} s during transfer {self.transfer} "
                f"({self._verified_count}/{len(self.plan)} chunks verified)"
            )
            return [Lost(self.lost)]
        if now - self._reported_at >= self.status_interval_s:
            return self._flush(now)  # even with nothing new: the holder of a pull waits on it
        return []

    # -- internals -------------------------------------------------------------------
    def _ready(self, index: int, now: float) -> list[Action]:
        """A Hash action if chunk `index` now has both its bytes and its checksum (without
        verification: the verdict as soon as the bytes landed)."""
        if not self.verify:
            return self._verdict(index, True, now) if self._landed[index] else []
        if (
            self._verified[index]
            or not self._landed[index]
            or self._expected[index] is None
            or self._hashing.get(index) == self.generation
        ):
            return []
        self._hashing[index] = self.generation
        return [Hash(index, self.generation)]

    def _report(self, now: float) -> list[Action]:
        done = self._verified_count == len(self.plan)
        if done or self._pending_corrupt or len(self._pending) >= self.status_every:
            return self._flush(now, done)
        return []

    def _flush(self, now: float, done: bool = False) -> list[Action]:
        status = Status(tuple(self._pending), tuple(self._pending_corrupt), done)
        self._pending, self._pending_corrupt = [], []
        self._reported_at = now
        self._finished = done
        return [status]

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self.plan):
            raise ProtocolError(f"peer named chunk {index}, outside the plan of {len(self.plan)} chunks")
