"""`FedRDMA`: a Flower strategy that moves its arrays with fedrdma and averages them in the node.

It wraps a strategy of the FedAvg family, which keeps everything that is its own: which nodes
are sampled, the config they get, how metrics are averaged, the weighting key. What changes
is where the arrays go:
- `configure_train` / `configure_evaluate` write the global into the node's pool (when it is
  not already there), publish it for this step with a fresh token, and send each node a
  descriptor (`descriptor.Offer`) in place of the ArrayRecord;
- `aggregate_train` reads each reply's receipt (site, publication) and weight, has the node
  average the deliveries with fedrdma's update checks (`node.holdings.Holdings.aggregate`)
  and FedAvg's own arithmetic in reply order, and reads the new global back into an
  ArrayRecord for Flower's loop. From round 2 that is the record it returned the round
  before, refilled array by array (`in_place`): Flower's `start` holds the initial record and
  the current one while the next is made, and each is a copy of the state, so a fresh record
  each round would be a third.

Only strategies that average as FedAvg does can be wrapped: one with its own aggregate step
(FedAdam's server optimizer, FedMedian, Krum) is refused, as the node's mean would replace it.

The global is double-buffered in two pools, as the aggregator's is: the average of round r
is summed in the spare pool, which then becomes the global.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedrdma.core.errors import AggregationError, FedRDMAError
from fedrdma.core.layout import Layout
from fedrdma.flower import records
from fedrdma.flower.descriptor import RECORD, Offer, Receipt
from fedrdma.node.client import NodeClient

log = logging.getLogger(__name__)

POOLS = ("flower-global-a", "flower-global-b")
"""The two halves of the double-buffered global in the node."""

FLOWER_MEAN: Final = "flower"
"""The node writes the mean with FedAvg's own arithmetic in reply order (`node.flowermean`):
the wrapped strategy's model is the one Flower would have made, to the bit."""

TOKEN_BYTES = 16
"""A publication's token: 128 random bits, one per configure step."""


