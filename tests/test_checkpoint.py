"""Checkpoints of one run: durable, pruned within their run, refused across runs, read past damage."""

from __future__ import annotations

import subprocess

import pytest

from fedrdma.bench.states import make_state, synthetic_layout
from fedrdma.core.chunks import state_digest
from fedrdma.fl import checkpoint
from fedrdma.fl.checkpoint import CheckpointError
from tests.conftest import needs_root


def state(seed: int, size: int = 64 << 10):
    return make_state(synthetic_layout(size), seed)


def test_a_run_saves_durably_and_prunes_only_its_own_checkpoints(tmp_path):
    s = state(1)
    run = checkpoint.begin_run(tmp_path, s.layout_id, resume=False)
    for rnd in range(1, 6):
        checkpoint.save(tmp_path, s, rnd, run)
    assert checkpoint.rounds(tmp_path) == [3, 4, 5]
    assert not list(tmp_path.glob("*.tmp"))
    again = state(0)
    resumed = checkpoint.load_latest(tmp_path, again, checkpoint.begin_run(tmp_path, s.layout_id, resume=True))
    assert resumed == checkpoint.Resumed(5, ())
    assert state_digest(again.memoryview()) == state_digest(s.memoryview())


def test_a_checkpoint_records_its_weights_and_keep_holds_as_many_as_asked(tmp_path):
    s = state(1)
    run = checkpoint.begin_run(tmp_path, s.layout_id, resume=False)
    for rnd in range(1, 6):
        checkpoint.save(tmp_path, s, rnd, run, {"bank": 0.25, "hospital": 0.75}, keep=5)
    assert checkpoint.rounds(tmp_path) == [1, 2, 3, 4, 5]
    assert checkpoint.weights_of(checkpoint.path_for(tmp_path, 5)) == {"bank": 0.25, "hospital": 0.75}


def test_a_fresh_run_into_a_directory_of_another_run_is_refused_and_touches_nothing(tmp_path):
    s = state(1)
    run = checkpoint.begin_run(tmp_path, s.layout_id, resume=False)
    checkpoint.save(tmp_path, s, 1, run)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match=f"holds the checkpoints of run {run} .*--resume.*another --out-dir"):
        checkpoint.begin_run(tmp_path, s.layout_id, resume=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resuming_with_another_model_is_refused(tmp_path):
    s = state(1)
    checkpoint.begin_run(tmp_path, s.layout_id, resume=False)
    with pytest.raises(CheckpointError, match="resume with the same model"):
        checkpoint.begin_run(tmp_path, state(1, 128 << 10).layout_id, resume=True)


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before_and_says_so(tmp_path):
    s1, s2 = state(1), state(2)
    run = checkpoint.begin_run(tmp_path, s1.layout_id, resume=False)
    checkpoint.save(tmp_path, s1, 1, run)
    checkpoint.save(tmp_path, s2, 2, run)
    latest = checkpoint.path_for(tmp_path, 2)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    loaded = state(0)
    resumed = checkpoint.load_latest(tmp_path, loaded, run)
    assert resumed is not None and resumed.round == 1
    assert len(resumed.skipped) == 1 and "round 2" in resumed.skipped[0]
    assert state_digest(loaded.memoryview()) == state_digest(s1.memoryview())


def test_every_checkpoint_damaged_is_an_error_naming_them(tmp_path):
    s = state(1)
    run = checkpoint.begin_run(tmp_path, s.layout_id, resume=False)
    checkpoint.save(tmp_path, s, 1, run)
    checkpoint.path_for(tmp_path, 1).write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="no checkpoint .* could be read: round 1"):
        checkpoint.load_latest(tmp_path, state(0), run)


@needs_root
def test_a_full_disk_is_a_clear_error_that_leaves_no_temporary_file(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    # 50 pages: room for the run record and two checkpoints of 64 KiB (17 pages each), not a third
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], check=True)
    try:
        s = state(1, 64 << 10)
        run = checkpoint.begin_run(disk, s.layout_id, resume=False)
        checkpoint.save(disk, s, 1, run)
        checkpoint.save(disk, s, 2, run)
        with pytest.raises(CheckpointError, match="could not write round 3's checkpoint .*intact.*free space"):
            checkpoint.save(disk, s, 3, run)
        assert not list(disk.glob("*.tmp")), "a failed write leaves nothing half-written"
        assert checkpoint.rounds(disk) == [1, 2], "the checkpoints before are intact"
        loaded = state(0, 64 << 10)
        assert checkpoint.load_latest(disk, loaded, run) == checkpoint.Resumed(2, ())
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_resuming_removes_what_a_killed_writer_left_half_written(tmp_path):
    s = state(1)
    run = checkpoint.begin_run(tmp_path, s.layout_id, resume=False)
    checkpoint.save(tmp_path, s, 1, run)
    half = checkpoint.path_for(tmp_path, 2).with_name("global-round-00002.safetensors.tmp")
    half.write_bytes(b"\0" * 100)  # as a SIGKILL during the write leaves it
    assert checkpoint.begin_run(tmp_path, s.layout_id, resume=True) == run
    assert not half.exists() and checkpoint.rounds(tmp_path) == [1]
