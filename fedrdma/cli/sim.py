"""`fedrdma tune` (a chunk size and window for one path) and `fedrdma sim` (the model's grid).

`tune` asks the RoCE model (`fedrdma.sim`) by default, and with `--probe` measures trial
transfers on a lab path (`fedrdma.bench.probe`). Its JSON is what the runtime's config
accepts as `tuning` (`config.chunk_size`, `config.window`) plus the reasons behind it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from fedrdma.cli.console import console
from fedrdma.cli.options import comma_list, line_rate, single
from fedrdma.cli.tables import probe_table, recommendation_table, sim_table, tcp_table
from fedrdma.core.chunks import CHUNK_ALIGN
from fedrdma.lab.config import PathShape
from fedrdma.lab.errors import LabError
from fedrdma.lab.units import parse_duration, parse_loss
from fedrdma.sim.tcp_buffers import tcp_check
from fedrdma.sim.tune import DEFAULT_STATE_BYTES, recommend

app = typer.Typer()

SIM_RATES = "100mbit,1gbit,10gbit"
"""The paper's Table 2 spread of link rates (plus 10 Gbit/s, where RoCE is usually deployed)."""

SIM_RTTS = "1ms,20ms,80ms"
"""Metro, continental and intercontinental round trips."""

SIM_LOSSES = "0,0.001,0.01"
"""Clean, mildly and badly lossy WAN paths."""

def _state_bytes(size_mb: float | None) -> int:
    if size_mb is None:
        return DEFAULT_STATE_BYTES
    if size_mb <= 0:
        raise typer.BadParameter(f"--size-mb {size_mb} must be positive (MiB of state to move)")
    return int(size_mb * 2**20) // CHUNK_ALIGN * CHUNK_ALIGN or CHUNK_ALIGN


def _write(out: Console, path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    out.print(f"wrote {path}")


@app.command("tune", help="Recommend a chunk size and window for a path (RoCE go-back-N model, or --probe).")
def tune(
    rate: str = typer.Option(None, help="Line rate of the path: 1gbit, 500mbit."),
    rtt: str = typer.Option(None, help="Round-trip time of the path: 20ms."),
    loss: str = typer.Option("0", help="Drop probability per packet: 0.01 or 1%."),
    size_mb: float = typer.Option(None, help="State size in MiB; default: GPT-2 small in fp32 (~475 MiB)."),
    probe: bool = typer.Option(False, "--probe", help="Measure on a live lab path with short trial transfers "
                                                      "instead of asking the model (needs root)."),
    lab: str = typer.Option(None, help="With --probe: probe a running lab (`fedrdma lab up`) instead of "
                                       "building a path from --rate/--rtt/--loss."),
    silo: int = typer.Option(1, min=1, help="With --probe --lab: whose path to probe."),
    json_path: Path = typer.Option(None, "--json", help="Write the recommendation here as JSON."),
    proc_root: Path = typer.Option(Path("/proc"), hidden=True, help="Where to read the TCP sysctls (tests)."),
) -> None:
    """Recommend a chunk size and window for a path, and check TCP buffers against its BDP.

    From the RoCE model by default; with --probe from trial transfers on a live path. The
    JSON's `config` holds `chunk_size` and `window`: give the file to the aggregator as
    `tuning = "FILE"` (or `--tuning FILE`).
    """
    out = console()
    if probe:
        data = _probe(out, rate, rtt, loss, size_mb, lab, silo, proc_root)
    else:
        if lab is not None:
            raise typer.BadParameter("--lab names a path to measure: it needs --probe", param_hint="--lab")
        if rate is None or rtt is None:
            raise typer.BadParameter("give the path: --rate (e.g. 1gbit) and --rtt (e.g. 20ms)",
                                     param_hint="--rate/--rtt")
        bps, seconds = single(rate, "--rate", line_rate), single(rtt, "--rtt", parse_duration)
        rec = recommend(bps, seconds, single(loss, "--loss", parse_loss), state_bytes=_state_bytes(size_mb))
        out.print(recommendation_table(rec))
        tcp = tcp_check(bps, seconds, proc_root)
        out.print(tcp_table(tcp, bps, seconds))
        data = rec.to_json() | {"method": "model", "tcp_buffers": tcp}
    if json_path:
        _write(out, json_path, data)


def _probe(out: Console, rate: str | None, rtt: str | None, loss: str, size_mb: float | None,
           lab_name: str | None, silo: int, proc_root: Path) -> dict[str, Any]:
    """Trial transfers on a running lab's path, or on a one-path lab built for the occasion."""
    # Heavy, as every import inside a command here: the peers' transport stack, matplotlib.
    from fedrdma.bench.probe import probe, probe_path, tuning_json

    shape = None
    if lab_name is not None:
        if rate is not None or rtt is not None:
            raise typer.BadParameter("--lab probes the lab's own path: drop --rate/--rtt", param_hint="--lab")
    elif rate is None:
        raise typer.BadParameter("--probe needs a path: --rate (and --rtt, --loss) to build one, "
                                 "or --lab NAME to use a running lab", param_hint="--rate/--lab")
    else:
        single(rate, "--rate", line_rate), single(rtt or "0", "--rtt", parse_duration)  # the model's messages
        shape = PathShape.of(rate, rtt or "0", single(loss, "--loss", parse_loss))
    nbytes = None if size_mb is None else _state_bytes(size_mb)
    try:
        with probe_path(shape, lab_name, silo, log=lambda m: out.print(f"[dim]lab: {m}")) as where:
            out.print(f"probing {where.describe()} with trial transfers ...")
            result = probe(where, nbytes)
    except LabError as exc:
        console(stderr=True).print(f"[bold red]tune --probe:[/] {exc}")
        raise typer.Exit(1) from None
    out.print(probe_table(result, where.describe()))
    data = tuning_json(result, where, proc_root)
    if "tcp_buffers" in data:
        assert where.shape is not None and where.shape.rate_bps is not None
        out.print(tcp_table(data["tcp_buffers"], where.shape.rate_bps, where.shape.rtt_s))
    return data


@app.command("sim", help="The RoCE go-back-N model's goodput by chunk size over a grid of paths.")
def sim(
    rates: str = typer.Option(SIM_RATES, help="Comma list of line rates."),
    rtts: str = typer.Option(SIM_RTTS, help="Comma list of RTTs."),
    losses: str = typer.Option(SIM_LOSSES, help="Comma list of loss fractions."),
    size_mb: float = typer.Option(None, help="State size in MiB; default: GPT-2 small in fp32 (~475 MiB)."),
    png: Path = typer.Option(None, "--png", help="Write goodput vs chunk size per path as a PNG."),
    json_path: Path = typer.Option(None, "--json", help="Write every row as JSON."),
) -> None:
    """The T2-style table from the RoCE model: goodput (fraction of line) per chunk size and path."""
    out = console()
    rate_list = comma_list(rates, "--rates", line_rate)
    rtt_list = comma_list(rtts, "--rtts", parse_duration)
    loss_list = comma_list(losses, "--losses", parse_loss)
    state = _state_bytes(size_mb)
    paths = [(r, t, p) for r in rate_list for t in rtt_list for p in loss_list]
    results = [(path, recommend(*path, state_bytes=state)) for path in paths]
    out.print(sim_table(results, state))
    if json_path:
        _write(out, json_path, [rec.to_json() for _, rec in results])
    if png:
        from fedrdma.cli.plots import sim_plot

        sim_plot(results, png)
        out.print(f"plot: {png}")
