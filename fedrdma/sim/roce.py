"""A model of RoCE (RC transport) go-back-N on a lossy, long-RTT link.

These machines have no RoCE NIC, so the paper's claim that a large RDMA message cannot
cross a lossy WAN while small chunks can is checked here against a model, not a wire.
Pure: no I/O, no clocks; randomness only from a seeded numpy Generator.

Modelling assumptions (each one is a choice; change it here, not in a caller):

- **Transport.** One RDMA WRITE of `n` packets on one RC queue pair (QP). RC WRITEs have
  no packet window: the sender streams packets back to back at the line rate until it
  learns of a loss. No congestion control (DCQCN reacts to ECN marks, not to loss).
- **Packets.** Payload per packet is the RoCE MTU (4096 by default); each packet also
  carries `header_bytes` on the wire. Serialization time is `(payload + header) * 8 / rate`.
  Time is continuous: a sender that learns of a loss restarts at that instant (a packet
  half sent is abandoned; rounding to a packet boundary would add at most one packet time).
- **Loss.** Every data transmission is dropped independently with probability `loss`.
  The reverse direction drops each NAK and the message's final ACK independently with
  probability `ack_loss` (by default equal to `loss`: the lab drops per direction alike).
  Intermediate ACKs are cumulative, so losing one of them costs nothing and is ignored.
- **Detection.** A lost packet `k` is detected when the first later packet of the same
  pass arrives out of order: the receiver sends one NAK (PSN sequence error) and drops
  every further out-of-order packet; the NAK reaches the sender one RTT after that later
  packet's last bit, and the sender goes back to `k` (go-back-N, ConnectX without
  selective repeat). When no later packet arrives (the lost packets are the message's
  last ones), or the NAK itself is lost, only the transport timer detects it: it fires
  one retransmission timeout (4.096 us x 2^local_ack_timeout) after the last packet the
  sender transmitted (the NIC restarts the timer on each transmission).
- **Final ACK.** The message completes when the ACK of its last packet reaches the sender
  (the requester's completion): one RTT after that packet's last bit. A lost final ACK
  costs a timeout and a resend of the last packet only (earlier ACKs covered the rest).
- **Retry limit.** Each retransmission that restarts at the same PSN as the previous one
  increments that PSN's retry counter; progress (a restart at a later PSN) resets it.
  The QP errors out when a counter would exceed `retry_cnt`. Hence a packet fails after
  `retry_cnt + 1` consecutive losses: p^(retry_cnt+1), independently per packet; the
  last packet also fails when its ACK is lost, so its per-attempt failure is
  1 - (1-loss)(1-ack_loss).
- **Chunked transfers.** See `fedrdma.sim.chunked`: one WRITE per chunk, each in-flight
  chunk on its own QP, the NIC sharing the link between the QPs with packets to send.

Expected times are for messages that complete (the retry limit not hit); they are the
mean of the uncapped process, which differs from the conditional mean by O(P(fail)).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from fedrdma.core.scheduler import MAX_ATTEMPTS

ROCE_MTU = 4096
"""Payload bytes per packet: the largest RoCE (IB) MTU, the usual setting on a jumbo-frame fabric."""

ROCEV2_HEADER_BYTES = 62
"""Per-packet wire overhead: Ethernet 14 + FCS 4, IPv4 20, UDP 8, BTH 12, ICRC 4 (RETH of the first packet ignored)."""

IB_TIMEOUT_UNIT_S = 4.096e-6
"""IB spec: the transport timer is 4.096 us x 2^local_ack_timeout."""

DEFAULT_LOCAL_ACK_TIMEOUT = 14
"""A common application default (~67 ms): long enough for most WAN RTTs, short enough to recover."""

MIN_LOCAL_ACK_TIMEOUT = 1
"""0 disables the timer in the IB spec: a lost tail would then hang the QP for ever."""

MAX_LOCAL_ACK_TIMEOUT = 31
"""The field is 5 bits wide (~2.4 hours)."""

MAX_RETRY_CNT = 7
"""retry_cnt is a 3-bit field in the QP context: ConnectX accepts 0..7."""

DEFAULT_RETRY_CNT = MAX_RETRY_CNT
"""Applications on lossy fabrics set the maximum; anything less only fails sooner."""

TIMEOUT_RTT_MARGIN = 2.0
"""Auto-chosen timeouts cover twice the RTT, so queueing delay does not fire the timer spuriously."""

CHUNK_ATTEMPTS = MAX_ATTEMPTS
"""A QP error costs one chunk: the runtime's scheduler retries it (on a new connection) this often."""

