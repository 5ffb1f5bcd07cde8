"""`fedrdma bench paper`: the FedRDMA paper's tables, measured in the WAN lab of this host.

T1 communication share of a round, T2 goodput by chunk size and window per path (with the
RoCE model beside it), T3 transfer time per mode, T4 CPU and memory per transfer. Every
figure is a median with its minimum over at least `repeat` runs, and every row says the
link it was measured on. The results go to DIR/paper.json, DIR/report.md and PNGs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrdma.bench import transfer
from fedrdma.bench.records import (
    ChunkWindow,
    Host,
    ModelChunk,
    ModelPick,
    PaperResult,
    T1Round,
    T1Row,
    T1Table,
    T2Path,
    T2Table,
    T3Row,
    T3Table,
    T4Row,
    T4Table,
)
from fedrdma.bench.sweep import best, run_cells
from fedrdma.bench.wan import LOOPBACK_PATH, ON_LOOPBACK, federation_hosts, placement
from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW
from fedrdma.core.errors import RunError
from fedrdma.core.modes import Mode
from fedrdma.lab.config import LabConfig, PathShape
from fedrdma.lab.lab import lab as running_lab
from fedrdma.lab.units import format_duration, format_rate

TABLES = ("T1", "T2", "T3", "T4")
PAPER_LAB = "frpaper"
"""The paper benchmark's own lab name: it never touches a user's lab."""

MIN_REPEAT = 3
"""The issue's floor: at least 3 counted runs per figure, reported as min and median."""

REFERENCE_RATE, REFERENCE_RTT = "1gbit", "20ms"
"""The reference WAN path every T2 variation departs from, and T3's WAN column."""

T2_RATES = ("100mbit", REFERENCE_RATE, "ceiling")
T2_RTTS = ("1ms", "80ms")
T2_LOSSES = (0.001, 0.01)
"""One factor at a time around the reference path: rate, then RTT, then loss."""