class FedRDMA(Strategy):
    """`FedRDMA(FedAvg(...), site="agg")`: the wrapped strategy, its arrays moved by `fedrdma node`."""

    def __init__(self, strategy: FedAvg, site: str, runtime_dir: Path | str | None = None,
                 min_sites: int = 1, in_place: bool = True, refill_initial: bool = False) -> None:
        """`in_place=False` gives each round's global a new ArrayRecord, for an app that keeps a
        round's record (from `evaluate_fn`, say) past the next round's aggregate step.

        `refill_initial=True` refills the record handed to the first step (`start`'s
        `initial_arrays`) as well: `start` holds it for the whole run beside the current
        record, a state's worth of the ServerApp's memory, and with this the two are one. For
        an app that does not read its initial arrays again once the run began."""
        if refill_initial and not in_place:
            raise ValueError("refill_initial=True refills records in place: it needs in_place=True")
        if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
            raise AggregationError(
                f"FedRDMA wraps strategies that average as FedAvg does; {type(strategy).__name__} aggregates its "
                "own way (a server optimizer, a median, a trimmed or Krum mean), which the node's weighted mean "
                "would silently replace: wrap FedAvg, FedProx, or a subclass that keeps FedAvg's aggregate_train")
        self.inner = strategy
        self.site = site
        self.runtime_dir = Path(runtime_dir) if runtime_dir else None
        self.min_sites = min_sites
        self.in_place = in_place
        self.refill_initial = refill_initial
        self._initial: ArrayRecord | None = None
        """The record handed to the first step."""
        self._node: NodeClient | None = None
        self._layout: Layout | None = None
        self._current = 0
        """Which of POOLS holds the global."""
        self._held: ArrayRecord | None = None
        """The ArrayRecord the global pool holds, so it is not written again."""
        self._marks: list[tuple[str, Array, bytes]] = []
        """What `_held` held then (see `_marks_of`)."""
        self._made: ArrayRecord | None = None
        """The record the last aggregate step returned: the next global may refill it."""
        self._seq = 0
        self._train_seq = -1

    # -- what the wrapped strategy decides ------------------------------------------------
    def summary(self) -> None:
        self.inner.summary()
        log.info("\tarrays moved by fedrdma node (site %s)", self.site)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        if messages:
            offer = self._offer(server_round, arrays, upload_sites=len(messages))
            self._train_seq = offer.fetch.round
            self._swap(messages, offer)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        if messages:
            self._swap(messages, self._offer(server_round, arrays))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        node, key = self._attach(), self.inner.weighted_by_key
        weights: dict[str, int] = {}
        contents: dict[str, RecordDict] = {}
        for reply in replies:
            source = reply.metadata.src_node_id
            if reply.has_error():
                log.info("round %d: node %d replied with an error: %s", server_round, source, reply.error.reason)
                continue
            try:
                site, weight = self._receipt(reply.content, key)
            except FedRDMAError as exc:
                log.warning("round %d: the reply of node %d is not counted: %s", server_round, source, exc)
                continue
            if site in weights:
                log.warning("round %d: a second reply for site %r (node %d) is not counted", server_round, site,
                            source)
                continue
            weights[site], contents[site] = weight, reply.content
        if not weights:
            node.take(self._train_seq, self._need_layout())  # drop what landed
            return None, None
        glob, spare = POOLS[self._current], POOLS[1 - self._current]
        try:
            result = node.aggregate(self._train_seq, glob, spare, weights, self.min_sites, mean=FLOWER_MEAN)
        except FedRDMAError as exc:
            log.warning("round %d: no new global, the old one stays: %s", server_round, exc)
            return None, None
        for site, reason in result.rejected.items():
            log.warning("round %d: site %s rejected: %s", server_round, site, reason)
        self._current = 1 - self._current
        ours = self._held is self._made or (self.refill_initial and self._held is self._initial)
        into = self._held if self.in_place and ours else None  # never a record of the app's, unless told
        self._marks = []  # they hold the old arrays: the refill frees each before it makes the next
        self._held = self._made = records.read(node.pools[spare].state, node.pools[spare].release, into)
        self._marks = _marks_of(self._held)
        metrics = self.inner.train_metrics_aggr_fn([contents[s] for s in result.accepted], key)
        return self._held, metrics

    # -- the node -------------------------------------------------------------------------
    def _attach(self) -> NodeClient:
        if self._node is None:
            self._node = NodeClient.attach(self.site, self.runtime_dir)
        return self._node

    def _need_layout(self) -> Layout:
        assert self._layout is not None, "configure_train runs before aggregate_train"
        return self._layout

    def _offer(self, server_round: int, arrays: ArrayRecord, upload_sites: int = 0) -> Offer:
        """Publish `arrays` for this step; with `upload_sites`, collect that many sites' updates too."""
        node = self._attach()
        if self._layout is None:
            self._layout, self._initial = records.layout_of(arrays), arrays
            for name in POOLS:
                node.pool(name, self._layout)
        glob = POOLS[self._current]
        if arrays is not self._held or not _unchanged(arrays, self._marks):  # the initial arrays, or changed ones
            self._marks = []
            records.write(arrays, node.pools[glob].state, node.pools[glob].release)
            self._held, self._marks = arrays, _marks_of(arrays)
        self._seq += 1
        token = secrets.token_hex(TOKEN_BYTES)
        fetch = node.publish(glob, self._seq, token)
        deliver = node.collect(self._seq, self._layout.layout_id, token, upload_sites) if upload_sites else None
        return Offer(round=server_round, arrays_key=self.inner.arrayrecord_key,
                     layout=json.dumps(self._layout.to_json()), fetch=fetch, deliver=deliver)

    def _swap(self, messages: list[Message], offer: Offer) -> None:
        """The arrays out of each message, the descriptor in; messages may share one RecordDict."""
        done: set[int] = set()
        for msg in messages:
            content = msg.content
            if id(content) in done:
                continue
            done.add(id(content))
            content.pop(self.inner.arrayrecord_key, None)
            content[RECORD] = offer.to_record()

    def _receipt(self, content: RecordDict, key: str) -> tuple[str, int]:
        record = content.config_records.get(RECORD)
        if record is None:
            raise FedRDMAError(f"it carries no {RECORD!r} receipt: is the ClientApp built with fedrdma_mod?")
        receipt = Receipt.from_record(record)
        if receipt.seq != self._train_seq:
            raise FedRDMAError(f"its receipt is for publication {receipt.seq}, this round's is {self._train_seq}")
        metrics = list(content.metric_records.values())
        if len(metrics) != 1 or key not in metrics[0]:
            raise FedRDMAError(f"it needs one MetricRecord with {key!r}")
        weight = metrics[0][key]
        if isinstance(weight, list) or float(weight) != int(weight) or int(weight) < 1:
            raise FedRDMAError(f"its {key!r} is {weight!r}, not a positive whole number")
        return receipt.site, int(weight)


def _marks_of(record: ArrayRecord) -> list[tuple[str, Array, bytes]]:
    """What a record holds as the global pool is written from it or read into it, so that a
    record the app changed in place (an Array replaced, added, dropped, or its bytes swapped)
    is written again. The objects themselves, not their ids: an id is reused once its object
    is freed."""
    return [(key, array, array.data) for key, array in record.items()]


def _unchanged(record: ArrayRecord, marks: list[tuple[str, Array, bytes]]) -> bool:
    return len(record) == len(marks) and all(record.get(key) is array and array.data is data
                                             for key, array, data in marks)
