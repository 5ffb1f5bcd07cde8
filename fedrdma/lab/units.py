"""Parsing and printing of link rates, durations and loss fractions.

Pure functions so the rules are unit-tested without a network. Rates follow tc's
decimal SI units (1gbit = 10**9 bit/s); tc's byte units (`bps`, `mbps`) are refused on
purpose, because `mbps` reads as megabit to most people and means megabyte to tc.
"""

from __future__ import annotations

import re

RATE_UNITS: dict[str, int] = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
"""Decimal multipliers, as tc uses them."""

DURATION_UNITS: dict[str, float] = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
"""Units accepted for delays; a bare number is refused as ambiguous (tc reads it as us)."""

UNSHAPED_WORDS = frozenset({"unlimited", "none", "off"})
"""Words meaning "no rate limit on this path"."""

_NUMBER = r"(?P<num>\d+(?:\.\d*)?|\.\d+)"
_RATE_RE = re.compile(_NUMBER + r"\s*(?P<unit>[a-z]+)(?:/s)?")
_DURATION_RE = re.compile(_NUMBER + r"\s*(?P<unit>[a-z]+)")


def parse_rate(text: str | int) -> int | None:
    """Bits per second from `1gbit`, `500mbit`, `1.5gbit`; None for `unlimited`."""
    if isinstance(text, bool):
        raise ValueError(f"rate {text!r} is not a rate: give e.g. 1gbit or 500mbit")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"rate {text} bit/s must be positive")
        return text
    raw = str(text).strip().lower()
    if raw in UNSHAPED_WORDS:
        return None
    m = _RATE_RE.fullmatch(raw)
    if not m or m.group("unit") not in RATE_UNITS:
        units = ", ".join(RATE_UNITS)
        raise ValueError(f"cannot parse rate {text!r}: give a number and one of {units} (e.g. 1gbit, 500mbit), "
                         f"or 'unlimited'")
    bps = round(float(m.group("num")) * RATE_UNITS[m.group("unit")])
    if bps <= 0:
        raise ValueError(f"rate {text!r} must be positive")
    return bps


def parse_duration(text: str | float | int) -> float:
    """Seconds from `20ms`, `0.5ms`, `1s`, `250us`; `0` alone means no delay."""
    if isinstance(text, bool):
        raise ValueError(f"duration {text!r} is not a duration: give e.g. 20ms")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"duration {text} s must not be negative")
        return float(text)
    raw = str(text).strip().lower()
    if raw in {"0", "0.0"}:
        return 0.0
    m = _DURATION_RE.fullmatch(raw)
    if not m or m.group("unit") not in DURATION_UNITS:
        raise ValueError(f"cannot parse duration {text!r}: give a number and one of "
                         f"{', '.join(DURATION_UNITS)} (e.g. 20ms)")
    return float(m.group("num")) * DURATION_UNITS[m.group("unit")]


def parse_loss(text: str | float) -> float:
    """A drop probability in [0, 1) from `0.01` or `1%`."""
    if isinstance(text, bool):
        raise ValueError(f"loss {text!r} is not a fraction: give e.g. 0.01 for 1 %")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        raw = str(text).strip()
        try:
            value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
        except ValueError:
            raise ValueError(f"cannot parse loss {text!r}: give a fraction such as 0.01 (or 1%)") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"loss {text!r} must be a fraction in [0, 1), e.g. 0.01 for 1 %")
    return value


def format_rate(bps: float | None) -> str:
    """Short human form: 1gbit, 500mbit, 2.35gbit; 'unlimited' for None."""
    if bps is None:
        return "unlimited"
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        scale = RATE_UNITS[unit]
        if bps >= scale:
            return f"{bps / scale:.3g}{unit}"
    return f"{bps:.3g}bit"


def format_duration(seconds: float) -> str:
    """Short human form in ms (the unit WAN RTTs are quoted in)."""
    return f"{seconds * 1e3:.3g}ms"
