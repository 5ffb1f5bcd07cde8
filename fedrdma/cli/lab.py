"""`fedrdma lab up|down|status|exec`: the WAN lab from the shell."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer
from pydantic import ValidationError

from fedrdma.cli.console import console
from fedrdma.cli.tables import status_table
from fedrdma.lab.config import (
    DEFAULT_LAB_NAME,
    DEFAULT_LOSS,
    DEFAULT_MTU,
    DEFAULT_RATE,
    DEFAULT_RTT,
    DEFAULT_SILOS,
    LabConfig,
)
from fedrdma.lab.errors import LabError
from fedrdma.lab.lab import Lab, PathStatus
from fedrdma.lab.probe import DEFAULT_TRANSFER_S
from fedrdma.lab.units import format_rate

app = typer.Typer(help="WAN lab: silos and an aggregator in network namespaces, joined by shaped paths.",
                  no_args_is_help=True)

NAME_HELP = "Lab name: prefix of its namespaces (<name>-agg, <name>-wan, <name>-siloK)."

FLAG_OF_FIELD = {"rate_bps": "--rate", "rtt_s": "--rtt", "loss": "--loss", "mtu": "--mtu", "name": "--name",
                 "delay_backend": "--delay-backend", "paths": "--silos"}
"""Pydantic reports model fields; users typed flags."""


def describe_validation(exc: ValidationError) -> str:
    """A lab setting's validation errors, each named by the flag that set it."""
    parts = []
    for e in exc.errors():
        field = next((str(x) for x in reversed(e["loc"]) if isinstance(x, str)), "")
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{FLAG_OF_FIELD.get(field, field)}: {msg}")
    return "; ".join(dict.fromkeys(parts))


def _fail(message: str) -> NoReturn:
    console(stderr=True).print(f"[bold red]lab:[/] {message}")
    raise typer.Exit(1)


def show_status(lab: Lab, rows: list[PathStatus]) -> None:
    console().print(status_table(lab.config, rows, lab.backend, lab.ceiling_bps, lab.congestion_control()))


@app.command("up")
def up(
    silos: int = typer.Option(DEFAULT_SILOS, help="Number of silo namespaces (one path each)."),
    rate: str = typer.Option(DEFAULT_RATE, help="Line rate of each path, each way: 1gbit, 500mbit, 'unlimited'."),
    rtt: str = typer.Option(DEFAULT_RTT, help="Round-trip time each path adds: 20ms, 0.5ms, 0."),
    loss: str = typer.Option(str(DEFAULT_LOSS), help="Drop probability per packet, each way: 0.01 = 1 %."),
    mtu: int = typer.Option(DEFAULT_MTU, help="MTU of every lab link."),
    name: str = typer.Option(DEFAULT_LAB_NAME, help=NAME_HELP),
    delay_backend: str = typer.Option("auto", help="auto | netem | element"),
    remeasure: bool = typer.Option(False, help="Measure the delay element's ceiling again instead of reusing it."),
) -> None:
    """Build the lab (or keep it, when it is already up with these settings)."""
    try:
        config = LabConfig.uniform(silos=silos, rate=rate, rtt=rtt, loss=loss, mtu=mtu, name=name,
                                   delay_backend=delay_backend)
    except ValidationError as exc:
        _fail(describe_validation(exc))
    except ValueError as exc:
        _fail(str(exc))
    out = console()
    try:
        lab = Lab.up(config, remeasure=remeasure, log=lambda m: out.print(f"[dim]{m}[/]"))
    except LabError as exc:
        _fail(str(exc))
    out.print(f"lab [bold]{name}[/] up: {len(lab.paths)} silo(s), MTU {config.mtu}, delay by {lab.backend}"
              + (f" (ceiling {format_rate(lab.ceiling_bps)})" if lab.ceiling_bps else ""))
    show_status(lab, lab.status(measure=False))


@app.command("down")
def down(name: str = typer.Option(DEFAULT_LAB_NAME, help=NAME_HELP)) -> None:
    """Remove everything the lab made (also after a crashed `up`); fine to run twice."""
    try:
        removed = Lab.down_by_name(name)
    except LabError as exc:
        _fail(str(exc))
    console().print(f"lab [bold]{name}[/] " + ("down" if removed else "was not up (nothing to remove)"))


@app.command("status")
def status(
    name: str = typer.Option(DEFAULT_LAB_NAME, help=NAME_HELP),
    measure: bool = typer.Option(True, help="Ping and run a short TCP transfer each way on every path."),
    seconds: float = typer.Option(DEFAULT_TRANSFER_S, help="Counted seconds of each TCP transfer."),
) -> None:
    """Each path's rate, RTT and loss: as configured and as measured."""
    try:
        lab = Lab.attach(name)
        if not lab.healthy():
            _fail(f"lab {name!r} is damaged (a namespace or the delay element is gone): "
                  f"run `fedrdma lab down --name {name}` and `lab up` again")
        rows = lab.status(measure=measure, seconds=seconds)
    except LabError as exc:
        _fail(str(exc))
    show_status(lab, rows)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    namespace: str = typer.Argument(..., help="agg, wan, silo1, ... or a full namespace name."),
    cmd: list[str] = typer.Argument(..., help="The command, after `--`."),
    name: str = typer.Option(DEFAULT_LAB_NAME, help=NAME_HELP),
) -> None:
    """Run CMD inside one of the lab's namespaces: `fedrdma lab exec silo1 -- ping 198.19.1.1`."""
    try:
        prefix = Lab.attach(name).exec_prefix(namespace)
    except LabError as exc:
        _fail(str(exc))
    argv = prefix + list(cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)
