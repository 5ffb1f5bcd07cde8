"""Each site moves every weight by a deterministic function of the weight and its partition.

With `kill-partition` and `kill-round` set, that site's ClientApp is killed (SIGKILL, by
itself) in that round's training, after the global reached it and before any reply left.
"""

import os
import signal

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrdma.flower.mod import fedrdma_mod

app = ClientApp(mods=[fedrdma_mod])


def trained(v: np.ndarray, part: int) -> np.ndarray:
    """What site `part` makes of the weights `v`: tests compute their expected models with it."""
    return (0.9 * v + np.float32(0.05 * (part + 1)) * np.sin(v)).astype(np.float32)


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    part = _partition(context)
    arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    rc = context.run_config
    if part == int(rc["kill-partition"]) and int(msg.content["config"]["server-round"]) == int(rc["kill-round"]):
        os.kill(os.getpid(), signal.SIGKILL)
    new = {k: trained(v, part) for k, v in arrays.items()}
    metrics = MetricRecord({"train-loss": float(np.abs(new["w"]).mean()), "num-examples": 10 * (part + 1),
                            "app-seconds": 0.0})
    return Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}), "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    w = msg.content["arrays"]["w"].numpy()
    metrics = MetricRecord({"eval-loss": float(np.abs(w).mean()), "num-examples": 5 * (_partition(context) + 1)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
