"""`fedrdma bench wire`: the same federation once per wire format, measured in one run.

Same seeds, same silos and data, same mode; only `wire` differs, so what changes is the
bytes on the line, the seconds they take and what the rounding does to the held-out loss.
On loopback the seconds say little (the line is memory); in the lab (`--rate/--rtt`) the
line is the bottleneck, as it is between sites.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedrdma.bench.records import WireFormat, WireResult, WireRound
from fedrdma.bench.wan import BENCH_LAB_NAME, LOOPBACK_PATH, federation_hosts
from fedrdma.core.modes import Mode, Wire
from fedrdma.fl.demo import DEMO_SILOS, LOCAL, Hosts, run_federation
from fedrdma.fl.records import AggregatorRound
from fedrdma.lab.config import DEFAULT_MTU, LabConfig, PathShape
from fedrdma.lab.lab import lab as running_lab

WIRE_SILOS = DEMO_SILOS[:2]
"""Two silos on their own corpora: enough for a mean, and the lab gives each its own path."""

WIRE_SETTINGS = {"first_broadcast": "unless-held"}
"""Every format's silos start from the model they build themselves, so no format pays a
whole first broadcast and the ratios are those of the rounds, not of the start-up."""


def _format(records: Sequence[AggregatorRound]) -> WireFormat:
    initial = next((r.eval_loss for r in records if r.round == 0), None)
    rounds = [WireRound(round=r.round, eval_loss=r.eval_loss, comm_seconds=r.comm_seconds,
                        codec_seconds=r.codec_seconds + r.silo_mean("silo_codec_seconds"),
                        bytes_up=sum(s.upload_bytes or 0 for s in r.silos),
                        bytes_down=sum(s.broadcast_bytes or 0 for s in r.silos))
              for r in records if r.round > 0]
    return WireFormat(initial_loss=initial, rounds=rounds)


def run_wire_bench(model: str, rounds: int, formats: Sequence[Wire], mode: Mode, out_dir: Path,
                   shape: PathShape | None = None, mtu: int = DEFAULT_MTU,
                   on_round: Callable[[Wire, AggregatorRound], None] = lambda w, r: None) -> WireResult:
    """Each format's federation in turn, on loopback or on one lab (one path per silo, kept up for all)."""
    results: dict[str, WireFormat] = {}

    def each(hosts: Hosts) -> None:
        for wire in formats:
            records = run_federation(out_dir / wire, mode, rounds, model, False, WIRE_SILOS, hosts=hosts, wire=wire,
                                     on_round=lambda r, w=wire: on_round(w, r), aggregator_settings=WIRE_SETTINGS)
            results[wire] = _format(records)

    if shape is None:
        each(LOCAL)
    else:
        with running_lab(LabConfig(name=BENCH_LAB_NAME, mtu=mtu, paths=(shape,) * len(WIRE_SILOS))) as lab:
            each(federation_hosts(lab))
    return WireResult(model=model, mode=mode, silos=list(WIRE_SILOS), rounds_asked=rounds,
                      first_broadcast=WIRE_SETTINGS["first_broadcast"],
                      path=LOOPBACK_PATH if shape is None else shape.describe(), formats=results, time=time.time())


def _over(value: float, base: float) -> float | None:
    return value / base if base > 0 else None


def ratios(result: WireResult) -> dict[str, dict[str, float | None]]:
    """Per format, against fp32 in the same run: upload bytes, broadcast bytes after the first
    round, communication seconds per round (without and with encoding and decoding, and over
    the rounds after the first, whose broadcast is the same in every format: whole, or none),
    and the final held-out loss (as a change). None where fp32's figure is 0 or missing."""
    base = result.formats.get(Wire.FP32)
    out: dict[str, dict[str, float | None]] = {}
    if base is None:
        return out
    base_comm, base_both = base.per_round("comm_seconds"), base.per_round("comm_seconds", "codec_seconds")
    base_later = base.per_round("comm_seconds", after=1)
    for wire, fmt in result.formats.items():
        comm, both = fmt.per_round("comm_seconds"), fmt.per_round("comm_seconds", "codec_seconds")
        final, base_final = fmt.rounds[-1].eval_loss, base.rounds[-1].eval_loss
        out[wire] = {
            "bytes_up": _over(fmt.total("bytes_up"), base.total("bytes_up")),
            "bytes_down_after_first": _over(fmt.total("bytes_down", 1), base.total("bytes_down", 1)),
            "comm_seconds": _over(comm, base_comm),
            "comm_seconds_after_first": _over(fmt.per_round("comm_seconds", after=1), base_later),
            "comm_and_codec_seconds": _over(both, base_both),
            "loss_change": (final / base_final - 1) if final is not None and base_final else None,
        }
    return out
