"""`fedrdma aggregator`, `fedrdma silo` and `fedrdma demo`: the federated runtime's commands.

The aggregator's and the silo's flags are generated from their settings (`fedrdma.config`),
one per field; `demo` runs a whole federation per mode on this host.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.logging import RichHandler

from fedrdma.cli.console import console, live, write_record
from fedrdma.cli.inputs import demo_files, model_name, text_file
from fedrdma.cli.options import comma_list, mode, single
from fedrdma.cli.settings import USAGE_ERROR, flag, settings_command
from fedrdma.cli.tables import add_round_row, demo_table, round_table
from fedrdma.config import AggregatorConfig, SiloConfig
from fedrdma.core.errors import FedRDMAError
from fedrdma.core.modes import Mode, choices
from fedrdma.fl.inputs import CERTS_DIR, DEMO_MODES, DEMO_SILOS, DataError

if TYPE_CHECKING:
    from fedrdma.fl.records import AggregatorRound

app = typer.Typer()


def _silo_entry(text: str) -> dict[str, str]:
    """`hospital`, or `hospital=1200` for a silo whose FedAvg weight the consortium agreed."""
    silo, sep, _ = text.partition(":")
    if sep:
        raise typer.BadParameter(f"--silos takes a silo id ({silo!r}); tokens are gone: a silo authenticates "
                                 "with its certificate (`fedrdma certs issue DIR ID --role silo`)")
    silo, sep, weight = text.partition("=")
    return {"id": silo, "weight": weight} if sep else {"id": silo}


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=console(stderr=True))])


def run_aggregator(cfg: AggregatorConfig) -> None:
    # Heavy, as every import inside a command here: torch, transformers, matplotlib.
    from fedrdma.cli.plots import rounds_plot
    from fedrdma.fl.aggregator import Aggregator
    from fedrdma.fl.evaluate import evaluator

    _logging()
    out = console()
    try:  # the held-out text is read before the model is built and the table drawn
        evaluate = evaluator(cfg)
    except DataError as exc:
        typer.echo(f"aggregator: `eval_data` ({flag('eval_data')}): {exc}", err=True)
        raise typer.Exit(USAGE_ERROR) from None
    table = round_table(cfg.mode)
    try:
        with live(out, table):
            records = Aggregator(cfg, evaluate).run(on_round=lambda r: add_round_row(table, r))
    except FedRDMAError as exc:
        out.print(f"[red]aggregator failed:[/] {exc}")
        raise typer.Exit(1) from None
    png = rounds_plot({cfg.mode: records}, Path(cfg.out_dir) / "rounds.png") \
        if any(r.eval_loss is not None for r in records) else None
    out.print(f"aggregator: {sum(r.round > 0 for r in records)} rounds; metrics in {cfg.out_dir}/metrics.jsonl"
              + (f", plot {png}" if png else ""))


def run_silo(cfg: SiloConfig) -> None:
    from fedrdma.fl.silo import Silo

    _logging()
    try:
        done = Silo(cfg).run()
    except FedRDMAError as exc:
        console().print(f"[red]silo {cfg.id} failed:[/] {exc}")
        raise typer.Exit(1) from None
    console().print(f"silo {cfg.id}: took part in rounds {done}")


app.command("aggregator", help="Run the aggregator: rounds of broadcast, local training, upload, FedAvg.")(
    settings_command("aggregator", AggregatorConfig, run_aggregator, {"silos": _silo_entry},
                     {"eval_data": text_file, "model": model_name})
)
app.command("silo", help="Run one silo: join the aggregator, train on local data, upload each round.")(
    settings_command("silo", SiloConfig, run_silo, {}, {"data": text_file, "model": model_name})
)


@app.command("demo")
def demo(
    rounds: int = typer.Option(3, min=1, help="Federated rounds per mode."),
    model: str = typer.Option("gpt2-small", help="gpt2-tiny|gpt2-small|... or a local checkpoint dir."),
    lora: bool = typer.Option(False, help="Fine-tune LoRA adapters only (only they travel)."),
    silos: int = typer.Option(3, min=1, max=3, help="How many demo silos (hospital, bank, support)."),
    modes: str = typer.Option(",".join(DEMO_MODES), help=f"Comma list of modes to compare: {choices()}."),
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Where configs, logs, checkpoints, metrics and "
                                                                  "plots go."),
    json_path: Path = typer.Option(None, "--json", help="Write the comparison here as JSON."),
) -> None:
    """A local federation (aggregator + silos as processes) per mode, side by side."""
    from fedrdma.cli.plots import rounds_plot
    from fedrdma.fl.demo import run_demo

    out = console()
    names = comma_list(modes, "--modes", mode)
    single(model, "--model", model_name)
    try:
        demo_files(DEMO_SILOS[:silos])
    except ValueError as exc:
        console(stderr=True).print(f"[bold red]demo:[/] the shipped corpus: {exc}")
        raise typer.Exit(1) from None
    out.print(f"[bold]demo[/]: {model}{' + LoRA' if lora else ''}, {silos} silos, {rounds} rounds, "
              f"modes {', '.join(names)}; logs in {out_dir}")
    out.print(f"  control plane: mutual TLS with the demo's own CA ({out_dir / CERTS_DIR})"
              + ("; one-sided modes run as a trusted fabric (every process is the demo's own)"
                 if any(Mode(n).one_sided for n in names) else ""))

    def show(name: str, r: AggregatorRound) -> None:
        loss = f"held-out loss {r.eval_loss:.3f}" if r.eval_loss is not None else "not scored"
        if r.round == 0:
            out.print(f"  {name:11} round 0  {loss}")
            return
        out.print(
            f"  {name:11} round {r.round}  {loss}  comm {r.comm_seconds:.2f} s  compute {r.compute_seconds:.2f} s  "
            f"comm share {100 * r.comm_share:.0f} %  accepted {', '.join(r.accepted)}"
        )

    result = run_demo(out_dir, rounds, model, lora, names, DEMO_SILOS[:silos], on_round=show)
    out.print(demo_table(result))
    png = rounds_plot({m: t.rounds for m, t in result.transports.items()}, out_dir / "demo.png")
    out.print(f"plot: {png}")
    out.print(f"max |difference| between the modes' final models: {result.max_abs_diff_between_transports:.2e}")
    if json_path:
        write_record(out, result, json_path)
