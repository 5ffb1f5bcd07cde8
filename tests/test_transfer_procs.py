"""Real processes, real sockets, real NIXL: each mode and each fault, end to end."""

from __future__ import annotations

import time

import pytest

from fedrdma.bench.procs import peer_env, start_pair
from fedrdma.bench.states import make_state, synthetic_layout
from fedrdma.core.chunks import state_digest
from fedrdma.core.modes import Mode
from tests.conftest import run_pair

MODES = [mode.value for mode in Mode]
TLS = {"tcp": "tcp", "shared-memory": "tcp,sm"}  # UCX needs tcp beside sm for wire-up; data goes by cma


def zeros_digest(size: int) -> str:
    return state_digest(make_state(synthetic_layout(size), None).memoryview())


def sender_digest(size: int) -> str:
    return state_digest(make_state(synthetic_layout(size), 1234).memoryview())


@pytest.mark.parametrize("tls", TLS.values(), ids=TLS.keys())
@pytest.mark.parametrize("mode", MODES)
def test_mode_moves_identical_bytes_twice_through_the_same_pools(mode, tls):
    size = 6 << 20
    res = run_pair(mode, size=size, chunk=1 << 20, transfers=2, tls=tls, common_extra=("--window", "4"))
    assert (res.sender_rc, res.receiver_rc) == (0, 0), res.receiver.stderr() + res.sender.stderr()
    expected = sender_digest(size)
    assert expected != zeros_digest(size)
    received = res.transfers("receiver")
    assert len(received) == 2
    assert [t["digest"] for t in received] == [expected, expected]
    if mode.startswith("rdma-e"):
        # one pool per side, registered once, still registered for the second transfer
        assert [t["registered_pools"] for t in received] == [1, 1]
        closed = res.receiver.of("closed")[0]
        assert closed["registered_pools"] == 0


def test_different_layouts_are_refused_before_any_byte_moves():
    size = 4 << 20
    res = run_pair("rdma-e", size=size, receiver_extra=("--layout-skew", "4096"))
    assert res.sender_rc == 1 and res.receiver_rc == 1
    s_err, r_err = res.error("sender"), res.error("receiver")
    sender_id = synthetic_layout(size).layout_id
    receiver_id = synthetic_layout(size + 4096).layout_id
    for err in (s_err, r_err):
        assert err["type"] == "LayoutError"
        assert sender_id in err["message"] and receiver_id in err["message"]
    assert r_err["digest"] == zeros_digest(size + 4096)
    assert r_err["registered_pools"] == 0 and s_err["registered_pools"] == 0


def test_a_pool_smaller_than_the_state_is_refused_and_nothing_is_written():
    size = 4 << 20
    res = run_pair("rdma-e", size=size, receiver_extra=("--advertise-bytes", str(size - 4096)))
    assert res.sender_rc == 1
    err = res.error("sender")
    assert err["type"] == "RangeError" and "outside the advertised pool" in err["message"]
    assert res.transfers("receiver") == [] and res.receiver_rc == 1
    lost = res.error("receiver")  # the sender refused before a byte moved; the receiver saw it go
    assert lost["type"] == "PeerLost", lost
    assert lost["digest"] == zeros_digest(size), "nothing was written into the receiver's pool"


@pytest.mark.parametrize("mode", ["rdma-e", "rdma-e-pull", "rdma"])
def test_corrupted_chunks_are_detected_and_fetched_again(mode):
    size, chunk = 8 << 20, 1 << 20
    res = run_pair(mode, size=size, chunk=chunk, receiver_extra=("--corrupt-once", "2,5"))
    assert (res.sender_rc, res.receiver_rc) == (0, 0), res.receiver.stderr()
    (received,) = res.transfers("receiver")
    assert received["digest"] == sender_digest(size)
    assert received["corrupt"] == 2
    initiator = res.transfers("receiver" if mode == "rdma-e-pull" else "sender")[0]
    assert initiator["bytes_posted"] == size + 2 * chunk


@pytest.mark.parametrize("mode,side", [("rdma-e", "sender"), ("rdma-e-pull", "receiver")])
def test_a_cut_endpoint_resumes_from_unverified_chunks(mode, side):
    size, chunk = 32 << 20, 1 << 20
    extra = ("--cut-after", "8")
    res = run_pair(
        mode, size=size, chunk=chunk,
        sender_extra=extra if side == "sender" else (),
        receiver_extra=extra if side == "receiver" else (),
        common_extra=("--window", "4"),
    )
    assert (res.sender_rc, res.receiver_rc) == (0, 0), (
        f"{res.sender.events}\n{res.receiver.events}\n{res.sender.stderr()}{res.receiver.stderr()}"
    )
    (received,) = res.transfers("receiver")
    assert received["digest"] == sender_digest(size)
    (initiator,) = res.transfers(side)
    assert initiator["reconnects"] >= 1
    resent = initiator["bytes_posted"] - size
    assert 0 < resent < size  # something went twice, far less than the whole state


