"""`bench paper`'s pure parts: the T2 grid, and a report with every table from its JSON.

The measurement itself takes ~35 minutes in the lab and is a benchmark, not a test; its
pieces (sweeps, lab placement, federations in namespaces) are tested where they live.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrdma.bench.paper import T2_MAX_BYTES, T2_MIN_BYTES, t2_cells, t2_paths, t2_state_bytes, t4_from_t3
from fedrdma.bench.report import write_report
from fedrdma.cli import app

MIB = 1 << 20


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


def _cell(chunk: int, window: int, fraction: float) -> dict[str, object]:
    return {"chunk_size": chunk, "window": window, "vs_line": fraction, "goodput_gbit_s_best": fraction + 0.01,
            "goodput_gbit_s": fraction, "seconds": 1.0, "seconds_min": 0.9, "repeat": 3, "identical": True}


def _modes(scale: float) -> dict[str, dict[str, float]]:
    return {m: {"seconds": s * scale, "seconds_min": s * scale * 0.9, "cpu_seconds": s, "receiver_extra_rss_mb": r,
                "sender_extra_rss_mb": 1.0}
            for m, s, r in (("grpc", 4.0, 1000.0), ("rdma", 2.0, 1500.0), ("rdma-e", 1.0, 0.0),
                            ("rdma-e-pull", 1.5, 0.0))}


def test_report_has_every_table_marks_the_best_cell_and_draws_plots(tmp_path: Path) -> None:
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
            "T4": t4_from_t3(t3),
        },
    }
    report = write_report(result, tmp_path).read_text()
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
    t4_rows = [line for line in report.splitlines() if line.startswith("| gpt2-small | 475 MiB |")]
    assert [row.split(" | ")[2] for row in t4_rows] == ["grpc", "rdma", "rdma-e"]  # loopback, full only
    for png in ("t1.png", "t2.png", "t3.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--tables", "T9"], "unknown table"),
    (["--repeat", "2"], "at least 3"),
])
def test_bench_paper_refuses_bad_settings(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["bench", "paper", *args])
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")
