"""Bounded inboxes end to end: tcp-e, rdma-e-pull and rdma-e uploads land in a few slots at the
aggregator, and a silo that must be taken back out is read again from the silo. Real
aggregator and silo processes, real NIXL READs for the pull and WRITEs into granted landing
slots for the push."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedrdma.bench.soak import TOLERANCE, update_path
from fedrdma.core.chunks import DEFAULT_WINDOW
from fedrdma.fl import checkpoint
from fedrdma.fl.demo import DEMO_SILOS, write_configs
from fedrdma.testing.silo import EXIT_CODE
from fedrdma.transport.movers.granting import GRANT_SPARE_SLOTS
from fedrdma.transport.ports import free_port
from tests.test_federation import MODEL, events, start, start_faulty, wait

CHUNK = 1 << 16
"""Small chunks, so gpt2-tiny's upload is many chunks and a silo can die between them."""

PUSH_CHUNK = 1 << 14
"""A push's chunks: smaller still, so that its window of landing slots is a fraction of the state."""


def federation(tmp_path: Path, faults: dict[str, str], mode: str = "tcp-e", **agg: object) -> tuple[list[int], dict]:
    """One round in `mode` of DEMO_SILOS[:3]; a silo listed in `faults` runs with that fault, the
    others record their updates. (silo exit codes, the round's record)."""
    port = free_port()
    settings = {"chunk_size": CHUNK, "min_silos": 2, **agg}
    agg_cfg, silo_cfgs = write_configs(tmp_path, mode, 1, MODEL, False, DEMO_SILOS[:3], port,
                                       aggregator_settings=settings)
    aggregator = start("aggregator", agg_cfg, tmp_path / "agg.log")
    silos = [start_faulty(cfg, tmp_path / f"{silo}.log", faults.get(silo, f"record:{tmp_path / 'updates'}"))
             for silo, cfg in zip(DEMO_SILOS[:3], silo_cfgs)]
    assert wait(aggregator) == 0, (tmp_path / "agg.log").read_text()
    codes = [wait(s) for s in silos]
    (pools,) = events(tmp_path / "aggregator" / "metrics.jsonl", "pools")
    assert pools["inbox"] == settings.get("inbox", "slots")
    (record,) = events(tmp_path / "aggregator" / "metrics.jsonl", "round")[1:]
    return codes, record


def assert_mean_of_recorded(tmp_path: Path, accepted: list[str]) -> None:
    """The round's checkpoint is exactly the weighted mean of what the accepted silos uploaded."""
    path = checkpoint.path_for(tmp_path / "aggregator", 1)
    weights = checkpoint.weights_of(path)
    assert sorted(weights) == sorted(accepted)
    updates = {s: load_file(str(update_path(tmp_path / "updates", s, 1))) for s in accepted}
    for name, tensor in load_file(str(path)).items():
        mean = sum(w * updates[s][name].double() for s, w in weights.items())
        assert float((mean - tensor.double()).abs().max()) <= TOLERANCE, name


def resent(tmp_path: Path, silo: str) -> int:
    return len(events(tmp_path / "silos" / f"{silo}.jsonl", "resent"))


@pytest.mark.parametrize("mode", ["tcp-e", "rdma-e-pull", "rdma-e"])
@pytest.mark.parametrize("fault,reason,evil_resends,honest_resends", [
    ("nan", "NaN", 1, 0),  # its finite chunks are subtracted again, read from it once more
    ("scale", "delta norm", 0, 1),  # x1000 cannot be subtracted exactly: the others are re-added
])
def test_a_rejected_silo_is_taken_out_exactly_by_reading_updates_again(tmp_path, fault, reason, evil_resends,
                                                                     honest_resends, mode):
    evil, *honest = DEMO_SILOS[:3]
    codes, record = federation(tmp_path, {evil: fault}, mode, **({"chunk_size": PUSH_CHUNK} if mode == "rdma-e" else {}))
    assert codes == [0, 0, 0]
    assert sorted(record["accepted"]) == sorted(honest)
    assert reason in record["rejected"][evil]
    assert resent(tmp_path, evil) == evil_resends
    assert [resent(tmp_path, s) for s in honest] == [honest_resends] * 2
    assert_mean_of_recorded(tmp_path, honest)
    handed = {e["inbox_bytes"] for e in events(tmp_path / "aggregator" / "metrics.jsonl", "sessions")}
    if mode == "rdma-e":  # a push's silo was handed keys to a window of landing slots, not to a whole inbox
        (pools,) = events(tmp_path / "aggregator" / "metrics.jsonl", "pools")
        assert handed == {(DEFAULT_WINDOW + GRANT_SPARE_SLOTS) * PUSH_CHUNK} and max(handed) < pools["upload_nbytes"] / 3
    else:
        assert handed == {0}, "the aggregator handed a silo keys to its memory"


def test_a_silo_dead_mid_upload_makes_the_others_resend_and_the_sum_is_rebuilt(tmp_path):
    victim, *honest = DEMO_SILOS[:3]
    codes, record = federation(tmp_path, {victim: "exit-mid-upload:1"})
    assert codes[0] == EXIT_CODE and codes[1:] == [0, 0], (codes, (tmp_path / f"{victim}.log").read_text()[-3000:])
    assert sorted(record["accepted"]) == sorted(honest)
    assert all(resent(tmp_path, s) == 1 for s in honest), "the others were read again to rebuild the sum"
    assert_mean_of_recorded(tmp_path, honest)


def test_a_full_inbox_is_still_there_for_whoever_asks_for_it(tmp_path):
    evil, *honest = DEMO_SILOS[:3]
    codes, record = federation(tmp_path, {evil: "scale"}, inbox="full")
    assert codes == [0, 0, 0] and sorted(record["accepted"]) == sorted(honest)
    assert resent(tmp_path, evil) == 0, "a full inbox retracts from its own copy"
    assert_mean_of_recorded(tmp_path, honest)


def test_slots_reject_what_they_cannot_land():
    from fedrdma.core.errors import TransferError
    from fedrdma.core.layout import FlatState
    from fedrdma.core.modes import Mode, Role
    from fedrdma.transport.channel import Listener, dial
    from fedrdma.transport.session import Session
    from fedrdma.transport.slots import Slots

    state = FlatState.from_tensors({"w": torch.zeros(1 << 16)})
    listener = Listener()
    try:
        with pytest.raises(TransferError, match="bounded inbox lands only a tcp-e, rdma-e or rdma-e-pull receiver"):
            Session(None, state, dial(listener.address), Mode.GRPC, Role.RECEIVER, CHUNK,
                    slots=Slots.own(1, CHUNK, lambda off, data: None))
        with pytest.raises(TransferError, match="each at most its 1024-byte slots"):
            Session(None, state, dial(listener.address), Mode.TCP_E, Role.RECEIVER, CHUNK,
                    slots=Slots.own(1, 1024, lambda off, data: None))
    finally:
        listener.close()
