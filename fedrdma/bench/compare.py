"""Do two `bench paper` runs give the same tables? Figure by figure, within noise.

A table's claims are ratios measured within one run: a share of the round (T1), a fraction
of the line (T2), a speedup over grpc (T3), CPU relative to grpc and memory held (T4). Those
decide the verdict. Absolute seconds are compared too and shown, but they follow the host's
speed, which changes between runs on a shared VM (the brief: compare within one run).

Two runs' medians agree when they differ by no more than the larger of: a relative
tolerance, a floor in the figure's unit, and the spread both runs measured themselves
(median to min, or to best; for a ratio, the range its two figures' spreads allow). The
last term is the honest one: a figure whose own repetitions swing by 30 % cannot be
expected to repeat to 10 %. T2's conclusion is checked too: each run's best cell must be
within noise of the other run's best on that path.

Some claims are bound by the host rather than by the line or the transport: ratios between
modes measured on loopback (T3's loopback speedups, T4's CPU against grpc), where nothing
but this VM's cores and memory limits either side, and grpc and rdma pay allocations and
copies of the whole state that rdma-e does not. Between rows of one run the host moves
them more than any within-run spread shows (the README's "Host-bound claims" gives a case).
They are judged apart: listed with whether their direction (faster or slower than grpc, or
at parity) held, and left out of the verdict unless asked for (`strict`).

Runs are read as `PaperResult` records (fedrdma.bench.records), so a result written before
a field existed compares with one written after.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fedrdma.bench.records import Cell, PaperResult, Repeats, T1Table, T2Path, T2Table, T3Table, T4Table, TableCounts
from fedrdma.bench.wan import LOOPBACK_PATH
from fedrdma.core.modes import Mode
from fedrdma.core.sizes import WHOLE, chunk_label

REL_TOLERANCE = 0.10
"""Run-to-run swing of this 2-core host, with nothing else changed (the README's WAN section
lists four runs of one build on the 5 Gbit/s path)."""

FLOORS = {"s": 0.003, "of line": 0.02, "% of round": 3.0, "CPU s": 0.05, "MiB": 64.0, "x grpc": 0.05}
"""Smallest difference that counts, per unit: a few ms of scheduling on millisecond LoRA
transfers; 2 % of a line; 3 points of a round's share; 50 ms of CPU; 64 MiB of RSS, which
moves with the allocator's arenas rather than with the transport; and 0.05 of a ratio."""


CLAIM = "claims"
"""A ratio measured within one run and bound by the line or the transport: it decides the verdict."""

HOST_BOUND = "host-bound claims"
"""A ratio between modes that only the host limits (loopback): judged by its direction."""

ABSOLUTE = "absolute (host-dependent)"
"""Seconds and CPU seconds: they follow the host's speed; shown, never judged."""

KINDS = (CLAIM, HOST_BOUND, ABSOLUTE)

PARITY = 0.10
"""A ratio within this of 1.0 is parity: neither mode is faster (the relative tolerance)."""


@dataclass(frozen=True)
class Figure:
    """One number of a table: its median, and how far its own repetitions strayed from it."""

    table: str
    name: str
    unit: str
    value: float
    spread: float = 0.0
    kind: str = CLAIM

    @property
    def direction(self) -> str:
        """Of a ratio against grpc: which side of parity it falls on."""
        if abs(self.value - 1.0) <= PARITY:
            return "parity"
        return "above" if self.value > 1.0 else "below"

    def __post_init__(self) -> None:
        object.__setattr__(self, "spread", max(0.0, self.spread))  # a best below the median is no spread


@dataclass(frozen=True)
class Pair:
    before: Figure
    after: Figure

    @property
    def difference(self) -> float:
        return self.after.value - self.before.value

    @property
    def relative(self) -> float:
        base = max(abs(self.before.value), abs(self.after.value))
        return abs(self.difference) / base if base else 0.0

    @property
    def tolerance(self) -> float:
        base = max(abs(self.before.value), abs(self.after.value))
        return max(REL_TOLERANCE * base, FLOORS.get(self.after.unit, 0.0), self.before.spread + self.after.spread)

    @property
    def agrees(self) -> bool:
        return abs(self.difference) <= self.tolerance

    @property
    def direction_holds(self) -> bool:
        """Both runs put the ratio on the same side of parity (or agree outright)."""
        return self.agrees or self.before.direction == self.after.direction


