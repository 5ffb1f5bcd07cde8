"""Typer commands whose flags are generated from the pydantic settings, one per field.

So every setting has exactly one flag and one config-file key with the same name, one
default (the model's) and one validation path, and a new setting needs no CLI code. A
refused setting is named three ways, by the command, the key and the flag
(`aggregator: \\`rounds\\` (--rounds) in agg.toml: ...`), and the files the settings point
at are checked before the command runs, so nothing is built for a run that cannot start.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel

from fedrdma.config import FLAGS, ConfigError, Issue, load

USAGE_ERROR = 2
"""Exit code of a refused setting, as click uses for any bad usage."""


def _flag_type(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    if origin in (list, tuple):
        return list[str]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if annotation in (int, float, bool, str, Path):
        return annotation
    return str


def flag(key: str) -> str:
    """The flag of a settings key: `eval_data` -> `--eval-data` (of a nested key, its first part)."""
    return "--" + key.split(".")[0].replace("_", "-")


def describe(command: str, error: ConfigError, from_flags: set[str]) -> str:
    """Each issue with the command, its key and flag, and the file it came from when it did."""
    lines = []
    for issue in error.issues:
        if issue.key is None:
            lines.append(f"{command}: {'flags' if error.source == FLAGS else error.source}: {issue.message}")
            continue
        top = issue.key.split(".")[0]
        where = "" if error.source == FLAGS or top in from_flags else f" in {error.source}"
        lines.append(f"{command}: `{issue.key}` ({flag(issue.key)}){where}: {issue.message}")
    return "\n".join(lines)


def settings_command(
    command: str,
    kind: type[BaseModel],
    run: Callable[[Any], None],
    list_parsers: Mapping[str, Callable[[str], Any]],
    checks: Mapping[str, Callable[[Any], None]],
) -> Callable[..., None]:
    """A function typer can register: `--config FILE` plus one flag per settings field.

    `checks` maps a field to a function that raises ValueError when its value cannot be
    used (a file that does not exist); every check runs, in order, before `run`.
    """
    params = [
        inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", help="TOML file with any of the settings below"),
            annotation=Path | None,
        )
    ]
    for name, field in kind.model_fields.items():
        ftype = _flag_type(field.annotation)
        default = field.default if field.default is not None and not callable(field.default_factory) else None
        help_text = (field.description or "") + (f" (default: {default})" if default not in (None, ...) else "")
        decls = [f"{flag(name)}/--no-{name.replace('_', '-')}"] if ftype is bool else [flag(name)]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=help_text.strip(), show_default=False),
                annotation=ftype | None,
            )
        )

    def command_function(**kwargs: Any) -> None:
        path = kwargs.pop("config")
        overrides = {}
        for key, value in kwargs.items():
            if value is None or (isinstance(value, list) and not value):
                continue
            overrides[key] = [list_parsers[key](v) for v in value] if key in list_parsers else value
        try:
            cfg = load(kind, path, overrides)
            issues = []
            for key, check in checks.items():
                value = getattr(cfg, key)
                if value is not None:
                    try:
                        check(value)
                    except ValueError as exc:
                        issues.append(Issue(key, str(exc)))
            if issues:
                raise ConfigError(FLAGS if path is None else str(path), issues)
        except ConfigError as exc:
            typer.echo(describe(command, exc, set(overrides)), err=True)
            raise typer.Exit(USAGE_ERROR) from None
        run(cfg)

    command_function.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command_function
