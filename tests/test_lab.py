"""The WAN lab: parsing (pure), and real namespaces checked by measurement (root only).

Lab tests use their own lab name so a developer's `frl` lab is left alone; every test
that makes a lab checks afterwards that nothing of it remains.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from fedrdma.cli import app
from fedrdma.lab import Lab, LabConfig, LabError, PathShape, delay, netns, probe, shaping
from fedrdma.lab.lab import _ceiling_key, _check_ceiling
from fedrdma.lab.netns import PathLinks
from fedrdma.lab.state import LabState, load_ceiling, store_ceiling
from fedrdma.lab.units import format_rate, parse_duration, parse_loss, parse_rate
from fedrdma.testing.lab import failing_at
from tests.conftest import LAB_GROUP

pytestmark = LAB_GROUP

TEST_LAB = "frlt"
"""Not the default `frl`, so a lab someone is using on this host is never touched."""

RTT_TOLERANCE = 0.10
"""The issue's bar: measured RTT within 10 % of the setting."""

RATE_TOLERANCE = 0.10
"""The issue's bar: a shaped rate within 10 % of the line."""

LOSS_SIGMAS = 5.0
"""Observed loss is binomial; 5 sigma keeps a correct lab from ever failing by chance."""

PROBE_S = 2.0
"""Counted seconds per TCP transfer: enough for a stable rate, keeps the file well under 4 minutes."""

PROBE_TRIES = 5
"""Transfers a shaped rate gets to reach its line. On a shared 2-core host the delay element
is a userspace process, and other tenants' load only ever lowers what a transfer sees (CI
measured a 1 Gbit/s line at 790 Mbit/s once, and a 200 Mbit/s one at 137-179 Mbit/s in five
runs' means): the best one-second interval of a few transfers is the shaper's rate, while
every transfer's mean is held to the ceiling, so a shaper that lets too much through still fails."""


# --- pure: parsing and validation ------------------------------------------------------------

@pytest.mark.parametrize("text,bps", [
    ("1gbit", 10**9), ("500mbit", 5 * 10**8), ("100mbit", 10**8), ("1.5gbit", 15 * 10**8),
    ("2Gbit", 2 * 10**9), ("10 mbit", 10**7), ("1gbit/s", 10**9), (250_000_000, 250_000_000),
])
def test_parse_rate(text: str | int, bps: int) -> None:
    assert parse_rate(text) == bps


def test_parse_rate_unlimited() -> None:
    assert parse_rate("unlimited") is None


@pytest.mark.parametrize("bad", ["fast", "1gb", "100mbps", "1e9", "", "-1gbit", "0mbit", "gbit"])
def test_parse_rate_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(bad)


@pytest.mark.parametrize("text,seconds", [("20ms", 0.02), ("0.5ms", 0.0005), ("1s", 1.0), ("250us", 0.00025),
                                          ("0", 0.0), (0.08, 0.08)])
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["20", "20 minutes", "ms", "-5ms", "fast"])
def test_parse_duration_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize("text,p", [("0.01", 0.01), ("1%", 0.01), (0, 0.0), ("0.001", 0.001)])
def test_parse_loss(text: str | float, p: float) -> None:
    assert parse_loss(text) == pytest.approx(p)


@pytest.mark.parametrize("bad", ["1", "1.5", "-0.1", "lots", "200%"])
def test_parse_loss_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="loss"):
        parse_loss(bad)


def test_format_rate() -> None:
    assert format_rate(10**9) == "1gbit"
    assert format_rate(5 * 10**8) == "500mbit"
    assert format_rate(None) == "unlimited"


def test_config_validates_fields() -> None:
    cfg = LabConfig.uniform(silos=2, rate="500mbit", rtt="20ms", loss="0.01")
    assert cfg.mtu == 9000 and cfg.name == "frl"
    assert cfg.paths[1] == PathShape(rate_bps=5 * 10**8, rtt_s=0.02, loss=0.01)
    with pytest.raises(ValidationError, match="cannot parse rate"):
        LabConfig.uniform(rate="fast")
    with pytest.raises(ValidationError, match="outside"):
        LabConfig.uniform(rate="10kbit")
    with pytest.raises(ValidationError, match="above the lab's limit"):
        LabConfig.uniform(rtt="5s")
    with pytest.raises(ValidationError, match="lab name"):
        LabConfig.uniform(name="Bad_Name")
    with pytest.raises(ValidationError):
        LabConfig.uniform(mtu=100)


def test_cli_refuses_unparsable_input_before_touching_anything() -> None:
    result = CliRunner().invoke(app, ["lab", "up", "--name", TEST_LAB, "--rate", "1xbit", "--loss", "3"])
    assert result.exit_code == 1
    assert "--rate: cannot parse rate '1xbit'" in result.output
    assert "--loss" in result.output


