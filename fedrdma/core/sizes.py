"""How a byte size reads wherever one is printed: tables, titles, reasons and reports.

One formatter, so a chunk, a state and a socket buffer read alike in every command and
in `bench paper`'s report. Units are binary (KiB, MiB, GiB): chunk sizes are powers of
two and the states are quoted in MiB throughout the README and the results. Not rich's
`filesize.decimal`: it counts in powers of 1000 (a 4 MiB chunk would read "4.2 MB"), and
the model in `sim/` that quotes sizes in its reasons imports no presentation library.
"""

from __future__ import annotations

BINARY_SUFFIXES = ("B", "KiB", "MiB", "GiB", "TiB")
"""Units in steps of 1024, up to more than any model state here."""

BINARY_BASE = 1024
"""Each unit is 1024 of the one before."""

DECIMAL_BELOW = 100
"""Values below this many of their unit get one decimal: a 1.2 MiB LoRA state or a 2.4 MiB
bandwidth-delay product needs it, a 475 MiB model does not."""


def size_label(nbytes: float) -> str:
    """`4 MiB`, `256 KiB`, `1.2 MiB`, `475 MiB`, `1.3 GiB`: whole numbers stay whole."""
    if nbytes < 0:
        raise ValueError(f"a size of {nbytes} bytes is negative: sizes count bytes")
    power = 0
    while nbytes >= BINARY_BASE ** (power + 1) and power + 1 < len(BINARY_SUFFIXES):
        power += 1
    value, suffix = nbytes / BINARY_BASE**power, BINARY_SUFFIXES[power]
    if value == int(value):
        return f"{int(value)} {suffix}"
    return f"{value:.1f} {suffix}" if round(value, 1) < DECIMAL_BELOW else f"{value:.0f} {suffix}"


WHOLE = "whole"
"""How a chunk that is the whole state reads: an unchunked transfer."""


def chunk_label(chunk: int | None, state: int | None = None) -> str:
    """A chunk size as tables name it; `whole` when it is no chunk at all (None, or the state)."""
    if chunk is None or (state is not None and chunk >= state):
        return WHOLE
    return size_label(chunk)
