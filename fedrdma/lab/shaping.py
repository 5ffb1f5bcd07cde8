"""Rate, loss and the hook for delay, all in the router namespace.

Why the router: shaping a sender's own egress makes TCP see the queue as its own
(TSQ, socket memory) and behave unlike it would on a WAN. In the router everything acts
on forwarded packets. Per path and direction the packet meets, in order:

    ingress of the incoming veth -> IFB device: tbf at the path's rate (the bottleneck)
    FORWARD -> chain <lab>-<dir><k>: [count] [DROP with probability p] [NFQUEUE q (delay)]
    egress qdisc on the outgoing veth: netem, when the kernel has it, instead of NFQUEUE

iptables-legacy is preferred: this kernel lacks nft_queue, so iptables-nft cannot
translate NFQUEUE, while the legacy xt target works.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from fedrdma.lab.errors import LabError
from fedrdma.lab.netns import DEPS_HINT, PathLinks, in_ns, run

IPTABLES_CANDIDATES = ("iptables-legacy", "iptables")
"""Legacy first: it supports NFQUEUE without nft_queue in the kernel."""

UP, DOWN = "up", "down"
"""Directions: up is silo -> aggregator, down is aggregator -> silo."""

BURST_TIME_S = 0.001
"""TBF bucket: 1 ms of line rate lets the qdisc keep up between hrtimer wakeups."""

BURST_MIN_PACKETS = 4
"""...but never less than a few MTU-sized packets, or TBF stalls on one jumbo frame."""

QUEUE_MIN_TIME_S = 0.005
"""Shortest bottleneck queue, for paths with a tiny RTT."""

QUEUE_MIN_PACKETS = 64
"""Bottleneck queue floor in packets, so slow-start bursts at low rates are not all dropped."""

NETEM_LIMIT_PACKETS = 200_000
"""netem's queue must hold a path's packets in flight: ~1 s at 10 Gbit/s with 9000-byte frames."""


def iptables() -> str:
    for name in IPTABLES_CANDIDATES:
        if shutil.which(name):
            return name
    raise LabError(f"no iptables on PATH: {DEPS_HINT}")


@dataclass(frozen=True)
class Direction:
    """One direction of one path: where it enters the router and where it leaves."""

    links: PathLinks
    way: str

    @property
    def chain(self) -> str:
        return f"{self.links.lab}-{self.way}{self.links.silo}"

    @property
    def in_iface(self) -> str:
        return self.links.wan_silo_iface if self.way == UP else self.links.wan_agg_iface

    @property
    def out_iface(self) -> str:
        return self.links.wan_agg_iface if self.way == UP else self.links.wan_silo_iface

    @property
    def ifb(self) -> str:
        """The IFB device that carries this direction's ingress through its token bucket."""
        return f"ifb{self.in_iface}"

    @property
    def queue(self) -> int:
        """NFQUEUE number: queues are per network namespace, so two labs never clash."""
        return 2 * (self.links.silo - 1) + (0 if self.way == UP else 1)


def directions(links: PathLinks) -> tuple[Direction, Direction]:
    return Direction(links, UP), Direction(links, DOWN)


def _ipt(ns: str, *args: str) -> None:
    run(in_ns(ns, [iptables(), "-w", *args]))


def install_chain(d: Direction, loss: float, queue: bool) -> None:
    """Counting rule, loss rule and (if the element delays) the NFQUEUE hook for one direction."""
    ns = d.links.wan_ns
    _ipt(ns, "-N", d.chain)
    _ipt(ns, "-A", d.chain, "-m", "comment", "--comment", "seen")
    if loss > 0:
        set_loss(d, loss, position=None)
    if queue:
        # No --queue-bypass: if the element dies the path goes dark, which `status` shows,
        # instead of silently losing its delay and measuring a different link.
        _ipt(ns, "-A", d.chain, "-j", "NFQUEUE", "--queue-num", str(d.queue))
    _ipt(ns, "-A", "FORWARD", "-i", d.in_iface, "-o", d.out_iface, "-j", d.chain)


