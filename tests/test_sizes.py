"""The one byte-size formatter every table, title and report uses."""

from __future__ import annotations

import pytest

from fedrdma.core.sizes import WHOLE, chunk_label, size_label


@pytest.mark.parametrize("nbytes,label", [
    (512, "512 B"),
    (256 << 10, "256 KiB"),
    (4 << 20, "4 MiB"),
    (1_258_291, "1.2 MiB"),  # a LoRA state: one decimal
    (2_500_000, "2.4 MiB"),  # 1 Gbit/s x 20 ms
    (497_759_232, "475 MiB"),  # GPT-2 small in fp32: whole MiB
    (int(99.99 * 2**20), "100 MiB"),  # rounds up past the decimal limit: no "100.0"
    (1_419_631_616, "1.3 GiB"),  # GPT-2 medium
    (0, "0 B"),
])
def test_sizes_read_in_binary_units_with_few_digits(nbytes: int, label: str) -> None:
    assert size_label(nbytes) == label


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        size_label(-1)


def test_a_chunk_that_is_the_state_is_whole() -> None:
    assert chunk_label(None) == WHOLE
    assert chunk_label(64 << 20, state=64 << 20) == WHOLE
    assert chunk_label(4 << 20, state=64 << 20) == "4 MiB"
