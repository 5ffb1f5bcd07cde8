"""`fedrdma bench soak`, short form: real processes under random faults, every round checked from files."""

from __future__ import annotations

import json
import os

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fedrdma.bench import soak
from fedrdma.cli import app
from fedrdma.fl import checkpoint
from tests.conftest import LAB_GROUP

pytestmark = LAB_GROUP

runner = CliRunner()

ROUNDS = 10
SEED = 6
"""Its plan for 10 rounds holds every kind of fault the lab adds and kills of the aggregator."""


def test_ten_rounds_under_faults_lose_nothing_and_the_check_catches_a_tampered_round(tmp_path):
    out = tmp_path / "soak.json"
    result = runner.invoke(app, ["bench", "soak", "--rounds", str(ROUNDS), "--seed", str(SEED),
                                 "--out-dir", str(tmp_path / "run"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["lab"] is (os.geteuid() == 0), "in the lab when root"
    assert sum(record["faults"].values()) >= 3
    if record["lab"]:
        assert all(record["faults"][kind] >= 1 for kind in (*soak.FAULTS, *soak.LAB_FAULTS)), record["faults"]
    assert record["survived"] == record["faults"]
    assert record["mismatched_rounds"] == [] and record["stale_updates"] == [] and record["double_counted"] == []
    assert record["leaks"] == {"processes": [], "fds": 0, "tmp_files": [], "namespaces": []}

    agg_dir, updates = tmp_path / "run" / "aggregator", tmp_path / "run" / soak.UPDATES_DIR
    assert checkpoint.rounds(agg_dir) == list(range(1, ROUNDS + 1))
    path = checkpoint.path_for(agg_dir, 5)  # one weight of round 5 moved, metadata kept
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name].view(-1)[0] += 1e-3
    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata()
    save_file(tensors, str(path), metadata=metadata)
    mismatched, stale = soak.verify_rounds(agg_dir, updates, ROUNDS)
    assert mismatched == [5]
    assert stale and all(s.endswith("@6") for s in stale), "round 6's updates were built on the true round 5"
