"""`Timed`: a strategy wrapper that writes down how long each training step takes, for `bench flower`.

A step is timed from `configure_train`'s start (a wrapped `FedRDMA` publishes the global
there) to `aggregate_train`'s end (where it averages): everything the arrays' travel costs,
both ways, plus the sites' own work, which each ClientApp reports as `APP_SECONDS` (the time
inside its train function). Communication is the step less the slowest site's own work:
what Flower's messages, or fedrdma's nodes, add around the training. Each step also notes
the ServerApp's resident memory as it begins and its high-water mark as it ends: the first
step's start is the app's baseline (its imports, its model and the initial arrays, before
any array moved), so the bench can say what moving the arrays added on top.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedrdma.metrics import peak_rss_bytes, rss_bytes

APP_SECONDS = "app-seconds"
"""The metric a ClientApp reports: seconds inside its train function (model, arrays, steps)."""

NODE_SECONDS = "fedrdma-seconds"
"""The metric `fedrdma_mod` adds: seconds the node took to fetch the global and deliver the update."""


class Timed(Strategy):
    def __init__(self, strategy: Strategy, path: Path | str) -> None:
        self.inner = strategy
        self.path = Path(path)
        self._started = 0.0
        self._rss = 0

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started, self._rss = time.perf_counter(), rss_bytes()
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        result = self.inner.aggregate_train(server_round, replies)
        seconds = time.perf_counter() - self._started
        metrics = [m for r in replies if not r.has_error() for m in r.content.metric_records.values()]
        app = max((float(m[APP_SECONDS]) for m in metrics if APP_SECONDS in m), default=0.0)
        node = [float(m[NODE_SECONDS]) for m in metrics if NODE_SECONDS in m]
        with self.path.open("a") as out:
            out.write(json.dumps({"round": server_round, "seconds": seconds, "comm_seconds": seconds - app,
                                  "app_seconds": app, "node_seconds": max(node) if node else None,
                                  "replies": len(metrics), "rss_mb": self._rss / 2**20,
                                  "peak_rss_mb": peak_rss_bytes() / 2**20}) + "\n")
        return result

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)
