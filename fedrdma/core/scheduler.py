"""The chunk scheduler: every rule about windows, retries and resumption, with no I/O.

In the manner of h11's `Connection`: the transport feeds events in by plain method calls
and executes the actions that come out; the scheduler never touches a socket, a clock or
NIXL. Time is passed in as `now`, so tests drive it with plain numbers. Its counterpart on
the verifying side is `core.receiver.Receiver`.

Call order, for the side that initiates the one-sided transfers (the sender when pushing,
the receiver when pulling):

1. `poll(now)` returns the `Post` actions to execute now (window and backoff permitting).
2. For every posted chunk the transport reports exactly one of `landed(i, gen)` (the
   one-sided operation completed) or `failed(i, gen, now, why)` (it errored, or its deadline
   from `expired(now)` passed and the transport released the handle).
3. The verifier's verdict arrives: `verified(i)` or `corrupt(i, now)`.
4. When `broken` names a reason, the transport rebuilds its endpoint to the peer, reports
   `disconnected(now)` (everything not verified is unverified again, and the generation
   advances so stale completions are ignored), then `resume(indices the peer holds verified)`.
5. The transfer ends when `done` is true, or `error` names why it cannot finish.

**The one rule for failures.** Bytes that arrived wrong (`corrupt`) are that chunk's
problem: the connection works, so only the chunk is sent again, after a backoff, at most
`max_attempts` times. An operation that errored or hung past its deadline (`failed`) is the
endpoint's problem: UCX fails every operation of a broken endpoint, so retrying the chunk
alone would only fail again. The scheduler then posts nothing more (`broken`) until the
transport reconnected and resumed, at most `max_reconnects` times per transfer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedrdma.core.chunks import Chunk, ChunkPlan, check_window
from fedrdma.core.errors import TransferError

MAX_ATTEMPTS = 5
"""A chunk that fails this often is not unlucky: the path or the peer is broken."""

MAX_RECONNECTS = 5
"""Reconnects per transfer before giving up: a flapping link should surface as an error."""

BACKOFF_BASE_S = 0.05
"""First retry delay: long enough to let a transient queue drain, short next to a chunk."""

BACKOFF_CAP_S = 2.0
"""Longest retry delay: beyond this a retry waits on the peer's heartbeat instead."""

CHUNK_TIMEOUT_S = 30.0
"""Default deadline of one posted chunk (NIXL 1.5.1 has none: a dead peer leaves it in
progress for ever). Generous enough for a 64 MiB chunk behind a full window at 100 Mbit/s."""


class ChunkStatus(enum.Enum):
    PENDING = "pending"
    IN_FLIGHT = "in_flight"
    LANDED = "landed"
    VERIFIED = "verified"


@dataclass(frozen=True)
class Post:
    """Action: start the one-sided operation for `chunk` in connection `generation`."""

    chunk: Chunk
    attempt: int
    generation: int


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = MAX_ATTEMPTS
    max_reconnects: int = MAX_RECONNECTS
    backoff_base_s: float = BACKOFF_BASE_S
    backoff_cap_s: float = BACKOFF_CAP_S
    chunk_timeout_s: float = CHUNK_TIMEOUT_S

    def backoff(self, failures: int) -> float:
        return min(self.backoff_cap_s, self.backoff_base_s * (2 ** max(0, failures - 1)))


@dataclass
class _Slot:
    status: ChunkStatus = ChunkStatus.PENDING
    failures: int = 0
    attempts: int = 0
    not_before: float = 0.0
    posted_at: float = 0.0
    generation: int = 0
    last_reason: str = ""


