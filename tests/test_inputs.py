"""Files a command needs are checked before it builds a model, and refused by its own names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedrdma.cli import app
from fedrdma.fl.data import read_documents
from fedrdma.fl.inputs import CORPUS_DIR, DataError, check_text

HOSPITAL = str(CORPUS_DIR / "hospital.jsonl")


def fedrdma(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedrdma.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_aggregator_names_its_own_eval_data_before_building_anything(tmp_path: Path) -> None:
    out = tmp_path / "agg"
    proc = fedrdma("aggregator", "--insecure", "--silos", "hospital", "--model", "gpt2-tiny", "--rounds", "1",
                   "--eval-data", "held-out.jsonl",
                   "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("aggregator: `eval_data` (--eval-data): held-out.jsonl does not exist; "
                                   f"the shipped corpus is in {CORPUS_DIR}/")
    assert proc.stdout == ""  # no rounds table drawn
    assert not out.exists()  # the aggregator makes its out_dir before its model: it never started


def test_silo_names_data_and_model_together(tmp_path: Path) -> None:
    out = tmp_path / "silo"
    proc = fedrdma("silo", "--id", "hospital", "--insecure", "--model", "gpt2-smol",
                   "--data", "hospital.jsonl", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == f"silo: `data` (--data): hospital.jsonl does not exist; the shipped corpus is in {CORPUS_DIR}/"
    assert lines[1].startswith("silo: `model` (--model): 'gpt2-smol' is neither a GPT-2 size (gpt2-tiny, ")
    assert not out.exists()


def test_a_file_named_in_the_config_is_refused_with_the_file_that_named_it(tmp_path: Path) -> None:
    config = tmp_path / "agg.toml"
    config.write_text('model = "gpt2-tiny"\neval_data = "notes.csv"\ninsecure = true\nsilos = ["hospital"]\n')
    (tmp_path / "notes.csv").write_text("a,b\n")
    proc = fedrdma("aggregator", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"aggregator: `eval_data` (--eval-data) in {config}: notes.csv has suffix " \
                                  "'.csv'; use one of .txt, .jsonl"
    proc = fedrdma("aggregator", "--config", str(config), "--eval-data", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2  # the flag won, so the flag is named, not the file
    assert proc.stderr.strip() == f"aggregator: `eval_data` (--eval-data): {tmp_path} is not a file; give a .txt " \
                                  f"or .jsonl file (the shipped corpus is in {CORPUS_DIR}/)"


def test_held_out_text_that_cannot_be_used_is_refused_before_the_table(tmp_path: Path) -> None:
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"text": 3}\n')
    proc = fedrdma("aggregator", "--insecure", "--silos", "hospital", "--model", "gpt2-tiny", "--eval-data", str(bad),
                   "--out-dir",
                   str(tmp_path / "agg"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f'aggregator: `eval_data` (--eval-data): {bad}:1: "text" is int, expected a string'
    assert not (tmp_path / "agg").exists()


@pytest.mark.parametrize("args", [
    ["demo", "--model", "gpt2-smol", "--out", "{tmp}/demo"],
    ["bench", "transfer", "--model", "gpt2-smol"],
    ["bench", "heap", "--model", "gpt2-smol"],
])
def test_benchmarks_and_the_demo_refuse_an_unknown_model_before_starting(args: list[str], tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2
    assert "Invalid value for --model: 'gpt2-smol' is neither a GPT-2 size" in " ".join(result.output.split())
    assert not (tmp_path / "demo").exists()


def test_text_checks_say_what_is_wrong_and_name_no_setting(tmp_path: Path) -> None:
    """The same check serves a silo's `data` and the aggregator's `eval_data`: only its
    caller knows which setting it was, so the message names none."""
    for path, message in ((tmp_path / "held-out.jsonl", "does not exist"), (tmp_path, "is not a file")):
        with pytest.raises(DataError, match=message) as err:
            read_documents(path)
        assert "`data`" not in str(err.value) and "silo" not in str(err.value)
        assert str(CORPUS_DIR) in str(err.value)
    assert check_text(HOSPITAL) == Path(HOSPITAL)
