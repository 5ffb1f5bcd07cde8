"""FedAvg over a 1.2 MB numpy model; with `fedrdma = true` the one-line change wraps the strategy."""

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    rng = np.random.default_rng(0)
    init = {"w": rng.standard_normal((512, 600)).astype(np.float32), "b": np.zeros(600, dtype=np.float32)}
    strategy = FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    if rc["fedrdma"]:
        from fedrdma.flower.strategy import FedRDMA

        strategy = FedRDMA(strategy, site=str(rc["fedrdma-site"]), runtime_dir=str(rc["fedrdma-runtime-dir"]) or None,
                           refill_initial=bool(rc["fedrdma-refill-initial"]))
    if rc["timings-path"]:
        from fedrdma.flower.timing import Timed

        strategy = Timed(strategy, str(rc["timings-path"]))
    initial = ArrayRecord({k: Array(v) for k, v in init.items()})
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(rc["num-server-rounds"]),
                            timeout=float(rc["round-timeout"]))
    np.savez(str(rc["out-path"]), **{k: v.numpy() for k, v in result.arrays.items()})
    # tests: whether the global lived in the initial record
    Path(str(rc["out-path"])).with_suffix(".json").write_text(json.dumps({"refilled": result.arrays is initial}))
