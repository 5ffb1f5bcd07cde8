"""Typer commands whose flags are generated from the pydantic settings, one per field.

So every setting has exactly one flag and one config-file key with the same name, one
default (the model's) and one validation path, and a new setting needs no CLI code.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import BaseModel

from fedrdma.config import ConfigError, load


def _flag_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin in (list, tuple):
        return list[str]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if annotation in (int, float, bool, str, Path):
        return annotation
    return str


def settings_command(kind: type[BaseModel], run: Callable[[Any], None], list_parsers: dict[str, Callable[[str], Any]]) -> Callable[..., None]:
    """A function typer can register: `--config FILE` plus one flag per settings field."""
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", help="TOML file with any of the settings below"),
            annotation=Optional[Path],
        )
    ]
    for name, field in kind.model_fields.items():
        flag = "--" + name.replace("_", "-")
        ftype = _flag_type(field.annotation)
        default = field.default if field.default is not None and not callable(field.default_factory) else None
        help_text = (field.description or "") + (f" (default: {default})" if default not in (None, ...) else "")
        decls = [f"{flag}/--no-{name.replace('_', '-')}"] if ftype is bool else [flag]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=help_text.strip(), show_default=False),
                annotation=Optional[ftype],
            )
        )

    def command(**kwargs: Any) -> None:
        path = kwargs.pop("config")
        overrides = {}
        for key, value in kwargs.items():
            if value is None or (isinstance(value, list) and not value):
                continue
            overrides[key] = [list_parsers[key](v) for v in value] if key in list_parsers else value
        try:
            cfg = load(kind, path, overrides)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        run(cfg)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command