def test_not_root_refused() -> None:
    with pytest.raises(LabError, match="needs root"):
        netns.require_root(euid=1000)
    netns.require_root(euid=0)


def test_addresses_stay_in_benchmark_block() -> None:
    block = ipaddress.ip_network(netns.LAB_BLOCK)
    for k in (1, 2, 250):
        links = PathLinks(TEST_LAB, k)
        addrs = [links.silo_addr, links.wan_silo_addr, links.agg_addr, links.wan_agg_addr]
        assert all(ipaddress.ip_address(a) in block for a in addrs)
        assert len(set(addrs)) == 4


def test_tbf_sized_for_bdp() -> None:
    burst, limit = shaping.tbf_params(10**9, 9000, 0.02)
    assert burst >= 4 * 9014
    assert limit >= 10**9 / 8 * 0.02  # one bandwidth-delay product of queue


def test_ceiling_refusal_states_ceiling() -> None:
    cfg = LabConfig.uniform(rate="6gbit", rtt="20ms")
    with pytest.raises(LabError, match="ceiling of 5.5gbit"):
        _check_ceiling(cfg, 5.5e9)
    _check_ceiling(LabConfig.uniform(rate="5gbit", rtt="20ms"), 5.5e9)


# --- root: real namespaces --------------------------------------------------------------------

def _netns_usable() -> str | None:
    """Why the lab tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root for network namespaces (CI runs as root)"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"], capture_output=True).returncode:
        return "`ip netns` is unavailable"
    missing = [t for t in ("tc", "ethtool", "ping", "iperf3") if shutil.which(t) is None]
    if shutil.which("iptables-legacy") is None and shutil.which("iptables") is None:
        missing.append("iptables")
    if not os.access(delay.helper_path(), os.X_OK):
        missing.append(str(delay.helper_path()))
    if missing:
        reason = f"lab tools missing ({', '.join(missing)}): run scripts/lab-deps.sh as root"
        if os.environ.get("CI"):
            pytest.fail(reason)  # in CI a skip would hide a broken setup step
        return reason
    return None


_SKIP = _netns_usable()
_skip_without_lab = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def needs_lab(fn):  # type: ignore[no-untyped-def]
    """Real-namespace tests: marked `netns` (deselect with -m 'not netns') and skipped without root."""
    return pytest.mark.netns(_skip_without_lab(fn))


def _root_snapshot() -> dict[str, str]:
    """What the host's own namespace looks like: the lab must never change it."""
    rules = netns.run([shaping.iptables() + "-save"], check=False).stdout
    return {
        "links": re.sub(r"link/\S+ \S+", "", netns.run(["ip", "-o", "link", "show"]).stdout),
        # Rules only: comments carry a timestamp and chain headers carry traffic counters.
        "iptables": "\n".join(re.sub(r"\[\d+:\d+\]", "", line) for line in rules.splitlines()
                              if not line.startswith("#")),
    }


def _element_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", delay.HELPER_NAME], capture_output=True, text=True).stdout
    return {int(p) for p in out.split() if netns.pid_alive(int(p))}


@pytest.fixture
def clean_slate() -> Iterator[dict[str, object]]:
    """Start without a test lab; afterwards assert nothing of it is left anywhere."""
    Lab.down_by_name(TEST_LAB)
    before = {"root": _root_snapshot(), "elements": _element_pids()}
    yield before
    assert_nothing_left(before)


def assert_nothing_left(before: dict[str, object]) -> None:
    left = sorted(ns for ns in netns.list_namespaces() if ns.startswith(f"{TEST_LAB}-"))
    assert not left, f"namespaces left behind: {left}"
    assert LabState.load(TEST_LAB) is None, "state file left behind"
    assert _element_pids() <= before["elements"], "delay element process left behind"  # type: ignore[operator]
    assert _root_snapshot() == before["root"], "host links or iptables rules changed"


def _config(**kw: object) -> LabConfig:
    args: dict[str, object] = {"rate": "200mbit", "rtt": "20ms", "loss": 0.0, "name": TEST_LAB}
    args.update(kw)
    return LabConfig.uniform(**args)  # type: ignore[arg-type]


