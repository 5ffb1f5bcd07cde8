"""How fast two `fedrdma node` processes move a GPT-2-small-sized state, and what they hold.

`python scripts/node_rate.py [--repeat N] [--mb MB] [--modes tcp-e,rdma-e]` starts a serving node
and a dialing one on loopback per mode, one mode after the other (mutual TLS with a CA made for
the run; rdma-e over UCX TCP, with `--trusted-fabric`), maps a pool in this process as an app
would, and times fetches (server to client) and deliveries (client to server) as the app
sees them: from its request to the node's answer. It prints GB/s per transfer and each
node's peak RSS above the pools it holds. With `--aggregate` the serving node averages each
round's delivery into a second pool (FedAvg with its update checks) instead of handing it over.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedrdma.bench.states import synthetic_layout
from fedrdma.control.certs import init_ca, issue
from fedrdma.metrics import peak_rss_bytes
from fedrdma.node.client import NodeClient
from fedrdma.node.process import start_node
from fedrdma.transport.tls import CLIENT, SERVER

GPT2_SMALL_BYTES = 497_759_232
"""GPT-2 small's float32 state, as the runtime moves it."""

MODE_FLAGS = {"tcp-e": ["--mode", "tcp-e"], "rdma-e": ["--mode", "rdma-e", "--trusted-fabric"]}
"""UCX over TCP enforces no remote keys: rdma-e here needs the operator's word."""


def peak_rss_mb(pid: int) -> float:
    return peak_rss_bytes(pid) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mb", type=float, default=GPT2_SMALL_BYTES / 2**20)
    ap.add_argument("--aggregate", action="store_true", help="average each delivery in the serving node")
    ap.add_argument("--modes", default="tcp-e", help="comma-separated: tcp-e, rdma-e")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedrdma-node-rate-"))
    init_ca(work / "certs")
    issue(work / "certs", "agg", SERVER, hosts=["127.0.0.1"])
    issue(work / "certs", "hospital", CLIENT)
    os.environ.setdefault("UCX_TLS", "tcp")
    for mode in args.modes.split(","):
        rate(mode, work / mode, work / "certs", args)


def rate(mode: str, work: Path, certs: Path, args: argparse.Namespace) -> None:
    server = start_node("agg", work / "agg", certs, serve=True, extra=MODE_FLAGS[mode])
    client = start_node("hospital", work / "hospital", certs, extra=MODE_FLAGS[mode])
    layout = synthetic_layout(int(args.mb * 2**20) // 4 * 4)
    try:
        with NodeClient.attach("agg", server.runtime_dir) as s, NodeClient.attach("hospital", client.runtime_dir) as c:
            glob = s.pool("global", layout)
            glob.buffer.view(torch.float32).normal_()  # finite values: --aggregate checks them
            if args.aggregate:
                s.pool("next", layout)
            local = c.pool("model", layout)
            rates: dict[str, list[float]] = {"fetch": [], "deliver": []}
            for rnd in range(1, args.repeat + 1):
                t = secrets.token_hex(16)
                offer, upload = s.publish("global", rnd, t), s.collect(rnd, layout.layout_id, t, sites=1)
                for kind, call, desc in (("fetch", c.fetch, offer), ("deliver", c.deliver, upload)):
                    started = time.perf_counter()
                    call("model", desc)
                    rates[kind].append(layout.nbytes / (time.perf_counter() - started) / 1e9)
                assert torch.equal(local.buffer, glob.buffer), "the fetched pool differs from the global"
                if args.aggregate:
                    result = s.aggregate(rnd, "global", "next", {"hospital": 1}, min_sites=1)
                    assert list(result.accepted) == ["hospital"], result
                    continue
                inbox = s.take(rnd, layout)["hospital"]
                assert torch.equal(inbox.buffer, glob.buffer), "the delivery differs from what was fetched"
                del inbox
            pools_mb = layout.nbytes / 2**20
            print(f"state {layout.nbytes / 1e6:.0f} MB, {args.repeat} rounds, loopback, {mode} between node processes")
            for kind, r in rates.items():
                print(f"  {kind:8} {', '.join(f'{x:.2f}' for x in r)} GB/s (median {statistics.median(r):.2f})")
            held = ("global + next + one inbox", 3) if args.aggregate else ("global + one inbox", 2)
            print(f"  serving node peak RSS {peak_rss_mb(server.pid):.0f} MiB "
                  f"(pools: {held[0]} = {held[1] * pools_mb:.0f} MiB)")
            print(f"  dialing node peak RSS {peak_rss_mb(client.pid):.0f} MiB (pool: {pools_mb:.0f} MiB)")
    finally:
        server.stop()
        client.stop()


if __name__ == "__main__":
    main()
