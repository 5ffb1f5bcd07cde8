"""The data plane's session messages, in the project's own schema.

JSON validated by pydantic: a peer's bytes are parsed, never unpickled (NIXL's
`get_serialized_descs` pickles, so remote memory is described here by plain integers).
Notifications that ride with each chunk use a fixed ASCII form, parsed strictly.
"""

from __future__ import annotations

import base64
import json
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from fedrdma.core.chunks import Region
from fedrdma.core.errors import ProtocolError
from fedrdma.core.modes import Mode


class _Msg(BaseModel):
    type: str
    model_config = ConfigDict(extra="forbid", frozen=True)


class RegionMsg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    address: int = Field(gt=0)
    length: int = Field(gt=0)

    def region(self) -> Region:
        return Region(self.address, self.length)

    @classmethod
    def of(cls, region: Region) -> RegionMsg:
        return cls(address=region.address, length=region.length)


class Hello(_Msg):
    """First message each way: who I am, what layout I hold, and what you may touch."""

    type: Literal["hello"] = "hello"
    mode: Mode
    layout_id: str
    nbytes: int = Field(gt=0)
    agent: str = ""
    metadata: str = ""
    """Base64 NIXL agent metadata; only from a side whose memory the peer may touch."""
    region: RegionMsg | None = None
    data_port: int = Field(default=0, ge=0, le=65535)
    """tcp-e: the listening side's data port (0: none)."""
    ticket: str = ""
    """tcp-e: base64 bytes the dialing side's data connections present."""
    data_streams: int = Field(default=0, ge=0)
    """tcp-e: how many data connections the dialing side opens."""
    slots: int = Field(default=0, ge=0)
    """rdma-e into a bounded inbox: `region` is this many equal landing slots, each WRITEn
    only where granted (`Grant`); 0: `region` is a whole state, chunk i at its own offset."""


class Refuse(_Msg):
    type: Literal["refuse"] = "refuse"
    reason: str
    retry_after_s: float = Field(default=0.0, ge=0)
    """Above 0: the refusal is for now (a second join while the first still lives), try again later."""


class Begin(_Msg):
    """Sender to receiver: a transfer of the state starts (push, rdma and grpc)."""

    type: Literal["begin"] = "begin"
    transfer: int = Field(ge=0)
    chunk_size: int = Field(gt=0)
    nchunks: int = Field(gt=0)
    key: str = ""
    """tcp-e: base64 key this transfer's chunks are sealed with (the control plane is mutual TLS)."""


class Stage(_Msg):
    """Receiver to sender in `rdma`: the staging buffers registered for this transfer."""

    type: Literal["stage"] = "stage"
    transfer: int = Field(ge=0)
    metadata: str
    regions: list[RegionMsg]


class Offer(_Msg):
    """Holder to receiver in `rdma-e-pull`: read my pool; checksums follow."""

    type: Literal["offer"] = "offer"
    transfer: int = Field(ge=0)
    chunk_size: int = Field(gt=0)
    nchunks: int = Field(gt=0)


class Checksums(_Msg):
    type: Literal["checksums"] = "checksums"
    transfer: int = Field(ge=0)
    start: int = Field(ge=0)
    values: list[int]


class Status(_Msg):
    """The verifier's word: which chunks hold verified bytes, which were corrupt."""

    type: Literal["status"] = "status"
    transfer: int = Field(ge=0)
    generation: int = Field(default=0, ge=0)
    """The verifier's connection generation: the first status of a new one answers a Resume."""
    verified: list[int] = []
    corrupt: list[int] = []
    complete: bool = False
    bytes_posted: int = Field(default=0, ge=0)
    """Pull mode: what the initiator moved, retries included (the holder cannot see it)."""
    seconds: dict[str, float] = {}
    """Timings only the verifier knows (the baseline's join and deserialize)."""


class Grant(_Msg):
    """Receiver of a push into slots: you may WRITE one chunk into each of these landing slots."""

    type: Literal["grant"] = "grant"
    transfer: int = Field(ge=0)
    generation: int = Field(ge=0)
    """The connection the grant is for: a sender that reconnected since drops it."""
    slots: list[int]


class Resume(_Msg):
    """Initiator after a reconnect: tell me what you hold verified; older notices are void."""

    type: Literal["resume"] = "resume"
    transfer: int = Field(ge=0)
    generation: int = Field(ge=0)


class Abort(_Msg):
    type: Literal["abort"] = "abort"
    reason: str


class Bye(_Msg):
    type: Literal["bye"] = "bye"


Message = _Msg
"""Any message on our streams; each kind is named by its `type` field."""

_KINDS: dict[str, type[_Msg]] = {}


def register(*kinds: type[_Msg]) -> None:
    """Make message kinds decodable; upper layers (the control plane) add their own."""
    for kind in kinds:
        name = kind.model_fields["type"].default
        if name in _KINDS and _KINDS[name] is not kind:
            raise ValueError(f"message type {name!r} registered twice")
        _KINDS[name] = kind


register(Hello, Refuse, Begin, Stage, Offer, Checksums, Status, Grant, Resume, Abort, Bye)


def encode(msg: _Msg) -> bytes:
    return msg.model_dump_json().encode()


def decode(data: bytes) -> Message:
    """Parse one message strictly: known kind, known fields, valid values."""
    try:
        kind = _KINDS.get(str(json.loads(data).get("type")))
        if kind is None:
            raise ValueError(f"unknown message type in {data[:60]!r}")
        return kind.model_validate_json(data)
    except (ValueError, AttributeError) as exc:
        raise ProtocolError(f"malformed message from peer: {exc}") from exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ProtocolError("peer sent agent metadata that is not base64") from exc


NOTICE_TAG = b"fr1"
"""Prefix of our chunk notifications, so a stray notification is recognised and dropped."""


class Notice(NamedTuple):
    """A chunk notification: which chunk of which transfer landed, in which connection, what it
    should hash to, and (a push into slots) the landing slot it was written to."""

    transfer: int
    generation: int
    index: int
    checksum: int
    slot: int | None = None


def chunk_notice(transfer: int, generation: int, index: int, checksum: int, slot: int | None = None) -> bytes:
    fields = (NOTICE_TAG, transfer, generation, index, checksum)
    if slot is None:
        return b"%s %d %d %d %d" % fields
    return b"%s %d %d %d %d %d" % (*fields, slot)


def parse_notice(data: bytes) -> Notice:
    """A chunk notification, parsed strictly: our tag, four or five non-negative integers."""
    parts = data.split()
    if len(parts) not in (5, 6) or parts[0] != NOTICE_TAG:
        raise ProtocolError(f"not a chunk notification: {data[:40]!r}")
    try:
        values = [int(p) for p in parts[1:]]
    except ValueError as exc:
        raise ProtocolError(f"chunk notification with a non-integer field: {data[:60]!r}") from exc
    if min(values) < 0:
        raise ProtocolError(f"chunk notification with a negative field: {data[:60]!r}")
    return Notice(*values)
