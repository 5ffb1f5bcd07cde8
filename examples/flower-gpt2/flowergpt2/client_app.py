"""Local steps on this site's part of the corpus; `fedrdma_mod` passes plain Flower messages through."""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrdma.flower.mod import fedrdma_mod
from flowergpt2 import task

app = ClientApp(mods=[fedrdma_mod])


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    rc = context.run_config
    module = task.model(rc)
    task.load(module, task.arrays_of(msg.content))
    server_round = int(msg.content["config"]["server-round"])
    examples, loss, seconds = task.train(module, rc, int(context.node_config["partition-id"]), server_round)
    reply = RecordDict({"arrays": task.arrays(module)})
    reply["metrics"] = MetricRecord({"train-loss": loss, "train-seconds": seconds, "num-examples": examples,
                                     "app-seconds": time.perf_counter() - started})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    rc = context.run_config
    module = task.model(rc)
    task.load(module, task.arrays_of(msg.content))
    loss, blocks = task.held_out(module, rc)
    return Message(RecordDict({"metrics": MetricRecord({"eval-loss": loss, "num-examples": blocks})}), reply_to=msg)
