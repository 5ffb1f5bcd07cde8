"""The `fedrdma` command: one typer app with every command group mounted on it.

`aggregator`, `silo` and `demo` (run.py), `bench` (bench.py), `lab` (lab.py), `tune` and
`sim` (sim.py), `node` (node.py), `schemas` (schemas.py), `certs` (certs.py). Tables are drawn in tables.py, consoles made in
console.py, list options parsed in options.py, input files checked in inputs.py. Start-up stays
light: nothing imported here loads torch, transformers or matplotlib; commands import
those inside their functions.
"""

from __future__ import annotations

import typer

from fedrdma.cli import bench, certs, lab, node, run, schemas, sim

app = typer.Typer(help="Federated fine-tuning of LLMs over chunked one-sided RDMA (FedRDMA).", no_args_is_help=True)
app.add_typer(run.app)
app.add_typer(node.app)
app.add_typer(bench.app, name="bench")
app.add_typer(lab.app, name="lab", help="WAN lab: silos and an aggregator in network namespaces behind shaped links.")
app.add_typer(sim.app)
app.add_typer(schemas.app)
app.add_typer(certs.app, name="certs")
