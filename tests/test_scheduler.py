import pytest

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import TransferError
from fedrdma.core.scheduler import ChunkStatus, RetryPolicy, Scheduler

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


def test_room_caps_posts_at_the_free_landing_places_and_retries_come_first():
    s = make(n=6, window=4)
    assert [p.chunk.index for p in s.poll(0.0, room=2)] == [0, 1]
    assert s.poll(0.0, room=0) == [], "no free slot: nothing is posted, whatever the window"
    s.landed(0, 0)
    s.landed(1, 0)
    s.corrupt(0, now=0.0)  # its slot came back; the chunk retries after a 1 s backoff
    assert [p.chunk.index for p in s.poll(0.5, room=1)] == [2]
    assert [p.chunk.index for p in s.poll(1.0, room=5)] == [0, 3, 4], "room beyond the window changes nothing"
    assert s.in_flight == 4 and s.poll(1.0, room=-1) == []


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


def test_a_failed_operation_breaks_the_endpoint_and_nothing_is_posted_until_reconnected():
    s = make(n=4, window=2)
    p0, p1 = s.poll(0.0)
    s.failed(0, p0.generation, 1.0, "wire error")
    assert s.broken == "chunk 0: wire error"
    assert s.status(0) is ChunkStatus.PENDING and s.in_flight == 1
    assert s.poll(100.0) == []  # a broken endpoint gets no new posts, however long we wait
    s.failed(1, p1.generation, 1.0, "wire error too")
    assert s.broken == "chunk 0: wire error", "the first failure names the break"
    s.disconnected(2.0, s.broken)
    assert s.broken is None and s.generation == 1
    assert s.poll(2.5) == []  # backoff after a reconnect
    again = s.poll(3.0)
    assert [p.chunk.index for p in again] == [0, 1] and all(p.generation == 1 for p in again)


def test_an_endpoint_that_keeps_failing_is_an_error_after_the_reconnect_limit():
    s = make(n=1, window=1)
    now = 0.0
    for _ in range(POLICY.max_reconnects + 1):
        (p,) = s.poll(now)
        s.failed(0, p.generation, now, "wire error")
        s.disconnected(now, s.broken or "")
        now += 10
    assert s.error is not None and "gave up after 2 reconnects" in s.error and "chunk 0: wire error" in s.error
    assert s.poll(now) == []


def test_a_chunk_corrupt_too_often_is_an_error_naming_the_chunk():
    s = make(n=1, window=1)
    now = 0.0
    for _ in range(POLICY.max_attempts):
        (p,) = s.poll(now)
        assert s.landed(0, p.generation)
        s.corrupt(0, now)
        now += 10
    assert s.error is not None and "chunk 0 failed 3 times" in s.error and "checksum mismatch" in s.error
    assert s.broken is None, "bad bytes are the chunk's problem, not the endpoint's"
    assert s.poll(now) == []


def test_a_completion_of_a_broken_generation_is_ignored():
    s = make(n=2, window=2)
    p0, p1 = s.poll(0.0)
    s.failed(0, p0.generation, 0.0, "wire error")
    s.disconnected(0.0, "wire error")
    assert s.landed(1, p1.generation) is False
    s.failed(1, p1.generation, 0.0, "late error of the old endpoint")
    assert s.broken is None


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


def test_a_corrupt_verdict_that_overtakes_the_completion_requeues_the_chunk():
    s = make(n=1, window=1)
    (p,) = s.poll(0.0)
    s.corrupt(0, now=0.0)
    assert s.status(0) is ChunkStatus.PENDING and s.in_flight == 0
    assert s.landed(0, p.generation) is False, "the late completion of the corrupt attempt is ignored"
    (again,) = s.poll(1.0)
    assert again.attempt == 2


def test_an_endpoint_lost_with_nothing_in_flight_still_breaks_the_transfer_until_reconnected():
    s = make(n=2, window=2)
    p0, p1 = s.poll(0.0)
    assert s.landed(0, p0.generation) and s.landed(1, p1.generation)  # sent, not yet verified
    s.endpoint_lost("the peer closed the connection")
    assert s.broken == "the peer closed the connection" and s.poll(1.0) == []
    s.disconnected(1.0, s.broken)
    assert sorted(p.chunk.index for p in s.poll(10.0)) == [0, 1], "unverified chunks go again"
    s.verified(0)
    s.verified(1)
    s.endpoint_lost("too late to matter")
    assert s.broken is None, "a finished transfer has no endpoint to rebuild"


def test_a_verdict_that_overtakes_the_completion_counts_and_the_late_completion_is_ignored():
    s = make(n=1, window=1)
    (p,) = s.poll(0.0)
    s.verified(0)  # the receiver checked the bytes before this side saw its own operation finish
    assert s.done and s.in_flight == 0
    assert s.landed(0, p.generation) is False


def test_a_verdict_naming_a_chunk_outside_the_plan_is_an_error():
    s = make(n=2)
    with pytest.raises(TransferError, match="chunk 5 verified, but the plan has 2"):
        s.verified(5)