T2_CHUNKS = (256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
T2_WINDOWS = (2, 8, 32)
"""256 KiB-64 MiB chunks (plus unchunked) and windows from 2 to 32 in flight."""

CEILING_HEADROOM = 0.8
"""T2's fastest path runs at this fraction of the delay element's ceiling, in 0.5 Gbit/s
steps: at the ceiling itself the lab would measure the element, not the link."""

T2_SECONDS = 0.5
"""Each T2 transfer lasts about this long on its line (the state is sized for it): long
against the RTT, short enough that the slow cells (small chunks, small windows) finish."""

T2_MIN_BYTES, T2_MAX_BYTES = 32 << 20, 256 << 20
"""State bounds for T2: 32 MiB keeps 100 Mbit/s cells under 3 s, 256 MiB fills fast paths."""

T1_RATES = (REFERENCE_RATE, "5gbit")
T1_MODES = (Mode.GRPC, Mode.RDMA, Mode.RDMA_E)
T1_MODEL = "gpt2-small"
T1_LOCAL_STEPS = 2
"""A few local steps, as in the demo: a CPU host trains GPT-2 small slowly."""

T1_SILOS = 1
"""One silo: real silos train on their own hardware; two here would split 2 cores and
inflate compute, and share one delay element."""

T3_MODELS = ("gpt2-small", "gpt2-medium")
T3_MODES = (Mode.GRPC, Mode.RDMA, Mode.RDMA_E, Mode.RDMA_E_PULL)
T4_MODES = (Mode.GRPC, Mode.RDMA, Mode.RDMA_E)


@dataclass(frozen=True)
class Step:
    """Progress callbacks: a new step (with its number of transfers) and one transfer done."""

    start: Callable[[str, int], None]
    advance: Callable[[], None]


def _quiet() -> Step:
    return Step(lambda _d, _n: None, lambda: None)


def _path_label(shape: PathShape) -> str:
    return f"{format_rate(shape.rate_bps)} / {format_duration(shape.rtt_s)} / loss {shape.loss:g}"


# --- T2 -------------------------------------------------------------------------------------


def t2_paths(ceiling_bps: float, top_bps: float | None = None) -> list[PathShape]:
    """T2's paths; `top_bps` pins the fastest one (a rerun keeps its predecessor's) if the element allows it."""
    top = math.floor(CEILING_HEADROOM * ceiling_bps / 0.5e9) * 0.5e9
    if top_bps is not None and top_bps <= CEILING_HEADROOM * ceiling_bps:
        top = top_bps
    paths = []
    for rate in T2_RATES:
        paths.append(PathShape.of(int(top) if rate == "ceiling" else rate, REFERENCE_RTT, 0))
    paths += [PathShape.of(REFERENCE_RATE, rtt, 0) for rtt in T2_RTTS]
    paths += [PathShape.of(REFERENCE_RATE, REFERENCE_RTT, loss) for loss in T2_LOSSES]
    return paths


def t2_state_bytes(rate_bps: float) -> int:
    want = int(rate_bps / 8 * T2_SECONDS)
    return max(T2_MIN_BYTES, min(T2_MAX_BYTES, want)) >> 20 << 20


def t2_cells(nbytes: int) -> list[tuple[int, int]]:
    """Chunk x window, leaving out windows that hold more than the state; unchunked once."""
    cells = [(c, w) for c in T2_CHUNKS for w in T2_WINDOWS if c < nbytes and c * (w - 1) < nbytes]
    return cells + [(nbytes, 1)]


def run_t2(repeat: int, step: Step, mtu: int, top_bps: float | None = None) -> T2Table:
    from fedrdma.sim.tune import recommend

    def measure(shape: PathShape, lab: Any) -> T2Path:
        assert shape.rate_bps is not None
        nbytes = t2_state_bytes(shape.rate_bps)
        cells = t2_cells(nbytes)
        step.start(f"T2 {_path_label(shape)}", len(cells) * (repeat + transfer.WARMUP))
        results = run_cells(nbytes, cells, repeat, placement(lab), on_transfer=step.advance)
        top = best(results, nbytes)
        model = recommend(shape.rate_bps, shape.rtt_s, shape.loss, state_bytes=nbytes)
        return T2Path(
            rate_bps=shape.rate_bps, rtt_s=shape.rtt_s, loss=shape.loss, state_bytes=nbytes,
            label=_path_label(shape),
            cells=[r.row(nbytes, shape.rate_bps) for r in results],
            best=ChunkWindow(chunk_size=top.chunk_size, window=top.window),
            model=ModelPick(
                chunk_size=model.chunk_size, window=model.window, goodput_fraction=model.goodput_fraction,
                by_chunk=[ModelChunk(chunk_size=row.chunk_bytes or nbytes, unchunked=row.chunk_bytes is None,
                                     goodput_fraction=row.result.goodput_bps / shape.rate_bps,
                                     p_fail=row.result.p_fail) for row in model.rows],
            ),
        )

    # The reference path's lab also tells the element's ceiling, which sets the fastest path.
    reference = PathShape.of(REFERENCE_RATE, REFERENCE_RTT, 0)
    with running_lab(LabConfig(name=PAPER_LAB, mtu=mtu, paths=(reference,))) as lab:
        ceiling = lab.ceiling_bps
        if not ceiling:
            raise RunError("the lab did not report its delay element's ceiling")
        measured = {reference: measure(reference, lab)}
    paths = t2_paths(ceiling, top_bps)
    for shape in paths:
        if shape not in measured:
            with running_lab(LabConfig(name=PAPER_LAB, mtu=mtu, paths=(shape,))) as lab:
                measured[shape] = measure(shape, lab)
    return T2Table(paths=[measured[s] for s in paths], mtu=mtu, repeat=repeat, ceiling_bps=ceiling)


# --- T3 and T4 ------------------------------------------------------------------------------


def run_t3(repeat: int, step: Step, mtu: int) -> T3Table:
    from fedrdma.bench.states import gpt2_layout

    configs = [(m, lora) for m in T3_MODELS for lora in (False, True)]
    sizes = {c: gpt2_layout(*c).nbytes for c in configs}
    out = T3Table(repeat=repeat, interleaved=True, rows=[])

    def measure(where_label: str, where: Any) -> None:
        for model, lora in configs:
            nbytes = sizes[(model, lora)]
            step.start(f"T3 {model}{' LoRA' if lora else ''} on {where_label}",
                       len(T3_MODES) * repeat * (1 + transfer.WARMUP))
            size_args = ["--model", model, *(["--lora"] if lora else [])]
            host = [memcpy_gb_s()]
            res = transfer.run(size_args, nbytes, T3_MODES, min(DEFAULT_CHUNK_SIZE, nbytes), DEFAULT_WINDOW,
                               repeat, on_transfer=step.advance, where=where, references=False, interleave=True)
            host.append(memcpy_gb_s())
            out.rows.append(T3Row(model=model, lora=lora, state_bytes=nbytes, path=where_label,
                                  link_rate_gbit=res.link_rate_gbit, rtt_ms=res.rtt_ms, memcpy_gb_s=host,
                                  modes=res.modes))

    measure(LOOPBACK_PATH, ON_LOOPBACK)
    shape = PathShape.of(REFERENCE_RATE, REFERENCE_RTT, 0)
    with running_lab(LabConfig(name=PAPER_LAB, mtu=mtu, paths=(shape,))) as lab:
        measure(_path_label(shape), placement(lab))
    return out


def t4_from_t3(t3: T3Table) -> T4Table:
    """CPU and memory per transfer: T3's loopback runs, where nothing but the host limits them."""
    rows = []
    for row in t3.rows:
        if row.path != LOOPBACK_PATH or row.lora:
            continue
        for mode in T4_MODES:
            m = row.modes[mode]
            rows.append(T4Row(model=row.model, state_bytes=row.state_bytes, mode=mode, cpu_seconds=m.cpu_seconds,
                              cpu_seconds_min=m.cpu_seconds if m.cpu_seconds_min is None else m.cpu_seconds_min,
                              receiver_extra_rss_mb=m.receiver_extra_rss_mb, sender_extra_rss_mb=m.sender_extra_rss_mb,
                              seconds=m.seconds))
    return T4Table(repeat=t3.repeat, rows=rows)


# --- T1 -------------------------------------------------------------------------------------


def run_t1(rounds: int, step: Step, mtu: int, logs: Path | None = None) -> T1Table:
    """Federations in the lab; their logs and checkpoints (GBs) go to `logs`, or to scratch."""
    if logs is None:
        with tempfile.TemporaryDirectory(prefix="fedrdma-t1-") as scratch:
            return run_t1(rounds, step, mtu, Path(scratch))
    from fedrdma.fl.demo import run_federation
    from fedrdma.fl.inputs import DEMO_SILOS

    out = T1Table(rounds=rounds, model=T1_MODEL, local_steps=T1_LOCAL_STEPS, silos=T1_SILOS, rows=[])
    for rate in T1_RATES:
        shape = PathShape.of(rate, REFERENCE_RTT, 0)
        with running_lab(LabConfig(name=PAPER_LAB, mtu=mtu, paths=(shape,) * T1_SILOS)) as lab:
            for mode in T1_MODES:
                step.start(f"T1 {mode} on {_path_label(shape)}", rounds)
                records = run_federation(
                    logs / f"{rate}-{mode}", mode, rounds, T1_MODEL, False,
                    DEMO_SILOS[:T1_SILOS], on_round=lambda r: step.advance() if r.round > 0 else None,
                    hosts=federation_hosts(lab), local_steps=T1_LOCAL_STEPS,
                )
                assert shape.rate_bps is not None
                out.rows.append(T1Row(rate_bps=shape.rate_bps, rtt_s=shape.rtt_s, mode=mode, path=_path_label(shape),
                                      rounds=[T1Round.of(r) for r in records if r.round > 0]))
    return out


# --- the whole run --------------------------------------------------------------------------


PREVIOUS = "paper.previous.json"
"""Where a rerun keeps the result it replaces, so its comparison can be made again."""


def keep_previous(out_dir: Path, against: Path | None) -> Path | None:
    """The earlier result a run compares itself with: `against`, or the one already in DIR.

    Checked before anything is measured: a long run must not end on an unreadable file.
    """
    from fedrdma.bench.compare import load

    current = out_dir / "paper.json"
    if against is not None:
        load(against)
        return against
    if not current.exists():
        return None
    load(current)
    kept = out_dir / PREVIOUS
    shutil.copyfile(current, kept)
    return kept


def run_paper(out_dir: Path, tables: Sequence[str] = TABLES, repeat: int = MIN_REPEAT, mtu: int = 9000,
              step: Step | None = None, command: str = "", against: Path | None = None,
              logs: Path | None = None) -> PaperResult:
    """Measure `tables` into DIR; `against` is an earlier result the report compares with."""
    step = step or _quiet()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result = PaperResult(
        command=command,
        host=Host(machine=platform.machine(), python=sys.version.split()[0], cpus=_cpus(),
                  memcpy_gb_s=[memcpy_gb_s()]),
        mtu=mtu, repeat=repeat,
    )
    from fedrdma.bench.compare import load

    before = load(against) if against is not None else None
    if against is not None:
        inside = against.resolve().parent == out_dir.resolve()
        result.against = against.name if inside else str(against.resolve())

    def save() -> None:
        """After every table: a run cut short still leaves a report of what it measured."""
        result.minutes = (time.time() - started) / 60
        _save(out_dir, result, before)

    if "T3" in tables or "T4" in tables:
        t3 = run_t3(repeat, step, mtu)
        if "T3" in tables:
            result.tables.T3 = t3
        if "T4" in tables:
            result.tables.T4 = t4_from_t3(t3)
        save()
    if "T2" in tables:
        result.tables.T2 = run_t2(repeat, step, mtu, _previous_top(before))
        save()
    if "T1" in tables:
        result.tables.T1 = run_t1(repeat, step, mtu, logs)
    result.host.memcpy_gb_s.append(memcpy_gb_s())
    save()
    return result


def _save(out_dir: Path, result: PaperResult, before: PaperResult | None) -> None:
    """paper.json and the report, with the comparison against `before` made afresh."""
    from fedrdma.bench.compare import compare, repeat_summary
    from fedrdma.bench.report import write_report

    comparison = compare(before, result) if before is not None else None
    if comparison is not None:
        result.repeats = repeat_summary(comparison)
    (out_dir / "paper.json").write_text(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
    write_report(result, out_dir, before, comparison)


def rewrite_report(out_dir: Path) -> PaperResult:
    """The report, plots and comparison of DIR's paper.json again, measuring nothing.

    For a report whose form changed after a long run: the figures stay as measured.
    """
    from fedrdma.bench.compare import load

    result = load(out_dir / "paper.json")
    # `against` is a name inside DIR or an absolute path; joining keeps an absolute one whole.
    before = load(out_dir / result.against) if result.against else None
    _save(out_dir, result, before)
    return result


def _previous_top(before: PaperResult | None) -> float | None:
    """The fastest T2 path of the run we compare with: the same path makes the same figures comparable."""
    if before is None or before.tables.T2 is None:
        return None
    return max((p.rate_bps for p in before.tables.T2.paths), default=None)


CALIBRATION_BYTES = 256 << 20
"""Large against the caches, so it is the memory that gets measured; copied in well under 1 s."""

CALIBRATION_TRIES = 5
"""Best of a few copies: the first pays for page faults."""


def memcpy_gb_s() -> float:
    """The host's memory copy rate: loopback seconds scale with it, and a shared VM's drifts."""
    import torch

    src = torch.ones(CALIBRATION_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    fastest = math.inf
    for _ in range(CALIBRATION_TRIES):
        start = time.perf_counter()
        dst.copy_(src)
        fastest = min(fastest, time.perf_counter() - start)
    return CALIBRATION_BYTES / fastest / 1e9


def _cpus() -> int:
    return len(os.sched_getaffinity(0))

