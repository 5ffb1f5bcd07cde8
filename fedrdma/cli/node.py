"""`fedrdma node`: run a site's node in the foreground until SIGINT or SIGTERM.

Its flags are generated from `config.NodeConfig`, one per setting, like the aggregator's.
"""

from __future__ import annotations

import signal
from types import FrameType

import typer

from fedrdma.cli.console import console
from fedrdma.cli.run import _logging
from fedrdma.cli.settings import settings_command
from fedrdma.config import NodeConfig
from fedrdma.core.errors import FedRDMAError

app = typer.Typer()


def run_node(cfg: NodeConfig) -> None:
    from fedrdma.node.daemon import Node

    _logging()
    try:
        node = Node(cfg)
        node.start()
    except (FedRDMAError, OSError) as exc:
        console(stderr=True).print(f"[bold red]node:[/] {exc}")
        raise typer.Exit(1) from None

    def stop(signum: int, frame: FrameType | None) -> None:
        node.request_stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # One line a supervisor (or a test) can wait for: where apps and peers reach this node.
    print(f"node ready: site={cfg.site} socket={node.paths.socket} address={node.address or '-'}", flush=True)
    node.wait()
    node.stop()


app.command("node", help="A site's data plane for apps that attach over its Unix socket (Flower apps).")(
    settings_command("node", NodeConfig, run_node, {}, {})
)