@needs_lab
def test_shaped_rate_and_rtt_match_settings(clean_slate: dict[str, object]) -> None:
    lab = Lab.up(_config(rate="200mbit"))
    try:
        path = lab.paths[0]
        rtt = probe.ping_rtt(path.links)
        assert abs(rtt - 0.020) <= RTT_TOLERANCE * 0.020, f"ping RTT {rtt * 1e3:.2f} ms for a 20 ms path"
        for rate in ("200mbit", "1gbit"):
            lab = Lab.up(_config(rate=rate))
            line = parse_rate(rate)
            assert line is not None
            seen: list[float] = []
            while len(seen) < PROBE_TRIES and (not seen or max(seen) < (1 - RATE_TOLERANCE) * line):
                got = probe.tcp_transfer(lab.paths[0].links, PROBE_S)
                assert got.bits_per_second <= (1 + RATE_TOLERANCE) * line, (
                    f"{format_rate(got.bits_per_second)} through a {rate} shaper")
                seen.append(got.peak_bits_per_second)
            assert max(seen) >= (1 - RATE_TOLERANCE) * line, (
                f"best seconds of {', '.join(format_rate(r) for r in seen)} on a {rate} line")
    finally:
        lab.down()


@needs_lab
def test_lab_topology_mtu_offloads_buffers_exec(clean_slate: dict[str, object]) -> None:
    lab = Lab.up(_config(silos=2, mtu=9000))
    try:
        assert lab.address("agg", silo=2) == "198.19.2.1"
        assert lab.address(lab.silos[1]) == "198.18.2.1"
        out = netns.run(lab.exec_prefix("silo2") + ["ip", "-o", "addr", "show", "wan0"]).stdout
        assert "198.18.2.1/30" in out
        lo = netns.run(lab.exec_prefix("agg") + ["ip", "-o", "link", "show", "lo"]).stdout
        assert "UP" in lo or "UNKNOWN" in lo
        links = lab.paths[1].links
        show = netns.run(["ip", "-n", links.wan_ns, "link", "show", links.wan_agg_iface]).stdout
        assert "mtu 9000" in show
        features = netns.run(netns.in_ns(links.silo_ns, ["ethtool", "-k", "wan0"])).stdout
        for feat in ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload"):
            assert f"{feat}: off" in features
        rmem = netns.run(netns.in_ns(links.silo_ns, ["sysctl", "-n", "net.ipv4.tcp_rmem"])).stdout.split()
        assert int(rmem[2]) == lab.config.tcp_buffer_max
        idle = netns.run(netns.in_ns(links.agg_ns, ["sysctl", "-n", "net.ipv4.tcp_slow_start_after_idle"]))
        assert idle.stdout.strip() == "0"
        cli = subprocess.run([sys.executable, "-m", "fedrdma.cli", "lab", "exec", "--name", TEST_LAB, "silo1", "--",
                              "ping", "-c", "1", "-W", "2", lab.address("agg", silo=1)],
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        # Idempotent: the same settings again reuse the running lab, element and all.
        element = lab.state.element
        again = Lab.up(_config(silos=2, mtu=9000))
        assert again.state.element == element
    finally:
        lab.down()
    assert Lab.down_by_name(TEST_LAB) is False  # down twice is fine


@needs_lab
def test_loss_observed_near_setting(clean_slate: dict[str, object]) -> None:
    p = 0.02
    lab = Lab.up(_config(rate="1gbit", rtt="2ms", loss=p))
    try:
        result = probe.tcp_transfer(lab.paths[0].links, PROBE_S)
        n = result.packets_seen
        assert n > 2000, f"too few packets ({n}) to judge loss"
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(result.loss - p) <= LOSS_SIGMAS * sigma, f"observed {result.loss:.4f} for loss {p} over {n}"
    finally:
        lab.down()


@needs_lab
def test_rate_above_ceiling_refused(clean_slate: dict[str, object]) -> None:
    with pytest.raises(LabError, match=r"ceiling of [\d.]+[mgt]bit"):
        Lab.up(_config(rate="300gbit"))


@needs_lab
def test_a_stored_ceiling_too_low_for_the_settings_is_measured_again_before_a_refusal(
        clean_slate: dict[str, object]) -> None:
    """A ceiling taken while the host was busy (851 Mbit/s once, against 4.7-8.7 Gbit/s on
    other runs here) must not refuse every later lab: the refusal rests on a fresh figure."""
    config = _config(rate="200mbit")
    store_ceiling(_ceiling_key(config), 1e6)
    lab = Lab.up(config)
    try:
        assert lab.state.ceiling_bps is not None and lab.state.ceiling_bps > 200e6
        assert load_ceiling(_ceiling_key(config)) == lab.state.ceiling_bps
    finally:
        lab.down()


@needs_lab
def test_colliding_namespace_refused_and_kept(clean_slate: dict[str, object]) -> None:
    netns.run(["ip", "netns", "add", f"{TEST_LAB}-wan"])
    try:
        with pytest.raises(LabError, match="did not make"):
            Lab.up(_config())
        assert netns.namespace_exists(f"{TEST_LAB}-wan"), "the lab removed a namespace it did not make"
        assert not netns.namespace_exists(f"{TEST_LAB}-agg")
    finally:
        netns.run(["ip", "netns", "del", f"{TEST_LAB}-wan"])


@needs_lab
@pytest.mark.parametrize("step", ["netns:frlt-silo1", "path:1", "ceiling", "shape", "done"])
def test_failure_midway_leaves_nothing(step: str, clean_slate: dict[str, object]) -> None:
    with pytest.raises(LabError, match="injected failure"):
        failing_at(step).up(_config())


@needs_lab
def test_down_after_killed_up_removes_everything(clean_slate: dict[str, object]) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedrdma.testing.lab", "--kill-at", "shape", "--name", TEST_LAB,
                           "--rate", "200mbit"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    state = LabState.load(TEST_LAB)
    assert state is not None and not state.complete and state.element is not None
    assert delay.element_alive(state.element), "the crash should have left a running element to clean up"
    assert all(netns.namespace_exists(ns) for ns in state.namespaces)
    down = subprocess.run([sys.executable, "-m", "fedrdma.cli", "lab", "down", "--name", TEST_LAB],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert not delay.element_alive(state.element)


# --- the transfer benchmark on a lab path -------------------------------------------------------

BENCH_BYTES = 24 * 2**20
"""Long enough on a 500 Mbit/s line (~0.4 s) that TBF's burst cannot carry it alone."""

TBF_BURST_SLACK = 1.05
"""Goodput may exceed the line by the one burst TBF lets through at once, never by more."""


@needs_lab
def test_bench_transfer_crosses_shaped_path() -> None:
    """Both peers run in lab namespaces: bytes arrive intact, no faster than the line, and
    the JSON says which path carried them; the lab is gone afterwards."""
    from fedrdma.bench import transfer
    from fedrdma.bench.wan import BENCH_LAB_NAME, shaped_path

    shape = PathShape.of("500mbit", "4ms", 0.0)
    with shaped_path(shape, mtu=9000) as where:
        assert where.listen_host == "198.19.1.1"
        seen = netns.run(netns.in_ns(f"{BENCH_LAB_NAME}-agg", ["ip", "-o", "addr"])).stdout
        assert where.listen_host in seen
        result = transfer.run(["--size-bytes", str(BENCH_BYTES)], BENCH_BYTES, ["rdma-e", "grpc"],
                              chunk_size=2**20, window=4, repeat=1, where=where, references=False)
    assert not [ns for ns in netns.list_namespaces() if ns.startswith(f"{BENCH_LAB_NAME}-")]
    assert LabState.load(BENCH_LAB_NAME) is None
    assert result.link_rate_gbit == 0.5 and result.rtt_ms == 4.0 and result.loss == 0.0
    assert result.mtu == 9000 and result.reference is None
    for mode in ("rdma-e", "grpc"):
        row = result.modes[mode]
        assert row.identical, mode
        assert row.vs_line is not None and 0 < row.vs_line <= TBF_BURST_SLACK, \
            f"{mode} moved {row.vs_line}x the line: not shaped"


@needs_lab
@pytest.mark.parametrize("deadline_s", [3.0, 1.5], ids=["mid-upload", "mid-broadcast"])
def test_a_transfer_still_landing_chunks_at_the_deadline_is_waited_for(tmp_path, clean_slate, deadline_s) -> None:
    """On a 2 Mbit/s path a round of gpt2-tiny (0.5 MiB each way) takes ~4.5 s; its deadline
    passes mid-upload (3 s) or mid-broadcast (1.5 s), and the silos, still verifying chunks,
    are accepted."""
    from fedrdma.bench.wan import federation_hosts
    from fedrdma.fl.demo import run_federation
    from fedrdma.fl.inputs import DEMO_SILOS

    with Lab.up(_config(silos=2, rate="2mbit", rtt="10ms")) as lab:
        records = run_federation(tmp_path, "tcp-e", 1, "gpt2-tiny", False, DEMO_SILOS[:2],
                                 hosts=federation_hosts(lab), local_steps=1,
                                 aggregator_settings={"round_deadline_s": deadline_s, "chunk_size": 65536,
                                                      "eval_data": None})
    (record,) = [r for r in records if r.round == 1]
    assert record.round_seconds > 3, "the path was meant to outlast the deadline"
    if deadline_s < 3:
        assert min(s.broadcast_seconds or 0 for s in record.silos) > deadline_s, "the broadcast outlasts it"
    assert sorted(record.accepted) == sorted(DEMO_SILOS[:2]), record.rejected
