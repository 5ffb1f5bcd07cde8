"""The command line: every command is there, and bad input is refused with the fix named."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from fedrdma.bench.records import TransferResult
from fedrdma.cli import app
from fedrdma.cli.console import PIPE_WIDTH, console
from fedrdma.cli.tables import status_table, transfer_table
from fedrdma.lab.config import LabConfig
from fedrdma.lab.lab import Lab, PathStatus
from fedrdma.lab.probe import TransferResult as TcpTransfer
from fedrdma.lab.state import LabState

runner = CliRunner()


def test_every_command_is_listed():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("aggregator", "silo", "demo", "bench", "lab", "tune", "sim", "schemas"):
        assert command in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--chunk-size", "0"], "positive"),
        (["--chunk-size", str(8 << 20)], "above the state size"),
        (["--window", "0"], "window must be between 1"),
        (["--modes", "rdma-e,carrier-pigeon"], "unknown mode"),
        (["--size-mb", "-1"], "must be positive"),
        (["--lora"], "--lora applies to --model"),
        (["--rtt", "20ms"], "also needs --rate"),
        (["--loss", "0.01", "--mtu", "1500"], "--loss, --mtu shape a lab path"),
        (["--rate", "1gbps"], "rate"),
        (["--rate", "1gbit", "--rtt", "5 minutes"], "rtt"),
        (["--rate", "1gbit", "--loss", "1.5"], "loss"),
        (["--rate", "1gbit", "--mtu", "100"], "mtu"),
        (["--inbox", "slots", "--modes", "rdma-e,grpc"], "not grpc; run those modes without it"),
    ],
)
def test_bench_transfer_refuses_bad_settings_before_starting_anything(args, message):
    result = runner.invoke(app, ["bench", "transfer", "--size-mb", "4", *args])
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")


def test_bench_transfer_moves_a_lora_state_in_one_chunk_by_default(tmp_path):
    """A LoRA state is smaller than the default chunk: the benchmark plans it as one chunk,
    as the runtime does, instead of refusing its own default."""
    import json

    from fedrdma.bench.states import gpt2_layout

    nbytes = gpt2_layout("gpt2-tiny", lora=True).nbytes
    out = tmp_path / "lora.json"
    result = runner.invoke(app, ["bench", "transfer", "--model", "gpt2-tiny", "--lora", "--modes", "rdma-e",
                                 "--repeat", "1", "--no-references", "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["size_bytes"] == nbytes < (4 << 20)
    assert saved["chunk_size"] == nbytes
    assert saved["modes"]["rdma-e"]["identical"] is True



def test_bench_transfer_into_slots_moves_every_mode_bit_identically_through_the_slots(tmp_path):
    """--inbox slots: the receivers land chunks in a few reused slots, a push in granted landing
    slots, and copy each verified chunk into their state; the bytes still arrive whole."""
    import json

    out = tmp_path / "slots.json"
    result = runner.invoke(app, ["bench", "transfer", "--size-mb", "8", "--chunk-size", str(1 << 20),
                                 "--modes", "tcp-e,rdma-e,rdma-e-pull", "--inbox", "slots", "--repeat", "1",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["inbox"] == "slots"
    for mode in ("tcp-e", "rdma-e", "rdma-e-pull"):
        row = saved["modes"][mode]
        assert row["identical"] is True and row["vs_raw_same_pair"] is None, (mode, row)


def test_bench_transfer_moves_an_int8_state_bit_identically_and_times_both_ends_of_the_codec(tmp_path):
    """The encoded state is what moves (a quarter of the bytes, identical on both sides); the
    codec's seconds come from the peers themselves, apart from the transfer's."""
    import json

    out = tmp_path / "int8.json"
    result = runner.invoke(app, ["bench", "transfer", "--size-mb", "8", "--modes", "tcp-e,grpc", "--wire", "int8",
                                 "--repeat", "1", "--no-references", "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["wire"] == "int8" and saved["size_bytes"] == 8 << 20
    for mode in ("tcp-e", "grpc"):
        row = saved["modes"][mode]
        assert row["identical"] is True and row["encode_seconds"] > 0 and row["decode_seconds"] > 0
    assert "moved as int8" in " ".join(result.output.split())


# --- tables written to a pipe -------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _lab_rows() -> tuple[LabConfig, list[PathStatus]]:
    """Two measured paths of a lab, as `lab status` shows them (no lab needed)."""
    config = LabConfig.uniform(silos=2, rate="1gbit", rtt="20ms", loss=0.01, name="frl")
    lab = Lab(LabState(name=config.name, config=config))
    rows = [PathStatus(path, 0.0201, TcpTransfer(977e6, 12, 81234, 812), TcpTransfer(964e6, 9, 80321, 799))
            for path in lab.paths]
    return config, rows


def _rendered(table: Table, out: Console) -> str:
    out.print(table)
    return out.file.getvalue()  # type: ignore[attr-defined]


def test_tables_written_to_a_pipe_keep_every_header_and_figure_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """At rich's 80 columns headers were cut to "referen…" and cells to "198.…"; the console
    the commands use when stdout is not a terminal keeps them whole, even where COLUMNS says 80."""
    monkeypatch.setenv("COLUMNS", "80")
    transfer = TransferResult.model_validate_json((REPO / "results" / "wan-5gbit-20ms.json").read_text())
    config, rows = _lab_rows()
    tables = [transfer_table(transfer), status_table(config, rows, "element", 8.78e9, "bbr")]
    narrow = "".join(_rendered(t, Console(file=io.StringIO(), width=80)) for t in tables)
    assert "reference" not in narrow and "198.18.1.1 -> 198.19.1.1" not in narrow  # what the factory fixes
    piped = [_rendered(t, console(file=io.StringIO())) for t in tables]
    for word in ("reference", "identical", "recv +RSS MiB", "seconds (min)", "grpc (wire only 0.47 GB/s)"):
        assert word in piped[0], word
    assert "0.914 (0.910)" in piped[0] and "…" not in piped[0]
    for text in ("198.18.1.1 -> 198.19.1.1", "198.18.2.1 -> 198.19.2.1", "977mbit (12 retr)",
                 "0.0100 (812/81234)", "rate down (TCP)", "element ceiling 8.78gbit"):
        assert text in piped[1], text
    assert "…" not in piped[1]
    assert all(len(line) <= PIPE_WIDTH for text in piped for line in text.splitlines())


# --- list options, layers and start-up ----------------------------------------------------------


def _unboxed(output: str) -> str:
    """An error as typer prints it, without rich's box and line breaks."""
    return " ".join(" ".join(line.strip("│╭╮╰╯─ ").split()) for line in output.splitlines())


