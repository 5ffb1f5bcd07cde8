"""`fedrdma lab up|down|status|exec`: the WAN lab from the shell.

Also runnable as `python -m fedrdma.lab.cli` (tests use this to crash an `up` midway).
"""

from __future__ import annotations

import os
import sys

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

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
from fedrdma.lab.units import format_duration, format_rate

app = typer.Typer(help="WAN lab: silos and an aggregator in network namespaces, joined by shaped paths.",
                  no_args_is_help=True)
console = Console()
err = Console(stderr=True)

NAME_HELP = "Lab name: prefix of its namespaces (<name>-agg, <name>-wan, <name>-siloK)."


def _fail(message: str) -> None:
    err.print(f"[bold red]lab:[/] {message}")
    raise typer.Exit(1)


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
        return
    except ValueError as exc:
        _fail(str(exc))
        return
    try:
        lab = Lab.up(config, remeasure=remeasure, log=lambda m: console.print(f"[dim]{m}[/]"))
    except LabError as exc:
        _fail(str(exc))
        return
    console.print(f"lab [bold]{name}[/] up: {len(lab.paths)} silo(s), MTU {config.mtu}, delay by {lab.backend}"
                  + (f" (ceiling {format_rate(lab.ceiling_bps)})" if lab.ceiling_bps else ""))
    console.print(status_table(lab, lab.status(measure=False)))


@app.command("down")
def down(name: str = typer.Option(DEFAULT_LAB_NAME, help=NAME_HELP)) -> None:
    """Remove everything the lab made (also after a crashed `up`); fine to run twice."""
    try:
        removed = Lab.down_by_name(name)
    except LabError as exc:
        _fail(str(exc))
        return
    console.print(f"lab [bold]{name}[/] " + ("down" if removed else "was not up (nothing to remove)"))


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
        return
    console.print(status_table(lab, rows))


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
        return
    argv = prefix + list(cmd)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


FLAG_OF_FIELD = {"rate_bps": "--rate", "rtt_s": "--rtt", "loss": "--loss", "mtu": "--mtu", "name": "--name",
                 "delay_backend": "--delay-backend", "paths": "--silos"}
"""Pydantic reports model fields; users typed flags."""


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        field = next((str(x) for x in reversed(e["loc"]) if isinstance(x, str)), "")
        msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{FLAG_OF_FIELD.get(field, field)}: {msg}")
    return "; ".join(dict.fromkeys(parts))


def status_table(lab: Lab, rows: list[PathStatus]) -> Table:
    cfg = lab.config
    ceiling = f", element ceiling {format_rate(lab.ceiling_bps)}" if lab.ceiling_bps else ""
    table = Table(title=f"lab {cfg.name}: MTU {cfg.mtu}, delay by {lab.backend}{ceiling}, "
                        f"TCP congestion control {lab.congestion_control()}")
    for col in ("path", "silo -> aggregator", "rate", "rate up (TCP)", "rate down (TCP)", "RTT", "RTT (ping)",
                "loss", "loss up", "loss down"):
        table.add_column(col, justify="left" if col in ("path", "silo -> aggregator") else "right")

    def rate(r: object) -> str:
        return "-" if r is None else f"{format_rate(r.bits_per_second)} ({r.retransmits} retr)"  # type: ignore[attr-defined]

    def loss(r: object) -> str:
        if r is None:
            return "-"
        return f"{r.loss:.4f} ({r.packets_dropped}/{r.packets_seen})"  # type: ignore[attr-defined]

    for row in rows:
        p = row.path
        table.add_row(
            f"{p.silo_ns}", f"{p.silo_addr} -> {p.agg_addr}", format_rate(p.shape.rate_bps),
            rate(row.upload), rate(row.download), format_duration(p.shape.rtt_s),
            "-" if row.rtt_s is None else format_duration(row.rtt_s), f"{p.shape.loss:g}",
            loss(row.upload), loss(row.download),
        )
    return table


if __name__ == "__main__":
    app()
