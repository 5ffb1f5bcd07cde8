"""The command line: every command is there, and bad input is refused with the fix named."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedrdma.cli import app

runner = CliRunner()


def test_every_command_is_listed():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("aggregator", "silo", "demo", "bench", "lab", "tune", "sim"):
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
