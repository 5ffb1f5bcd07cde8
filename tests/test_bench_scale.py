"""`fedrdma bench scale`: many real silos on one aggregator, and the light silos it runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedrdma.bench.scale import groups, silo_names
from fedrdma.cli import app
from fedrdma.config import ConfigError, SiloConfig, load
from fedrdma.fl.silo import PERTURBED_SAMPLES, Silo

runner = CliRunner()


def test_more_silos_than_the_old_server_had_threads_for_are_all_accepted_every_round(tmp_path):
    """8 silos hold 24 long-lived streams: the 16-thread server of old admitted 5."""
    out = tmp_path / "scale.json"
    result = runner.invoke(app, ["bench", "scale", "--silos", "8", "--rounds", "2", "--model", "gpt2-tiny",
                                 "--out-dir", str(tmp_path / "runs"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    (run,) = json.loads(out.read_text())["runs"]
    assert run["silos"] == 8 and run["all_accepted"] is True
    assert [r["accepted"] for r in run["rounds"]] == [silo_names(8)] * 2
    assert run["aggregator_cpu_seconds"] > 0 and run["aggregator_peak_rss_mb"] > run["aggregator_rss_above_globals_mb"]
    assert (tmp_path / "scale-gpt2-tiny.png").stat().st_size > 0


def test_silos_are_dealt_over_the_processes_round_robin():
    paths = [Path(f"{i}.toml") for i in range(6)]
    assert groups(paths, 4) == [[paths[0], paths[4]], [paths[1], paths[5]], [paths[2]], [paths[3]]]
    assert groups(paths[:2], 4) == [[paths[0]], [paths[1]]]


def test_a_training_silo_needs_its_data_and_a_light_one_does_not(tmp_path):
    (tmp_path / "a.toml").write_text('id = "a"\ninsecure = true\n')
    with pytest.raises(ConfigError, match="--data FILE .* or --train none"):
        load(SiloConfig, tmp_path / "a.toml", {})
    assert load(SiloConfig, tmp_path / "a.toml", {"train": "none"}).data is None


def test_a_light_silo_moves_every_weight_by_seeded_noise_different_per_silo_and_round(tmp_path):
    def update(silo: str, rnd: int) -> dict[str, torch.Tensor]:
        light = Silo(SiloConfig(id=silo, insecure=True, train="none", model="gpt2-tiny", out_dir=tmp_path))
        before = {name: view.clone() for name, view in light.state.views.items()}
        n, loss, _ = light.train(rnd, upload=None)  # type: ignore[arg-type]
        assert (n, loss) == (PERTURBED_SAMPLES, 0.0)
        return {name: view - before[name] for name, view in light.state.views.items()}

    first = update("a", 1)
    assert all(torch.equal(first[k], v) for k, v in update("a", 1).items())
    for other in (update("b", 1), update("a", 2)):
        assert not any(torch.equal(first[k], v) for k, v in other.items())
    assert all(bool((delta != 0).any()) and float(delta.abs().mean()) < 1e-2 for delta in first.values())
