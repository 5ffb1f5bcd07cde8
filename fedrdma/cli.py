"""The `fedrdma` command."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedrdma.bench.heap import DEFAULT_MODEL as DEFAULT_HEAP_MODEL
from fedrdma.bench.heap import DEFAULT_REPEAT as DEFAULT_HEAP_REPEAT
from fedrdma.bench.heap import DEFAULT_ROUNDS as DEFAULT_HEAP_ROUNDS
from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, ChunkPlan, check_window
from fedrdma.core.errors import PlanError
from fedrdma.core.modes import Mode, choices
from fedrdma.core.sizes import size_label

app = typer.Typer(help="Federated fine-tuning of LLMs over chunked one-sided RDMA (FedRDMA).", no_args_is_help=True)
bench = typer.Typer(help="Benchmarks that print ratios measured in one run.", no_args_is_help=True)
app.add_typer(bench, name="bench")


def _add_lab() -> None:
    from fedrdma.lab.cli import app as lab_app

    app.add_typer(lab_app, name="lab", help="WAN lab: silos and an aggregator in network namespaces behind shaped links.")


def _add_sim() -> None:
    from fedrdma.sim.cli import sim as sim_command
    from fedrdma.sim.cli import tune as tune_command

    app.command("tune", help="Recommend a chunk size and window for a path (RoCE go-back-N model).")(tune_command)
    app.command("sim", help="The RoCE go-back-N model's goodput by chunk size over a grid of paths.")(sim_command)


_add_lab()
_add_sim()
console = Console()

DEFAULT_BENCH_MODEL = "gpt2-small"
"""The transfer benchmark's default state: GPT-2 small's 124M fp32 parameters (~475 MiB)."""


def _parse_modes(text: str) -> list[Mode]:
    try:
        return Mode.parse_list(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@bench.command("transfer")
def bench_transfer(
    size_mb: float = typer.Option(None, help="State size in MiB (synthetic fp32); default: GPT-2 small from config."),
    model: str = typer.Option(DEFAULT_BENCH_MODEL, help="Model whose trainable state to move, when --size-mb is not given."),
    lora: bool = typer.Option(False, "--lora", help="With --model: move only the LoRA adapters, as a LoRA federation does."),
    modes: str = typer.Option(",".join(Mode), help=f"Comma list of modes: {choices()}."),
    chunk_size: int = typer.Option(
        None, help=f"Chunk size in bytes; default {DEFAULT_CHUNK_SIZE}, or the whole state when it is smaller "
        "(as the runtime does)."),
    window: int = typer.Option(DEFAULT_WINDOW, help="Chunks in flight at once."),
    repeat: int = typer.Option(3, min=1, help="Counted transfers per mode (after one warm-up); figures are medians."),
    json_path: Path = typer.Option(None, "--json", help="Write the results here as JSON."),
    rate: str = typer.Option(None, help="Run the peers in a lab path of this line rate (1gbit, 500mbit) "
                                        "instead of on loopback; needs root."),
    rtt: str = typer.Option(None, help="With --rate: round-trip time the path adds (20ms); default 0."),
    loss: str = typer.Option(None, help="With --rate: drop probability per packet each way (0.01 = 1 %); default 0."),
    mtu: int = typer.Option(None, help="With --rate: MTU of the lab links; default the lab's (9000)."),
    references: bool = typer.Option(True, help="Also time raw NIXL WRITE and READ (the ceiling the modes are read against)."),
) -> None:
    """Move one state between two processes with each mode and with raw NIXL references.

    With --rate the sender runs in a silo namespace and the receiver in the aggregator's,
    joined by a path shaped in the lab's router; figures are then also read against the line.
    """
    from fedrdma.bench import transfer

    mode_list = _parse_modes(modes)
    if size_mb is not None:
        if size_mb <= 0:
            raise typer.BadParameter("--size-mb must be positive")
        if lora:
            raise typer.BadParameter("--lora applies to --model; a --size-mb state is synthetic")
        nbytes = int(size_mb * 2**20) // 4 * 4
        size_args = ["--size-bytes", str(nbytes)]
        what = f"{size_label(nbytes)} synthetic fp32 state"
    else:
        from fedrdma.bench.states import gpt2_layout

        nbytes = gpt2_layout(model, lora).nbytes
        size_args = ["--model", model, *(["--lora"] if lora else [])]
        what = f"{model}{' LoRA' if lora else ''} trainable state, {size_label(nbytes)}"
    if chunk_size is None:
        chunk_size = min(DEFAULT_CHUNK_SIZE, nbytes)
    try:
        ChunkPlan.build(nbytes, chunk_size)
        check_window(window)
    except PlanError as exc:
        raise typer.BadParameter(str(exc)) from None
    shape = _path_shape(rate, rtt, loss, mtu)
    env = transfer.transfer_env()
    console.print(f"[bold]bench transfer[/]: {what}; chunk {chunk_size} B, window {window}, "
                  f"{repeat} counted + 1 warm-up per mode; UCX_TLS={env['UCX_TLS']}")
    total = (len(mode_list) + (2 if references else 0)) * (repeat + transfer.WARMUP)
    with _placement(shape, mtu) as where, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        console.print(f"peers on {where.describe()}")
        task = progress.add_task("starting", total=total)
        result = transfer.run(
            size_args, nbytes, mode_list, chunk_size, window, repeat,
            on_transfer=lambda: progress.advance(task),
            on_mode=lambda m: progress.update(task, description=f"[cyan]{m}"),
            env=env, where=where, references=references,
        )
    console.print(transfer_table(result))
    if json_path:
        transfer.write_json(result, json_path)
        console.print(f"wrote {json_path}")
    if not all(row["identical"] for row in result["modes"].values()):
        raise typer.Exit(1)


@bench.command("paper")
def bench_paper(
    out: Path = typer.Option(Path("results/paper"), help="Where paper.json, report.md and the PNGs go."),
    tables: str = typer.Option("T1,T2,T3,T4", help="Comma list of the tables to measure (T4 comes from T3's runs)."),
    repeat: int = typer.Option(3, help="Counted runs per figure (at least 3), after one warm-up."),
    mtu: int = typer.Option(9000, help="MTU of the lab links."),
    against: Path | None = typer.Option(
        None, help="An earlier paper.json to compare with; by default the one already in --out, kept as "
        "paper.previous.json."),
    logs: Path | None = typer.Option(
        None, help="Keep T1's federation logs and checkpoints (several GB) here; by default they go to scratch."),
    report_only: bool = typer.Option(
        False, "--report-only", help="Measure nothing: write the report, plots and comparison of --out's "
        "paper.json again (after the report's form changed)."),
) -> None:
    """The FedRDMA paper's tables T1-T4, measured in the WAN lab: report, JSON and plots.

    Needs root (the lab) and about 50 minutes on a 2-core host. A rerun into the same --out
    compares itself with the run it replaces, figure by figure, in the report.
    """
    import os
    import shlex
    import sys

    from fedrdma.bench.paper import MIN_REPEAT, TABLES, Step, keep_previous, rewrite_report, run_paper

    if report_only:
        try:
            rewrite_report(out)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--out") from exc
        console.print(f"wrote {out / 'report.md'} from {out / 'paper.json'} (nothing measured)")
        return

    wanted = [t.strip().upper() for t in tables.split(",") if t.strip()]
    bad = [t for t in wanted if t not in TABLES]
    if bad or not wanted:
        raise typer.BadParameter(f"unknown table(s) {', '.join(bad) or '(none)'}; choose from {', '.join(TABLES)}")
    if repeat < MIN_REPEAT:
        raise typer.BadParameter(f"--repeat {repeat}: the report states min and median of at least {MIN_REPEAT} runs")
    if os.geteuid() != 0:
        console.print("[bold red]bench paper:[/] needs root to build the WAN lab's namespaces: run it with sudo")
        raise typer.Exit(1)
    try:
        previous = keep_previous(out, against)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--against") from exc
    command = "fedrdma " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        current: list[Any] = []

        def start(description: str, total: int) -> None:
            if current:
                progress.update(current[-1], completed=progress.tasks[-1].total)
            current.append(progress.add_task(description, total=total))

        result = run_paper(out, wanted, repeat, mtu, Step(start, lambda: progress.advance(current[-1])), command,
                           against=previous, logs=logs)
    console.print(f"wrote {out / 'report.md'} ({result['minutes']:.0f} min)")
    if "repeats" in result:
        console.print(f"against {previous}: " + ("every claim bound by the line or the transport repeats within "
                                                 "noise" if result["repeats"]["agrees"]
                                                 else "some claims differ beyond noise (see the report)"))


@bench.command("compare")
def bench_compare(
    before: Path = typer.Argument(..., metavar="BEFORE", help="The earlier run's paper.json."),
    after: Path = typer.Argument(..., metavar="AFTER", help="The later run's paper.json."),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Also write the comparison here as markdown."),
    strict: bool = typer.Option(False, "--strict", help="Hold host-bound claims (loopback ratios between modes) "
                                "to the same rule: they then decide the exit code too."),
) -> None:
    """Do two `bench paper` runs give the same tables within noise? Exit 1 if not."""
    from fedrdma.bench.compare import compare, groups, held, host_speed, load, markdown

    try:
        runs = [load(before), load(after)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    comparison = compare(*runs)
    if not comparison.pairs:
        raise typer.BadParameter(f"{before} and {after} have no table in common: nothing to compare")
    table = Table(title=f"{after} against {before}")
    for column in ("table", "figures", "count", "within noise", "direction holds", "largest difference"):
        table.add_column(column)
    for name, kind, pairs in groups(comparison):
        worst = max(pairs, key=lambda p: p.relative)
        table.add_row(name, kind, str(len(pairs)), str(sum(p.agrees for p in pairs)), held(kind, pairs),
                      f"{100 * worst.relative:.0f} % ({worst.after.name}, {worst.after.unit})")
    console.print(table)
    hosts = (host_speed(runs[0]), host_speed(runs[1]))
    console.print(f"host memory copy: before {hosts[0]}, now {hosts[1]}")
    for pick in comparison.picks:
        if not pick.holds:
            console.print(f"T2 {pick.path}: best cell {pick.before} before, {pick.after} now, beyond noise")
    if markdown_out is not None:
        markdown_out.write_text(markdown(comparison, str(before), hosts) + "\n")
        console.print(f"wrote {markdown_out}")
    if not (comparison.agrees_strictly if strict else comparison.agrees):
        console.print("[bold red]some claims differ beyond noise[/]")
        raise typer.Exit(1)
    if comparison.agrees_strictly:
        console.print("every claim repeats within noise")
    else:
        turned = sum(not p.direction_holds for p in comparison.host_bound)
        console.print("every claim bound by the line or the transport repeats within noise; some host-bound "
                      f"claims moved ({turned} changed direction; --strict counts them)")


@bench.command("heap")
def bench_heap(
    model: str = typer.Option(DEFAULT_HEAP_MODEL, help="Model to train (gpt2-tiny ... or a local checkpoint dir)."),
    rounds: int = typer.Option(DEFAULT_HEAP_ROUNDS, min=2, help="Local rounds per child process; the first is a warm-up."),
    repeat: int = typer.Option(DEFAULT_HEAP_REPEAT, min=1, help="Child processes per setting, interleaved with the others."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results here as JSON."),
) -> None:
    """Local training under glibc's default heap, the pinned mmap threshold, and the pin lifted while computing."""
    from fedrdma.bench import heap

    total = repeat * len(heap.VARIANTS)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("training, one process per setting", total=total)
        result = heap.run(model, rounds, repeat, on_child=lambda variant: progress.advance(task))
    table = Table(title=f"{model}: {heap.LOCAL_STEPS} local steps of batch {heap.BATCH_SIZE} x {heap.SEQ_LEN} tokens "
                        f"per round, {rounds - 1} counted rounds x {repeat} processes")
    for column in ("heap", "s per round, median (min)", "vs default", "4 MiB mmapped while training"):
        table.add_column(column)
    for variant, row in result["variants"].items():
        table.add_row(variant, f"{row['seconds']:.2f} ({row['seconds_min']:.2f})", f"{row['vs_default']:.2f}x",
                      str(row["chunk_mmapped_while_training"]))
    console.print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}")