P_FAIL_MAX = 1e-6
"""Link-Enable threshold: at most one failed transfer in a million (a round that fails costs a round)."""

KIB = 1 << 10
MIB = 1 << 20

CHUNK_GRID: tuple[int, ...] = tuple(KIB * k for k in (256, 512)) + tuple(MIB * k for k in (1, 2, 4, 8, 16, 32, 64))
"""The paper's Table 2 range, 256 KiB to 64 MiB in powers of two; `None` in a grid means unchunked."""

MAX_MODEL_PACKETS = 1 << 24
"""64 GiB at MTU 4096: arrays beyond this would not fit in memory; no model state is that big."""

DEFAULT_TRIALS = 2000
"""Monte Carlo runs per estimate: the mean's relative error is ~1/sqrt(trials) of the spread."""


@dataclass(frozen=True)
class Link:
    """One direction of a path as the model sees it (rates in bit/s, times in seconds)."""

    rate_bps: float
    rtt_s: float
    loss: float
    ack_loss: float | None = None
    mtu: int = ROCE_MTU
    header_bytes: int = ROCEV2_HEADER_BYTES

    def __post_init__(self) -> None:
        if not self.rate_bps > 0:
            raise ValueError(f"link rate {self.rate_bps} bit/s must be positive: give e.g. 1gbit")
        if not self.rtt_s >= 0:
            raise ValueError(f"RTT {self.rtt_s} s must not be negative: give e.g. 20ms")
        for name, value in (("loss", self.loss), ("ack_loss", self.reverse_loss)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} {value} must be a fraction in [0, 1), e.g. 0.01 for 1 %")
        if self.mtu <= 0 or self.header_bytes < 0:
            raise ValueError(f"MTU {self.mtu} must be positive and header bytes {self.header_bytes} not negative")

    @property
    def reverse_loss(self) -> float:
        return self.loss if self.ack_loss is None else self.ack_loss

    @property
    def bdp_bytes(self) -> float:
        """Bytes in flight to keep the line busy for one round trip."""
        return self.rate_bps * self.rtt_s / 8

    def packet_time(self, rate_bps: float | None = None) -> float:
        """Wire time of one full packet, headers included."""
        return (self.mtu + self.header_bytes) * 8 / (rate_bps or self.rate_bps)


@dataclass(frozen=True)
class Nic:
    """The QP's retry settings (the fields `ibv_modify_qp` sets on the requester)."""

    retry_cnt: int = DEFAULT_RETRY_CNT
    local_ack_timeout: int = DEFAULT_LOCAL_ACK_TIMEOUT

    def __post_init__(self) -> None:
        if not 0 <= self.retry_cnt <= MAX_RETRY_CNT:
            raise ValueError(f"retry_cnt {self.retry_cnt} is outside 0..{MAX_RETRY_CNT} (a 3-bit field on ConnectX)")
        if not MIN_LOCAL_ACK_TIMEOUT <= self.local_ack_timeout <= MAX_LOCAL_ACK_TIMEOUT:
            raise ValueError(f"local_ack_timeout {self.local_ack_timeout} is outside "
                             f"{MIN_LOCAL_ACK_TIMEOUT}..{MAX_LOCAL_ACK_TIMEOUT} (0 would disable the timer)")

    @property
    def timeout_s(self) -> float:
        return IB_TIMEOUT_UNIT_S * 2**self.local_ack_timeout

    @classmethod
    def for_rtt(cls, rtt_s: float, retry_cnt: int = DEFAULT_RETRY_CNT) -> Nic:
        """The default timeout, raised until it covers the RTT with margin (a WAN needs more)."""
        exponent = DEFAULT_LOCAL_ACK_TIMEOUT
        while IB_TIMEOUT_UNIT_S * 2**exponent < TIMEOUT_RTT_MARGIN * rtt_s and exponent < MAX_LOCAL_ACK_TIMEOUT:
            exponent += 1
        return cls(retry_cnt=retry_cnt, local_ack_timeout=exponent)


