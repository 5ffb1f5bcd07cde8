"""The verifying side's protocol, driven by plain function calls: events in, actions out."""

import pytest

from fedrdma.core.chunks import ChunkPlan
from fedrdma.core.errors import ProtocolError
from fedrdma.core.receiver import Corrupt, Hash, Lost, Receiver, Status, Verified

C = 128
"""Bytes per chunk in these plans."""


def make(n=4, status_every=2, interval=5.0, timeout=10.0, transfer=1):
    return Receiver(ChunkPlan.build(n * C, C), transfer, now=0.0, peer_timeout=timeout,
                    status_every=status_every, status_interval_s=interval)


def test_a_pushed_chunk_is_hashed_then_verified_and_reported_in_batches():
    r = make()
    assert r.notice(1, 0, 0, 111, now=1.0) == [Hash(0, 0)]
    assert r.hashed(0, 0, 111, now=1.1) == [Verified(0)]  # one verified: below the batch of 2
    assert r.notice(1, 0, 1, 222, now=1.2) == [Hash(1, 0)]
    assert r.hashed(1, 0, 222, now=1.3) == [Verified(1), Status((0, 1))]
    assert r.verified_indices() == [0, 1] and not r.complete


def test_the_last_chunk_sends_the_final_report_with_everything_pending():
    r = make(n=3, status_every=10)
    for i in range(3):
        r.notice(1, 0, i, i, now=1.0)
    assert r.hashed(0, 0, 0, 1.0) == [Verified(0)]
    assert r.hashed(2, 0, 2, 1.0) == [Verified(2)]
    assert r.hashed(1, 0, 1, 1.0) == [Verified(1), Status((0, 2, 1), (), True)]
    assert r.complete


def test_a_corrupt_chunk_is_reported_at_once_and_accepted_when_it_comes_again():
    r = make()
    r.notice(1, 0, 2, 7, now=1.0)
    assert r.hashed(2, 0, 8, now=1.0) == [Corrupt(2), Status((), (2,))]
    assert r.corrupt_count == 1 and not r.is_verified(2)
    assert r.hashed(2, 0, 7, now=1.1) == [], "no hash was asked for since the bytes failed"
    assert r.notice(1, 0, 2, 7, now=2.0) == [Hash(2, 0)]
    assert r.hashed(2, 0, 7, now=2.0) == [Verified(2)]


def test_notices_of_another_transfer_or_an_older_connection_are_void():
    r = make(transfer=5)
    assert r.notice(4, 0, 0, 1, now=1.0) == []
    r.resume(5, 1, now=1.0)
    assert r.notice(5, 0, 0, 1, now=1.0) == []
    assert r.notice(5, 1, 0, 1, now=1.0) == [Hash(0, 1)]


def test_resume_voids_unverified_landings_and_reports_everything_verified():
    r = make(n=4, status_every=10)
    r.notice(1, 0, 0, 10, now=1.0)
    r.hashed(0, 0, 10, now=1.0)
    r.notice(1, 0, 1, 11, now=1.0)  # landed, hash in flight when the cut comes
    assert r.resume(1, 1, now=2.0) == [Status((0,), (), False)]
    assert r.hashed(1, 0, 11, now=2.1) == [], "a hash of the old connection's bytes is void"
    assert not r.is_verified(1)
    assert r.notice(1, 1, 1, 11, now=3.0) == [Hash(1, 1)]
    assert r.resume(1, 1, now=3.0) == [], "a repeated resume changes nothing"
    assert r.resume(2, 2, now=3.0) == [], "a resume of another transfer is not ours"


def test_resume_after_everything_was_verified_completes_the_transfer():
    r = make(n=2, status_every=10)
    r.notice(1, 0, 0, 1, now=0.0)
    r.hashed(0, 0, 1, now=0.0)
    r.notice(1, 0, 1, 2, now=0.0)
    assert r.hashed(1, 0, 2, now=0.0)[-1].complete
    assert r.resume(1, 1, now=1.0) == [Status((0, 1), (), True)]