def _path_shape(rate: str | None, rtt: str | None, loss: str | None, mtu: int | None) -> Any:
    """The lab path the flags ask for, or None for loopback; bad values fail before anything starts."""
    if rate is None:
        given = [flag for flag, value in (("--rtt", rtt), ("--loss", loss), ("--mtu", mtu)) if value is not None]
        if given:
            verb = "shapes" if len(given) == 1 else "shape"
            raise typer.BadParameter(f"{', '.join(given)} {verb} a lab path, which also needs --rate (e.g. --rate 1gbit)")
        return None
    from pydantic import ValidationError

    from fedrdma.lab.cli import describe_validation
    from fedrdma.lab.config import LabConfig, PathShape

    try:
        shape = PathShape.of(rate, rtt or 0, loss or 0)
        if mtu is not None:
            LabConfig(mtu=mtu, paths=(shape,))
    except (ValidationError, ValueError) as exc:
        text = describe_validation(exc) if isinstance(exc, ValidationError) else str(exc)
        raise typer.BadParameter(text) from None
    return shape


@contextmanager
def _placement(shape: Any, mtu: int | None) -> Iterator[Any]:
    """Loopback, or a one-path lab that is taken down however the benchmark ends."""
    from fedrdma.bench.wan import ON_LOOPBACK, shaped_path
    from fedrdma.lab.config import DEFAULT_MTU
    from fedrdma.lab.errors import LabError

    if shape is None:
        yield ON_LOOPBACK
        return
    try:
        with shaped_path(shape, mtu or DEFAULT_MTU, log=lambda m: console.print(f"[dim]lab: {m}")) as where:
            yield where
    except LabError as exc:
        console.print(f"[bold red]lab:[/] {exc}")
        raise typer.Exit(1) from None