@dataclass(frozen=True)
class Pick:
    """T2's conclusion on one path: each run's best cell, and how the other run scored it."""

    path: str
    before: str
    after: str
    before_of_after: float  # the earlier run's goodput for the later run's best cell
    before_best: float
    after_of_before: float
    after_best: float
    tolerance: float

    @property
    def holds(self) -> bool:
        return (self.before_best - self.before_of_after <= self.tolerance
                and self.after_best - self.after_of_before <= self.tolerance)


@dataclass(frozen=True)
class Comparison:
    pairs: list[Pair]
    picks: list[Pick]
    only_before: list[str]
    only_after: list[str]

    @property
    def claims(self) -> list[Pair]:
        """The claims bound by the line or the transport: the ones the verdict rests on."""
        return [p for p in self.pairs if p.after.kind == CLAIM]

    @property
    def host_bound(self) -> list[Pair]:
        return [p for p in self.pairs if p.after.kind == HOST_BOUND]

    @property
    def agrees(self) -> bool:
        """The verdict: every line-bound claim repeats within noise, and T2's best cells hold."""
        return all(p.agrees for p in self.claims) and all(p.holds for p in self.picks)

    @property
    def agrees_strictly(self) -> bool:
        """The verdict with host-bound claims held to the same rule."""
        return self.agrees and all(p.agrees for p in self.host_bound)

    def tables(self) -> list[str]:
        return sorted({p.after.table for p in self.pairs})


# --- figures of each table -----------------------------------------------------------------


def _cell_label(chunk: int, window: int, state: int) -> str:
    label = chunk_label(chunk, state)
    return label if label == WHOLE else f"{label} x {window}"


def _t1(t1: T1Table) -> Iterable[Figure]:
    for row in t1.rows:
        shares = [r.comm_share * 100 for r in row.rounds]
        med = statistics.median(shares)
        yield Figure("T1", f"{row.path}, {row.mode}", "% of round", med, max(shares) - min(shares))


def _t2_best(path: T2Path, cell: Cell) -> float:
    return cell.goodput_gbit_s_best * 1e9 / path.rate_bps


def _t2(t2: T2Table) -> Iterable[Figure]:
    for path in t2.paths:
        for cell in path.cells:
            name = f"{path.label}, {_cell_label(cell.chunk_size, cell.window, path.state_bytes)}"
            yield Figure("T2", name, "of line", path.of_line(cell), _t2_best(path, cell) - path.of_line(cell))


def _ratio(num: tuple[float, float | None], den: tuple[float, float | None], floor: float) -> tuple[float, float]:
    """num/den of two (median, min) figures and its spread: the widest the ratio goes when each
    figure moves within its own range (median to min, widened by the unit's floor)."""
    (num_med, num_min), (den_med, den_min) = num, den
    ratio = num_med / den_med
    num_min = num_med if num_min is None else num_min  # older runs: median only
    den_min = den_med if den_min is None else den_min
    lo = max(num_min - floor, 0.0) / (den_med + floor)
    hi = (num_med + floor) / max(den_min - floor, 1e-9)
    return ratio, max(ratio - lo, hi - ratio)


def _t3(t3: T3Table) -> Iterable[Figure]:
    for row in t3.rows:
        grpc = row.modes.get(Mode.GRPC)
        kind = HOST_BOUND if row.path == LOOPBACK_PATH else CLAIM
        state = f"{row.model} {'LoRA' if row.lora else 'full'}"
        for mode, m in row.modes.items():
            name = f"{state}, {row.path}, {mode}"
            yield Figure("T3", name, "s", m.seconds, m.seconds - m.seconds_min, kind=ABSOLUTE)
            if grpc is not None and mode != Mode.GRPC:
                speedup, spread = _ratio((grpc.seconds, grpc.seconds_min), (m.seconds, m.seconds_min), FLOORS["s"])
                yield Figure("T3", name, "x grpc", speedup, spread, kind=kind)


def _t4(t4: T4Table) -> Iterable[Figure]:
    grpc = {row.model: row for row in t4.rows if row.mode == Mode.GRPC}
    for row in t4.rows:
        name = f"{row.model}, {row.mode}"
        cpu_min = row.cpu_seconds if row.cpu_seconds_min is None else row.cpu_seconds_min
        yield Figure("T4", f"{name}, CPU", "CPU s", row.cpu_seconds, row.cpu_seconds - cpu_min, kind=ABSOLUTE)
        base = grpc.get(row.model)
        if base is not None and row.mode != Mode.GRPC:  # T4 comes from T3's loopback runs
            yield Figure("T4", f"{name}, CPU", "x grpc", *_ratio((row.cpu_seconds, row.cpu_seconds_min),
                                                                 (base.cpu_seconds, base.cpu_seconds_min),
                                                                 FLOORS["CPU s"]), kind=HOST_BOUND)
        yield Figure("T4", f"{name}, receiver +RSS", "MiB", row.receiver_extra_rss_mb)