def check_timeout(link: Link, nic: Nic) -> None:
    if nic.timeout_s <= link.rtt_s:
        need = math.ceil(math.log2(TIMEOUT_RTT_MARGIN * link.rtt_s / IB_TIMEOUT_UNIT_S))
        raise ValueError(f"retransmission timeout {nic.timeout_s * 1e3:.3g} ms (local_ack_timeout "
                         f"{nic.local_ack_timeout}) is not above the RTT {link.rtt_s * 1e3:.3g} ms: every message "
                         f"would time out before its ACK; set local_ack_timeout to at least {need}")


@dataclass(frozen=True)
class Shape:
    """A message as packets: count and how much shorter than MTU the last one is (in time)."""

    packets: int
    tau: float
    delta: float

    @classmethod
    def of(cls, size_bytes: int, link: Link, rate_bps: float | None = None) -> Shape:
        if size_bytes <= 0:
            raise ValueError(f"message size {size_bytes} bytes must be positive")
        n = -(-size_bytes // link.mtu)
        if n > MAX_MODEL_PACKETS:
            raise ValueError(f"{size_bytes} bytes is {n} packets, above the model's limit of {MAX_MODEL_PACKETS}: "
                             f"model it as chunks")
        rate = rate_bps or link.rate_bps
        last = size_bytes - (n - 1) * link.mtu
        return cls(n, link.packet_time(rate), (link.mtu - last) * 8 / rate)


def log_survive(p_fail: float) -> float:
    """log(1 - p_fail), exact for tiny p_fail, -inf for certain failure."""
    return math.log1p(-p_fail) if p_fail < 1.0 else -math.inf


def per_packet_failure(loss: float, retry_cnt: int) -> float:
    """A packet's QP-error probability: lost on its first try and on every one of its retries."""
    return loss ** (retry_cnt + 1)


def message_failure(packets: int, link: Link, nic: Nic) -> float:
    """P(the QP errors out) for one message: any packet exhausts its retries (see module doc)."""
    q_ack = (1 - link.loss) * (1 - link.reverse_loss)
    log_ok = (packets - 1) * log_survive(per_packet_failure(link.loss, nic.retry_cnt))
    log_ok += log_survive((1 - q_ack) ** (nic.retry_cnt + 1))
    return -math.expm1(log_ok)


def _solve(go: np.ndarray, p: float, q_ack_loss_coeff: np.ndarray, p_ack: float, q: float) -> np.ndarray:
    """Expected totals E(D) for D = 1..n remaining packets, given the expected per-pass cost `go`.

    A pass from D remaining whose first loss is at offset i restarts with D - i remaining
    (prob q^i p); a loss-free pass whose final ACK is lost restarts with 1 remaining
    (prob q^D p_ack). With S(D) = sum_{i>=1} q^i E(D-i) the recursion
    E(D) = G(D) + p E(D) + p S(D) + q^D p_ack E(1) collapses, because
    S(D+1) = q (S(D) + E(D)), to S(D+1) = S(D) + G'(D) and E(D) = (G'(D) + p S(D)) / q,
    where G'(D) = G(D) + q^D p_ack E(1): linear time, vectorized.
    """
    e1 = go[0] / (q * (1 - p_ack))
    g = go + q_ack_loss_coeff * p_ack * e1
    s = np.concatenate(([0.0], np.cumsum(g)[:-1]))
    return (g + p * s) / q


def _expectations(shape: Shape, link: Link, nic: Nic) -> tuple[np.ndarray, np.ndarray]:
    """Expected completion time and wire packets for 1..n remaining packets (analytical).

    One pass from D remaining ends in one of: no data loss (prob q^D; done, or a timeout when
    the final ACK is lost); a loss detected by the first later arrival at offset a (prob
    q u(a), where u(a) = sum_{i<a} q^i p^(a-i) = p (q^a - p^a)/(q - p); the NAK arrives at
    (a+1) tau + RTT, or when lost a timeout after the last packet); or every packet from the
    first loss on lost (prob u(D); a timeout). Prefix sums over a give every D at once.
    """
    p, p_ack = link.loss, link.reverse_loss
    q, q_ack = 1.0 - p, 1.0 - p_ack
    n, tau, delta = shape.packets, shape.tau, shape.delta
    rtt, rto = link.rtt_s, nic.timeout_s
    d = np.arange(1, n + 1, dtype=float)
    a = np.arange(0, n + 1, dtype=float)  # index a, u[0] = 0
    if p == 0.0:
        u = np.zeros(n + 1)
    elif abs(q - p) < 1e-12:
        u = a * p**a
    else:
        u = p * (q**a - p**a) / (q - p)
    h = q * u  # prob the pass ends by a NAK-detectable loss whose first later arrival is at a
    h[0] = 0.0
    cs0 = np.cumsum(h)  # cs0[k] = sum_{a=1..k} h(a)
    cs1 = np.cumsum(h * (a + 1))
    di = np.arange(1, n + 1)
    nak = cs0[di - 1]  # P(pass ends via a NAK-detectable loss), a = 1..D-1
    qd = q**d
    tail = u[di]
    end = d * tau - delta  # last bit of the message's last packet, from the pass's start
    go_time = (qd * (end + q_ack * rtt + p_ack * rto)
               + q_ack * (tau * cs1[di - 1] + rtt * nak) - q_ack * h[di - 1] * delta
               + p_ack * nak * (end + rto)
               + tail * (end + rto))
    w = rtt / tau  # packets the sender streams while a NAK is on its way
    m = np.clip(np.floor(d - 1 - w), 0, d - 1).astype(int)
    sent_nak = cs1[m] + w * cs0[m] + d * (nak - cs0[m])
    go_packets = qd * d + q_ack * sent_nak + p_ack * d * nak + tail * d
    times = _solve(go_time, p, qd, p_ack, q)
    packets = _solve(go_packets, p, qd, p_ack, q)
    return times, packets


@dataclass(frozen=True)
class MessageResult:
    """One WRITE: expected completion time (to the sender's completion), goodput, P(QP error)."""

    size_bytes: int
    packets: int
    expected_time_s: float
    goodput_bps: float
    p_fail: float
    expected_wire_packets: float


def message(size_bytes: int, link: Link, nic: Nic | None = None, rate_bps: float | None = None) -> MessageResult:
    """Analytical expectation for one message; `rate_bps` overrides the rate (a QP's share)."""
    nic = nic or Nic.for_rtt(link.rtt_s)
    check_timeout(link, nic)
    shape = Shape.of(size_bytes, link, rate_bps)
    times, packets = _expectations(shape, link, nic)
    t = float(times[-1])
    return MessageResult(size_bytes, shape.packets, t, size_bytes * 8 / t, message_failure(shape.packets, link, nic),
                         float(packets[-1]))


@dataclass(frozen=True)
class Trace:
    """A replayed message: exact time, packets put on the wire, passes, and whether the QP errored."""

    time_s: float
    wire_packets: int
    passes: int
    failed: bool


def replay(size_bytes: int, link: Link, nic: Nic, data_losses: Collection[tuple[int, int]] = (),
           nak_losses: Collection[int] = (), ack_losses: Collection[int] = ()) -> Trace:
    """The model run on explicit losses, so a test can check a case computed by hand.

    `data_losses` holds (psn, k): the k-th transmission (0-based) of packet psn is dropped.
    `nak_losses` / `ack_losses` hold ordinals (0-based) of the NAKs / final ACKs that are dropped.
    """
    check_timeout(link, nic)
    shape = Shape.of(size_bytes, link)
    n, tau, delta = shape.packets, shape.tau, shape.delta
    rtt, rto, w = link.rtt_s, nic.timeout_s, link.rtt_s / shape.tau
    lost = set(data_losses)
    sent = [0] * n
    t, wire, passes, base, retries, naks, acks = 0.0, 0, 0, 0, 0, 0, 0
    while True:
        passes += 1
        dd = n - base
        end = dd * tau - delta
        first = next((i for i in range(dd) if (base + i, sent[base + i]) in lost), None)
        if first is None:
            wire += dd
            for psn in range(base, n):
                sent[psn] += 1
            ack_lost = acks in ack_losses
            acks += 1
            if not ack_lost:
                return Trace(t + end + rtt, wire, passes, False)
            t, new_base = t + end + rto, n - 1
        else:
            arrival = next((a for a in range(first + 1, dd) if (base + a, sent[base + a]) not in lost), None)
            count = dd
            if arrival is None:
                t += end + rto
            else:
                nak_lost = naks in nak_losses
                naks += 1
                if nak_lost:
                    t += end + rto
                else:
                    t += (arrival + 1) * tau - (delta if arrival == dd - 1 else 0.0) + rtt
                    count = min(dd, math.ceil(arrival + 1 + w - 1e-9))
            wire += count
            for psn in range(base, base + count):
                sent[psn] += 1
            new_base = base + first
        retries = retries + 1 if new_base == base else 1
        base = new_base
        if retries > nic.retry_cnt:
            return Trace(t, wire, passes, True)


@dataclass(frozen=True)
class MonteCarlo:
    """Samples of one message's completion: times of the runs that completed, and the failures."""

    times_s: np.ndarray
    wire_packets: np.ndarray
    failed: np.ndarray
    size_bytes: int = field(default=0)

    @property
    def p_fail(self) -> float:
        return float(self.failed.mean())

    @property
    def mean_time_s(self) -> float:
        return float(self.times_s[~self.failed].mean())


def simulate_message(size_bytes: int, link: Link, nic: Nic | None = None, trials: int = DEFAULT_TRIALS,
                     rng: np.random.Generator | int = 0, rate_bps: float | None = None) -> MonteCarlo:
    """Seeded Monte Carlo of the same process, with the retry limit enforced.

    Vectorized over trials: each loop step plays one pass of every unfinished trial, drawing
    the first loss offset and the run of further losses as geometric variables instead of
    one coin per packet. Gives distributions and capped failures, which the expectation cannot.
    """
    nic = nic or Nic.for_rtt(link.rtt_s)
    check_timeout(link, nic)
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    shape = Shape.of(size_bytes, link, rate_bps)
    n, tau, delta = shape.packets, shape.tau, shape.delta
    p, p_ack = link.loss, link.reverse_loss
    rtt, rto, w = link.rtt_s, nic.timeout_s, link.rtt_s / shape.tau
    t = np.zeros(trials)
    wire = np.zeros(trials)
    base = np.zeros(trials, dtype=np.int64)
    retries = np.zeros(trials, dtype=np.int64)
    failed = np.zeros(trials, dtype=bool)
    active = np.arange(trials)
    while active.size:
        k = active.size
        b = base[active]
        dd = n - b
        if p > 0:
            first = rng.geometric(p, k) - 1  # arrivals before the first loss
            arrival = first + rng.geometric(1 - p, k)  # offset of the first arrival after it
        else:
            first = dd
            arrival = dd
        nak_lost = rng.random(k) < p_ack
        ack_lost = rng.random(k) < p_ack
        clean = first >= dd
        tail = ~clean & (arrival >= dd)
        by_nak = ~clean & ~tail & ~nak_lost
        end = dd * tau - delta
        dur = np.where(clean, end + np.where(ack_lost, rto, rtt), end + rto)
        nak_time = (arrival + 1) * tau - np.where(arrival == dd - 1, delta, 0.0) + rtt
        dur = np.where(by_nak, nak_time, dur)
        t[active] += dur
        wire[active] += np.where(by_nak, np.minimum(dd, arrival + 1 + w), dd)
        done = clean & ~ack_lost
        new_base = np.where(clean, n - 1, b + np.minimum(first, dd - 1))
        r = np.where(new_base == b, retries[active] + 1, 1)
        retries[active] = r
        base[active] = new_base
        fail = ~done & (r > nic.retry_cnt)
        failed[active[fail]] = True
        active = active[~done & ~fail]
    return MonteCarlo(t, wire, failed, size_bytes)
