"""Chunk size and window for one path, from the RoCE model (`fedrdma tune` without --probe).

The chunk comes from the Link-Enable table (`chunked.chunk_table`): the usable chunk size with
the best modelled goodput. The window is the one that table used for that chunk: enough
chunks in flight to cover the path's bandwidth-delay product with headroom, capped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedrdma.core.chunks import CHUNK_ALIGN
from fedrdma.core.sizes import size_label
from fedrdma.sim import chunked, roce

BDP_HEADROOM = 2.0
"""window x chunk covers 2 x BDP (+ one chunk): NAK round trips and timeouts stretch each
chunk's latency beyond one RTT, and the spare chunks keep the line busy meanwhile."""

MAX_TUNED_WINDOW = 64
"""One QP per chunk in flight: beyond a few dozen QPs per peer the NIC's QP-context cache
misses, and the window-covering rule never needs more on the paths modelled here."""

DEFAULT_STATE_BYTES = 124_439_808 * 4
"""GPT-2 small's trainable state in fp32 (124,439,808 parameters, ~475 MiB): the paper's model."""


@dataclass(frozen=True)
class Recommendation:
    """What to put in the runtime's config (`chunk_size`, `window`), and what the model expects."""

    chunk_size: int
    window: int
    expected_goodput_bps: float
    p_fail: float
    expected_time_s: float
    reasons: tuple[str, ...]
    rate_bps: float
    rtt_s: float
    loss: float
    state_bytes: int
    rows: tuple[chunked.ChunkRow, ...] = field(repr=False, default=())

    @property
    def goodput_fraction(self) -> float:
        return self.expected_goodput_bps / self.rate_bps

    def config(self) -> dict[str, int]:
        """The keys the runtime's config accepts."""
        return {"chunk_size": self.chunk_size, "window": self.window}

    def to_json(self) -> dict[str, Any]:
        return {
            "path": {"rate_bps": self.rate_bps, "rtt_s": self.rtt_s, "loss": self.loss},
            "state_bytes": self.state_bytes,
            "config": self.config(),
            "expected_goodput_bps": self.expected_goodput_bps,
            "goodput_fraction": self.goodput_fraction,
            "p_fail": self.p_fail,
            "expected_time_s": self.expected_time_s,
            "reasons": list(self.reasons),
            "table": [row_json(r) for r in self.rows],
        }


def row_json(row: chunked.ChunkRow) -> dict[str, Any]:
    data = asdict(row.result)
    data.update(chunk_bytes=row.chunk_bytes, unchunked=row.chunk_bytes is None, usable=row.usable)
    return data


def recommend(rate: float, rtt: float, loss: float, state_bytes: int = DEFAULT_STATE_BYTES,
              nic: roce.Nic | None = None, headroom: float = BDP_HEADROOM, max_window: int = MAX_TUNED_WINDOW,
              p_fail_max: float = roce.P_FAIL_MAX) -> Recommendation:
    """Best usable chunk and its window for a path (rate bit/s, RTT s, loss fraction)."""
    link = roce.Link(rate, rtt, loss)
    nic = nic or roce.Nic.for_rtt(rtt)
    rows = chunked.chunk_table(state_bytes, link, nic=nic, headroom=headroom, max_window=max_window,
                            p_fail_max=p_fail_max)
    candidates = [r for r in rows if r.chunk_bytes is not None or state_bytes % CHUNK_ALIGN == 0]
    best = chunked.best_row(candidates)
    reasons: list[str] = []
    if best is None:
        best = min(rows, key=lambda r: r.result.p_fail)
        reasons.append(f"no chunk size keeps P(fail) under {p_fail_max:g} on this path; the least risky is "
                       f"shown: lower the loss or expect failed transfers")
    res = best.result
    chunk = res.chunk_bytes
    bdp = link.bdp_bytes
    if best.chunk_bytes is None:
        reasons.append(f"unchunked: no chunk size beats one {size_label(state_bytes)} WRITE by more than "
                       f"{chunked.GOODPUT_TIE:.0%} on this path, so the fewest operations win")
    else:
        unchunked = next((r for r in rows if r.chunk_bytes is None), None)
        if unchunked is not None:
            reasons.append(f"{size_label(chunk)} chunks: modelled goodput {res.goodput_bps / rate:.2f} of line vs "
                           f"{unchunked.result.goodput_bps / rate:.2f} unchunked (go-back-N resends up to a BDP "
                           f"per loss; a chunk per QP shares that cost across {res.window} lanes)")
    reasons.append(f"window {res.window}: x chunk = {size_label(res.window * chunk)} vs BDP {size_label(round(bdp))} "
                   f"(covers {headroom:g} x BDP + one chunk, at most {max_window})")
    if res.window * chunk < bdp:
        reasons.append(f"the window cap {max_window} cannot cover the BDP with {size_label(chunk)} chunks")
    reasons.append(f"P(transfer fails) {res.p_fail:.1e} with retry_cnt {nic.retry_cnt}, timeout "
                   f"{nic.timeout_s * 1e3:.0f} ms (local_ack_timeout {nic.local_ack_timeout}) and "
                   f"{roce.CHUNK_ATTEMPTS} attempts per chunk")
    return Recommendation(chunk, res.window, res.goodput_bps, res.p_fail, res.expected_time_s, tuple(reasons),
                          rate, rtt, loss, state_bytes, tuple(rows))

