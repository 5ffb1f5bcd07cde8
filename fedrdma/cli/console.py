"""The consoles and progress bars every command prints through.

One factory, so every command behaves alike when its output goes to a file or a pipe:
rich would then assume 80 columns and cut table headers and cells short ("referen…",
"198.…"), which is exactly when output is kept and read later.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pydantic import BaseModel
from rich.console import Console, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

PIPE_WIDTH = 160
"""Console width when output is not a terminal: the widest table here (the sim grid, the
lab's status) fits in it, where rich's 80 would wrap and cut columns."""

LIVE_REFRESH_PER_S = 2
"""A live table changes once a round (seconds apart): redrawing it more often costs CPU for nothing."""


def console(stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A terminal's own width on a terminal, `PIPE_WIDTH` anywhere else.

    Built per command, not per import, so it sees the stream the command writes to (a
    test runner swaps stdout).
    """
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    if stream.isatty():
        return Console(file=file, stderr=stderr)
    return Console(file=file, stderr=stderr, width=PIPE_WIDTH)


def progress(out: Console) -> Progress:
    """The progress bar of long commands: what runs, how many of how many, time taken."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=out)


@contextmanager
def live(out: Console, renderable: RenderableType) -> Iterator[None]:
    """A display redrawn as it changes; off a terminal it is printed once, when the block ends.

    rich's Live ends its last line only on a terminal: here the next line starts on its own.
    """
    try:
        with Live(renderable, console=out, refresh_per_second=LIVE_REFRESH_PER_S):
            yield
    finally:
        if not out.is_terminal:
            out.line()


def write_record(out: Console, record: BaseModel, path: Path) -> None:
    """A record as indented JSON at `path` (its folder made), said on `out`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record.model_dump_json(indent=2) + "\n")
    out.print(f"wrote {path}")
