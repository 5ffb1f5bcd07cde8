"""The RoCE go-back-N model, the TCP buffer check, the tuner and their CLI.

Closed forms are computed by hand here from the model's stated assumptions (see the
docstring of fedrdma.sim.roce), so a change of semantics fails a test instead of
silently moving every number.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrdma.cli import app
from fedrdma.core.sizes import chunk_label
from fedrdma.sim import chunked, roce
from fedrdma.sim.roce import Link, Nic
from fedrdma.sim.tcp_buffers import bdp_bytes, check_buffers, read_tcp_limits
from fedrdma.sim.tune import recommend

GBIT = 1e9
RTT = 0.02
MTU = 4096
TAU = MTU * 8 / GBIT  # one full packet at 1 Gbit/s, no headers
NIC = Nic(retry_cnt=7, local_ack_timeout=14)
RTO = 4.096e-6 * 2**14


def clean(loss: float = 0.0, ack_loss: float | None = 0.0, rate: float = GBIT, rtt: float = RTT) -> Link:
    """A link without header overhead, so times are payload/rate exactly."""
    return Link(rate, rtt, loss, ack_loss=ack_loss, header_bytes=0)


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("size", [1 << 20, 16 << 20, 1_000_003])
def test_no_loss_time_is_size_over_rate_plus_one_rtt(size: int) -> None:
    m = roce.message(size, clean(), NIC)
    assert m.expected_time_s == pytest.approx(size * 8 / GBIT + RTT, rel=1e-12)
    assert m.goodput_bps == pytest.approx(size * 8 / m.expected_time_s)
    assert m.p_fail == 0.0
    assert roce.replay(size, clean(), NIC).time_s == pytest.approx(m.expected_time_s, rel=1e-12)


def test_no_loss_time_counts_header_bytes() -> None:
    link = Link(GBIT, RTT, 0.0, ack_loss=0.0, header_bytes=62)
    n = 256
    assert roce.message(n * MTU, link, NIC).expected_time_s == pytest.approx(n * (MTU + 62) * 8 / GBIT + RTT)


def test_single_loss_mid_message_costs_one_nak_round_trip() -> None:
    n, k = 4096, 100
    trace = roce.replay(n * MTU, clean(), NIC, data_losses={(k, 0)})
    # packet k+1 arrives out of order at (k+2) tau + RTT/2; the NAK is back RTT/2 later;
    # the sender resends k..n-1 and the last ACK takes one more RTT
    assert trace.time_s == pytest.approx((k + 2) * TAU + RTT + (n - k) * TAU + RTT, rel=1e-12)
    # first pass: the sender streamed until the NAK arrived, RTT/TAU = 610.35 packets after k+1
    assert trace.wire_packets == (k + 2 + math.ceil(RTT / TAU)) + (n - k)
    assert (trace.passes, trace.failed) == (2, False)


def test_single_loss_of_last_packet_costs_a_timeout() -> None:
    n = 256
    trace = roce.replay(n * MTU, clean(), NIC, data_losses={(n - 1, 0)})
    assert trace.time_s == pytest.approx(n * TAU + RTO + TAU + RTT, rel=1e-12)
    assert trace.wire_packets == n + 1


def test_lost_nak_falls_back_to_the_timeout() -> None:
    n, k = 256, 10
    trace = roce.replay(n * MTU, clean(), NIC, data_losses={(k, 0)}, nak_losses={0})
    assert trace.time_s == pytest.approx(n * TAU + RTO + (n - k) * TAU + RTT, rel=1e-12)


def test_lost_final_ack_resends_only_the_last_packet() -> None:
    n = 256
    trace = roce.replay(n * MTU, clean(), NIC, ack_losses={0})
    assert trace.time_s == pytest.approx(n * TAU + RTO + TAU + RTT, rel=1e-12)
    assert trace.wire_packets == n + 1


@pytest.mark.parametrize("retry_cnt", [0, 3, 7])
def test_retry_limit_counts_consecutive_losses_of_one_packet(retry_cnt: int) -> None:
    nic = Nic(retry_cnt=retry_cnt, local_ack_timeout=14)
    survive = roce.replay(MTU, clean(), nic, data_losses={(0, i) for i in range(retry_cnt)})
    assert not survive.failed
    assert survive.time_s == pytest.approx(retry_cnt * (TAU + RTO) + TAU + RTT, rel=1e-12)
    assert roce.replay(MTU, clean(), nic, data_losses={(0, i) for i in range(retry_cnt + 1)}).failed


def test_progress_resets_the_retry_counter() -> None:
    nic = Nic(retry_cnt=1, local_ack_timeout=14)
    # packet 3 lost once (retry 1 for PSN 3), then on the resend packet 5 lost once: the restart
    # moved on to PSN 5, so its counter starts again at 1 and retry_cnt 1 is not exceeded
    ok = roce.replay(8 * MTU, clean(), nic, data_losses={(3, 0), (5, 1)})
    assert not ok.failed
    assert roce.replay(8 * MTU, clean(), nic, data_losses={(3, 0), (3, 1)}).failed


@pytest.mark.parametrize(("p", "r"), [(0.1, 7), (0.3, 2), (0.5, 0), (0.01, 7)])
def test_single_packet_failure_is_p_to_the_retries_plus_one(p: float, r: int) -> None:
    nic = Nic(retry_cnt=r, local_ack_timeout=14)
    assert roce.per_packet_failure(p, r) == pytest.approx(p ** (r + 1))
    assert roce.message(MTU, clean(p), nic).p_fail == pytest.approx(p ** (r + 1), rel=1e-9)


def test_message_failure_formula_with_ack_loss() -> None:
    p, pa, r, n = 0.2, 0.1, 2, 50
    nic = Nic(retry_cnt=r, local_ack_timeout=14)
    want = 1 - (1 - p**3) ** (n - 1) * (1 - (1 - (1 - p) * (1 - pa)) ** 3)
    assert roce.message(n * MTU, clean(p, pa), nic).p_fail == pytest.approx(want, rel=1e-12)


def test_failure_rises_with_size_and_loss() -> None:
    nic = Nic(retry_cnt=3, local_ack_timeout=14)
    by_size = [roce.message(s, clean(0.1), nic).p_fail for s in (1 << 16, 1 << 20, 1 << 24)]
    by_loss = [roce.message(1 << 20, clean(p), nic).p_fail for p in (0.01, 0.05, 0.1)]
    assert by_size == sorted(by_size) and by_size[0] < by_size[-1] / 100
    assert by_loss == sorted(by_loss) and by_loss[0] < by_loss[-1] / 100


def test_timeout_below_rtt_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="local_ack_timeout to at least 14"):
        roce.message(1 << 20, clean(), Nic(local_ack_timeout=10))
    with pytest.raises(ValueError, match="retry_cnt 8"):
        Nic(retry_cnt=8)
    assert Nic.for_rtt(0.2).timeout_s >= 2 * 0.2  # raised from the default for a long path
    with pytest.raises(ValueError, match="loss"):
        Link(GBIT, RTT, 1.0)


# ---------------------------------------------------------------- Monte Carlo vs analytical


@pytest.mark.parametrize(("size", "p", "rtt"), [(1 << 20, 0.01, 0.02), (16 << 20, 0.001, 0.02),
                                                 (4 << 20, 0.05, 0.001), (333_333, 0.02, 0.08)])
def test_monte_carlo_agrees_with_the_expectation(size: int, p: float, rtt: float) -> None:
    link = Link(GBIT, rtt, p)  # reverse loss = forward loss, headers on
    nic = Nic.for_rtt(rtt)
    want = roce.message(size, link, nic)
    mc = roce.simulate_message(size, link, nic, trials=3000, rng=7)
    assert mc.mean_time_s == pytest.approx(want.expected_time_s, rel=0.03)
    assert mc.wire_packets.mean() == pytest.approx(want.expected_wire_packets, rel=0.03)
    assert mc.p_fail == 0.0


def test_monte_carlo_failure_rate_matches_formula() -> None:
    nic = Nic(retry_cnt=1, local_ack_timeout=14)
    link = clean(0.3, 0.0)
    want = roce.message(4 * MTU, link, nic).p_fail  # 1 - (1 - 0.09)^4 = 0.3143
    assert want == pytest.approx(1 - 0.91**4)
    mc = roce.simulate_message(4 * MTU, link, nic, trials=20000, rng=3)
    assert mc.p_fail == pytest.approx(want, abs=4 * math.sqrt(want * (1 - want) / 20000))


def test_monte_carlo_is_seeded() -> None:
    link = Link(GBIT, RTT, 0.01)
    a = roce.simulate_message(1 << 20, link, NIC, trials=200, rng=5).times_s
    b = roce.simulate_message(1 << 20, link, NIC, trials=200, rng=5).times_s
    assert (a == b).all()


# ---------------------------------------------------------------- chunked transfers


def test_chunked_no_loss_window_and_link_bounds() -> None:
    link = clean()
    chunk = 1 << 20
    c = chunk * 8 / GBIT  # 8.4 ms per chunk at line rate, below the 20 ms RTT
    # window 2 cannot cover c + RTT: each lane waits for its ACKs; 16 chunks, 8 per lane
    t = chunked.transfer(16 * chunk, chunk, 2, link, NIC)
    assert t.expected_time_s == pytest.approx(8 * (c + RTT), rel=1e-9)
    # window 8 covers it: the link bound rules, all chunks back to back plus the last ACK
    t = chunked.transfer(16 * chunk, chunk, 8, link, NIC)
    assert t.expected_time_s == pytest.approx(16 * c + RTT, rel=1e-9)
    # unchunked is one message
    assert chunked.transfer(16 * chunk, None, 4, link, NIC).expected_time_s == pytest.approx(16 * c + RTT)


def test_chunked_short_last_chunk() -> None:
    link = clean()
    chunk = 1 << 20
    size = 3 * chunk + chunk // 2
    t = chunked.transfer(size, chunk, 1, link, NIC)  # window 1: chunks one after another
    assert t.chunks == 4
    assert t.expected_time_s == pytest.approx(size * 8 / GBIT + 4 * RTT, rel=1e-9)


def test_chunked_monte_carlo_agrees_with_the_expectation() -> None:
    link = Link(GBIT, RTT, 0.01)
    want = chunked.transfer(32 << 20, 1 << 20, 8, link, NIC)
    mc = chunked.simulate_transfer(32 << 20, 1 << 20, 8, link, NIC, trials=150, rng=11)
    # the expectation is max of expected bounds, the samples the mean of per-trial maxima
    assert mc.mean_time_s >= want.expected_time_s * 0.99
    assert mc.mean_time_s == pytest.approx(want.expected_time_s, rel=0.06)


def test_more_loss_means_lower_goodput_and_higher_failure() -> None:
    nic = Nic(retry_cnt=3, local_ack_timeout=14)
    results = [chunked.transfer(64 << 20, 1 << 20, 8, Link(GBIT, RTT, p), nic) for p in (0.0, 0.001, 0.01, 0.05)]
    goodputs = [r.goodput_bps for r in results]
    fails = [r.p_qp_error for r in results]
    assert goodputs == sorted(goodputs, reverse=True) and goodputs[-1] < 0.5 * goodputs[0]
    assert fails == sorted(fails) and fails[0] == 0.0 and fails[-1] > 0


def test_chunking_reduces_failure_and_go_back_n_cost_on_a_lossy_link() -> None:
    link = Link(GBIT, RTT, 0.2)
    nic = Nic(retry_cnt=7, local_ack_timeout=14)
    whole = chunked.transfer(64 << 20, None, 1, link, nic)
    in_chunks = chunked.transfer(64 << 20, 1 << 20, 8, link, nic)
    assert whole.p_fail > 1e-8  # ~ (16384 x 0.2^8)^5
    assert in_chunks.p_fail < whole.p_fail / 1e6  # a QP error costs one chunk, retried
    assert in_chunks.goodput_bps > 2 * whole.goodput_bps


def test_link_enable_picks_unchunked_when_clean_and_small_chunks_when_lossy() -> None:
    size = 64 << 20
    assert chunked.link_enable(size, Link(GBIT, RTT, 0.0)).chunk_bytes is None
    lossy = chunked.link_enable(size, Link(GBIT, RTT, 0.01))
    assert lossy is not None and lossy.chunk_bytes is not None and lossy.chunk_bytes <= 4 << 20
    rows = chunked.chunk_table(size, Link(GBIT, RTT, 0.01))
    assert [r.chunk_bytes for r in rows] == [*roce.CHUNK_GRID[:-1], None]  # a 64 MiB chunk is unchunked
    assert lossy.result.goodput_bps == max(r.result.goodput_bps for r in rows if r.usable)


def test_link_enable_refuses_paths_nothing_makes_usable() -> None:
    # 40 % loss with one retry: even one 256 KiB chunk errors out almost surely
    assert chunked.link_enable(4 << 20, Link(GBIT, RTT, 0.4), Nic(retry_cnt=1)) is None


# ---------------------------------------------------------------- TCP buffers


def fake_proc(root: Path, rmem: str, wmem: str, rmem_max: str, wmem_max: str) -> Path:
    for rel, text in (("sys/net/ipv4/tcp_rmem", rmem), ("sys/net/ipv4/tcp_wmem", wmem),
                      ("sys/net/core/rmem_max", rmem_max), ("sys/net/core/wmem_max", wmem_max)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return root


def test_bdp() -> None:
    assert bdp_bytes(GBIT, RTT) == 2_500_000
    assert bdp_bytes(100e6, 0.08) == 1_000_000


def test_buffer_check_names_the_sysctls_to_raise(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "4096\t131072\t6291456", "4096 16384 4194304", "212992", "67108864")
    limits = read_tcp_limits(proc)
    assert limits.tcp_rmem == (4096, 131072, 6291456)
    found = {f.sysctl: f for f in check_buffers(limits, GBIT, RTT)}  # needs 2 x 2.5 MB = 5 MB
    assert set(found) == {"net.ipv4.tcp_wmem", "net.core.rmem_max"}
    assert found["net.ipv4.tcp_wmem"].command == 'sysctl -w net.ipv4.tcp_wmem="4096 16384 8388608"'
    assert found["net.core.rmem_max"].command == "sysctl -w net.core.rmem_max=8388608"
    assert found["net.core.rmem_max"].required == 5_000_000
    assert check_buffers(limits, 100e6, 0.001) == []  # 25 kB needed: all fine


def test_buffer_reader_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="net.ipv4.tcp_rmem"):
        read_tcp_limits(tmp_path)
    fake_proc(tmp_path, "4096 131072", "1 2 3", "4", "5")
    with pytest.raises(ValueError, match="three numbers"):
        read_tcp_limits(tmp_path)


# ---------------------------------------------------------------- recommendation

STATE = 64 << 20


def test_recommendation_covers_the_bdp_on_a_1gbit_20ms_path() -> None:
    rec = recommend(GBIT, RTT, 0.01, state_bytes=STATE)
    assert rec.window * rec.chunk_size >= bdp_bytes(GBIT, RTT)
    assert rec.chunk_size % 8 == 0 and 1 <= rec.window <= 64
    assert rec.config() == {"chunk_size": rec.chunk_size, "window": rec.window}
    assert 0.5 < rec.goodput_fraction < 1.0
    assert any("window" in r for r in rec.reasons)


def test_lossier_path_gets_a_smaller_or_equal_chunk() -> None:
    chunks = [recommend(GBIT, RTT, p, state_bytes=STATE).chunk_size for p in (0.0, 0.001, 0.01)]
    assert chunks == sorted(chunks, reverse=True)
    assert chunks[0] == STATE  # clean: unchunked ties the best, fewest operations win
    assert chunks[-1] < STATE


def test_clean_path_goodput_near_line() -> None:
    rec = recommend(GBIT, RTT, 0.0, state_bytes=STATE)
    payload_s = STATE * 8 / GBIT
    # one WRITE: payload plus 62 header bytes per 4096, then one RTT for the last ACK
    assert rec.goodput_fraction == pytest.approx(payload_s / (payload_s * 4158 / 4096 + RTT), rel=1e-9)


# ---------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_tune_prints_and_writes_the_recommendation(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", "4096 131072 6291456", "4096 16384 4194304", "212992", "212992")
    out = tmp_path / "tune.json"
    result = runner.invoke(app, ["tune", "--rate", "1gbit", "--rtt", "20ms", "--loss", "0.01", "--size-mb", "64",
                                 "--json", str(out), "--proc-root", str(proc)])
    assert result.exit_code == 0, result.output
    rec = recommend(GBIT, RTT, 0.01, state_bytes=STATE)
    assert str(rec.chunk_size) in result.output
    assert f"window            │ {rec.window} " in result.output
    assert 'sysctl -w net.ipv4.tcp_wmem="4096 16384 8388608"' in result.output
    data = json.loads(out.read_text())
    assert data["config"] == {"chunk_size": rec.chunk_size, "window": rec.window}
    assert data["tcp_buffers"]["checked"] is True
    assert {f["sysctl"] for f in data["tcp_buffers"]["findings"]} == {
        "net.ipv4.tcp_wmem", "net.core.rmem_max", "net.core.wmem_max"}


def test_cli_tune_bad_input_errors_clearly() -> None:
    bad = runner.invoke(app, ["tune", "--rate", "1gbot", "--rtt", "20ms"])
    assert bad.exit_code == 2
    assert "1gbot" in bad.output and "--rate" in bad.output
    no_path = runner.invoke(app, ["tune", "--loss", "0.01"])
    assert no_path.exit_code == 2 and "--rtt" in no_path.output
    loss = runner.invoke(app, ["tune", "--rate", "1gbit", "--rtt", "20ms", "--loss", "2"])
    assert loss.exit_code == 2 and "--loss" in loss.output
    unlimited = runner.invoke(app, ["tune", "--rate", "unlimited", "--rtt", "20ms"])
    assert unlimited.exit_code == 2 and "finite" in unlimited.output


def test_cli_sim_table_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "sim.png"
    result = runner.invoke(app, ["sim", "--rates", "1gbit", "--rtts", "20ms", "--losses", "0,0.01",
                                 "--size-mb", "64", "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 10_000
    lines = [ln for ln in result.output.splitlines() if "1gbit" in ln and "20ms" in ln]
    assert len(lines) == 2
    assert lines[0].count("*") == 1 and "whole" in lines[0]
    best = recommend(GBIT, RTT, 0.01, state_bytes=STATE)
    assert chunk_label(best.chunk_size) in lines[1] and lines[1].count("*") == 1