@app.command("demo")
def demo(
    rounds: int = typer.Option(3, min=1, help="Federated rounds per mode."),
    model: str = typer.Option("gpt2-small", help="gpt2-tiny|gpt2-small|... or a local checkpoint dir."),
    lora: bool = typer.Option(False, help="Fine-tune LoRA adapters only (only they travel)."),
    silos: int = typer.Option(3, min=1, max=3, help="How many demo silos (hospital, bank, support)."),
    modes: str = typer.Option("rdma-e,grpc", help=f"Comma list of modes to compare: {choices()}."),
    out: Path = typer.Option(Path("runs/demo"), help="Where configs, logs, checkpoints, metrics and plots go."),
    json_path: Path = typer.Option(None, "--json", help="Write the comparison here as JSON."),
) -> None:
    """A local federation (aggregator + silos as processes) per mode, side by side."""
    from fedrdma.fl.data import DEMO_SILOS
    from fedrdma.fl.demo import run_demo
    from fedrdma.plots import demo_plot

    names = _parse_modes(modes)
    console.print(f"[bold]demo[/]: {model}{' + LoRA' if lora else ''}, {silos} silos, {rounds} rounds, "
                  f"modes {', '.join(names)}; logs in {out}")

    def show(mode: str, r: dict[str, Any]) -> None:
        if r["round"] == 0:
            console.print(f"  {mode:11} round 0  held-out loss {r['eval_loss']:.3f}")
            return
        console.print(
            f"  {mode:11} round {r['round']}  held-out loss {r['eval_loss']:.3f}  "
            f"comm {r['comm_seconds']:.2f} s  compute {r['compute_seconds']:.2f} s  "
            f"comm share {100 * r['comm_share']:.0f} %  accepted {', '.join(r['accepted'])}"
        )

    result = run_demo(out, rounds, model, lora, names, DEMO_SILOS[:silos], on_round=show)
    console.print(demo_table(result))
    png = demo_plot(result, out / "demo.png")
    console.print(f"plot: {png}")
    console.print(f"max |difference| between the modes' final models: {result['max_abs_diff_between_transports']:.2e}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}")