@pytest.mark.parametrize("args,message", [
    (["bench", "transfer", "--modes", "rdma-e,carrier-pigeon"],
     "Invalid value for --modes: unknown mode 'carrier-pigeon'; choose from grpc, rdma, rdma-e, rdma-e-pull"),
    (["demo", "--modes", "grpc,grpc"], "Invalid value for --modes: 'grpc' is listed twice"),
    (["bench", "paper", "--tables", "T1,T9"], "Invalid value for --tables: unknown table 'T9'; choose from T1, T2"),
    (["sim", "--rates", "1gbit,fast"], "Invalid value for --rates: cannot parse rate 'fast'"),
    (["sim", "--rtts", ","], "Invalid value for --rtts: give at least one value, separated by ','"),
    (["sim", "--losses", "0,2,3"], "Invalid value for --losses: loss '2' must be a fraction in [0, 1), e.g. 0.01 "
                                   "for 1 %; loss '3' must be"),
])
def test_every_list_option_refuses_bad_values_in_one_form(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in _unboxed(result.output)


def test_tables_are_named_case_insensitively() -> None:
    from fedrdma.cli.options import comma_list, one_of

    assert comma_list("t3, T1", "--tables", one_of("table", ("T1", "T2", "T3"))) == ["T3", "T1"]


def _imported_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint('\\n'.join(sys.modules))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(proc.stdout.split())


def test_the_command_starts_without_torch_or_matplotlib() -> None:
    loaded = _imported_after("import fedrdma.cli")
    assert not {"torch", "transformers", "matplotlib", "grpc", "fedrdma.bench.transfer"} & loaded


def test_sim_is_a_pure_model() -> None:
    """No command line, no console, no benchmark: `sim/` models, the CLI and bench use it."""
    loaded = _imported_after("import pkgutil, importlib, fedrdma.sim\n"
                             "for m in pkgutil.iter_modules(fedrdma.sim.__path__):\n"
                             "    importlib.import_module('fedrdma.sim.' + m.name)")
    assert "fedrdma.sim.tune" in loaded and "fedrdma.sim.tcp_buffers" in loaded
    outside = {m for m in loaded if m.split(".")[0] in ("typer", "rich", "click")
               or m.startswith(("fedrdma.bench", "fedrdma.cli", "fedrdma.lab", "fedrdma.fl"))}
    assert not outside, sorted(outside)


@pytest.mark.parametrize("entry,message", [
    ("bank=0", "greater than 0"),
    (f"bank={1 << 29}", "less than 536870912"),
    ("bank=many", "valid integer"),
])
def test_an_agreed_weight_out_of_range_names_the_silo_entry(entry: str, message: str) -> None:
    result = runner.invoke(app, ["aggregator", "--insecure", "--silos", "hospital", "--silos", entry])
    assert result.exit_code == 2
    text = _unboxed(result.output)
    assert "`silos.1.weight`" in text and message in text, text


def test_bench_wire_runs_the_federation_per_format_and_writes_its_ratios_and_plot(tmp_path):
    import json

    out = tmp_path / "wire.json"
    result = runner.invoke(app, ["bench", "wire", "--model", "gpt2-tiny", "--rounds", "2", "--formats", "fp32,int8",
                                 "--out-dir", str(tmp_path / "runs"), "--json", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    fp32, int8 = saved["formats"]["fp32"], saved["formats"]["int8"]
    assert [r["round"] for r in int8["rounds"]] == [1, 2] and saved["path"] == "loopback"
    up = sum(r["bytes_up"] for r in int8["rounds"]) / sum(r["bytes_up"] for r in fp32["rounds"])
    down = int8["rounds"][1]["bytes_down"] / fp32["rounds"][1]["bytes_down"]
    assert up < 0.26 and down < 0.26 and int8["rounds"][0]["bytes_down"] == fp32["rounds"][0]["bytes_down"]
    assert abs(int8["rounds"][-1]["eval_loss"] / fp32["rounds"][-1]["eval_loss"] - 1) < 0.03
    assert out.with_suffix(".png").stat().st_size > 0
    said = " ".join(result.output.split())
    assert "the same federation per wire format" in said and "0.254" in said


def test_the_flower_bench_plot_draws_both_ways_from_a_stored_result(tmp_path):
    """`bench flower --json F` writes F's plot beside it; drawn here from the stored result."""
    import struct

    from fedrdma.bench.records import FlowerResult
    from fedrdma.cli.plots import flower_plot

    result = FlowerResult.model_validate_json((REPO / "results" / "flower-gpt2-small.json").read_text())
    png = flower_plot(result, tmp_path / "flower.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1100, 450)  # two panels, 11 x 4.5 in at 100 dpi
