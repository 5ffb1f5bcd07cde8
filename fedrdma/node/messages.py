"""What apps and nodes say: the local protocol (app and node) and a node's request to a peer node.

Strict pydantic messages, decoded by `transport.wire` like every other message: known kinds,
known fields, bounded values. A `Descriptor` is what one site hands another through its own
control plane (a Flower message): where the bytes are, which round and layout, and the
round's token. It says nothing about memory: the serving node alone decides what a request
reaches, and it is a whole pool or nothing.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from fedrdma.config import SILO_ID_PATTERN as SITE
from fedrdma.transport import wire

POOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"
"""Pool names: short words an app picks ("global", "update"), safe in logs and memfd names."""

LAYOUT_ID = r"^[0-9a-f]{16}$"
"""`Layout.layout_id`: 16 hex digits."""

TOKEN = r"^[0-9a-f]{32,128}$"
"""A round's token: hex, at least 128 bits (`secrets.token_hex(16)`)."""

MAX_ROUND = 2**31 - 1
"""Rounds are counted, not named: any federation ends long before this."""

MAX_SITES = 1024
"""Sites one round aggregates: far above the 64 the aggregator is measured with."""

FETCH, DELIVER = "fetch", "deliver"
"""What a node asks a peer node for: the peer's published pool, or to take this node's pool."""


class Descriptor(BaseModel):
    """Where a round's bytes are to be fetched or delivered: small enough for any config message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str = Field(min_length=3, max_length=262)
    """host:port of the serving node's peer listener."""
    round: int = Field(ge=0, le=MAX_ROUND)
    layout_id: str = Field(pattern=LAYOUT_ID)
    token: str = Field(pattern=TOKEN)
    mode: Literal["tcp-e", "rdma-e"] = "tcp-e"
    """The serving node's: a dialing node moves the pool this way or refuses by name."""


# -- app to node ---------------------------------------------------------------------------
class Attach(wire._Msg):
    """First on an app's connection: which site it works for and the node's token."""

    type: Literal["node-attach"] = "node-attach"
    site: str = Field(pattern=SITE)
    token: str = Field(max_length=128)


class OpenPool(wire._Msg):
    """Map the pool `name` of this layout, making it when the node has none by that name."""

    type: Literal["node-open-pool"] = "node-open-pool"
    name: str = Field(pattern=POOL_NAME)
    layout: list[dict[str, object]] = Field(min_length=1)


class Publish(wire._Msg):
    """Let peers that present `token` fetch pool `pool` for `round`; withdraws every earlier offer of its layout."""

    type: Literal["node-publish"] = "node-publish"
    pool: str = Field(pattern=POOL_NAME)
    round: int = Field(ge=0, le=MAX_ROUND)
    token: str = Field(pattern=TOKEN)


class Collect(wire._Msg):
    """Take deliveries of layout `layout_id` for `round` from up to `sites` peers presenting `token`."""

    type: Literal["node-collect"] = "node-collect"
    round: int = Field(ge=0, le=MAX_ROUND)
    layout_id: str = Field(pattern=LAYOUT_ID)
    token: str = Field(pattern=TOKEN)
    sites: int = Field(ge=1)


class Fetch(wire._Msg):
    """Fill pool `pool` from the peer node the descriptor names."""

    type: Literal["node-fetch"] = "node-fetch"
    pool: str = Field(pattern=POOL_NAME)
    descriptor: Descriptor


class Deliver(wire._Msg):
    """Move pool `pool` to the peer node the descriptor names."""

    type: Literal["node-deliver"] = "node-deliver"
    pool: str = Field(pattern=POOL_NAME)
    descriptor: Descriptor


class Take(wire._Msg):
    """Map the deliveries of `round` that landed whole; the node forgets them (and `round`) after."""

    type: Literal["node-take"] = "node-take"
    round: int = Field(ge=0, le=MAX_ROUND)


Mean = Literal["sum-then-divide", "flower"]
"""How a round's mean is computed: every update times its weight, summed and divided once
(`core.fedavg`), or each times its share, summed in the order of `weights` in the arrays'
own dtype, as Flower's FedAvg does (`node.flowermean`)."""


class Aggregate(wire._Msg):
    """FedAvg of round `round`'s deliveries from the sites in `weights` (global `glob`) into pool `into`."""

    type: Literal["node-aggregate"] = "node-aggregate"
    round: int = Field(ge=0, le=MAX_ROUND)
    glob: str = Field(pattern=POOL_NAME)
    into: str = Field(pattern=POOL_NAME)
    weights: dict[Annotated[str, StringConstraints(pattern=SITE)], int] = Field(min_length=1, max_length=MAX_SITES)
    """Each site's FedAvg weight (its sample count, or the consortium's agreed figure)."""
    min_sites: int = Field(default=1, ge=1)
    mean: Mean = "sum-then-divide"


# -- node to app ---------------------------------------------------------------------------
class Aggregated(wire._Msg):
    """What the round's FedAvg decided (`core.fedavg.RoundResult`)."""

    type: Literal["node-aggregated"] = "node-aggregated"
    accepted: list[str]
    rejected: dict[str, str]
    weights: dict[str, float]
    """Each accepted site's share of the mean."""
    capped: dict[str, int] = Field(default_factory=dict)


class Attached(wire._Msg):
    type: Literal["node-attached"] = "node-attached"
    site: str
    address: str
    """Where peers reach this node ("" when it serves no peers)."""


class PoolOpened(wire._Msg):
    """The pool's descriptor rides with this message (`SCM_RIGHTS`)."""

    type: Literal["node-pool"] = "node-pool"
    name: str
    layout_id: str
    nbytes: int = Field(gt=0)


class Done(wire._Msg):
    """A request finished; for a transfer, what moved and how long it took."""

    type: Literal["node-done"] = "node-done"
    nbytes: int = Field(default=0, ge=0)
    seconds: float = Field(default=0.0, ge=0)
    descriptor: Descriptor | None = None
    """Publish and Collect: what to hand the peers."""


class Working(wire._Msg):
    """While a transfer runs: the node is alive, keep waiting."""

    type: Literal["node-working"] = "node-working"


class Delivery(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str
    """The delivering node's site, as its certificate names it."""
    nbytes: int = Field(gt=0)


class Taken(wire._Msg):
    """The deliveries' pool descriptors ride with this message, in this order."""

    type: Literal["node-taken"] = "node-taken"
    layout_id: str
    deliveries: list[Delivery]


class Failed(wire._Msg):
    """A request the node refused or could not finish; the reason names what and why."""

    type: Literal["node-failed"] = "node-failed"
    reason: str


# -- node to node --------------------------------------------------------------------------
class Want(wire._Msg):
    """First on a node's stream to a peer node; a data-plane session follows if the peer agrees."""

    type: Literal["node-want"] = "node-want"
    kind: Literal["fetch", "deliver"]
    site: str = Field(pattern=SITE)
    """Without TLS (loopback only) the site is taken on trust; with TLS it must match the certificate."""
    round: int = Field(ge=0, le=MAX_ROUND)
    layout_id: str = Field(pattern=LAYOUT_ID)
    token: str = Field(pattern=TOKEN)


wire.register(Attach, OpenPool, Publish, Collect, Fetch, Deliver, Take, Aggregate,
              Aggregated, Attached, PoolOpened, Done, Working, Taken, Failed, Want)