def demo_table(result: dict[str, Any]) -> Table:
    transports = list(result["transports"])
    table = Table(title="federated rounds, side by side")
    table.add_column("round", justify="right")
    for t in transports:
        table.add_column(f"{t} loss", justify="right")
        table.add_column(f"{t} round s", justify="right")
        table.add_column(f"{t} comm %", justify="right")
    if "grpc" in transports and len(transports) > 1:
        for t in transports:
            if t != "grpc":
                table.add_column(f"comm speedup {t} vs grpc", justify="right")
    rows = {t: {r["round"]: r for r in result["transports"][t]["rounds"]} for t in transports}
    for rnd in sorted(set().union(*(r.keys() for r in rows.values()))):
        cells = [str(rnd)]
        for t in transports:
            r = rows[t].get(rnd, {})
            cells += [f"{r.get('eval_loss', float('nan')):.3f}", f"{r.get('round_seconds', 0.0):.1f}",
                      f"{100 * r.get('comm_share', 0.0):.0f}"]
        if "grpc" in transports and len(transports) > 1:
            g = rows["grpc"].get(rnd, {}).get("comm_seconds", 0.0)
            for t in transports:
                if t != "grpc":
                    mine = rows[t].get(rnd, {}).get("comm_seconds", 0.0)
                    cells.append(f"{g / mine:.1f}x" if mine > 0 and g > 0 else "")
        table.add_row(*cells)
    return table


def _silo_entry(text: str) -> dict[str, str]:
    silo, sep, token = text.partition(":")
    if not sep:
        raise typer.BadParameter(f"--silos takes ID:TOKEN, got {text!r}")
    return {"id": silo, "token": token}


