"""What a node holds for its apps, and the rules for who may reach it: pools, offers, collections.

No sockets here: the app door (`daemon.py`) and the peer door (`peers.py`) call these
methods, each under the one lock, so a request from either side sees one consistent state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fedrdma.core.errors import FedRDMAError
from fedrdma.core.fedavg import RoundAggregate, RoundResult
from fedrdma.core.layout import Layout
from fedrdma.core.rules import NORM_FACTOR, WEIGHT_FACTOR
from fedrdma.node import messages as m
from fedrdma.node.flowermean import flower_mean
from fedrdma.node.paths import same_token
from fedrdma.node.shm import PoolError, SharedPool

MAX_POOLS = 16
"""Pools one node holds for its apps: a global and an update per model, a few models."""

MAX_ROUNDS = 4
"""Rounds collected at once: the current one and stragglers of a few before."""

FOLD_SLICE_BYTES = 16 << 20
"""A delivery is folded this much at a time (a multiple of CHUNK_ALIGN). The fold takes a
private copy of what it is given and float room for its delta: given a whole GPT-2-small
delivery at once, that was two 475 MiB buffers the serving node kept for its lifetime."""


class NodeError(FedRDMAError):
    """A request this node refuses; the reason goes back to the app or peer that asked."""


@dataclass
class Offer:
    round: int
    token: str


@dataclass
class Collection:
    layout: Layout
    token: str
    sites: int
    landing: set[str] = field(default_factory=set)
    landed: dict[str, SharedPool] = field(default_factory=dict)
    open: bool = True


class Holdings:
    def __init__(self, site: str, serve: bool) -> None:
        self.site = site
        self.serve = serve
        self.pools: dict[str, SharedPool] = {}
        self.offers: dict[str, Offer] = {}
        self.collections: dict[int, Collection] = {}
        self.lock = threading.Lock()

    # -- the app door ---------------------------------------------------------------------
    def open_pool(self, name: str, layout: Layout) -> SharedPool:
        with self.lock:
            pool = self.pools.get(name)
            if pool is not None:
                if pool.layout.layout_id != layout.layout_id:
                    raise NodeError(f"pool {name!r} holds layout {pool.layout.layout_id}; this model's layout "
                                    f"is {layout.layout_id}: open it under another name")
                return pool
            if len(self.pools) >= MAX_POOLS:
                raise NodeError(f"this node holds {MAX_POOLS} pools already ({', '.join(sorted(self.pools))})")
            pool = self.pools[name] = SharedPool.create(name, layout)
            return pool

    def pool(self, name: str) -> SharedPool:
        pool = self.pools.get(name)
        if pool is None:
            raise NodeError(f"no pool named {name!r}: open it first")
        return pool

    def _serving(self) -> None:
        if not self.serve:
            raise NodeError(f"this node serves no peers: start it with `fedrdma node --site {self.site} --serve`")

    def publish(self, name: str, rnd: int, token: str) -> Layout:
        self._serving()
        with self.lock:
            pool = self.pool(name)
            for other in [n for n in self.offers if self.pools[n].layout.layout_id == pool.layout.layout_id]:
                del self.offers[other]  # one current version of a model: a double buffer's other half is scratch
            self.offers[name] = Offer(rnd, token)
            return pool.layout

    def collect(self, rnd: int, layout_id: str, token: str, sites: int) -> None:
        self._serving()
        with self.lock:
            layout = next((p.layout for p in self.pools.values() if p.layout.layout_id == layout_id), None)
            if layout is None:
                raise NodeError(f"no pool of layout {layout_id} is open here: open the model's pool before "
                                "collecting its updates")
            if rnd not in self.collections and len(self.collections) >= MAX_ROUNDS:
                raise NodeError(f"{MAX_ROUNDS} rounds are being collected already "
                                f"({', '.join(map(str, sorted(self.collections)))}): take one first")
            self.collections[rnd] = Collection(layout, token, sites)

    def take(self, rnd: int) -> tuple[Layout, list[tuple[str, SharedPool]]]:
        """Close round `rnd`'s collection: its whole deliveries, by site; later ones are dropped."""
        with self.lock:
            collection = self.collections.pop(rnd, None)
            if collection is None:
                raise NodeError(f"round {rnd} is not being collected")
            collection.open = False
            return collection.layout, sorted(collection.landed.items())

    def aggregate(self, rnd: int, glob: str, into: str, weights: dict[str, int], min_sites: int,
                  norm_factor: float = NORM_FACTOR, weight_factor: float = WEIGHT_FACTOR,
                  mean: m.Mean = "sum-then-divide") -> RoundResult:
        """FedAvg of round `rnd`'s deliveries from the sites in `weights` into pool `into`.

        The update checks are the aggregator's (`core.fedavg`): whole, finite, a delta norm
        not far above the others', a weight capped at a few times the others' median. A site
        in `weights` whose delivery did not land is rejected by name; a delivery from a site
        not in `weights` (its app's reply never came) is not counted. Fewer than `min_sites`
        accepted: NotEnoughSilos, and `glob` is untouched. `into` is the spare half of a double
        buffer: an all-float32 layout sums in it in place, so it holds nothing usable after a refusal.
        `mean="flower"`: the accepted sites' mean is then written again with Flower's FedAvg
        arithmetic, in the order of `weights` (`flowermean`), so a wrapped Flower strategy's
        model is the one Flower itself would have made.
        """
        base, target = self.pool(glob), self.pool(into)
        if base is target:
            raise NodeError(f"aggregate into another pool than the global {glob!r}: the deltas are taken against it")
        layout, landed = self.take(rnd)
        if base.layout.layout_id != layout.layout_id or target.layout.layout_id != layout.layout_id:
            raise NodeError(f"round {rnd} collected layout {layout.layout_id}; pools {glob!r} and {into!r} hold "
                            f"{base.layout.layout_id} and {target.layout.layout_id}")
        inboxes = dict(landed)
        try:
            in_place = all(s.dtype == "float32" for s in layout.specs)  # else a float64 sum (core.fedavg)
            agg = RoundAggregate(base.state, accumulator=target.state if in_place else None)
            for site, weight in sorted(weights.items()):
                agg.start_silo(site, weight)
                inbox = inboxes.get(site)
                if inbox is None:
                    agg.reject(site, f"no delivery of round {rnd} landed from site {site!r}")
                    continue
                for offset in range(0, layout.nbytes, FOLD_SLICE_BYTES):
                    agg.fold(site, inbox.state, offset, min(FOLD_SLICE_BYTES, layout.nbytes - offset))
            result = agg.finish(target.state, min_silos=min_sites, norm_factor=norm_factor,
                                weight_factor=weight_factor)
            if mean == "flower":
                counted = [(inboxes[s].state, result.capped.get(s, weights[s])) for s in weights if s in result.accepted]
                flower_mean(counted, target.state, FOLD_SLICE_BYTES)
            return result
        finally:
            for inbox in inboxes.values():
                inbox.close()  # its mapping goes with the last view, as this call returns

    # -- the peer door --------------------------------------------------------------------
    def offered(self, want: m.Want) -> SharedPool:
        with self.lock:
            for name, offer in self.offers.items():
                pool = self.pools[name]
                if offer.round == want.round and pool.layout.layout_id == want.layout_id:
                    if not same_token(want.token, offer.token):
                        raise NodeError(f"round {want.round}: the token does not match (stale or forged)")
                    return pool
            offered = sorted({o.round for o in self.offers.values()})
        raise NodeError(f"round {want.round} of layout {want.layout_id} is not offered here (offered rounds: "
                        f"{', '.join(map(str, offered)) or 'none'})")

    def inbox_for(self, want: m.Want) -> tuple[Collection, SharedPool]:
        """A fresh inbox for `want`'s delivery, the site marked as landing; `landed` or `dropped` after."""
        with self.lock:
            collection = self.collections.get(want.round)
            if collection is None:
                raise NodeError(f"round {want.round} takes no deliveries here (collecting: "
                                f"{', '.join(map(str, sorted(self.collections))) or 'none'})")
            if not same_token(want.token, collection.token):
                raise NodeError(f"round {want.round}: the token does not match (stale or forged)")
            if want.layout_id != collection.layout.layout_id:
                raise NodeError(f"round {want.round} collects layout {collection.layout.layout_id}, "
                                f"not {want.layout_id}")
            if want.site in collection.landing or want.site in collection.landed:
                raise NodeError(f"site {want.site!r} delivered round {want.round} already")
            if len(collection.landing) + len(collection.landed) >= collection.sites:
                raise NodeError(f"round {want.round} takes {collection.sites} deliveries, and has them")
            collection.landing.add(want.site)
        try:
            return collection, SharedPool.create(f"inbox-{want.round}-{want.site}", collection.layout)
        except PoolError as exc:
            with self.lock:
                collection.landing.discard(want.site)
            raise NodeError(str(exc)) from None

    def landed(self, collection: Collection, site: str, inbox: SharedPool | None) -> None:
        """One step from landing to landed (None: the delivery failed), so no second one slips between."""
        with self.lock:
            collection.landing.discard(site)
            if inbox is not None and collection.open:
                collection.landed[site] = inbox
                return
        if inbox is not None:
            inbox.close()
