"""Option values every command parses alike: comma-separated lists and their items.

One list parser for `--modes`, `--tables`, `--rates`, `--rtts` and `--losses`, so each
refuses bad input in the same form: the option, then every bad value with why it is bad.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import typer

from fedrdma.core.modes import Mode, choices
from fedrdma.lab.units import parse_rate

T = TypeVar("T")

LIST_SEPARATOR = ","
"""List options take one argument, `grpc,rdma-e`, as the README writes them."""


def comma_list(text: str, option: str, item: Callable[[str], T]) -> list[T]:
    """The values of a comma-separated option, each parsed by `item` (which raises ValueError).

    Every bad value is named at once, and so is a value given twice: a mode or a path
    measured twice in one run is a typo, not a wish.
    """
    names = [name.strip() for name in text.split(LIST_SEPARATOR) if name.strip()]
    if not names:
        raise typer.BadParameter(f"give at least one value, separated by {LIST_SEPARATOR!r}", param_hint=option)
    values: list[T] = []
    problems: list[str] = []
    for name in names:
        try:
            value = item(name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if value in values:
            problems.append(f"{name!r} is listed twice")
        values.append(value)
    if problems:
        raise typer.BadParameter("; ".join(problems), param_hint=option)
    return values


def one_of(kind: str, allowed: Sequence[str]) -> Callable[[str], str]:
    """An item parser for a fixed set of names (case-insensitive), naming them when refused."""
    by_key = {name.upper(): name for name in allowed}

    def parse(text: str) -> str:
        if text.upper() not in by_key:
            raise ValueError(f"unknown {kind} {text!r}; choose from {', '.join(allowed)}")
        return by_key[text.upper()]

    return parse


def mode(text: str) -> Mode:
    """One mode by its name."""
    if text not in Mode._value2member_map_:
        raise ValueError(f"unknown mode {text!r}; choose from {choices()}")
    return Mode(text)


def line_rate(text: str) -> float:
    """A finite line rate in bit/s: a model needs one ('unlimited' is refused)."""
    bps = parse_rate(text)
    if bps is None:
        raise ValueError(f"{text!r} is not a finite rate; the model needs the line rate (e.g. 1gbit)")
    return float(bps)


def single(text: str, option: str, item: Callable[[str], T]) -> T:
    """One value of an option, refused in the form the list options use."""
    try:
        return item(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