def _run_aggregator(cfg: Any) -> None:
    from rich.live import Live

    from fedrdma.core.errors import FedRDMAError
    from fedrdma.fl.aggregator import Aggregator
    from fedrdma.fl.evaluate import evaluator
    from fedrdma.plots import demo_plot

    _logging()
    table = round_table(cfg.mode)
    try:
        with Live(table, console=console, refresh_per_second=2):
            records = Aggregator(cfg, evaluator(cfg)).run(on_round=lambda r: add_round_row(table, r))
    except FedRDMAError as exc:
        console.print(f"[red]aggregator failed:[/] {exc}")
        raise typer.Exit(1) from None
    png = demo_plot({"transports": {cfg.mode: {"rounds": records}}}, Path(cfg.out_dir) / "rounds.png") \
        if any(r.get("eval_loss") is not None for r in records) else None
    console.print(f"aggregator: {len(records)} rounds; metrics in {cfg.out_dir}/metrics.jsonl"
                  + (f", plot {png}" if png else ""))


def round_table(mode: str) -> Table:
    table = Table(title=f"rounds ({mode})")
    for col in ("round", "held-out loss", "broadcast s", "train s", "upload s", "aggregate s", "comm %", "accepted",
                "rejected"):
        table.add_column(col, justify="left" if col in ("accepted", "rejected") else "right")
    return table


def add_round_row(table: Table, r: dict[str, Any]) -> None:
    from fedrdma.plots import mean_over_silos as _mean

    loss = r.get("eval_loss")
    table.add_row(
        str(r["round"]),
        f"{loss:.3f}" if loss is not None else "",
        f"{_mean(r, 'broadcast_seconds'):.2f}",
        f"{_mean(r, 'train_seconds'):.2f}",
        f"{_mean(r, 'upload_seconds'):.2f}",
        f"{r.get('aggregation_seconds', 0.0):.2f}",
        f"{100 * r.get('comm_share', 0.0):.0f}",
        ", ".join(r.get("accepted", [])),
        "; ".join(f"{k}: {v}" for k, v in (r.get("rejected") or {}).items()),
    )


def _run_silo(cfg: Any) -> None:
    from fedrdma.core.errors import FedRDMAError
    from fedrdma.fl.silo import Silo

    _logging()
    try:
        done = Silo(cfg).run()
    except FedRDMAError as exc:
        console.print(f"[red]silo {cfg.id} failed:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"silo {cfg.id}: took part in rounds {done}")


def _logging() -> None:
    import logging

    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=Console(stderr=True))])


def _register_settings_commands() -> None:
    from fedrdma.config import AggregatorConfig, SiloConfig
    from fedrdma.settings_cli import settings_command

    app.command("aggregator", help="Run the aggregator: rounds of broadcast, local training, upload, FedAvg.")(
        settings_command(AggregatorConfig, _run_aggregator, {"silos": _silo_entry})
    )
    app.command("silo", help="Run one silo: join the aggregator, train on local data, upload each round.")(
        settings_command(SiloConfig, _run_silo, {})
    )


_register_settings_commands()


def transfer_table(result: dict[str, Any]) -> Table:
    on_line = result.get("link_rate_gbit") is not None
    table = Table(title=f"{size_label(result['size_bytes'])} over {result.get('path', 'loopback')}, "
                        f"medians of {result['repeat']}")
    cols = ["mode", "seconds (min)", "GB/s", *(["of line"] if on_line else []), "vs reference", "vs grpc",
            "CPU s", "recv +RSS MiB", "identical"]
    for col in cols:
        table.add_column(col, justify="left" if col == "mode" else "right")

    def line(row: dict[str, Any]) -> list[str]:
        return [f"{row['vs_line']:.3f}"] if on_line else []

    for label, key in [("raw WRITE", "reference"), ("raw READ", "reference_read")]:
        if key not in result:
            continue
        row = result[key]
        table.add_row(label, f"{row['seconds']:.3f} ({row['seconds_min']:.3f})", f"{row['goodput_gb_s']:.2f}",
                      *line(row), "1.00", "", f"{row['cpu_seconds']:.2f}", f"{row['receiver_extra_rss_mb']:.0f}", "",
                      style="dim")
    for mode, row in result["modes"].items():
        label = mode if "goodput_wire_gb_s" not in row else f"{mode} (wire only {row['goodput_wire_gb_s']:.2f} GB/s)"
        table.add_row(
            label,
            f"{row['seconds']:.3f} ({row['seconds_min']:.3f})",
            f"{row['goodput_gb_s']:.3f}",
            *line(row),
            f"{row['vs_reference']:.2f}" if "vs_reference" in row else "",
            f"{row['vs_grpc']:.1f}x" if "vs_grpc" in row else "",
            f"{row['cpu_seconds']:.2f}",
            f"{row['receiver_extra_rss_mb']:.0f}",
            "yes" if row["identical"] else "[red]NO",
        )
    return table


if __name__ == "__main__":
    app()
