"""`fedrdma bench transfer|paper|compare|heap|scale|soak|flower|wire`: benchmarks that print ratios measured in one run."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from pydantic import ValidationError
from rich.console import Console

from fedrdma.bench import heap
from fedrdma.bench.compare import compare, host_speed, load, markdown
from fedrdma.bench.wan import ON_LOOPBACK, Placement, shaped_path
from fedrdma.cli.console import console, progress, write_record
from fedrdma.cli.inputs import model_name
from fedrdma.cli.lab import describe_validation
from fedrdma.cli.options import comma_list, mode, one_of, single
from fedrdma.cli.tables import compare_table, heap_table, scale_table, soak_table, transfer_table
from fedrdma.config import INBOXES, VERIFIES
from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, ChunkPlan, check_window
from fedrdma.core.errors import PlanError, RunError
from fedrdma.core.modes import Mode, Wire, choices
from fedrdma.core.sizes import size_label
from fedrdma.fl.records import AggregatorRound
from fedrdma.lab.config import DEFAULT_MTU, LabConfig, PathShape
from fedrdma.lab.errors import LabError
from fedrdma.transport.streams import DEFAULT_STREAMS, MAX_STREAMS

app = typer.Typer(help="Benchmarks that print ratios measured in one run.", no_args_is_help=True)

DEFAULT_BENCH_MODEL = "gpt2-small"
"""The transfer benchmark's default state: GPT-2 small's trainable fp32 parameters."""

FP32_BYTES = 4
"""A --size-mb state is synthetic fp32: whole 4-byte elements."""


@app.command("transfer")
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
    tls: bool = typer.Option(True, help="Mutual TLS between the peers, with certificates made for the run: grpc over "
                                        "TLS, tcp-e's chunks sealed, as a federation runs them."),
    data_streams: int = typer.Option(DEFAULT_STREAMS, min=1, max=MAX_STREAMS, help="tcp-e: data connections per "
                                     "session."),
    wire_format: Wire = typer.Option(Wire.FP32, "--wire", help="Move the state as bf16 or int8, encoded before "
                                     "each send and decoded after each receive, as a federation does; the codec's "
                                     "seconds are reported per GB of the fp32 state."),
    verify: str = typer.Option("xxh3", help="fabric: receivers take landed chunks as good without hashing them, "
                               "to measure what xxh3 costs (a federation allows it only on InfiniBand or RoCE)."),
    inbox: str = typer.Option("full", help="slots: receivers land chunks in a few reused slots, as the "
                              "aggregator does (tcp-e, rdma-e, rdma-e-pull; a push WRITEs into granted landing "
                              "slots), to measure what that costs against a whole-state pool."),
) -> None:
    """Move one state between two processes with each mode and with raw NIXL references.

    With --rate the sender runs in a silo namespace and the receiver in the aggregator's,
    joined by a path shaped in the lab's router; figures are then also read against the line.
    """
    # Heavy, as every import inside a command here: torch and the transport stack.
    from fedrdma.bench import transfer

    out = console()
    mode_list = comma_list(modes, "--modes", mode)
    verify = single(verify, "--verify", one_of("verify", VERIFIES))
    inbox = single(inbox, "--inbox", one_of("inbox", INBOXES))
    if inbox == "slots" and (whole := [m.value for m in mode_list if not m.receiver_places]):
        raise typer.BadParameter(f"--inbox slots lands only tcp-e, rdma-e and rdma-e-pull in slots, not "
                                 f"{', '.join(whole)}; run those modes without it")
    if size_mb is not None:
        if size_mb <= 0:
            raise typer.BadParameter("--size-mb must be positive")
        if lora:
            raise typer.BadParameter("--lora applies to --model; a --size-mb state is synthetic")
        nbytes = int(size_mb * 2**20) // FP32_BYTES * FP32_BYTES
        size_args = ["--size-bytes", str(nbytes)]
        what = f"{size_label(nbytes)} synthetic fp32 state"
    else:
        from fedrdma.bench.states import gpt2_layout

        single(model, "--model", model_name)
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
    out.print(f"[bold]bench transfer[/]: {what}; chunk {chunk_size} B, window {window}, "
              f"{repeat} counted + 1 warm-up per mode; UCX_TLS={env['UCX_TLS']}"
              + ("; receivers do NOT hash landed chunks (--verify fabric)" if verify == "fabric" else "")
              + ("; receivers land chunks in slots (--inbox slots)" if inbox == "slots" else ""))
    total = (len(mode_list) + (2 if references else 0)) * (repeat + transfer.WARMUP)
    out.print(("peers speak mutual TLS (certificates made for this run)" if tls else "peers speak plaintext (--no-tls)")
              + ("; one-sided modes run as a trusted fabric: both peers are this benchmark's own processes"
                 if references or any(m.one_sided for m in mode_list) else ""))
    with _placement(out, shape, mtu) as where, progress(out) as bar:
        out.print(f"peers on {where.describe()}")
        task = bar.add_task("starting", total=total)
        try:
            result = transfer.run(
                size_args, nbytes, mode_list, chunk_size, window, repeat,
                on_transfer=lambda: bar.advance(task),
                on_mode=lambda m: bar.update(task, description=f"[cyan]{m}"),
                env=env, where=where, references=references, tls=tls, data_streams=data_streams,
                wire=wire_format, verify=verify, inbox=inbox,
            )
        except RunError as exc:
            bar.stop()
            console(stderr=True).print(f"[bold red]bench transfer failed:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
    out.print(transfer_table(result))
    if json_path:
        transfer.write_json(result, json_path)
        out.print(f"wrote {json_path}")
    if not all(row.identical for row in result.modes.values()):
        raise typer.Exit(1)


def _path_shape(rate: str | None, rtt: str | None, loss: str | None, mtu: int | None) -> PathShape | None:
    """The lab path the flags ask for, or None for loopback; bad values fail before anything starts."""
    if rate is None:
        given = [flag for flag, value in (("--rtt", rtt), ("--loss", loss), ("--mtu", mtu)) if value is not None]
        if given:
            verb = "shapes" if len(given) == 1 else "shape"
            raise typer.BadParameter(f"{', '.join(given)} {verb} a lab path, which also needs --rate (e.g. --rate 1gbit)")
        return None
    try:
        shape = PathShape.of(rate, rtt or 0, loss or 0)
        if mtu is not None:
            LabConfig(mtu=mtu, paths=(shape,))
    except (ValidationError, ValueError) as exc:
        text = describe_validation(exc) if isinstance(exc, ValidationError) else str(exc)
        raise typer.BadParameter(text) from None
    return shape


@contextmanager
def _placement(out: Console, shape: PathShape | None, mtu: int | None) -> Iterator[Placement]:
    """Loopback, or a one-path lab that is taken down however the benchmark ends."""
    if shape is None:
        yield ON_LOOPBACK
        return
    try:
        with shaped_path(shape, mtu or DEFAULT_MTU, log=lambda m: out.print(f"[dim]lab: {m}")) as where:
            yield where
    except LabError as exc:
        console(stderr=True).print(f"[bold red]lab:[/] {exc}")
        raise typer.Exit(1) from None


@app.command("paper")
def bench_paper(
    out_dir: Path = typer.Option(Path("results/paper"), "--out", help="Where paper.json, report.md and the PNGs go."),
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

    Needs root (the lab) and time: the README gives how long a run took here. A rerun into
    the same --out compares itself with the run it replaces, figure by figure, in the report.
    """
    from fedrdma.bench.paper import MIN_REPEAT, TABLES, Step, keep_previous, rewrite_report, run_paper

    out = console()
    if report_only:
        try:
            rewrite_report(out_dir)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--out") from exc
        out.print(f"wrote {out_dir / 'report.md'} from {out_dir / 'paper.json'} (nothing measured)")
        return

    wanted = comma_list(tables, "--tables", one_of("table", TABLES))
    if repeat < MIN_REPEAT:
        raise typer.BadParameter(f"--repeat {repeat}: the report states min and median of at least {MIN_REPEAT} runs")
    if os.geteuid() != 0:
        console(stderr=True).print("[bold red]bench paper:[/] needs root to build the WAN lab's namespaces: "
                                   "run it with sudo")
        raise typer.Exit(1)
    try:
        previous = keep_previous(out_dir, against)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--against") from exc
    command = "fedrdma " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out.print("peers and federations speak mutual TLS with certificates made for the run; one-sided modes run as "
              "a trusted fabric: every process is this benchmark's own")
    with progress(out) as bar:
        current: list[Any] = []

        def start(description: str, total: int) -> None:
            if current:
                bar.update(current[-1], completed=bar.tasks[-1].total)
            current.append(bar.add_task(description, total=total))

        result = run_paper(out_dir, wanted, repeat, mtu, Step(start, lambda: bar.advance(current[-1])), command,
                           against=previous, logs=logs)
    out.print(f"wrote {out_dir / 'report.md'} ({result.minutes or 0:.0f} min)")
    if result.repeats is not None:
        out.print(f"against {previous}: " + ("every claim bound by the line or the transport repeats within "
                                             "noise" if result.repeats.agrees
                                             else "some claims differ beyond noise (see the report)"))


