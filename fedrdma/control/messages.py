"""Control-plane messages: small, validated, never model bytes.

They travel on the same kind of gRPC stream as the data plane's session messages (a silo
dials one control stream and one stream per data-plane session); `Join` or `Attach`
opens each stream and names what it is for. Who is on a stream is the name in the
certificate the silo presented (mutual TLS), never a claim in a message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedrdma.config import SILO_ID_PATTERN as SILO_ID
from fedrdma.core.modes import Mode, Wire
from fedrdma.transport import wire


class Join(wire._Msg):
    """Silo to aggregator, first on the control stream."""

    type: Literal["join"] = "join"
    silo: str = Field(pattern=SILO_ID)
    """With TLS it must be the name in the silo's certificate; without, it is taken on trust (loopback only)."""
    layout_id: str = Field(max_length=64)
    nbytes: int = Field(gt=0)
    wire: Wire = Wire.FP32
    """The format this silo encodes its updates in: it must be the federation's."""
    digest: str = Field("", max_length=32, pattern=r"^[0-9a-f]*$")
    """xxh3-128 of the state the silo holds as it joins: with `first_broadcast = "unless-held"`,
    a silo that already holds the global (a fresh run's silos build the same initial model) is
    not sent it. A silo that lies only trains from the wrong weights."""


class Welcome(wire._Msg):
    """Aggregator to silo: accepted; how the data plane will run."""

    type: Literal["welcome"] = "welcome"
    silo: str
    generation: int = Field(ge=0)
    """Increases with every join of this silo: streams of an older join are refused."""
    broadcast_mode: Mode
    upload_mode: Mode
    chunk_size: int = Field(gt=0)
    """Of the state; an encoded upload's chunks are `core.formats.Codec.chunk_size` of it."""
    window: int = Field(gt=0)
    heartbeat_s: float = Field(gt=0)


class Attach(wire._Msg):
    """Silo to aggregator, first on a data-plane stream: which session this stream carries."""

    type: Literal["attach"] = "attach"
    silo: str = Field(pattern=SILO_ID)
    generation: int = Field(ge=0)
    purpose: Literal["broadcast", "delta", "upload"]
    """`delta` only in a federation with a compressed wire format: the encoded broadcasts."""


class RoundStart(wire._Msg):
    type: Literal["round_start"] = "round_start"
    round: int = Field(ge=1)
    broadcast: Literal["whole", "delta", "skip"] = "whole"
    """How the round's global comes: whole, in fp32, on the broadcast stream; encoded on the
    `delta` stream as the change from what this silo took from the last one (`fl.broadcasts`);
    or not at all, since the silo's state is the global already (its join's digest)."""


class Ready(wire._Msg):
    """Silo to aggregator after local training: my update is in my pool, weigh it by n."""

    type: Literal["ready"] = "ready"
    round: int = Field(ge=1)
    n_samples: int = Field(gt=0)
    train_loss: float
    train_seconds: float = Field(ge=0)
    broadcast_seconds: float = Field(ge=0)
    cpu_seconds: float = Field(ge=0)
    codec_seconds: float = Field(0.0, ge=0)
    """Encoding the update and decoding the broadcast, with a compressed wire format."""
    memory: dict[str, int] = {}


class RoundEnd(wire._Msg):
    type: Literal["round_end"] = "round_end"
    round: int = Field(ge=1)
    included: bool
    reason: str = ""


class Resend(wire._Msg):
    """Aggregator to silo, before the round ends: upload round `round`'s update once more.

    A bounded inbox folds chunks and forgets them; to take a rejected silo back out, or to
    change its weight, the aggregator reads its bytes again from the silo, which keeps its
    update unchanged until RoundEnd.
    """

    type: Literal["resend"] = "resend"
    round: int = Field(ge=1)


class Heartbeat(wire._Msg):
    type: Literal["heartbeat"] = "heartbeat"


class Finish(wire._Msg):
    """Aggregator to silo: training is over; leave."""

    type: Literal["finish"] = "finish"


class Leave(wire._Msg):
    type: Literal["leave"] = "leave"
    reason: str = ""


wire.register(Join, Welcome, Attach, RoundStart, Ready, RoundEnd, Resend, Heartbeat, Finish, Leave)