@pytest.mark.parametrize("mode", ["rdma-e", "rdma-e-pull"])
@pytest.mark.parametrize("victim", ["sender", "receiver"])
def test_a_killed_peer_is_a_clear_error_within_a_bounded_time(mode, victim):
    common = ["--size-bytes", str(64 << 20), "--transfers", "100000", "--peer-timeout", "10", "--trusted-fabric"]
    sender, receiver = start_pair(mode, common, env=peer_env("tcp"))
    procs = {"sender": sender, "receiver": receiver}
    survivor = procs["receiver" if victim == "sender" else "sender"]
    try:
        while not procs[victim].of("transfer"):
            assert procs[victim].next_event(60) is not None, procs[victim].stderr()
        procs[victim].kill()
        killed_at = time.monotonic()
        rc = survivor.finish(60)
        waited = time.monotonic() - killed_at
    finally:
        sender.kill()
        receiver.kill()
    assert rc == 1
    err = survivor.of("error")[0]
    assert err["type"] in ("PeerLost", "TransferError"), err
    assert waited < 30, f"took {waited:.1f} s to notice the dead peer"
    assert err["registered_pools"] == 0


def test_interleaved_modes_take_turns_and_pool_every_turns_transfer():
    """Interleaved, each repetition is a fresh pair per mode, modes in turn; the figures
    are medians over all of a mode's turns, every one of them byte-identical."""
    from fedrdma.bench import transfer

    size = 2 << 20
    order: list[str] = []
    counted: list[None] = []
    result = transfer.run(["--size-bytes", str(size)], size, ["grpc", "rdma-e"], chunk_size=1 << 20, window=2,
                          repeat=2, on_mode=order.append, on_transfer=lambda: counted.append(None),
                          references=False, interleave=True)
    assert order == ["grpc", "rdma-e", "grpc", "rdma-e"]
    assert len(counted) == 2 * 2 * (1 + transfer.WARMUP)
    assert result.interleaved is True and result.repeat == 2
    for mode in ("grpc", "rdma-e"):
        row = result.modes[mode]
        assert row.repeat == 2, mode
        assert row.identical, mode
        assert row.seconds_min <= row.seconds
    assert result.modes["rdma-e"].vs_grpc > 0 and result.modes["grpc"].goodput_wire_gb_s > 0


def test_a_later_pair_extends_a_modes_figures():
    from fedrdma.bench.transfer import ModeResult

    first = ModeResult("rdma-e", [1.0], [0.5], [10], [20], True, {"wire_seconds": [0.9]}, [])
    later = ModeResult("rdma-e", [3.0], [0.7], [30], [5], False, {"wire_seconds": [2.9], "waits": [1.0]}, [7])
    both = first.extend(later)
    assert both.seconds == [1.0, 3.0] and both.cpu_seconds == [0.5, 0.7]
    assert both.receiver_extra_rss == [10, 30] and both.sender_extra_rss == [20, 5]
    assert both.identical is False, "one pair that moved different bytes spoils the mode"
    assert both.extra == {"wire_seconds": [0.9, 2.9], "waits": [1.0]}
    assert both.bytes_posted == [7]
    summary = both.summary(4)
    assert summary.seconds == 2.0 and summary.wire_seconds == 1.9
    assert summary.model_dump()["waits"] == 1.0, "a mover's own timing is kept as it came"


def test_a_hung_peer_is_reported_with_where_its_threads_were():
    from fedrdma.bench.procs import PeerProcess

    waiting = PeerProcess(["--role", "receiver", "--mode", "rdma-e", "--listen", "127.0.0.1:0",
                           "--size-bytes", str(1 << 20), "--chunk-size", str(1 << 20)], env=peer_env("tcp"))
    try:
        waiting.wait_ready()
        with pytest.raises(TimeoutError) as caught:
            waiting.next_event(2.0)  # nobody connects: it waits in accept
    finally:
        waiting.kill()
    text = str(caught.value)
    assert "printed nothing for 2 s" in text and "--role receiver --mode rdma-e" in text
    assert "Thread 0x" in text and "in accept" in text, text[-2000:]


def test_a_failing_peers_error_reaches_the_benchmark_with_both_sides_output():
    from fedrdma.bench.transfer import run_pair_events, transfer_env
    from fedrdma.core.errors import RunError

    started = time.monotonic()
    with pytest.raises(RunError) as caught:
        run_pair_events("rdma-e", ["--size-bytes", str(1 << 20), "--chunk-size", "12345"], 1, transfer_env())
    text = str(caught.value)
    assert "rdma-e" in text and "failed: PlanError: chunk size 12345 is not a multiple of 8 bytes" in text
    assert "--- sender's stderr:" in text and "--- receiver's stderr:" in text
    assert time.monotonic() - started < 60, "a failure is reported as it happens, not after a timeout"


@pytest.mark.parametrize("mode", ["rdma-e", "rdma-e-pull"])
def test_pool_modes_are_read_against_a_raw_operation_by_the_same_pair_right_after_each_transfer(mode):
    from fedrdma.bench import transfer

    size = 8 << 20
    res = transfer.run_mode(mode, ["--size-bytes", str(size)], 1 << 20, 4, 3, transfer.transfer_env())
    assert res.identical and len(res.seconds) == 3
    assert len(res.paired) == 3 and all(0 < r < 50 for r in res.paired), res.paired
    assert res.summary(size).vs_raw_same_pair == sorted(res.paired)[1]
    grpc = transfer.run_mode("grpc", ["--size-bytes", str(size)], 1 << 20, 4, 1, transfer.transfer_env())
    assert grpc.paired == [] and grpc.summary(size).vs_raw_same_pair is None
