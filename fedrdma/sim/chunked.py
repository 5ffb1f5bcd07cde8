"""The RoCE model of a chunked transfer: one WRITE per chunk, a window of chunks in flight.

Built on `fedrdma.sim.roce`'s model of one message: each in-flight chunk is a message on its
own queue pair, and the NIC shares the link between the queue pairs with packets to send.
Tables over chunk sizes (`chunk_table`, `link_enable`) are what `fedrdma sim` prints and
`fedrdma tune` picks from. Pure, like the model it builds on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedrdma.sim.roce import (
    CHUNK_ATTEMPTS,
    CHUNK_GRID,
    DEFAULT_TRIALS,
    P_FAIL_MAX,
    Link,
    Nic,
    Shape,
    check_timeout,
    log_survive,
    message,
    simulate_message,
)


@dataclass(frozen=True)
class TransferResult:
    """A state of `size_bytes` moved as chunks: expected time, goodput, P(QP error), P(transfer fails)."""

    size_bytes: int
    chunk_bytes: int
    window: int
    chunks: int
    lanes: int
    expected_time_s: float
    goodput_bps: float
    p_qp_error: float
    p_fail: float
    link_bound_s: float
    window_bound_s: float

    @property
    def unchunked(self) -> bool:
        return self.chunks == 1


def _combine(chunks: int, window: int, lat_full: float, lat_last: float, link_full: float, link_last: float,
             rtt: float) -> tuple[float, float, float]:
    """Time = max(link bound, window bound): the link must carry every packet, and one lane
    runs its chunks one after another, each taking at least its own latency."""
    link_bound = (chunks - 1) * link_full + link_last + rtt
    per_lane = -(-chunks // window)  # the lane holding the last chunk has this many
    others_full = (chunks - 1) % window > 0  # an earlier lane holds as many, all full-size
    window_bound = max(per_lane * lat_full if others_full else 0.0, (per_lane - 1) * lat_full + lat_last)
    return max(link_bound, window_bound), link_bound, window_bound


def transfer_plan(size_bytes: int, chunk_bytes: int | None, window: int) -> tuple[int, int, int, int]:
    """(chunk bytes, chunks, last chunk bytes, window) with `None` meaning one unchunked message."""
    if size_bytes <= 0:
        raise ValueError(f"transfer size {size_bytes} bytes must be positive")
    chunk = size_bytes if chunk_bytes is None else min(chunk_bytes, size_bytes)
    if chunk <= 0:
        raise ValueError(f"chunk size {chunk_bytes} bytes must be positive")
    if window < 1:
        raise ValueError(f"window {window} must be at least 1 chunk in flight")
    chunks = -(-size_bytes // chunk)
    return chunk, chunks, size_bytes - (chunks - 1) * chunk, min(window, chunks)


def transfer(size_bytes: int, chunk_bytes: int | None, window: int, link: Link, nic: Nic | None = None,
             attempts: int = CHUNK_ATTEMPTS) -> TransferResult:
    """Expected completion of a chunked transfer.

    Assumptions: each chunk is one RDMA WRITE on its own RC QP ("lane"); `window` lanes run
    at once (`min(window, chunks)`), chunk i on lane i mod window, and a lane starts its next
    chunk when the previous one completed (its final ACK arrived). The NIC shares the link
    among the L lanes with packets to send, so while one lane waits for a NAK the others use
    the line and its go-back-N wastes only BDP/L: wire packets per chunk come from the
    single-message model at rate R/L. A chunk cannot finish faster than alone on the line:
    its latency comes from the model at full rate R. The expected time is the larger of the
    link bound (all wire packets at rate R, plus the last ACK's RTT) and the window bound
    (the busiest lane's latencies in sequence). Both are lower bounds, so the estimate is
    optimistic by at most about one chunk latency; it is exact for one chunk and for
    window 1. A QP error costs one chunk, which the runtime retries `attempts` times in all:
    P(fail) is the chance that some chunk errors on every attempt.
    """
    nic = nic or Nic.for_rtt(link.rtt_s)
    check_timeout(link, nic)
    chunk, chunks, last, lanes = transfer_plan(size_bytes, chunk_bytes, window)
    lane_rate = link.rate_bps / lanes
    tau = link.packet_time()
    full = message(chunk, link, nic)
    last_m = full if last == chunk else message(last, link, nic)
    full_lane = message(chunk, link, nic, rate_bps=lane_rate)
    last_lane = full_lane if last == chunk else message(last, link, nic, rate_bps=lane_rate)
    wire_full = full_lane.expected_wire_packets * tau - Shape.of(chunk, link).delta
    wire_last = last_lane.expected_wire_packets * tau - Shape.of(last, link).delta
    t, link_bound, window_bound = _combine(chunks, lanes, full.expected_time_s, last_m.expected_time_s,
                                           wire_full, wire_last, link.rtt_s)
    log_ok = (chunks - 1) * log_survive(full.p_fail) + log_survive(last_m.p_fail)
    log_ok_app = (chunks - 1) * log_survive(full.p_fail**attempts) + log_survive(last_m.p_fail**attempts)
    return TransferResult(size_bytes, chunk, lanes, chunks, lanes, t, size_bytes * 8 / t, -math.expm1(log_ok),
                          -math.expm1(log_ok_app), link_bound, window_bound)


@dataclass(frozen=True)
class TransferSamples:
    """Monte Carlo of a chunked transfer: per-trial times and whether any chunk's QP errored."""

    times_s: np.ndarray
    qp_error: np.ndarray

    @property
    def mean_time_s(self) -> float:
        return float(self.times_s.mean())


def simulate_transfer(size_bytes: int, chunk_bytes: int | None, window: int, link: Link, nic: Nic | None = None,
                      trials: int = DEFAULT_TRIALS, rng: np.random.Generator | int = 0) -> TransferSamples:
    """Sampled chunk latencies and wire packets, combined per trial as in `transfer`.

    The expectation takes the max of expected bounds; here each trial takes the max of its
    own sums, so the difference shows how much the variance of go-back-N adds.
    """
    nic = nic or Nic.for_rtt(link.rtt_s)
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    chunk, chunks, last, lanes = transfer_plan(size_bytes, chunk_bytes, window)
    tau = link.packet_time()
    sizes = [chunk] * (chunks - 1) + [last]
    lat = np.empty((trials, chunks))
    wire = np.empty((trials, chunks))
    err = np.zeros(trials, dtype=bool)
    for size, cols in _group_columns(sizes):
        full = simulate_message(size, link, nic, trials * len(cols), rng)
        lane = simulate_message(size, link, nic, trials * len(cols), rng, rate_bps=link.rate_bps / lanes)
        lat[:, cols] = full.times_s.reshape(trials, len(cols))
        wire[:, cols] = lane.wire_packets.reshape(trials, len(cols)) * tau - Shape.of(size, link).delta
        err |= full.failed.reshape(trials, len(cols)).any(axis=1)
    lane_of = np.arange(chunks) % lanes
    lane_sums = np.stack([lat[:, lane_of == k].sum(axis=1) for k in range(lanes)], axis=1)
    times = np.maximum(wire.sum(axis=1) + link.rtt_s, lane_sums.max(axis=1))
    return TransferSamples(times, err)


def _group_columns(sizes: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(sizes):
        groups.setdefault(s, []).append(i)
    return [(s, np.array(cols)) for s, cols in groups.items()]


def covering_window(chunk_bytes: int, link: Link, headroom: float, max_window: int) -> int:
    """Chunks in flight so that window x chunk >= headroom x BDP + one chunk being serialized."""
    if chunk_bytes <= 0:
        raise ValueError(f"chunk size {chunk_bytes} bytes must be positive")
    return max(1, min(max_window, math.ceil(headroom * link.bdp_bytes / chunk_bytes) + 1))


@dataclass(frozen=True)
class ChunkRow:
    """One cell group of the Link-Enable table."""

    chunk_bytes: int | None
    window: int
    result: TransferResult
    usable: bool


def chunk_table(size_bytes: int, link: Link, window: int | None = None, nic: Nic | None = None,
                grid: Sequence[int | None] = (*CHUNK_GRID, None), headroom: float = 2.0, max_window: int = 64,
                p_fail_max: float = P_FAIL_MAX) -> list[ChunkRow]:
    """Rows per chunk size (None = unchunked, window 1): goodput, P(fail), expected time.

    `window` fixes the window for every chunk size; by default each chunk size gets the
    window that covers the BDP (`covering_window`), as the tuner would set it.
    """
    rows = []
    for chunk in grid:
        if chunk is not None and chunk >= size_bytes:
            continue  # same as unchunked
        if chunk is None:
            lanes = 1
        else:
            lanes = window or covering_window(chunk, link, headroom, max_window)
        res = transfer(size_bytes, chunk, lanes, link, nic)
        rows.append(ChunkRow(chunk, res.window, res, res.p_fail <= p_fail_max))
    return rows


GOODPUT_TIE = 0.01
"""Goodputs within 1 % are a tie (below the model's accuracy): take the larger chunk, fewer operations."""


def best_row(rows: Sequence[ChunkRow]) -> ChunkRow | None:
    """Link-Enable: the usable row with the highest goodput, ties going to the larger chunk."""
    usable = [r for r in rows if r.usable]
    if not usable:
        return None
    top = max(r.result.goodput_bps for r in usable)
    near = [r for r in usable if r.result.goodput_bps >= (1 - GOODPUT_TIE) * top]
    return max(near, key=lambda r: r.result.chunk_bytes)


def link_enable(size_bytes: int, link: Link, nic: Nic | None = None, **table_args: object) -> ChunkRow | None:
    """The chunk size that keeps this RoCE link usable with the best goodput, or None when none does."""
    return best_row(chunk_table(size_bytes, link, nic=nic, **table_args))  # type: ignore[arg-type]