EXTRACTORS = {"T1": _t1, "T2": _t2, "T3": _t3, "T4": _t4}


def figures(result: PaperResult) -> dict[tuple[str, str, str], Figure]:
    out: dict[tuple[str, str, str], Figure] = {}
    for name, extract in EXTRACTORS.items():
        table = getattr(result.tables, name)
        if table is not None:
            for fig in extract(table):
                out[(fig.table, fig.name, fig.unit)] = fig
    return out


def _picks(before: PaperResult, after: PaperResult) -> list[Pick]:
    if before.tables.T2 is None or after.tables.T2 is None:
        return []
    earlier = {p.label: p for p in before.tables.T2.paths}
    picks = []
    for path in after.tables.T2.paths:
        prev = earlier.get(path.label)
        if prev is None:
            continue
        cells_b = {(c.chunk_size, c.window): c for c in prev.cells}
        cells_a = {(c.chunk_size, c.window): c for c in path.cells}
        best_b = (prev.best.chunk_size, prev.best.window)
        best_a = (path.best.chunk_size, path.best.window)
        if best_a not in cells_b or best_b not in cells_a:
            continue  # different grids: the figures' lists already say so
        top_b, top_a = cells_b[best_b], cells_a[best_a]
        spread = (_t2_best(prev, top_b) - prev.of_line(top_b)) + (_t2_best(path, top_a) - path.of_line(top_a))
        tolerance = max(REL_TOLERANCE * max(path.of_line(top_a), prev.of_line(top_b)), FLOORS["of line"], spread)
        state = path.state_bytes
        picks.append(Pick(
            path=path.label, before=_cell_label(*best_b, state), after=_cell_label(*best_a, state),
            before_of_after=prev.of_line(cells_b[best_a]), before_best=prev.of_line(top_b),
            after_of_before=path.of_line(cells_a[best_b]), after_best=path.of_line(top_a), tolerance=tolerance,
        ))
    return picks


def compare(before: PaperResult, after: PaperResult) -> Comparison:
    """Pair the figures of the tables both runs measured; list the ones only one run has."""
    common = before.tables.names() & after.tables.names()
    a = {k: f for k, f in figures(before).items() if k[0] in common}
    b = {k: f for k, f in figures(after).items() if k[0] in common}
    pairs = [Pair(a[k], b[k]) for k in b if k in a]
    return Comparison(
        pairs=pairs, picks=_picks(before, after),
        only_before=[f"{t}: {n} ({u})" for t, n, u in a if (t, n, u) not in b],
        only_after=[f"{t}: {n} ({u})" for t, n, u in b if (t, n, u) not in a],
    )


