"""docs/schemas/ is what `fedrdma schemas` writes from the models today, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedrdma.cli import app
from fedrdma.cli.schemas import RECORDS, SUFFIX

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "schemas"


def test_committed_schemas_are_current(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["schemas", str(tmp_path)])
    assert result.exit_code == 0, result.output
    fresh = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in COMMITTED.iterdir()}
    assert sorted(fresh) == sorted(committed) == sorted([*(f"{n}{SUFFIX}" for n in RECORDS), "README.md"])
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"docs/schemas is out of date for {stale}: run `fedrdma schemas` and commit the result"


def test_each_schema_is_its_models_and_names_the_fields_scripts_read() -> None:
    transfer = json.loads((COMMITTED / f"bench-transfer{SUFFIX}").read_text())
    summary = transfer["$defs"]["ModeSummary"]["properties"]
    assert {"goodput_gb_s", "receiver_extra_rss_mb", "identical"} <= set(summary)
    assert {"modes", "reference", "reference_read"} <= set(transfer["properties"])
    demo = json.loads((COMMITTED / f"demo{SUFFIX}").read_text())
    assert {"transports", "max_abs_diff_between_transports"} <= set(demo["properties"])
    assert {"eval_loss", "comm_share"} <= set(demo["$defs"]["AggregatorRound"]["properties"])
    for name, (model, _) in RECORDS.items():
        assert json.loads((COMMITTED / f"{name}{SUFFIX}").read_text())["title"] == model.__name__
