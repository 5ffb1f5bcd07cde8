"""FedAvg over GPT-2; the one-line change for fedrdma is the `FedRDMA(...)` wrap."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flowergpt2 import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    n = int(rc["min-nodes"])
    strategy = FedAvg(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    if rc["fedrdma"]:
        from fedrdma.flower.strategy import FedRDMA

        strategy = FedRDMA(strategy, site=str(rc["fedrdma-site"]), runtime_dir=str(rc["fedrdma-runtime-dir"]) or None,
                           refill_initial=bool(rc["fedrdma-refill-initial"]))
    if rc["timings-path"]:
        from fedrdma.flower.timing import Timed

        strategy = Timed(strategy, str(rc["timings-path"]))
    module = task.model(rc)
    started = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=task.arrays(module), num_rounds=int(rc["num-server-rounds"]),
                            timeout=float(rc["round-timeout"]), evaluate_fn=lambda rnd, arrays: _score(module, rc,
                                                                                                       arrays))
    print(f"flowergpt2: {rc['num-server-rounds']} rounds in {time.perf_counter() - started:.1f} s", flush=True)
    np.savez(str(rc["out-path"]), **{k: v.numpy() for k, v in result.arrays.items()})


def _score(module, rc, arrays) -> MetricRecord:  # type: ignore[no-untyped-def]
    task.load(module, arrays)
    loss, _ = task.held_out(module, rc)
    print(f"flowergpt2: held-out loss {loss:.4f}", flush=True)
    return MetricRecord({"eval-loss": loss})