def load(path: Path) -> PaperResult:
    """A `bench paper` result, or an error that says what the file is not."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a bench paper result ({exc})") from exc
    if not isinstance(result, dict) or not isinstance(result.get("tables"), dict):
        raise ValueError(f"{path} is not a bench paper result (it has no 'tables'); "
                         "give the paper.json that `fedrdma bench paper` wrote")
    try:
        return PaperResult.model_validate(result)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise ValueError(f"{path} is not a bench paper result this version reads ({where}); "
                         "see docs/schemas/bench-paper.schema.json") from None


def groups(comparison: Comparison) -> list[tuple[str, str, list[Pair]]]:
    """(table, kind, pairs): the rows of a summary, in KINDS order within each table."""
    out = []
    for table in comparison.tables():
        for kind in KINDS:
            pairs = [p for p in comparison.pairs if p.after.table == table and p.after.kind == kind]
            if pairs:
                out.append((table, kind, pairs))
    return out


def held(kind: str, pairs: list[Pair]) -> str:
    """What a summary row says of direction: only host-bound claims are judged by it."""
    return str(sum(p.direction_holds for p in pairs)) if kind == HOST_BOUND else ""


def repeat_summary(comparison: Comparison) -> Repeats:
    """What paper.json records of a comparison: the verdict and the counts per table."""
    tables = {f"{t} {kind}": TableCounts(figures=len(ps), within_noise=sum(p.agrees for p in ps),
                                         direction_holds=sum(p.direction_holds for p in ps) if kind == HOST_BOUND
                                         else None)
              for t, kind, ps in groups(comparison)}
    return Repeats(agrees=comparison.agrees, agrees_strictly=comparison.agrees_strictly, tables=tables,
                   t2_picks_hold=all(p.holds for p in comparison.picks))


# --- markdown -----------------------------------------------------------------------------


_KIND_LABEL = {CLAIM: "claim", HOST_BOUND: "host-bound claim", ABSOLUTE: "absolute"}


def _fmt(value: float, unit: str) -> str:
    if unit == "of line":
        return f"{value:.3f}"
    if unit == "% of round":
        return f"{value:.1f} %"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    if unit == "x grpc":
        return f"{value:.2f}x"
    return f"{value:.3f} s"


def host_speed(result: PaperResult) -> str:
    """The memory copy rates a run recorded at its start and end, for the reader to weigh its seconds."""
    rates = result.host.memcpy_gb_s
    return " / ".join(f"{r:.1f}" for r in rates) + " GB/s" if rates else "not recorded"


def markdown(comparison: Comparison, before_name: str, hosts: tuple[str, str] | None = None) -> str:
    """The report's repeatability section: a summary per table, T2's picks, every disagreement."""
    rows = []
    for table, kind, pairs in groups(comparison):
        agree = sum(p.agrees for p in pairs)
        worst = max(pairs, key=lambda p: p.relative)
        units = ", ".join(sorted({p.after.unit for p in pairs}))
        rows.append(f"| {table} | {kind}: {units} | {len(pairs)} | {agree} | {held(kind, pairs)} | "
                    f"{100 * statistics.median(p.relative for p in pairs):.1f} % | "
                    f"{100 * worst.relative:.0f} % ({worst.after.name}) |")
    verdict = ("Every claim bound by the line or the transport repeats within noise." if comparison.agrees else
               "Not every claim bound by the line or the transport repeats within noise: the ones that do not "
               "are listed below.")
    hosted = comparison.host_bound
    if hosted:
        verdict += (f" Of {len(hosted)} host-bound claims (ratios between modes on loopback, where only this "
                    f"host's cores and memory limit either side), {sum(p.agrees for p in hosted)} repeat within "
                    f"noise and {held(HOST_BOUND, hosted)} keep their direction against grpc (faster, slower, "
                    f"or parity within {PARITY:.0%}); they do not decide the verdict.")
    lines = [
        f"Against `{before_name}`, figure by figure. The verdict rests on the tables' claims, which are ratios "
        "measured within one run (share of the round, fraction of the line, speedup over grpc on a lab path, memory "
        "held); absolute seconds follow the host's speed and are shown beside them. Two medians agree when they "
        f"differ by at most the largest of {REL_TOLERANCE:.0%} of the figure, a floor in its unit ("
        + ", ".join(f"{v:g} {k}" for k, v in FLOORS.items())
        + "), and the spread both runs measured themselves (median to min, or to best). " + verdict,
    ]
    if hosts:
        lines += ["", f"Host speed (memory copy, start and end of each run): before {hosts[0]}, now {hosts[1]}."]
    lines += [
        "",
        "| table | figures | count | within noise | direction holds | median difference | largest difference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if comparison.picks:
        lines += ["", "T2's best cell per path, in each run, and how the other run scored it (of line):", "",
                  "| path | best before | best now | before: its best / now's pick | now: its best / before's pick "
                  "| holds |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {p.path} | {p.before} | {p.after} | {p.before_best:.3f} / {p.before_of_after:.3f} | "
                  f"{p.after_best:.3f} / {p.after_of_before:.3f} | {'yes' if p.holds else '**no**'} |"
                  for p in comparison.picks]
    outliers = [p for p in comparison.pairs if not p.agrees]
    if outliers:
        lines += ["", "Figures outside noise (claims first):", "",
                  "| table | figure | kind | before | now | difference | tolerance |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {p.after.table} | {p.after.name} | {_KIND_LABEL[p.after.kind]} | "
                  f"{_fmt(p.before.value, p.after.unit)} | {_fmt(p.after.value, p.after.unit)} | "
                  f"{100 * p.relative:.0f} % | {_fmt(p.tolerance, p.after.unit)} |"
                  for p in sorted(outliers, key=lambda p: KINDS.index(p.after.kind))]
    for label, names in (("Only in the earlier run", comparison.only_before), ("Only in this run", comparison.only_after)):
        if names:
            lines += ["", f"{label}: " + "; ".join(names) + "."]
    return "\n".join(lines)
