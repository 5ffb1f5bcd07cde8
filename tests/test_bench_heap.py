import pytest

from fedrdma.bench import heap


def test_each_setting_trains_under_the_heap_it_names():
    """Real training in three child processes; the flags are what malloc did, not what was asked."""
    result = heap.run("gpt2-tiny", rounds=2, repeat=1)
    rows = result.variants
    assert list(rows) == ["default", "pinned", "compute-heap"]
    assert rows["pinned"].chunk_mmapped_while_training is True
    assert rows["compute-heap"].chunk_mmapped_while_training is False
    assert all(row.rounds_counted == 1 and row.seconds > 0 for row in rows.values())
    assert rows["default"].vs_default == 1.0


def test_a_single_round_leaves_nothing_to_count():
    with pytest.raises(ValueError, match="at least 2"):
        heap.run("gpt2-tiny", rounds=1, repeat=1)
