"""Sweeps over chunk size and window, `tune --probe`, and the runtime taking tune's result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrdma.bench.peer import format_cells, parse_cells
from fedrdma.bench.probe import MAX_TRIAL_BYTES, MIN_TRIAL_BYTES, probe_cells, trial_bytes
from fedrdma.bench.sweep import CellResult, best, chunk_timeout, run_cells
from fedrdma.cli import app
from fedrdma.config import AggregatorConfig, ConfigError, load
from fedrdma.core.scheduler import CHUNK_TIMEOUT_S
from tests.conftest import LAB_GROUP
from tests.test_lab import needs_lab

pytestmark = LAB_GROUP

runner = CliRunner()
MIB = 1 << 20


def test_cells_round_trip() -> None:
    cells = [(4 * MIB, 8), (MIB, 32)]
    assert parse_cells(format_cells(cells)) == cells
    assert parse_cells("") == []


def test_probe_grid_leaves_out_windows_larger_than_the_state() -> None:
    cells = probe_cells(32 * MIB)
    assert (MIB, 32) in cells and (4 * MIB, 8) in cells
    assert (16 * MIB, 4) not in cells  # 3 x 16 MiB queued behind the first: more than the state
    assert all(c * (w - 1) < 32 * MIB for c, w in cells)
    with pytest.raises(ValueError, match="larger state"):
        probe_cells(MIB // 2)


def test_trial_size_follows_the_line() -> None:
    assert trial_bytes(1e9) == 59 * MIB  # half a second at 1 Gbit/s, whole MiB
    assert trial_bytes(1e6) == MIN_TRIAL_BYTES
    assert trial_bytes(None) == trial_bytes(1e12) == MAX_TRIAL_BYTES


def test_chunk_deadline_covers_the_slowest_window() -> None:
    assert chunk_timeout([(MIB, 4)], None) == CHUNK_TIMEOUT_S
    # 64 MiB x 4 at 100 Mbit/s is 21.5 s on the line: the deadline must be several times that
    assert chunk_timeout([(64 * MIB, 4)], 100e6) == pytest.approx(4 * 64 * MIB * 4 * 8 / 100e6)


def test_best_cell_is_the_fastest_and_ties_prefer_the_smaller_window() -> None:
    n = 64 * MIB
    slow = CellResult(MIB, 4, (2.0, 2.0, 2.0), True)
    fast_big = CellResult(4 * MIB, 32, (1.0, 1.0, 1.0), True)
    fast_small = CellResult(4 * MIB, 8, (1.0, 1.0, 1.0), True)
    assert best([slow, fast_big, fast_small], n) is fast_small
    assert best([slow], n) is slow


def test_sweep_moves_identical_bytes_with_each_setting_on_one_connection() -> None:
    n = 8 * MIB
    cells = [(MIB, 2), (256 * 1024, 16), (n, 1)]
    results = run_cells(n, cells, repeat=1)
    assert [(r.chunk_size, r.window) for r in results] == cells
    assert all(r.identical and len(r.seconds) == 1 and r.seconds[0] > 0 for r in results)
    with pytest.raises(ValueError, match="exceed"):
        run_cells(n, [(2 * n, 1)])


def _tuning(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "tune.json"
    path.write_text(json.dumps({"method": "probe", "config": config}))
    return path


ONE_HOST = {"insecure": True, "silos": ["hospital"]}
"""What an aggregator's settings need beyond the tuning: who may join, and how (on one host, plainly)."""


def test_aggregator_config_takes_tunes_result_and_explicit_settings_win(tmp_path: Path) -> None:
    path = _tuning(tmp_path, {"chunk_size": MIB, "window": 16})
    cfg = load(AggregatorConfig, None, {"tuning": str(path), **ONE_HOST})
    assert (cfg.chunk_size, cfg.window) == (MIB, 16)
    toml = tmp_path / "agg.toml"
    toml.write_text(f'tuning = "{path}"\nwindow = 3\ninsecure = true\nsilos = ["hospital"]\n')
    cfg = load(AggregatorConfig, toml, {})
    assert (cfg.chunk_size, cfg.window) == (MIB, 3)


@pytest.mark.parametrize("content,message", [
    (None, "does not exist"),
    ("not json", "not readable JSON"),
    ({"window": 4}, "no `config`"),
])
def test_bad_tuning_file_is_refused_with_the_fix(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "tune.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps({"config": content}))
    with pytest.raises(ConfigError, match=message) as err:
        load(AggregatorConfig, None, {"tuning": str(path)})
    assert "fedrdma tune" in str(err.value)


@pytest.mark.parametrize("args,message", [
    (["--probe"], "--probe needs a path"),
    (["--probe", "--lab", "frl", "--rate", "1gbit"], "drop --rate"),
    (["--lab", "frl", "--rate", "1gbit", "--rtt", "20ms"], "needs --probe"),
    (["--probe", "--rate", "1gbps"], "cannot parse rate"),
])
def test_tune_probe_refuses_bad_input(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["tune", *args])
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")


@needs_lab
def test_tune_probe_on_a_lab_path_writes_a_config_the_aggregator_takes(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    result = runner.invoke(app, ["tune", "--probe", "--rate", "500mbit", "--rtt", "4ms", "--size-mb", "24",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["method"] == "probe" and data["path"]["link_rate_gbit"] == 0.5
    table = data["table"]
    assert len(table) == len(probe_cells(24 * MIB)) and all(row["identical"] for row in table)
    assert all(0 < row["vs_line"] <= 1.05 for row in table), "trials ran faster than the line: not shaped"
    top = max(row["goodput_gbit_s"] for row in table)
    # the best cell, with sweep.best's tie rule: goodputs equal once rounded to 1 Mbit/s
    assert round(data["chosen"]["goodput_gbit_s"] * 1e3) == round(top * 1e3)
    cfg = load(AggregatorConfig, None, {"tuning": str(out), **ONE_HOST})
    assert (cfg.chunk_size, cfg.window) == (data["config"]["chunk_size"], data["config"]["window"])
