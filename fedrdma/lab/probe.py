"""Measurements of a lab path: checked, not assumed.

RTT by ping (the least of a few echoes: a busy host only ever adds to an echo's time), rate
by a short iperf3 TCP transfer, loss from the router's own counters during that transfer.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass

from fedrdma.lab.errors import LabError
from fedrdma.lab.netns import PathLinks, in_ns, kill_pids, run
from fedrdma.lab.shaping import Direction, counters, reset_counters

PING_COUNT = 7
"""Enough echoes for one that no scheduling hiccup touched; ~1.5 s at PING_INTERVAL_S."""

PING_INTERVAL_S = 0.2
"""Root may ping faster than 1/s; 0.2 s keeps the probe short without flooding."""

IPERF_PORT = 5299
"""Away from iperf3's default 5201, so a user's own iperf3 in the lab does not clash."""

IPERF_OMIT_S = 1
"""Seconds of slow start iperf3 leaves out of the figure (integer: iperf3 3.12 wants one)."""

DEFAULT_TRANSFER_S = 2.0
"""Counted seconds of a status transfer: enough for a stable rate, short enough for tests."""

SERVER_START_TRIES = 40
"""Client connection attempts while the iperf3 server comes up (every SERVER_RETRY_S)."""

SERVER_RETRY_S = 0.05
"""Pause between connection attempts."""

_TIME_RE = re.compile(r"time=([\d.]+) ms")


@dataclass(frozen=True)
class TransferResult:
    """One TCP transfer in one direction and what the router saw of it."""

    bits_per_second: float
    retransmits: int
    packets_seen: int
    packets_dropped: int
    peak_bits_per_second: float = 0.0
    """The best counted one-second interval: what the path carried while the host left the flow
    alone (another tenant's stall lowers a transfer's mean, and never lifts an interval past the
    shaper)."""

    @property
    def loss(self) -> float:
        return self.packets_dropped / self.packets_seen if self.packets_seen else 0.0


def ping_rtt(links: PathLinks, count: int = PING_COUNT) -> float:
    """The least RTT in seconds of a few echoes from the silo to the aggregator along this path:
    the path's own delay, where a median on a busy host also counts the host's late wakeups (CI
    once saw 22.5 ms on a 20 ms path)."""
    proc = run(in_ns(links.silo_ns, ["ping", "-n", "-c", str(count), "-i", str(PING_INTERVAL_S), "-W", "2",
                                     links.agg_addr]), check=False, timeout=count * 3 + 5)
    times = [float(t) / 1e3 for t in _TIME_RE.findall(proc.stdout)]
    if not times:
        raise LabError(f"no ping reply from {links.agg_addr} via {links.wan_ns} "
                       f"(is the delay element running?): {proc.stdout.strip()[-200:]}")
    return min(times)


def tcp_transfer(links: PathLinks, seconds: float = DEFAULT_TRANSFER_S, upload: bool = True) -> TransferResult:
    """Goodput of one iperf3 TCP flow silo -> aggregator (or back), plus router counters."""
    direction = Direction(links, "up" if upload else "down")
    server = subprocess.Popen(in_ns(links.agg_ns, ["iperf3", "-s", "-1", "-B", links.agg_addr,
                                                   "-p", str(IPERF_PORT)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reset_counters(direction)
        client = ["iperf3", "-c", links.agg_addr, "-p", str(IPERF_PORT), "-J", "-O", str(IPERF_OMIT_S),
                  "-t", f"{seconds:g}", *([] if upload else ["-R"])]
        report = None
        for _ in range(SERVER_START_TRIES):
            proc = run(in_ns(links.silo_ns, client), check=False, timeout=seconds + IPERF_OMIT_S + 30)
            try:
                report = json.loads(proc.stdout)
            except json.JSONDecodeError:
                report = {"error": proc.stderr.strip() or "no output"}
            if "error" not in report:
                break
            if "connect" not in str(report["error"]):
                break
            time.sleep(SERVER_RETRY_S)
        if report is None or "error" in report:
            raise LabError(f"iperf3 through {links.wan_ns} failed: {report and report.get('error')}")
        seen, dropped = counters(direction)
        end = report["end"]
        counted = [float(i["sum"]["bits_per_second"]) for i in report.get("intervals", [])
                   if not i["sum"].get("omitted", False)]
        mean = float(end["sum_received"]["bits_per_second"])
        return TransferResult(bits_per_second=mean, retransmits=int(end.get("sum_sent", {}).get("retransmits", 0)),
                              packets_seen=seen, packets_dropped=dropped, peak_bits_per_second=max(counted, default=mean))
    finally:
        if server.poll() is None:
            kill_pids([server.pid])
        server.wait()