@app.command("compare")
def bench_compare(
    before: Path = typer.Argument(..., metavar="BEFORE", help="The earlier run's paper.json."),
    after: Path = typer.Argument(..., metavar="AFTER", help="The later run's paper.json."),
    markdown_out: Path | None = typer.Option(None, "--markdown", help="Also write the comparison here as markdown."),
    strict: bool = typer.Option(False, "--strict", help="Hold host-bound claims (loopback ratios between modes) "
                                "to the same rule: they then decide the exit code too."),
) -> None:
    """Do two `bench paper` runs give the same tables within noise? Exit 1 if not."""
    out = console()
    try:
        runs = [load(before), load(after)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    comparison = compare(*runs)
    if not comparison.pairs:
        raise typer.BadParameter(f"{before} and {after} have no table in common: nothing to compare")
    out.print(compare_table(comparison, str(before), str(after)))
    hosts = (host_speed(runs[0]), host_speed(runs[1]))
    out.print(f"host memory copy: before {hosts[0]}, now {hosts[1]}")
    for pick in comparison.picks:
        if not pick.holds:
            out.print(f"T2 {pick.path}: best cell {pick.before} before, {pick.after} now, beyond noise")
    if markdown_out is not None:
        markdown_out.write_text(markdown(comparison, str(before), hosts) + "\n")
        out.print(f"wrote {markdown_out}")
    if not (comparison.agrees_strictly if strict else comparison.agrees):
        out.print("[bold red]some claims differ beyond noise[/]")
        raise typer.Exit(1)
    if comparison.agrees_strictly:
        out.print("every claim repeats within noise")
    else:
        turned = sum(not p.direction_holds for p in comparison.host_bound)
        out.print("every claim bound by the line or the transport repeats within noise; some host-bound "
                  f"claims moved ({turned} changed direction; --strict counts them)")


@app.command("heap")
def bench_heap(
    model: str = typer.Option(heap.DEFAULT_MODEL, help="Model to train (gpt2-tiny ... or a local checkpoint dir)."),
    rounds: int = typer.Option(heap.DEFAULT_ROUNDS, min=2, help="Local rounds per child process; the first is a warm-up."),
    repeat: int = typer.Option(heap.DEFAULT_REPEAT, min=1, help="Child processes per setting, interleaved with the others."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results here as JSON."),
) -> None:
    """Local training under glibc's default heap, the pinned mmap threshold, and the pin lifted while computing."""
    out = console()
    single(model, "--model", model_name)
    total = repeat * len(heap.VARIANTS)
    with progress(out) as bar:
        task = bar.add_task("training, one process per setting", total=total)
        result = heap.run(model, rounds, repeat, on_child=lambda variant: bar.advance(task))
    out.print(heap_table(result, heap.PROBE_BYTES))
    if json_path:
        write_record(out, result, json_path)


SCALE_MODEL = "gpt2-tiny"
"""The scale benchmark's default model: 64 silos' states fit anywhere; gpt2-small measures memory."""

MAX_SCALE_SILOS = 256
"""Beyond this the silos' processes would not fit this machine's memory and file descriptors."""


@app.command("scale")
def bench_scale(
    silos: str = typer.Option("4,16,64", help="Comma list of silo counts, one federation each."),
    model: str = typer.Option(SCALE_MODEL, help="Model whose state the silos move (gpt2-tiny, gpt2-small, ...)."),
    rounds: int = typer.Option(2, min=1, help="Rounds per federation; the table shows the last."),
    mode_name: str = typer.Option(Mode.TCP_E.value, "--mode", help=f"How updates move: {choices()} (one-sided "
                                  "modes run as a trusted fabric: every process is this benchmark's)."),
    inbox: str = typer.Option("slots", help="The aggregator's `inbox`: slots (tcp-e, rdma-e, rdma-e-pull: a few chunks per silo) "
                              "or full (a whole-state inbox per silo), to compare the two."),
    out_dir: Path = typer.Option(Path("runs/bench-scale"), help="Configs, logs and metrics of each federation."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results here as JSON."),
    plot: bool = typer.Option(True, help="Write scale-MODEL[-MODE][-full].png next to the JSON (or in --out-dir)."),
) -> None:
    """One aggregator with more and more silos: real links and transfers, no local training."""
    from fedrdma.bench import scale
    from fedrdma.cli.plots import scale_plot

    out = console()
    counts = comma_list(silos, "--silos", _silo_count)
    chosen = single(mode_name, "--mode", mode)
    single(model, "--model", model_name)
    inbox = single(inbox, "--inbox", one_of("inbox", INBOXES))
    with progress(out) as bar:
        task = bar.add_task(f"federations of {silos} silos", total=rounds * len(counts))
        try:
            result = scale.run(out_dir, counts, model, chosen, rounds, on_round=lambda n, r: bar.advance(task),
                               inbox=inbox)
        except RunError as exc:
            out.print(f"[red]bench scale failed:[/] {exc}")
            raise typer.Exit(1) from None
    out.print(scale_table(result))
    if json_path:
        write_record(out, result, json_path)
    if plot:
        variant = "".join(f"-{v}" for v, default in ((chosen, "tcp-e"), (inbox, "slots")) if v != default)
        png = scale_plot(result, (json_path.parent if json_path else out_dir) / f"scale-{model}{variant}.png")
        out.print(f"wrote {png}")


def _silo_count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_SCALE_SILOS:
        raise ValueError(f"silo count {text!r} must be a whole number from 1 to {MAX_SCALE_SILOS}")
    return int(text)


@app.command("soak")
def bench_soak(
    rounds: int = typer.Option(100, min=2, help="Rounds of the federation."),
    silos: int = typer.Option(4, min=2, max=16, help="Silos, each its own process."),
    faults: str = typer.Option("random", help="random: after each closed round, a fault with probability 1/2."),
    seed: int = typer.Option(0, help="Seed of the faults: which, when, whom."),
    model: str = typer.Option("gpt2-tiny", help="Model whose state the silos move."),
    mode_name: str = typer.Option(Mode.TCP_E.value, "--mode", help=f"How updates move: {choices()}."),
    out_dir: Path = typer.Option(Path("runs/bench-soak"), help="Configs, logs, checkpoints and the silos' updates."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results here as JSON."),
    lab: bool | None = typer.Option(None, "--lab/--no-lab", help="Run in the WAN lab, each silo on its own path, "
                                    "and cut those paths too; default: when root."),
) -> None:
    """A federation under random faults; every round's mean recomputed from the silos' saved updates."""
    from fedrdma.bench import soak

    in_lab = os.geteuid() == 0 if lab is None else lab
    if in_lab and os.geteuid() != 0:
        raise typer.BadParameter("the lab needs root (network namespaces); run with sudo or --no-lab", param_hint="--lab")

    out = console()
    single(faults, "--faults", one_of("fault schedule", ["random"]))
    chosen = single(mode_name, "--mode", mode)
    single(model, "--model", model_name)
    with progress(out) as bar:
        task = bar.add_task(f"{rounds} rounds under faults", total=rounds)
        try:
            result = soak.run(out_dir, rounds, silos, seed, chosen, model, in_lab, on_round=lambda r: bar.advance(task))
        except (RunError, LabError) as exc:
            out.print(f"[red]bench soak failed:[/] {exc}")
            raise typer.Exit(1) from None
    out.print(soak_table(result))
    if json_path:
        write_record(out, result, json_path)
    clean = not (result.mismatched_rounds or result.stale_updates or result.double_counted
                 or result.leaks.processes or result.leaks.fds or result.leaks.tmp_files or result.leaks.namespaces)
    if not clean:
        out.print("[red]the soak found rounds or resources that are wrong: see the table[/]")
        raise typer.Exit(1)


EXAMPLE_APP = Path(__file__).resolve().parents[2] / "examples" / "flower-gpt2"
"""The Flower app `bench flower` runs by default: the repository's GPT-2 example."""


@app.command("flower")
def bench_flower(
    model: str = typer.Option("gpt2-small", help="The example's model (gpt2-tiny, gpt2-small, ...)."),
    rounds: int = typer.Option(3, min=1, help="Federated rounds per way."),
    app_dir: Path = typer.Option(EXAMPLE_APP, "--app", help="The Flower app to run both ways (it must take the "
                                 "example's run-config keys: fedrdma, timings-path, out-path, ...)."),
    out_dir: Path = typer.Option(Path("runs/bench-flower"), help="Flower's homes, the nodes' directories, logs."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results here as JSON (and a plot beside it)."),
    rate: str = typer.Option(None, help="Run each site on a lab path of this line rate (1gbit), under TLS; needs "
                             "root."),
    rtt: str = typer.Option(None, help="With --rate: round-trip time the path adds (20ms); default 0."),
    loss: str = typer.Option(None, help="With --rate: drop probability per packet each way; default 0."),
    mtu: int = typer.Option(None, help="With --rate: MTU of the lab links; default the lab's (9000)."),
) -> None:
    """The same Flower app twice, its arrays moved by Flower and by fedrdma nodes: seconds, comm, RSS."""
    from fedrdma.bench.flower import run_flower_bench
    from fedrdma.cli.tables import flower_table

    out = console()
    if not (app_dir / "pyproject.toml").is_file():
        out.print(f"[red]bench flower:[/] --app {app_dir} holds no Flower app (no pyproject.toml)")
        raise typer.Exit(1)
    single(model, "--model", model_name)
    shape = _path_shape(rate, rtt, loss, mtu)
    try:
        result = run_flower_bench(app_dir, model, rounds, out_dir, say=lambda text: out.print(f"  {text}"),
                                  shape=shape, mtu=mtu or DEFAULT_MTU)
    except (RunError, LabError) as exc:
        out.print(f"[red]bench flower failed:[/] {exc}")
        raise typer.Exit(1) from None
    out.print(flower_table(result))
    out.print(f"max |difference| between the two ways' final models: {result.max_abs_diff:.2e}")
    if json_path:
        from fedrdma.cli.plots import flower_plot

        write_record(out, result, json_path)
        out.print(f"wrote {flower_plot(result, json_path.with_suffix('.png'))}")


@app.command("wire")
def bench_wire(
    model: str = typer.Option("gpt2-small", help="The federation's model (gpt2-tiny, gpt2-small, ...)."),
    rounds: int = typer.Option(5, min=1, help="Federated rounds per wire format."),
    formats: str = typer.Option(",".join(Wire), help="Comma list of wire formats, fp32 first for the ratios."),
    run_mode: str = typer.Option(Mode.TCP_E, "--mode", help=f"How updates move: {choices()}."),
    out_dir: Path = typer.Option(Path("runs/bench-wire"), help="Each format's federation: configs, logs, metrics."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the results here as JSON (and a plot beside it)."),
    rate: str = typer.Option(None, help="Run each silo on a lab path of this line rate (1gbit); needs root."),
    rtt: str = typer.Option(None, help="With --rate: round-trip time the path adds (20ms); default 0."),
    loss: str = typer.Option(None, help="With --rate: drop probability per packet each way; default 0."),
    mtu: int = typer.Option(None, help="With --rate: MTU of the lab links; default the lab's (9000)."),
) -> None:
    """The same federation once per wire format: held-out loss, bytes each way, comm seconds, against fp32."""
    from fedrdma.bench.wire import WIRE_SILOS, ratios, run_wire_bench
    from fedrdma.cli.plots import wire_plot
    from fedrdma.cli.tables import wire_table

    out = console()
    single(model, "--model", model_name)
    wires = comma_list(formats, "--formats", Wire)
    chosen = single(run_mode, "--mode", mode)
    shape = _path_shape(rate, rtt, loss, mtu)
    where = "loopback" if shape is None else f"a lab path each, {shape.describe()}"
    out.print(f"[bold]bench wire[/]: {model}, {rounds} rounds, {len(WIRE_SILOS)} silos, {chosen} on {where}; "
              f"formats {', '.join(wires)}")
    with progress(out) as bar:
        task = bar.add_task("starting", total=len(wires) * rounds)

        def seen(wire: Wire, record: AggregatorRound) -> None:
            if record.round > 0:
                bar.update(task, advance=1, description=f"[cyan]{wire}[/] round {record.round}")

        try:
            result = run_wire_bench(model, rounds, wires, chosen, out_dir, shape, mtu or DEFAULT_MTU, on_round=seen)
        except (RunError, LabError) as exc:
            bar.stop()
            console(stderr=True).print(f"[bold red]bench wire failed:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(1) from None
    out.print(wire_table(result, ratios(result)))
    if json_path:
        write_record(out, result, json_path)
        out.print(f"wrote {wire_plot(result, json_path.with_suffix('.png'))}")