def set_loss(d: Direction, loss: float, position: int | None = 2) -> None:
    """Random drop per packet; inserted after the counting rule when added later."""
    where = ["-A", d.chain] if position is None else ["-I", d.chain, str(position)]
    _ipt(d.links.wan_ns, *where, "-m", "statistic", "--mode", "random", "--probability", f"{loss:.10f}",
         "-m", "comment", "--comment", "loss", "-j", "DROP")


def clear_loss(d: Direction, loss: float) -> None:
    """Remove a drop rule `set_loss(d, loss)` added (the first of that probability)."""
    _ipt(d.links.wan_ns, "-D", d.chain, "-m", "statistic", "--mode", "random", "--probability", f"{loss:.10f}",
         "-m", "comment", "--comment", "loss", "-j", "DROP")


def counters(d: Direction) -> tuple[int, int]:
    """(packets seen, packets dropped by the loss rule) since the last reset."""
    out = run(in_ns(d.links.wan_ns, [iptables(), "-w", "-L", d.chain, "-v", "-x", "-n"])).stdout
    seen = dropped = 0
    for line in out.splitlines():
        fields = line.split()
        if not fields or not fields[0].isdigit():
            continue
        if "/* seen */" in line:
            seen = int(fields[0])
        elif "/* loss */" in line:
            dropped = int(fields[0])
    return seen, dropped


def reset_counters(d: Direction) -> None:
    _ipt(d.links.wan_ns, "-Z", d.chain)


def tbf_params(rate_bps: int, mtu: int, rtt_s: float) -> tuple[int, int]:
    """(burst, limit) in bytes: a bucket of ~1 ms and a bottleneck queue of one BDP.

    One BDP of buffer is the classic router sizing that lets a single TCP flow keep the
    line busy through its window halvings, which is what a shaped-rate check measures.
    """
    frame = mtu + 14
    burst = max(BURST_MIN_PACKETS * frame, round(rate_bps / 8 * BURST_TIME_S))
    limit = max(QUEUE_MIN_PACKETS * frame, round(rate_bps / 8 * max(rtt_s, QUEUE_MIN_TIME_S)))
    return burst, limit + burst


def install_qdisc(d: Direction, rate_bps: int | None, mtu: int, rtt_s: float, netem_delay_s: float) -> None:
    """Rate limit where the direction enters the router; netem (if used) where it leaves.

    The rate is enforced on the ingress side, through an IFB device, so the token bucket
    sees the sender's own smooth pacing. Shaped after the userspace element instead, it
    saw the element's batched releases: every gap longer than the bucket wasted tokens, and
    the line carried well below its rate (README: Measurements behind the defaults).
    """
    ns = d.links.wan_ns
    if netem_delay_s > 0:
        run(in_ns(ns, ["tc", "qdisc", "replace", "dev", d.out_iface, "root", "handle", "1:", "netem",
                       "delay", f"{round(netem_delay_s * 1e6)}us", "limit", str(NETEM_LIMIT_PACKETS)]))
    if rate_bps is None:
        return
    ifb = d.ifb
    if run(in_ns(ns, ["ip", "link", "show", ifb]), check=False).returncode != 0:
        run(in_ns(ns, ["ip", "link", "add", ifb, "type", "ifb"]))
        run(in_ns(ns, ["ip", "link", "set", ifb, "mtu", str(mtu), "up"]))
        run(in_ns(ns, ["tc", "qdisc", "add", "dev", d.in_iface, "handle", "ffff:", "ingress"]))
        run(in_ns(ns, ["tc", "filter", "add", "dev", d.in_iface, "parent", "ffff:", "protocol", "all", "u32",
                       "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb]))
    burst, limit = tbf_params(rate_bps, mtu, rtt_s)
    run(in_ns(ns, ["tc", "qdisc", "replace", "dev", ifb, "root", "handle", "10:", "tbf",
                   "rate", f"{rate_bps}bit", "burst", str(burst), "limit", str(limit)]))


def netem_available(ns: str) -> bool:
    """Ask tc itself: the only reliable test of whether this kernel has sch_netem."""
    ok = run(in_ns(ns, ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]), check=False)
    if ok.returncode == 0:
        run(in_ns(ns, ["tc", "qdisc", "del", "dev", "lo", "root"]), check=False)
        return True
    return False
