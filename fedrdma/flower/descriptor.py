"""What rides in Flower's messages instead of the arrays: a descriptor out, a receipt back.

Both are one ConfigRecord named `RECORD`. The out-bound one says where the round's global is
(a `node.messages.Descriptor`), the layout it has (as JSON, so the ClientApp can name the
arrays it reads), and, for training, where the update goes. The receipt says which site
delivered for which publication. Both are parsed strictly: a ClientApp or a reply is never
trusted to be well-formed.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedrdma.config import SILO_ID_PATTERN
from fedrdma.core.errors import FedRDMAError, LayoutError
from fedrdma.core.layout import Layout
from fedrdma.node.messages import MAX_ROUND, Descriptor

RECORD = "fedrdma"
"""The ConfigRecord's name in both directions."""


class DescriptorError(FedRDMAError):
    """A descriptor or receipt that cannot be used; the message names the field and why."""


class Offer(BaseModel):
    """ServerApp to ClientApp: the round's global, and for training where the update goes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=0, le=MAX_ROUND)
    """Flower's server round: a message whose config names another round is refused."""
    arrays_key: str = Field(min_length=1, max_length=128)
    """The name the strategy gives the ArrayRecord (FedAvg's `arrayrecord_key`)."""
    layout: str = Field(min_length=2)
    """The arrays' layout as JSON (`Layout.to_json`)."""
    fetch: Descriptor
    deliver: Descriptor | None = None

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"offer": self.model_dump_json()})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Offer:
        try:
            return cls.model_validate_json(str(record["offer"]))
        except (KeyError, ValidationError) as exc:
            raise DescriptorError(f"the {RECORD!r} record carries no valid offer: {exc}") from None

    def checked_layout(self) -> Layout:
        """The layout, rebuilt here, held to the id the descriptor names."""
        try:
            layout = Layout.from_json(json.loads(self.layout))
        except (ValueError, LayoutError) as exc:
            raise DescriptorError(f"the offer's layout is not one: {exc}") from None
        if layout.layout_id != self.fetch.layout_id:
            raise DescriptorError(f"the offer's layout is {layout.layout_id}, its descriptor names "
                                  f"{self.fetch.layout_id}")
        return layout


class Receipt(BaseModel):
    """ClientApp to ServerApp: this site delivered its update for this publication."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(pattern=SILO_ID_PATTERN)
    seq: int = Field(ge=0, le=MAX_ROUND)
    """The node round (`Descriptor.round`) the update was delivered for."""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"site": self.site, "seq": self.seq})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Receipt:
        try:
            return cls.model_validate(dict(record))
        except ValidationError as exc:
            raise DescriptorError(f"the reply's {RECORD!r} record is not a receipt: {exc}") from None
