import pytest

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import TransferError
from fedrdma.core.scheduler import ChunkStatus, Ledger, RetryPolicy, Scheduler

C = 128
"""Bytes per chunk in these plans: small, and a multiple of the chunk alignment."""

POLICY = RetryPolicy(max_attempts=3, max_reconnects=2, backoff_base_s=1.0, backoff_cap_s=4.0, chunk_timeout_s=10.0)


def make(n=10, window=3):
    return Scheduler(ChunkPlan.build(n * C, C), window, POLICY)


def land_and_verify(s, posts):
    for p in posts:
        assert s.landed(p.chunk.index, p.generation)
        s.verified(p.chunk.index)


def test_window_limits_chunks_in_flight_and_order_is_sequential():
    s = make()
    posts = s.poll(0.0)
    assert [p.chunk.index for p in posts] == [0, 1, 2]
    assert s.poll(0.0) == []
    s.landed(1, 0)
    assert [p.chunk.index for p in s.poll(0.0)] == [3]
    assert s.in_flight == 3


def test_all_verified_is_done_and_nothing_is_resent():
    s = make()
    while not s.done:
        land_and_verify(s, s.poll(0.0))
    assert s.bytes_posted == 10 * C and s.bytes_resent == 0
    assert s.poll(0.0) == []


def test_corrupt_chunk_is_retried_after_backoff():
    s = make(n=2, window=2)
    p0, p1 = s.poll(0.0)
    s.landed(0, 0)
    s.landed(1, 0)
    s.verified(1)
    s.corrupt(0, now=5.0)
    assert s.status(0) is ChunkStatus.PENDING
    assert s.poll(5.5) == []  # backoff of 1 s not over
    (retry,) = s.poll(6.0)
    assert retry.chunk.index == 0 and retry.attempt == 2
    s.landed(0, 0)
    s.verified(0)
    assert s.done and s.bytes_resent == C


def test_backoff_doubles_and_is_capped():
    assert [POLICY.backoff(k) for k in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 4.0, 4.0]


def test_too_many_failures_is_an_error_naming_the_chunk():
    s = make(n=1, window=1)
    now = 0.0
    for _ in range(3):
        (p,) = s.poll(now)
        s.failed(0, p.generation, now, "wire error")
        now += 10
    assert s.error is not None and "chunk 0 failed 3 times" in s.error and "wire error" in s.error
    assert s.poll(now) == []


def test_expired_reports_in_flight_chunks_past_their_deadline():
    s = make(n=4, window=2)
    s.poll(0.0)
    s.landed(0, 0)
    assert s.expired(5.0) == []
    assert s.expired(10.5) == [(1, 0)]


def test_disconnect_then_resume_sends_only_unverified_chunks():
    s = make(n=6, window=3)
    land_and_verify(s, s.poll(0.0))  # 0,1,2 verified
    s.poll(0.0)  # 3,4,5 in flight
    s.landed(3, 0)
    s.disconnected(1.0)
    assert s.generation == 1 and s.in_flight == 0
    # a late completion from the old connection is ignored
    assert s.landed(4, 0) is False
    s.resume([0, 1, 2, 3])  # the peer verified chunk 3 before the cut
    assert s.poll(1.5) == []  # backoff after a disconnect
    again = s.poll(2.0)
    assert sorted(p.chunk.index for p in again) == [4, 5]
    assert all(p.generation == 1 for p in again)
    land_and_verify(s, again)
    assert s.done
    assert s.bytes_resent == 2 * C  # only chunks 4 and 5 went twice


def test_too_many_reconnects_is_an_error():
    s = make()
    for k in range(3):
        s.disconnected(float(k))
    assert s.error is not None and "reconnects" in s.error


def test_resume_rejects_unknown_chunk_indices():
    s = make(n=2)
    with pytest.raises(TransferError, match="chunk 7"):
        s.resume([7])


def test_ledger_verifies_only_with_bytes_and_checksum():
    ledger = Ledger(ChunkPlan.build(3 * C, C))
    assert ledger.land(0) is False  # checksum not yet known
    assert ledger.expect(0, 42) is True
    assert ledger.check(0, 42) is True
    assert ledger.expect(1, 7) is False
    assert ledger.land(1) is True
    assert ledger.check(1, 8) is False  # corrupt: must land again
    assert ledger.corrupt_count == 1 and not ledger.is_verified(1)
    assert ledger.land(1) is True and ledger.check(1, 7) is True
    assert ledger.verified_indices() == [0, 1] and not ledger.complete
    with pytest.raises(TransferError, match="before its bytes"):
        ledger.check(2, 0)
    with pytest.raises(TransferError, match="outside the plan"):
        ledger.land(3)


def test_ledger_reset_forgets_unverified_landings():
    ledger = Ledger(ChunkPlan.build(2 * C, C))
    ledger.expect(0, 1)
    ledger.land(0)
    ledger.check(0, 1)
    ledger.land(1)
    ledger.reset_unverified()
    assert ledger.expect(1, 5) is False  # the landing before the reset no longer counts
