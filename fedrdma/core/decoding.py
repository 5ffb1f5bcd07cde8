"""Folding encoded uploads: each chunk decoded against the round's global as it lands.

Pure torch, no I/O. An encoded chunk (`core.formats`) holds deltas; FedAvg and its update
checks (finite values, the delta's norm) work on values. So each verified chunk is decoded
into a chunk-sized float32 buffer, the global's values added, and the result handed to
`RoundAggregate.fold_chunk` as the state's bytes it stands for: no full-size decoded copy
of any silo's update exists, and everything the aggregate decides (coverage, checks,
retraction, weight caps) is decided on decoded values by the same code as for fp32.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import torch

from fedrdma.core.errors import AggregationError, EncodingError
from fedrdma.core.fedavg import RoundAggregate, Source
from fedrdma.core.folds import Scratch
from fedrdma.core.formats import FLOAT32, Codec


class DecodingFold:
    """A RoundAggregate's `start_silo` and `fold_chunk` for chunks of an encoded state.

    Offsets and sources are in the encoded state's bytes; the aggregate sees the state's.
    Folds may come from many threads at once (one receiver per silo), so each thread
    decodes into its own `Scratch`, reused from chunk to chunk.
    """

    def __init__(self, aggregate: RoundAggregate, codec: Codec) -> None:
        if codec.state_nbytes != aggregate.layout.nbytes:
            raise ValueError(f"a codec for {codec.state_nbytes} bytes cannot fold into a "
                             f"{aggregate.layout.nbytes}-byte round")
        self.aggregate, self.codec = aggregate, codec
        self._global = aggregate.global_state.buffer.view(torch.float32)
        self._local = threading.local()

    def start_silo(self, silo: str, n_samples: int, agreed: bool = False, source: Source | None = None) -> None:
        """`source` streams the silo's encoded chunks again; the aggregate gets them decoded."""
        self.aggregate.start_silo(silo, n_samples, agreed, source=None if source is None else self._decoded(source))

    def fold_chunk(self, silo: str, offset: int, data: torch.Tensor) -> None:
        """Fold one verified encoded chunk at `offset`. A chunk that does not decode (a scale
        of 0, Inf or NaN) rejects the silo, naming the record; the round goes on without it.
        A chunk outside the encoded state, or splitting a record, is refused like a chunk
        outside the state or splitting an element."""
        if not self.count(silo, offset, data.numel()):
            return  # the encoded state's padding: no value lies there
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = Scratch()
        try:
            start, values = self.values(offset, data, scratch)
        except EncodingError as exc:
            self.aggregate.reject(silo, f"its update does not decode: {exc}")
            return
        self.aggregate.fold_chunk(silo, start, values)

    def count(self, silo: str, offset: int, length: int) -> int:
        """How many values encoded bytes `[offset, offset+length)` hold; an AggregationError
        for a range outside the encoded state or splitting a record (the caller's plan is
        wrong, not the silo's bytes)."""
        try:
            return self.codec.values(offset, length)[1]
        except EncodingError as exc:
            raise AggregationError(f"silo {silo!r}: {exc}") from None

    def values(self, offset: int, data: torch.Tensor, scratch: Scratch) -> tuple[int, torch.Tensor]:
        """(state byte offset, the state's bytes) that encoded `data` at `offset` stands for,
        in `scratch`'s floats: the round's global plus the decoded delta."""
        first, count = self.codec.values(offset, data.numel())
        out = self.codec.decode(data, offset, scratch.floats(count))
        out.add_(self._global[first : first + count])
        return first * FLOAT32, out.view(torch.uint8)

    def _decoded(self, source: Source) -> Source:
        def again() -> Iterable[tuple[int, torch.Tensor]] | None:
            stream = source()
            return None if stream is None else self._stream(stream)
        return again

    def _stream(self, stream: Iterable[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
        scratch = Scratch()  # its own: folds on other threads use theirs meanwhile
        try:
            for offset, data in stream:
                try:
                    yield self.values(offset, data, scratch)
                except EncodingError:
                    return  # a stream that ends early: the aggregate takes the bytes as gone
        finally:
            getattr(stream, "close", lambda: None)()

