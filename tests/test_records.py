"""Typed records: committed results read into them, and the names scripts read survive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from fedrdma.bench.records import HeapResult, ModeSummary, PaperResult, T1Row, TransferResult
from fedrdma.fl.records import AggregatorRound, DemoResult, SiloOutcome

RESULTS = Path(__file__).resolve().parent.parent / "results"

COMMITTED: list[tuple[str, type[BaseModel]]] = [
    ("demo-gpt2-small.json", DemoResult),
    ("heap-gpt2-small.json", HeapResult),
    ("transfer-512.json", TransferResult),
    ("wan-1gbit-20ms.json", TransferResult),
    ("wan-1gbit-20ms-loss1.json", TransferResult),
    ("wan-1gbit-20ms-grpc.json", TransferResult),
    ("wan-5gbit-20ms.json", TransferResult),
    ("paper/paper.json", PaperResult),
    ("paper/paper.previous.json", PaperResult),
]


def _at(data: Any, path: str) -> Any:
    for key in path.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


@pytest.mark.parametrize("name,model", COMMITTED, ids=[name for name, _ in COMMITTED])
def test_every_committed_result_reads_into_its_record_and_back(name: str, model: type[BaseModel]) -> None:
    raw = json.loads((RESULTS / name).read_text())
    record = model.model_validate(raw)
    again = model.model_validate(record.model_dump(mode="json"))
    assert again == record


@pytest.mark.parametrize("name,paths", [
    ("transfer-512.json", ["modes.rdma-e.goodput_gb_s", "reference.goodput_gb_s", "reference_read.goodput_gb_s",
                           "modes.grpc.receiver_extra_rss_mb", "modes.rdma.identical"]),
    ("demo-gpt2-small.json", ["transports.rdma-e.rounds.1.eval_loss", "transports.grpc.rounds.2.comm_share",
                              "max_abs_diff_between_transports"]),
])
def test_the_fields_scripts_read_keep_their_names_and_values(name: str, paths: list[str]) -> None:
    raw = json.loads((RESULTS / name).read_text())
    model = dict(COMMITTED)[name]
    written = model.model_validate(raw).model_dump(mode="json")
    for path in paths:
        assert _at(written, path) == _at(raw, path), path


def test_renamed_fields_read_under_their_old_names() -> None:
    row = T1Row.model_validate({"rate_bps": 10**9, "rtt_s": 0.02, "transport": "grpc", "path": "p", "rounds": []})
    assert row.mode == "grpc" and "mode" in row.model_dump() and "transport" not in row.model_dump()
    assert AggregatorRound.model_validate({"round": 1, "transport": "rdma-e"}).mode == "rdma-e"
    silo = SiloOutcome.model_validate({"silo": "bank", "ok": True, "silo_download_seconds": 0.5})
    assert silo.silo_broadcast_seconds == 0.5


def test_a_key_no_record_knows_is_refused() -> None:
    with pytest.raises(ValidationError, match="eval_los\n  Extra inputs are not permitted"):
        AggregatorRound.model_validate({"round": 1, "eval_los": 2.0})
    with pytest.raises(ValidationError, match="mode"):
        AggregatorRound.model_validate({"round": 1, "mode": "carrier-pigeon"})


def test_a_movers_own_timings_are_kept_as_they_came() -> None:
    """A mode's summary types the timings it knows and keeps any other a mover reports."""
    row = ModeSummary.model_validate({"seconds": 1.0, "seconds_min": 0.9, "goodput_gb_s": 1.0, "cpu_seconds": 1.0,
                                      "receiver_extra_rss_mb": 0.0, "sender_extra_rss_mb": 0.0, "identical": True,
                                      "repeat": 3, "wire_seconds": 0.4, "pacing_waits": 2.0})
    assert row.wire_seconds == 0.4 and row.model_dump()["pacing_waits"] == 2.0


def test_a_run_that_measured_some_tables_writes_only_those() -> None:
    paper = PaperResult.model_validate_json((RESULTS / "paper" / "paper.json").read_text())
    paper.tables.T1 = paper.tables.T2 = None
    written = paper.model_dump(mode="json")
    assert list(written["tables"]) == ["T3", "T4"] and paper.tables.names() == {"T3", "T4"}
    assert PaperResult.model_validate(written).tables.T1 is None