def test_pull_checksums_and_landings_arrive_in_any_order():
    r = make(n=3, status_every=10)
    assert r.landed(0, now=1.0) == []  # bytes here, checksum not yet
    assert r.expect(0, 5, now=1.0) == [Hash(0, 0)]
    assert r.expect(1, 6, now=1.0) == []  # checksum here, bytes not yet
    assert r.landed(1, now=1.0) == [Hash(1, 0)]
    r.reconnected(1)
    assert r.hashed(1, 0, 6, now=1.0) == []
    assert r.landed(1, now=1.5) == [Hash(1, 1)]


def test_a_silent_peer_is_lost_after_its_timeout_and_every_sign_of_life_restarts_it():
    r = make(timeout=10.0, interval=100.0)
    assert r.tick(9.0) == []
    r.heard(9.0)
    assert r.tick(18.0) == []
    r.notice(1, 0, 0, 1, now=18.0)
    (lost,) = r.tick(28.5)
    assert isinstance(lost, Lost) and "silent for 10 s during transfer 1 (0/4 chunks verified)" in lost.reason
    assert r.tick(40.0) == [], "the peer is given up once"


def test_verified_chunks_are_reported_after_the_interval_even_below_a_batch():
    r = make(status_every=32, interval=5.0)
    r.notice(1, 0, 3, 9, now=1.0)
    assert r.hashed(3, 0, 9, now=1.0) == [Verified(3)]
    assert r.tick(4.0) == []
    assert r.tick(6.0) == [Status((3,))]
    assert r.tick(10.5) == [], "the last report is recent"


def test_an_empty_report_goes_out_after_the_interval_so_a_waiting_holder_knows_we_live():
    r = make(interval=5.0, timeout=100.0)
    assert r.tick(4.0) == []
    assert r.tick(5.0) == [Status(())]
    assert r.tick(9.0) == []
    assert r.tick(10.0) == [Status(())]


def test_a_chunk_outside_the_plan_is_a_protocol_error():
    r = make(n=2)
    with pytest.raises(ProtocolError, match="chunk 9, outside the plan of 2 chunks"):
        r.notice(1, 0, 9, 1, now=0.0)
    with pytest.raises(ProtocolError, match="chunk -1"):
        r.expect(-1, 1, now=0.0)


def test_a_sealed_chunk_brings_its_verdict_and_a_failed_tag_is_corrupt():
    r = make(n=2, status_every=10)
    assert r.checked(1, 0, 0, True, now=1.0) == [Verified(0)]
    assert r.checked(1, 0, 1, False, now=1.0) == [Corrupt(1), Status((0,), (1,))]
    assert r.checked(1, 0, 0, True, now=1.0) == [], "a chunk verified once stays verified"
    assert r.checked(1, 5, 1, True, now=1.0) == [], "another generation's landing is void"
    assert r.checked(1, 0, 1, True, now=2.0) == [Verified(1), Status((1,), (), True)]


def test_without_verification_a_landed_chunk_is_verified_at_once_and_generations_still_hold():
    r = Receiver(ChunkPlan.build(3 * C, C), 1, now=0.0, status_every=10, verify=False)
    assert r.notice(1, 0, 0, 0, now=1.0) == [Verified(0)], "no Hash: the fabric's CRC is trusted"
    assert r.notice(1, 0, 0, 0, now=1.0) == [], "a chunk counts once"
    r.resume(1, 1, now=2.0)
    assert r.notice(1, 0, 1, 0, now=2.0) == [], "a landing of the old connection is void all the same"
    assert r.notice(1, 1, 1, 0, now=2.0) == [Verified(1)]
    assert r.notice(1, 1, 2, 0, now=2.0) == [Verified(2), Status((1, 2), (), True)]
    pulled = Receiver(ChunkPlan.build(2 * C, C), 1, now=0.0, verify=False)
    assert pulled.expect(0, 5, now=1.0) == [], "a checksum alone is no landing"
    assert pulled.landed(1, now=1.0) == [Verified(1)], "a READ's bytes count without their checksum"
