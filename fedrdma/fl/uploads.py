"""How a round's uploads reach the FedAvg sum: as the state's own bytes (fp32), or encoded
(bf16, int8) and decoded chunk by chunk inside the fold (`core.decoding`).

An encoded upload is a state of its own (`Codec.encoded_layout`): sessions, pools, slots
and inboxes carry it like any state, at a quarter or a half of the bytes, and nothing but
this module and `core.decoding` knows that its bytes are not the model's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fedrdma.core.decoding import DecodingFold
from fedrdma.core.errors import AggregationError
from fedrdma.core.fedavg import RoundAggregate, Source
from fedrdma.core.formats import Codec
from fedrdma.core.layout import FlatState, Layout
from fedrdma.core.modes import Wire


class Uploads:
    """A federation's upload format, the same every round: what inboxes hold and how chunks are planned."""

    def __init__(self, wire: Wire, layout: Layout, chunk_size: int) -> None:
        """`chunk_size`: the state's, at most its size; an encoded upload's holds whole records."""
        self.wire = wire
        self.codec = Codec.of(wire, layout) if wire.compressed else None
        self.layout = self.codec.encoded_layout if self.codec else layout
        self.chunk_size = self.codec.chunk_size(chunk_size) if self.codec else chunk_size

    def round(self, aggregate: RoundAggregate) -> RoundUploads:
        return RoundUploads(aggregate, self.codec)


class RoundUploads:
    """One round's `start_silo` and folds, in the upload's bytes; the aggregate gets the state's.

    Callers serialize calls per silo (the aggregator's fold lock); an encoded whole-state
    inbox is read again for a retraction in the very chunks that were folded, as a
    `core.fedavg` Source, since the aggregate cannot read encoded bytes itself.
    """

    def __init__(self, aggregate: RoundAggregate, codec: Codec | None) -> None:
        self.aggregate = aggregate
        self._decoding = DecodingFold(aggregate, codec) if codec else None
        self._folded: dict[str, list[tuple[int, int]]] = {}

    def start_silo(self, silo: str, n_samples: int, agreed: bool = False, source: Source | None = None,
                   inbox: FlatState | None = None) -> None:
        """`source` for an upload landing in reused slots, `inbox` for one landing whole."""
        if self._decoding is None:
            self.aggregate.start_silo(silo, n_samples, agreed, source=source)
            return
        if source is None:
            if inbox is None:
                raise AggregationError(f"silo {silo!r}: an encoded upload needs its inbox or a source to be read again")
            folded = self._folded[silo] = []
            source = lambda: _chunks(inbox, list(folded))  # noqa: E731  (the Source protocol is a callable)
        self._decoding.start_silo(silo, n_samples, agreed, source=source)

    def fold(self, silo: str, inbox: FlatState, offset: int, length: int) -> None:
        """A verified chunk that stays in `inbox` until the round closes."""
        if self._decoding is None:
            self.aggregate.fold(silo, inbox, offset, length)
            return
        self._decoding.count(silo, offset, length)  # before slicing, which would clip the range
        folded = self._folded.get(silo)
        if folded is None:
            raise AggregationError(f"chunk from silo {silo!r}, which was not started with its inbox")
        folded.append((offset, length))
        self._decoding.fold_chunk(silo, offset, inbox.buffer[offset : offset + length])

    def fold_chunk(self, silo: str, offset: int, data: torch.Tensor) -> None:
        """A verified chunk in a slot that will be reused."""
        (self._decoding or self.aggregate).fold_chunk(silo, offset, data)


def _chunks(inbox: FlatState, ranges: list[tuple[int, int]]) -> Iterator[tuple[int, torch.Tensor]]:
    for offset, length in ranges:
        yield offset, inbox.buffer[offset : offset + length]
