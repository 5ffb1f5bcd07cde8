"""`bench paper`'s pure parts: the T2 grid, and a report with every table from its JSON.

The measurement itself takes ~35 minutes in the lab and is a benchmark, not a test; its
pieces (sweeps, lab placement, federations in namespaces) are tested where they live.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fedrdma.bench import compare as comparing
from fedrdma.bench import report
from fedrdma.bench.compare import ABSOLUTE, CLAIM, HOST_BOUND, Comparison, groups, markdown
from fedrdma.bench.paper import (
    T2_MAX_BYTES,
    T2_MIN_BYTES,
    keep_previous,
    t2_cells,
    t2_paths,
    t2_state_bytes,
    t4_from_t3,
)
from fedrdma.bench.records import PaperResult, T3Table
from fedrdma.cli import app

MIB = 1 << 20


def _paper(result: dict[str, Any]) -> PaperResult:
    """The tests build results as paper.json holds them; the code reads them as records."""
    return PaperResult.model_validate(result)


def compare(before: dict[str, Any], after: dict[str, Any]) -> Comparison:
    return comparing.compare(_paper(before), _paper(after))


def write_report(result: dict[str, Any], out: Path) -> Path:
    return report.write_report(_paper(result), out)


def host_speed(result: dict[str, Any]) -> str:
    return comparing.host_speed(_paper(result))


def test_t2_paths_vary_one_factor_around_the_reference() -> None:
    paths = t2_paths(7.44e9)
    described = [(p.rate_bps, p.rtt_s, p.loss) for p in paths]
    assert described == [
        (100_000_000, 0.02, 0.0), (1_000_000_000, 0.02, 0.0), (5_500_000_000, 0.02, 0.0),  # 0.8 x ceiling
        (1_000_000_000, 0.001, 0.0), (1_000_000_000, 0.08, 0.0),
        (1_000_000_000, 0.02, 0.001), (1_000_000_000, 0.02, 0.01),
    ]


def test_t2_state_and_cells() -> None:
    assert t2_state_bytes(100e6) == T2_MIN_BYTES
    assert t2_state_bytes(1e9) == 59 * MIB
    assert t2_state_bytes(40e9) == T2_MAX_BYTES
    cells = t2_cells(32 * MIB)
    assert cells[-1] == (32 * MIB, 1)  # unchunked, once
    assert (256 << 10, 32) in cells and (16 * MIB, 2) in cells
    assert (16 * MIB, 8) not in cells and all(c < 32 * MIB for c, _ in cells[:-1])


def _cell(chunk: int, window: int, fraction: float) -> dict[str, Any]:
    return {"chunk_size": chunk, "window": window, "vs_line": fraction, "goodput_gbit_s_best": fraction + 0.01,
            "goodput_gbit_s": fraction, "seconds": 1.0, "seconds_min": 0.9, "repeat": 3, "identical": True}


def _mode(seconds: float, seconds_min: float, cpu: float = 1.0, rss: float = 0.0) -> dict[str, Any]:
    return {"seconds": seconds, "seconds_min": seconds_min, "goodput_gb_s": 1.0 / seconds, "cpu_seconds": cpu,
            "receiver_extra_rss_mb": rss, "sender_extra_rss_mb": 1.0, "identical": True, "repeat": 3}


def _modes(scale: float) -> dict[str, dict[str, Any]]:
    return {m: _mode(s * scale, s * scale * 0.9, s, r)
            for m, s, r in (("grpc", 4.0, 1000.0), ("rdma", 2.0, 1500.0), ("rdma-e", 1.0, 0.0),
                            ("rdma-e-pull", 1.5, 0.0))}


def _result() -> dict[str, Any]:
    """A bench paper result with every table, small enough to read: the report's and comparison's input."""
    state = 64 * MIB
    t3 = {"repeat": 3, "rows": [
        {"model": "gpt2-small", "lora": False, "state_bytes": 475 * MIB, "path": "loopback", "modes": _modes(1)},
        {"model": "gpt2-small", "lora": True, "state_bytes": MIB, "path": "loopback", "modes": _modes(0.01)},
        {"model": "gpt2-small", "lora": False, "state_bytes": 475 * MIB, "path": "1gbit / 20ms / loss 0",
         "modes": _modes(10)},
    ]}
    result = {
        "command": "fedrdma bench paper --out X", "host": {"machine": "x86_64", "python": "3.11", "cpus": 2},
        "mtu": 9000, "repeat": 3, "minutes": 30,
        "tables": {
            "T1": {"rounds": 3, "model": "gpt2-small", "local_steps": 2, "silos": 1, "rows": [
                {"path": "1gbit / 20ms / loss 0", "transport": t, "rate_bps": 1e9, "rtt_s": 0.02,
                 "rounds": [{"round": k, "comm_seconds": c, "compute_seconds": 10.0, "comm_share": c / (c + 10)}
                            for k in (1, 2, 3)]} for t, c in (("grpc", 10.0), ("rdma-e", 2.5))]},
            "T2": {"repeat": 3, "mtu": 9000, "ceiling_bps": 7e9, "paths": [{
                "rate_bps": 1e9, "rtt_s": 0.02, "loss": 0.0, "state_bytes": state, "label": "1gbit / 20ms / loss 0",
                "cells": [_cell(MIB, 2, 0.5), _cell(MIB, 8, 0.9), _cell(4 * MIB, 2, 0.7), _cell(4 * MIB, 8, 0.96),
                          _cell(state, 1, 0.8)],
                "best": {"chunk_size": 4 * MIB, "window": 8},
                "model": {"chunk_size": MIB, "window": 8, "goodput_fraction": 0.97, "by_chunk": [
                    {"chunk_size": MIB, "unchunked": False, "goodput_fraction": 0.97, "p_fail": 0.0},
                    {"chunk_size": 4 * MIB, "unchunked": False, "goodput_fraction": 0.95, "p_fail": 0.0},
                    {"chunk_size": state, "unchunked": True, "goodput_fraction": 0.4, "p_fail": 0.1}]},
            }]},
            "T3": t3,
            "T4": t4_from_t3(T3Table.model_validate(t3)).model_dump(mode="json"),
        },
    }
    return result


def test_report_has_every_table_marks_the_best_cell_and_draws_plots(tmp_path: Path) -> None:
    report = write_report(_result(), tmp_path).read_text()
    for title in ("## T1", "## T2", "## T3", "## T4"):
        assert title in report
    assert "`fedrdma bench paper --out X`" in report and "MTU 9000" in report
    assert "| 1gbit / 20ms / loss 0 | grpc | 50.0 (50.0) % |" in report
    assert "**0.960 (0.970)**" in report  # the best cell, bold; others not
    assert report.count("**0.") == 1
    assert "| 1 MiB | 0.500 (0.510) | 0.900 (0.910) | 0.970 ✓ |" in report
    assert "| whole | 0.800 (0.810) | - | 0.400 |" in report
    assert "| gpt2-small full | 475 MiB | 1gbit / 20ms / loss 0 | 40.000 (36.000) |" in report
    assert "4.0x" in report  # rdma-e vs grpc
    assert "host memcpy GB/s" not in report  # a result from before rows sampled the host


def test_interleaved_t3_says_so_and_shows_the_host_beside_each_row(tmp_path: Path) -> None:
    result = _result()
    t3 = result["tables"]["T3"]
    t3["interleaved"] = True
    for row, rates in zip(t3["rows"], ([12.7, 19.4], [19.4, 19.1], [18.0, 18.2]), strict=True):
        row["memcpy_gb_s"] = rates
    report = write_report(result, tmp_path).read_text()
    assert "The modes take turns" in report
    header = next(line for line in report.splitlines() if line.startswith("| state | size | path |"))
    assert header.endswith("| host memcpy GB/s |")
    assert "| 2.7x | 12.7-19.4 |" in report and "| 19.1-19.4 |" in report
    t4_rows = [line for line in report.splitlines() if line.startswith("| gpt2-small | 475 MiB |")]
    assert [row.split(" | ")[2] for row in t4_rows] == ["grpc", "rdma", "rdma-e"]  # loopback, full only
    for png in ("t1.png", "t2.png", "t3.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lora_rows_on_a_wan_path_are_read_in_round_trips(tmp_path: Path) -> None:
    """Beyond the bytes' time on the line, each mode's time is counted in RTTs: the sentence
    that explains why a 1 MiB state gains nothing from one-sided transfers on a WAN path."""
    result = _result()
    t3 = result["tables"]["T3"]
    assert "round trips" not in write_report(result, tmp_path).read_text()  # no LoRA row on a WAN path
    line_s = MIB * 8 / 1e9  # 8.4 ms at 1 Gbit/s
    t3["rows"].append({
        "model": "gpt2-small", "lora": True, "state_bytes": MIB, "path": "1gbit / 20ms / loss 0",
        "link_rate_gbit": 1.0, "rtt_ms": 20.0,
        "modes": {m: _mode(line_s + trips * 0.020, line_s + trips * 0.020)
                  for m, trips in (("grpc", 1.0), ("rdma", 3.0), ("rdma-e", 2.0), ("rdma-e-pull", 2.5))},
    })
    report = write_report(result, tmp_path).read_text()
    assert ("gpt2-small LoRA on 1gbit / 20ms / loss 0 (8 ms on the line): grpc 1.0, rdma 3.0, rdma-e 2.0, "
            "rdma-e-pull 2.5") in report
    assert report.index("round trips") > report.index("## T3") and report.index("round trips") < report.index("## T4")


@pytest.mark.parametrize("args,message", [
    (["--tables", "T9"], "unknown table"),
    (["--repeat", "2"], "at least 3"),
])
def test_bench_paper_refuses_bad_settings(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", "paper", *args])
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")


# --- two runs compared ------------------------------------------------------------------------


def _t3_mode(result: dict[str, Any], row: int, mode: str) -> dict[str, float]:
    return result["tables"]["T3"]["rows"][row]["modes"][mode]


def test_a_run_repeats_itself_and_pairs_every_figure() -> None:
    before = _result()
    comparison = compare(before, copy.deepcopy(before))
    assert comparison.agrees
    counts = {(t, k): len(ps) for t, k, ps in groups(comparison)}
    assert counts == {("T1", CLAIM): 2, ("T2", CLAIM): 5,
                      # 3 speedups over grpc per row (2 rows on loopback, 1 on the WAN); seconds of 4 modes
                      ("T3", CLAIM): 3, ("T3", HOST_BOUND): 6, ("T3", ABSOLUTE): 12,
                      # RSS (3); CPU against grpc (2), from loopback; CPU seconds (3)
                      ("T4", CLAIM): 3, ("T4", HOST_BOUND): 2, ("T4", ABSOLUTE): 3}
    assert comparison.only_before == comparison.only_after == []
    assert [(p.before, p.after, p.holds) for p in comparison.picks] == [("4 MiB x 8", "4 MiB x 8", True)]


def test_a_speedup_beyond_tolerance_and_its_own_spread_is_named() -> None:
    before, after = _result(), _result()
    _t3_mode(after, 2, "rdma-e").update(seconds=13.0, seconds_min=12.5)  # tight runs: the move is real
    comparison = compare(before, after)
    wan = "gpt2-small full, 1gbit / 20ms / loss 0, rdma-e"
    outliers = [(p.after.name, p.after.unit) for p in comparison.pairs if not p.agrees]
    assert outliers == [(wan, "s"), (wan, "x grpc")]
    assert not comparison.agrees
    text = markdown(comparison, "paper.previous.json")
    assert f"| T3 | {wan} | claim | 4.00x | 3.08x | 23 % |" in text
    assert "| T3 | claims: x grpc | 3 | 2 |  |" in text


def test_host_bound_claims_are_judged_by_direction_apart_from_the_verdict() -> None:
    """A loopback speedup that halves while staying above grpc, and a CPU ratio that crosses
    parity: both are named; only --strict lets them decide."""
    before, after = _result(), _result()
    _t3_mode(after, 0, "rdma-e").update(seconds=2.0, seconds_min=1.95)  # 4.0x -> 2.0x: still faster than grpc
    before["tables"]["T4"]["rows"][1].update(cpu_seconds=5.0, cpu_seconds_min=5.0)  # rdma vs grpc: 1.25x ...
    after["tables"]["T4"]["rows"][1].update(cpu_seconds=2.4, cpu_seconds_min=2.4)  # ... -> 0.6x: direction turned
    comparison = compare(before, after)
    moved = {p.after.name: p for p in comparison.host_bound if not p.agrees}
    assert set(moved) == {"gpt2-small full, loopback, rdma-e", "gpt2-small, rdma, CPU"}
    assert moved["gpt2-small full, loopback, rdma-e"].direction_holds
    assert not moved["gpt2-small, rdma, CPU"].direction_holds
    assert comparison.agrees and not comparison.agrees_strictly
    text = markdown(comparison, "x")
    assert "Every claim bound by the line or the transport repeats within noise." in text
    assert "Of 8 host-bound claims" in text and "6 repeat within noise and 7 keep their direction" in text
    assert "| T3 | host-bound claims: x grpc | 6 | 5 | 6 |" in text
    assert "| T4 | gpt2-small, rdma, CPU | host-bound claim | 1.25x | 0.60x |" in text


def test_the_host_getting_faster_moves_seconds_but_not_claims() -> None:
    before, after = _result(), _result()
    for row in range(3):
        for mode in ("grpc", "rdma", "rdma-e", "rdma-e-pull"):
            m = _t3_mode(after, row, mode)
            m.update(seconds=m["seconds"] * 0.6, seconds_min=m["seconds_min"] * 0.6)
    comparison = compare(before, after)
    assert comparison.agrees  # every speedup is what it was
    assert any(not p.agrees for p in comparison.pairs if p.after.unit == "s")
    before["host"]["memcpy_gb_s"], after["host"]["memcpy_gb_s"] = [3.9, 4.0], [6.5, 6.4]
    text = markdown(comparison, "x", (host_speed(before), host_speed(after)))
    assert "before 3.9 / 4.0 GB/s, now 6.5 / 6.4 GB/s" in text
    assert "Every claim bound by the line or the transport repeats within noise." in text


def test_a_move_inside_the_runs_own_spread_is_noise() -> None:
    before, after = _result(), _result()
    _t3_mode(after, 0, "rdma-e").update(seconds=1.15, seconds_min=0.9)  # 13 %: inside spreads 0.1 + 0.25
    assert compare(before, after).agrees
    assert all(p.agrees for p in compare(before, after).pairs)


def test_t2_pick_that_changes_within_noise_holds_and_beyond_does_not() -> None:
    before, after = _result(), _result()
    cells = after["tables"]["T2"]["paths"][0]["cells"]
    cells[1].update(vs_line=0.955, goodput_gbit_s_best=0.965)  # 1 MiB x 8 now edges out 4 MiB x 8
    cells[3].update(vs_line=0.95, goodput_gbit_s_best=0.96)
    after["tables"]["T2"]["paths"][0]["best"] = {"chunk_size": MIB, "window": 8}
    [pick] = compare(before, after).picks
    assert (pick.before, pick.after, pick.holds) == ("4 MiB x 8", "1 MiB x 8", True)
    cells[3]["vs_line"] = 0.6  # the old best collapsed: the conclusion changed
    cells[3]["goodput_gbit_s_best"] = 0.61
    [pick] = compare(before, after).picks
    assert not pick.holds
    assert "| **no** |" in markdown(compare(before, after), "x")


def test_only_tables_both_runs_have_are_compared() -> None:
    before, after = _result(), _result()
    del after["tables"]["T1"]
    after["tables"]["T2"]["paths"][0]["cells"].pop(0)
    comparison = compare(before, after)
    assert "T1" not in comparison.tables()
    assert comparison.only_before == ["T2: 1gbit / 20ms / loss 0, 1 MiB x 2 (of line)"]


def test_rerun_keeps_the_previous_result_and_reports_against_it(tmp_path: Path) -> None:
    assert keep_previous(tmp_path, None) is None  # a first run has nothing to compare with
    (tmp_path / "paper.json").write_text(json.dumps(_result()))
    kept = keep_previous(tmp_path, None)
    assert kept == tmp_path / "paper.previous.json" and json.loads(kept.read_text()) == _result()
    now = _result()
    _t3_mode(now, 1, "grpc").update(seconds=0.5, seconds_min=0.45)  # LoRA grpc: 0.04 s became 0.5 s
    now["against"] = kept.name
    report = write_report(now, tmp_path).read_text()
    assert "## Repeatability: this run against the previous one" in report
    assert "| T3 | gpt2-small LoRA, loopback, grpc | absolute | 0.040 s | 0.500 s | 92 % |" in report
    assert "| T3 | gpt2-small LoRA, loopback, rdma | host-bound claim | 2.00x | 25.00x |" in report
    assert "memory copy not recorded (start / end)" in report


def test_rerun_refuses_an_unreadable_previous_result_before_measuring(tmp_path: Path) -> None:
    (tmp_path / "paper.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a bench paper result"):
        keep_previous(tmp_path, None)
    (tmp_path / "other.json").write_text(json.dumps({"modes": {}}))
    with pytest.raises(ValueError, match="has no 'tables'"):
        keep_previous(tmp_path, tmp_path / "other.json")
    assert not (tmp_path / "paper.previous.json").exists()


def test_t2_rerun_keeps_the_fastest_path_when_the_element_allows() -> None:
    assert t2_paths(8.0e9)[2].rate_bps == 6_000_000_000  # its own pick: 0.8 x ceiling, in 0.5 Gbit/s steps
    assert t2_paths(8.0e9, top_bps=5.5e9)[2].rate_bps == 5_500_000_000  # the previous run's path, kept
    assert t2_paths(6.5e9, top_bps=5.5e9)[2].rate_bps == 5_000_000_000  # too near this element's ceiling


def test_bench_compare_exit_codes_and_markdown(tmp_path: Path) -> None:
    before, after = tmp_path / "a.json", tmp_path / "b.json"
    before.write_text(json.dumps(_result()))
    after.write_text(json.dumps(_result()))
    out = CliRunner().invoke(app, ["bench", "compare", str(before), str(after), "--markdown", str(tmp_path / "c.md")])
    assert out.exit_code == 0, out.output
    assert "every claim repeats within noise" in out.output
    assert "| T2 | claims: of line | 5 | 5 |" in (tmp_path / "c.md").read_text()
    moved = _result()
    _t3_mode(moved, 2, "rdma").update(seconds=40.0, seconds_min=39.0)  # 20 s became 40 s: 2x became 1x grpc
    after.write_text(json.dumps(moved))
    out = CliRunner().invoke(app, ["bench", "compare", str(before), str(after)])
    assert out.exit_code == 1
    assert "some claims differ beyond noise" in out.output
    hosted = _result()
    _t3_mode(hosted, 0, "rdma-e").update(seconds=2.0, seconds_min=1.95)  # a loopback speedup halved
    after.write_text(json.dumps(hosted))
    out = CliRunner().invoke(app, ["bench", "compare", str(before), str(after)])
    assert out.exit_code == 0, out.output
    assert "some host-bound claims moved (0 changed direction; --strict counts them)" in " ".join(out.output.split())
    assert CliRunner().invoke(app, ["bench", "compare", "--strict", str(before), str(after)]).exit_code == 1
    only_t1 = {**_result(), "tables": {"T1": _result()["tables"]["T1"]}}
    after.write_text(json.dumps({**_result(), "tables": {"T3": _result()["tables"]["T3"]}}))
    before.write_text(json.dumps(only_t1))
    out = CliRunner().invoke(app, ["bench", "compare", str(before), str(after)])
    unboxed = " ".join(" ".join(line.strip("│╭╮╰╯─ ").split()) for line in out.output.splitlines())
    assert out.exit_code == 2 and "have no table in common: nothing to compare" in unboxed


def test_report_only_writes_the_report_again_from_the_json(tmp_path: Path) -> None:
    """After the report's form changes, a 50-minute run need not be repeated: the figures
    stay as measured, the comparison is made again."""
    previous, now = _result(), _result()
    _t3_mode(now, 2, "rdma-e").update(seconds=13.0, seconds_min=12.5)
    now["against"] = "paper.previous.json"
    now["repeats"] = {"agrees": True}  # stale: written by an older form
    (tmp_path / "paper.previous.json").write_text(json.dumps(previous))
    (tmp_path / "paper.json").write_text(json.dumps(now))
    out = CliRunner().invoke(app, ["bench", "paper", "--out", str(tmp_path), "--report-only"])
    assert out.exit_code == 0, out.output
    report = (tmp_path / "report.md").read_text()
    assert "| T3 | gpt2-small full, 1gbit / 20ms / loss 0, rdma-e | claim | 4.00x | 3.08x | 23 % |" in report
    saved = json.loads((tmp_path / "paper.json").read_text())
    assert saved["repeats"]["agrees"] is False and _paper(saved).tables == _paper(now).tables
    assert (tmp_path / "t3.png").read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty"
    empty.mkdir()
    out = CliRunner().invoke(app, ["bench", "paper", "--out", str(empty), "--report-only"])
    assert out.exit_code == 2 and "cannot read a bench paper result" in " ".join(out.output.split())
