"""The `fedrdma` command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, ChunkPlan, check_window
from fedrdma.core.errors import PlanError
from fedrdma.transport.wire import MODES

app = typer.Typer(help="Federated fine-tuning of LLMs over chunked one-sided RDMA (FedRDMA).", no_args_is_help=True)
bench = typer.Typer(help="Benchmarks that print ratios measured in one run.", no_args_is_help=True)
app.add_typer(bench, name="bench")
console = Console()

DEFAULT_BENCH_MODEL = "gpt2-small"
"""The transfer benchmark's default state: GPT-2 small's 124M fp32 parameters (~475 MiB)."""


def _parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise typer.BadParameter(f"unknown mode(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODES)}")
    return modes


@bench.command("transfer")
def bench_transfer(
    size_mb: float = typer.Option(None, help="State size in MiB (synthetic fp32); default: GPT-2 small from config."),
    model: str = typer.Option(DEFAULT_BENCH_MODEL, help="Model whose trainable state to move, when --size-mb is not given."),
    modes: str = typer.Option(",".join(MODES), help="Comma list of modes: " + ", ".join(MODES)),
    chunk_size: int = typer.Option(DEFAULT_CHUNK_SIZE, help="Chunk size in bytes."),
    window: int = typer.Option(DEFAULT_WINDOW, help="Chunks in flight at once."),
    repeat: int = typer.Option(3, min=1, help="Counted transfers per mode (after one warm-up); figures are medians."),
    json_path: Path = typer.Option(None, "--json", help="Write the results here as JSON."),
) -> None:
    """Move one state between two processes with each mode and with raw NIXL references."""
    from fedrdma.bench import transfer

    mode_list = _parse_modes(modes)
    if size_mb is not None:
        if size_mb <= 0:
            raise typer.BadParameter("--size-mb must be positive")
        nbytes = int(size_mb * 2**20) // 4 * 4
        size_args = ["--size-bytes", str(nbytes)]
        what = f"{nbytes / 2**20:.0f} MiB synthetic fp32 state"
    else:
        from fedrdma.bench.states import gpt2_layout

        nbytes = gpt2_layout(model).nbytes
        size_args = ["--model", model]
        what = f"{model} trainable state, {nbytes / 2**20:.0f} MiB"
    try:
        ChunkPlan.build(nbytes, chunk_size)
        check_window(window)
    except PlanError as exc:
        raise typer.BadParameter(str(exc)) from None
    env = transfer.transfer_env()
    console.print(f"[bold]bench transfer[/]: {what}; chunk {chunk_size} B, window {window}, "
                  f"{repeat} counted + 1 warm-up per mode; UCX_TLS={env['UCX_TLS']}")
    total = (len(mode_list) + 2) * (repeat + transfer.WARMUP)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("starting", total=total)
        result = transfer.run(
            size_args, nbytes, mode_list, chunk_size, window, repeat,
            on_transfer=lambda: progress.advance(task),
            on_mode=lambda m: progress.update(task, description=f"[cyan]{m}"),
            env=env,
        )
    console.print(transfer_table(result))
    if json_path:
        transfer.write_json(result, json_path)
        console.print(f"wrote {json_path}")
    if not all(row["identical"] for row in result["modes"].values()):
        raise typer.Exit(1)


def transfer_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"{result['size_bytes'] / 2**20:.0f} MiB, medians of {result['repeat']}")
    for col in ("mode", "seconds (min)", "GB/s", "vs reference", "vs grpc", "CPU s", "recv +RSS MiB", "identical"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for label, row in [("raw WRITE", result["reference"]), ("raw READ", result["reference_read"])]:
        table.add_row(label, f"{row['seconds']:.3f} ({row['seconds_min']:.3f})", f"{row['goodput_gb_s']:.2f}",
                      "1.00", "", f"{row['cpu_seconds']:.2f}", f"{row['receiver_extra_rss_mb']:.0f}", "", style="dim")
    for mode, row in result["modes"].items():
        label = mode if "goodput_wire_gb_s" not in row else f"{mode} (wire only {row['goodput_wire_gb_s']:.2f} GB/s)"
        table.add_row(
            label,
            f"{row['seconds']:.3f} ({row['seconds_min']:.3f})",
            f"{row['goodput_gb_s']:.2f}",
            f"{row['vs_reference']:.2f}",
            f"{row['vs_grpc']:.1f}x" if "vs_grpc" in row else "",
            f"{row['cpu_seconds']:.2f}",
            f"{row['receiver_extra_rss_mb']:.0f}",
            "yes" if row["identical"] else "[red]NO",
        )
    return table


if __name__ == "__main__":
    app()