@dataclass
class Scheduler:
    plan: ChunkPlan
    window: int
    policy: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        check_window(self.window)
        self.generation = 0
        self.reconnects = 0
        self.bytes_posted = 0
        self.error: str | None = None
        self.broken: str | None = None
        """Why the endpoint must be rebuilt before anything more is posted (None: it works)."""
        self._slots = [_Slot() for _ in self.plan.chunks]
        self._in_flight = 0
        self._verified = 0
        self._cursor = 0  # lowest index that may still be pending: keeps poll O(window)
        self._retry: set[int] = set()
        self._quiet_until = 0.0
        """After a reconnect nothing is posted before this: a peer that just failed gets a breath."""

    # -- queries ---------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._verified == len(self._slots)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def status(self, index: int) -> ChunkStatus:
        return self._slots[index].status

    def verified_indices(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s.status is ChunkStatus.VERIFIED]

    @property
    def bytes_resent(self) -> int:
        return max(0, self.bytes_posted - self.plan.nbytes)

    def next_wakeup(self, now: float) -> float | None:
        """When `poll` could next return something, for a transport that wants to sleep."""
        times = [max(self._quiet_until, self._slots[i].not_before) for i in self._retry]
        times += [s.posted_at + self.policy.chunk_timeout_s for s in self._slots if s.status is ChunkStatus.IN_FLIGHT]
        return min(times) if times else None

    # -- events ----------------------------------------------------------------------
    def poll(self, now: float, room: int | None = None) -> list[Post]:
        """Chunks to post now: retries whose backoff has passed first, then new ones in order.

        `room` caps how many: the landing places the initiator has free (a bounded inbox's
        slots, when a pull lands in them); None when every chunk has its place in a pool.
        """
        if self.error is not None or self.broken is not None or self.done or now < self._quiet_until:
            return []
        limit = self.window if room is None else min(self.window, self._in_flight + max(0, room))
        posts: list[Post] = []
        for index in sorted(self._retry):
            if self._in_flight >= limit:
                return posts
            if self._slots[index].not_before <= now:
                self._retry.discard(index)
                posts.append(self._post(index, now))
        while self._in_flight < limit and self._cursor < len(self._slots):
            index = self._cursor
            self._cursor += 1
            if self._slots[index].status is ChunkStatus.PENDING and index not in self._retry:
                posts.append(self._post(index, now))
        return posts

    def landed(self, index: int, generation: int) -> bool:
        """The one-sided operation completed; the bytes await verification.

        Returns False (and changes nothing) for a completion from an older connection or
        for a chunk that is no longer in flight.
        """
        slot = self._slots[index]
        if generation != self.generation or slot.status is not ChunkStatus.IN_FLIGHT:
            return False
        slot.status = ChunkStatus.LANDED
        self._in_flight -= 1
        return True

    def failed(self, index: int, generation: int, now: float, reason: str) -> None:
        """The operation errored or missed its deadline: the endpoint is broken (see the rule above)."""
        slot = self._slots[index]
        if generation != self.generation or slot.status is not ChunkStatus.IN_FLIGHT:
            return
        self._in_flight -= 1
        slot.status = ChunkStatus.PENDING
        slot.last_reason = reason
        self._retry.add(index)
        if self.broken is None:
            self.broken = f"chunk {index}: {reason}"

    def endpoint_lost(self, reason: str) -> None:
        """The endpoint broke with nothing of ours failing on it (the peer closed it): rebuild it."""
        if self.broken is None and not self.done:
            self.broken = reason

    def verified(self, index: int) -> None:
        """The verifier holds chunk `index`'s bytes, checked: whatever this side's own op still says.

        A verifier's word may overtake the operation's completion (it checks the bytes as they
        land): a chunk still in flight counts as verified all the same, and its late
        completion is then ignored.
        """
        self._check_index(index)
        slot = self._slots[index]
        if slot.status is ChunkStatus.VERIFIED:
            return
        if slot.status is ChunkStatus.IN_FLIGHT:
            self._in_flight -= 1
        self._retry.discard(index)
        slot.status = ChunkStatus.VERIFIED
        self._verified += 1

    def corrupt(self, index: int, now: float) -> None:
        """The landed bytes did not match their checksum: fetch or send them again.

        The verifier's word may overtake the operation's own completion (a push receiver
        hashes on the notification): a chunk still in flight is requeued all the same, and
        its late completion is then ignored.
        """
        slot = self._slots[index]
        if slot.status is ChunkStatus.IN_FLIGHT:
            self._in_flight -= 1
        elif slot.status is not ChunkStatus.LANDED:
            return
        self._requeue(index, now, "checksum mismatch")

    def expired(self, now: float) -> list[tuple[int, int]]:
        """(index, generation) of in-flight chunks past their deadline.

        The transport must release each one's handle, then report `failed` for it.
        """
        limit = self.policy.chunk_timeout_s
        return [
            (i, s.generation)
            for i, s in enumerate(self._slots)
            if s.status is ChunkStatus.IN_FLIGHT and now - s.posted_at > limit
        ]

    def disconnected(self, now: float, reason: str = "connection lost") -> None:
        """The endpoint was torn down: nothing unverified can be trusted to land any more."""
        self.broken = None
        self.generation += 1
        self.reconnects += 1
        if self.reconnects > self.policy.max_reconnects:
            self.error = f"gave up after {self.policy.max_reconnects} reconnects; last: {reason}"
        for index, slot in enumerate(self._slots):
            if slot.status in (ChunkStatus.IN_FLIGHT, ChunkStatus.LANDED):
                slot.status = ChunkStatus.PENDING
                self._retry.add(index)
        self._quiet_until = now + self.policy.backoff(self.reconnects)
        self._in_flight = 0

    def resume(self, verified: Iterable[int]) -> None:
        """After a reconnect: the peer already holds these chunks verified; skip them."""
        for index in verified:
            self.verified(index)

    def _check_index(self, index: int) -> None:
        if not 0 <= index < len(self._slots):
            raise TransferError(f"peer reports chunk {index} verified, but the plan has {len(self._slots)}")

    # -- internals -------------------------------------------------------------------
    def _post(self, index: int, now: float) -> Post:
        slot = self._slots[index]
        slot.status = ChunkStatus.IN_FLIGHT
        slot.attempts += 1
        slot.posted_at = now
        slot.generation = self.generation
        self._in_flight += 1
        chunk = self.plan.chunks[index]
        self.bytes_posted += chunk.length
        return Post(chunk, slot.attempts, self.generation)

    def _requeue(self, index: int, now: float, reason: str) -> None:
        slot = self._slots[index]
        slot.failures += 1
        slot.last_reason = reason
        slot.status = ChunkStatus.PENDING
        if slot.failures >= self.policy.max_attempts:
            self.error = f"chunk {index} failed {slot.failures} times; last: {reason}"
            return
        slot.not_before = now + self.policy.backoff(slot.failures)
        self._retry.add(index)
