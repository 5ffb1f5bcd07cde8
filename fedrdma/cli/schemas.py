"""`fedrdma schemas [DIR]`: the JSON Schema of every record the commands write, for other tools.

Generated from the pydantic models themselves, so a schema cannot drift from the code;
tests/test_schemas.py regenerates them and fails when docs/schemas/ was not updated.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from pydantic import BaseModel

from fedrdma.bench.records import (
    FlowerResult,
    HeapResult,
    PaperResult,
    ScaleResult,
    SoakResult,
    TransferResult,
    WireResult,
)
from fedrdma.cli.console import console
from fedrdma.fl.records import AggregatorRound, DemoResult, SiloRoundRecord

app = typer.Typer()

DEFAULT_DIR = Path("docs/schemas")
"""Where the repository keeps them, beside the docs that cite them."""

SUFFIX = ".schema.json"
"""The suffix editors and validators recognise as a JSON Schema."""

RECORDS: dict[str, tuple[type[BaseModel], str]] = {
    "aggregator-round": (AggregatorRound, "a line of the aggregator's `out_dir/metrics.jsonl` whose event is `round`"),
    "silo-round": (SiloRoundRecord, "a line of a silo's `out_dir/<id>.jsonl` whose event is `round`"),
    "demo": (DemoResult, "`fedrdma demo --json PATH`"),
    "bench-transfer": (TransferResult, "`fedrdma bench transfer --json PATH`"),
    "bench-paper": (PaperResult, "`fedrdma bench paper`: `DIR/paper.json` (and `paper.previous.json`)"),
    "bench-heap": (HeapResult, "`fedrdma bench heap --json PATH`"),
    "bench-scale": (ScaleResult, "`fedrdma bench scale --json PATH`"),
    "bench-soak": (SoakResult, "`fedrdma bench soak --json PATH`"),
    "bench-flower": (FlowerResult, "`fedrdma bench flower --json PATH`"),
    "bench-wire": (WireResult, "`fedrdma bench wire --json PATH`"),
}
"""Each record's file name (without SUFFIX), its model, and what writes it."""


def schema_text(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(), indent=2, ensure_ascii=False) + "\n"


def index_text() -> str:
    lines = ["# Record schemas", "",
             "JSON Schemas of the records fedrdma writes, generated from their pydantic models by "
             "`fedrdma schemas` (do not edit them by hand: `tests/test_schemas.py` fails when a model changed and "
             "these files did not). Other lines of the metrics files (joins, sessions, refusals) carry "
             "`time` and `event` too, and are not typed yet.", "",
             "| schema | model | written by |", "| --- | --- | --- |"]
    for name, (model, writer) in RECORDS.items():
        lines.append(f"| [{name}{SUFFIX}]({name}{SUFFIX}) | `{model.__module__}.{model.__name__}` | {writer} |")
    return "\n".join(lines) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    """One schema file per record and an index README; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (model, _) in RECORDS.items():
        path = directory / f"{name}{SUFFIX}"
        path.write_text(schema_text(model))
        written.append(path)
    index = directory / "README.md"
    index.write_text(index_text())
    return [*written, index]


@app.command("schemas", help="Write the JSON Schema of every record the commands write.")
def schemas(
    directory: Path = typer.Argument(DEFAULT_DIR, metavar="DIR", help="Where to write them."),
) -> None:
    """One `<record>.schema.json` per record (metrics rows, demo, bench transfer, paper, heap) and a README."""
    out = console()
    for path in write_schemas(directory):
        out.print(f"wrote {path}")
