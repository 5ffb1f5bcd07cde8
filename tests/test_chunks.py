import pytest

from fedrdma.core import chunks
from fedrdma.core.chunks import ChunkPlan, Region, check_window, chunk_checksum
from fedrdma.core.errors import PlanError, RangeError


def test_plan_covers_every_byte_once():
    plan = ChunkPlan.build(10_000, 4096)
    assert [(c.offset, c.length) for c in plan.chunks] == [(0, 4096), (4096, 4096), (8192, 1808)]
    assert sum(c.length for c in plan.chunks) == 10_000
    assert [c.index for c in plan.chunks] == [0, 1, 2]


def test_plan_with_chunk_equal_to_state_is_one_chunk():
    plan = ChunkPlan.build(4096, 4096)
    assert len(plan) == 1 and plan.chunks[0].length == 4096


@pytest.mark.parametrize("chunk_size", [0, -5])
def test_chunk_size_must_be_positive(chunk_size):
    with pytest.raises(PlanError, match="positive"):
        ChunkPlan.build(100, chunk_size)


def test_chunk_size_above_state_size_is_refused():
    with pytest.raises(PlanError, match="above the state size 100"):
        ChunkPlan.build(100, 101)


@pytest.mark.parametrize("window", [0, -1, 100_000])
def test_window_bounds(window):
    with pytest.raises(PlanError, match="window"):
        check_window(window)


def test_region_slice_inside_and_outside():
    region = Region(0x1000, 100)
    assert region.slice(10, 90) == (0x1000 + 10, 90)
    with pytest.raises(RangeError, match="outside the advertised pool"):
        region.slice(50, 51)
    with pytest.raises(RangeError, match="outside"):
        region.slice(-1, 10)
    with pytest.raises(RangeError, match="positive length"):
        region.slice(0, 0)
    with pytest.raises(RangeError, match="positive length"):
        region.slice(0, -4)


def test_region_itself_must_be_valid():
    with pytest.raises(RangeError):
        Region(0, 10)
    with pytest.raises(RangeError):
        Region(0x1000, 0)


def test_checksum_detects_a_flipped_bit():
    data = bytearray(range(256)) * 16
    before = chunk_checksum(bytes(data))
    data[100] ^= 1
    assert chunk_checksum(bytes(data)) != before


def test_chunk_size_that_splits_an_element_is_refused_unless_it_is_the_whole_state():
    with pytest.raises(PlanError, match="not a multiple of 8 bytes.*use e.g. 4096"):
        ChunkPlan.build(10_000, 4100)
    assert len(ChunkPlan.build(10_004, 10_004)) == 1


def test_chunks_of_a_state_above_one_registration_slice_never_straddle_a_slice(monkeypatch):
    monkeypatch.setattr(chunks, "REGISTRATION_SLICE", 1 << 20)
    plan = ChunkPlan.build(5 << 20 | 24, 256 << 10)
    slices = chunks.registration_slices(plan.nbytes)
    assert slices == [(i << 20, 1 << 20) for i in range(5)] + [(5 << 20, 24)]
    for c in plan.chunks:
        assert c.offset >> 20 == (c.end - 1) >> 20, c


def test_a_chunk_size_that_would_straddle_a_slice_is_refused_with_one_that_works(monkeypatch):
    monkeypatch.setattr(chunks, "REGISTRATION_SLICE", 1 << 20)
    with pytest.raises(PlanError, match=r"straddle two registrations.*divides 1048576 \(a power of two"):
        ChunkPlan.build(5 << 20, 384 << 10)
    assert len(ChunkPlan.build(1 << 20, 384 << 10)) == 3  # within one slice any aligned size works
