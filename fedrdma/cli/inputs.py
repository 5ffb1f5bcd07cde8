"""Checks of the files a command needs, run before anything is built or drawn.

A command that built a model first would fail on a misspelt path only after the build, with
a live table already on the screen. Each check raises ValueError with what is wrong; the
command names its own flag or setting.
"""

from __future__ import annotations

from pathlib import Path

from fedrdma.fl.inputs import DEMO_EVAL, check_text, demo_corpus


def text_file(path: Path) -> None:
    """A silo's text or the held-out set: a readable .txt or .jsonl file."""
    check_text(path)


def model_name(name: str) -> None:
    """A GPT-2 size built from its configuration, or a local checkpoint directory."""
    if Path(name).is_dir():
        return
    from fedrdma.fl.model import GPT2_SIZES  # heavy (torch): only once the cheap checks passed

    if name not in GPT2_SIZES:
        raise ValueError(f"{name!r} is neither a GPT-2 size ({', '.join(GPT2_SIZES)}) nor a checkpoint directory")


def demo_files(silos: tuple[str, ...]) -> None:
    """The shipped corpus files a demo with these silos reads."""
    for name in (*silos, DEMO_EVAL):
        check_text(demo_corpus(name))
