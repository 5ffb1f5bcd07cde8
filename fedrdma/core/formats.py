"""Wire formats: how a state's update travels, as float32 or in fewer bytes per value.

Pure torch, no I/O. On a WAN path a transfer is bound by the line, so fewer bytes is the
only way left to go faster. A compressed format never travels values: it travels the
update's delta from the round's global, which both sides hold, because a fine-tuning step
changes a weight by far less than the weight's own rounding step (a bfloat16 weight of 0.1
moves in steps of 0.0005), while the delta itself keeps three significant digits in
bfloat16 and 1/254 of its block's largest change in int8.

- `fp32`: the state's own bytes; no codec.
- `bf16`: each delta value cast to bfloat16 (round to nearest even): 2 bytes per value.
- `int8`: the delta quantized in blocks of BLOCK_VALUES values, each block one record of
  RECORD_BYTES: an 8-byte header (a float32 scale, then 4 reserved zero bytes) and one
  int8 per value, `value = q * scale`.

Records are self-contained, so a chunk made of whole records decodes on its own the moment
it lands, in any order (`Codec.values` says which values it holds). The silo keeps what
rounding lost and adds it to its next delta (`ErrorFeedback`), so the error of one round
is paid back in the next instead of adding up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedrdma.core.chunks import CHUNK_ALIGN
from fedrdma.core.errors import EncodingError
from fedrdma.core.layout import ALIGNMENT, FlatState, Layout
from fedrdma.core.modes import Wire

__all__ = ["Codec", "EncodedState", "ErrorFeedback", "Wire"]

RECORD_BYTES = 2048
"""One int8 block on the wire. A power of two, so every power-of-two chunk size (the 4 MiB
default, the 4 GiB registration slice) holds whole records."""

HEADER_BYTES = 8
"""A record's float32 scale and 4 reserved bytes: keeps the int8 values 8-byte aligned."""

BLOCK_VALUES = RECORD_BYTES - HEADER_BYTES
"""2040 values share a scale: the header costs 0.4 % of the bytes (int8 is 0.251 of fp32),
while one outlier coarsens the step of only 2040 neighbours (bitsandbytes' blockwise
quantization uses blocks of 2048-4096 for the same trade)."""

LEVELS = 127
"""Largest |q|: a symmetric range, so 0 is exact and -128 is never written."""

WORK_VALUES = 512 * BLOCK_VALUES
"""Values encoded or decoded per pass (4 MiB of float32): the temporaries stay cache-sized
and are reused, where whole-state temporaries would add the model's size again."""

FLOAT32 = 4
"""Bytes per value of the states a codec carries: a value's index times this is its byte offset."""


@dataclass(frozen=True)
class Codec:
    """Encodes a float32 state's delta into a wire format and decodes it chunk by chunk.

    The state is taken as one run of float32 values: its buffer, alignment padding included
    (padding deltas are 0), so a value's index times 4 is its byte offset in the state.
    """

    wire: Wire
    numel: int
    """float32 values in the state."""
    layout: Layout | None = None
    """Only to name the tensor an error points at."""

    @classmethod
    def of(cls, wire: Wire, layout: Layout) -> Codec:
        """The codec for `layout`; an EncodingError when `wire` cannot carry it."""
        if not wire.compressed:
            raise EncodingError("fp32 travels the state's own bytes; it has no codec")
        odd = next((s for s in layout.specs if s.dtype != "float32"), None)
        if odd is not None:
            raise EncodingError(f"wire {wire} encodes float32 states, but tensor {odd.name!r} is {odd.dtype}; "
                                "use wire fp32 for this model, or load it in float32")
        if layout.nbytes % FLOAT32:
            raise EncodingError(f"a float32 layout of {layout.nbytes} bytes is not whole values")
        return cls(wire, layout.nbytes // FLOAT32, layout)

    # -- sizes -----------------------------------------------------------------------

    @property
    def unit(self) -> int:
        """Bytes of the smallest piece that decodes on its own."""
        return 2 if self.wire is Wire.BF16 else RECORD_BYTES

    @property
    def unit_values(self) -> int:
        return 1 if self.wire is Wire.BF16 else BLOCK_VALUES

    @property
    def records(self) -> int:
        return -(-self.numel // self.unit_values)

    @property
    def nbytes(self) -> int:
        """The encoded state's bytes: its records, then zeros up to ALIGNMENT, so the encoded
        state is a FlatState of its own, whose buffers are padded so."""
        return -(-self.records * self.unit // ALIGNMENT) * ALIGNMENT

    @property
    def state_nbytes(self) -> int:
        return self.numel * FLOAT32

    def chunk_size(self, requested: int) -> int:
        """The largest chunk size up to `requested` made of whole records (at least one), and
        at most the encoded state: what both sides plan an encoded transfer with."""
        step = math.lcm(self.unit, CHUNK_ALIGN)
        return min(self.nbytes, max(step, requested // step * step))

    @property
    def encoded_layout(self) -> Layout:
        """The encoded state as a layout of its own, so sessions and pools carry it like any
        state; named by its format, so peers of two formats fail at hello, not at decoding."""
        return Layout.from_shapes([(f"update.{self.wire}", torch.uint8, (self.nbytes,))])

    def values(self, offset: int, length: int) -> tuple[int, int]:
        """(first value, count) that encoded bytes `[offset, offset+length)` decode to."""
        end = offset + length
        if offset < 0 or length <= 0 or end > self.nbytes:
            raise EncodingError(f"encoded bytes [{offset}, {end}) are outside the encoded state [0, {self.nbytes})")
        if offset % self.unit or end % self.unit:
            raise EncodingError(f"encoded bytes [{offset}, {end}) split a {self.unit}-byte {self.wire} record; "
                                f"plan chunks with Codec.chunk_size")
        first = offset // self.unit * self.unit_values
        return first, max(0, min(self.numel, end // self.unit * self.unit_values) - first)  # 0: padding only

    # -- encoding --------------------------------------------------------------------

    def encode(self, delta: torch.Tensor, out: torch.Tensor, leave_error: bool = False,
               plus: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """`delta` (float32, numel) into `out` (uint8, nbytes). With `leave_error`, `delta`
        is overwritten by what rounding lost (`delta - decode(out)`), the error feedback of
        the next round. `plus=(update, reference)` first adds `update - reference` to
        `delta`, a cache-sized piece at a time (one pass over memory, not three). An
        EncodingError names a NaN or Inf; `out` is then not an update to send."""
        self._check(delta, torch.float32, self.numel, "delta")
        self._check(out, torch.uint8, self.nbytes, "encoded buffer")
        for name, tensor in zip(("update", "reference"), plus or ()):
            self._check(tensor, torch.float32, self.numel, name)
        work = torch.empty(min(WORK_VALUES, self.numel), dtype=torch.float32)
        for start in range(0, self.numel, WORK_VALUES):
            piece = delta[start : start + WORK_VALUES]
            if plus is not None:
                piece.add_(plus[0][start : start + WORK_VALUES]).sub_(plus[1][start : start + WORK_VALUES])
            _, finite = self._encode_piece(start, piece, out, work, leave_error)
            if not finite:
                bad = start + int((~torch.isfinite(piece)).nonzero()[0])
                raise EncodingError(f"the update's delta holds {float(piece[bad - start])} at {self._where(bad)}; "
                                    "the update is not sent: a silo must not send a diverged update")
        out[self.records * self.unit :].zero_()  # the padding: no stale bytes on the line

    def advance(self, target: torch.Tensor, held: torch.Tensor, out: torch.Tensor) -> None:
        """Encode `target - held` into `out`, and move `held` by what `out` decodes to.

        The aggregator's broadcast as a delta from what the silos hold: each silo adds the
        decoded delta to its copy of `held` and this adds the very same float32 values, so
        both copies stay bit for bit alike. What rounding lost stays in `target - held`, and
        the next round's delta carries it (error feedback without a state of its own).
        """
        self._check(target, torch.float32, self.numel, "target")
        self._check(held, torch.float32, self.numel, "held")
        self._check(out, torch.uint8, self.nbytes, "encoded buffer")
        size = min(WORK_VALUES, self.numel)
        piece_buffer, work, decoded = (torch.empty(size, dtype=torch.float32) for _ in range(3))
        for start in range(0, self.numel, WORK_VALUES):
            end = min(self.numel, start + WORK_VALUES)
            piece = torch.sub(target[start:end], held[start:end], out=piece_buffer[: end - start])
            encoded, finite = self._encode_piece(start, piece, out, work, False)
            if not finite:
                raise EncodingError(f"the broadcast's delta is not finite at {self._where(start)}...; "
                                    "the global must be finite before it is broadcast")
            held[start:end].add_(self.decode(encoded, start // self.unit_values * self.unit, decoded))
        out[self.records * self.unit :].zero_()

    def _encode_piece(self, start: int, piece: torch.Tensor, out: torch.Tensor, work: torch.Tensor,
                      leave_error: bool) -> tuple[torch.Tensor, bool]:
        """Values `[start, start + len(piece))` of the state, a record-aligned piece, into their
        records of `out`: (those bytes, whether the piece was all finite)."""
        lo = start // self.unit_values * self.unit
        hi = -(-(start + piece.numel()) // self.unit_values) * self.unit
        encoded = out[lo:hi]
        if self.wire is Wire.BF16:
            return encoded, self._encode_bf16(piece, encoded, work, leave_error)
        return encoded, self._encode_int8(piece, encoded, work, leave_error)

    def _encode_bf16(self, piece: torch.Tensor, out: torch.Tensor, work: torch.Tensor, leave_error: bool) -> bool:
        """False if `piece` is not all finite (a NaN or Inf makes the sum so; an overflowing
        sum of finite values is checked element-wise)."""
        if not math.isfinite(float(piece.sum())) and not bool(torch.isfinite(piece).all()):
            return False
        wire = out.view(torch.bfloat16)
        wire.copy_(piece)
        if leave_error:
            piece.sub_(work[: piece.numel()].copy_(wire))
        return True

    def _encode_int8(self, piece: torch.Tensor, out: torch.Tensor, work: torch.Tensor, leave_error: bool) -> bool:
        """False if `piece` is not all finite (its block's largest magnitude says so)."""
        full, tail = divmod(piece.numel(), BLOCK_VALUES)
        finite = True
        if full:
            finite = self._blocks(piece[: full * BLOCK_VALUES].view(full, BLOCK_VALUES), out[: full * RECORD_BYTES],
                         work[: full * BLOCK_VALUES].view(full, BLOCK_VALUES), leave_error)
        if tail:  # the state's last block: padded with zeros, which quantize to 0
            padded = torch.zeros(1, BLOCK_VALUES, dtype=torch.float32)
            padded[0, :tail] = piece[full * BLOCK_VALUES :]
            finite = self._blocks(padded, out[full * RECORD_BYTES : (full + 1) * RECORD_BYTES],
                                  torch.empty(1, BLOCK_VALUES), leave_error) and finite
            if leave_error:
                piece[full * BLOCK_VALUES :] = padded[0, :tail]
        return finite

    @staticmethod
    def _blocks(d: torch.Tensor, out: torch.Tensor, work: torch.Tensor, leave_error: bool) -> bool:
        """(blocks, BLOCK_VALUES) float32 into as many records; `d` becomes its error if asked.
        False, with nothing written, when a block is not all finite."""
        records = out.view(-1, RECORD_BYTES)
        scale = torch.abs(d, out=work).amax(dim=1)  # NaN propagates, so this also checks finiteness
        if not math.isfinite(float(scale.max())):
            return False
        scale.div_(LEVELS)
        scale.masked_fill_(scale == 0, 1.0)  # an all-zero block: any positive scale decodes it exactly
        q = torch.div(d, scale[:, None], out=work).round_().clamp_(-LEVELS, LEVELS)
        records[:, HEADER_BYTES:].view(torch.int8).copy_(q)
        records[:, :4].view(torch.float32).copy_(scale[:, None])
        records[:, 4:HEADER_BYTES].zero_()
        if leave_error:
            d.sub_(q.mul_(scale[:, None]))
        return True

    # -- decoding --------------------------------------------------------------------

    def decode(self, data: torch.Tensor, offset: int, out: torch.Tensor) -> torch.Tensor:
        """The delta values that encoded bytes `data`, at `offset` in the encoded state, hold,
        written into `out` (float32, at least that many) and returned as a view of it.

        Refuses, naming the record, a scale that is not a positive finite float32 and
        reserved bytes that are not zero: such a record is not one an encoder wrote.
        """
        first, count = self.values(offset, data.numel())
        if out.dtype != torch.float32 or out.numel() < count:
            raise EncodingError(f"decoding {count} values needs a float32 buffer of as many, got {out.dtype} {out.numel()}")
        out = out[:count]
        if self.wire is Wire.BF16:
            return out.copy_(data[: count * 2].view(torch.bfloat16))
        records = data.view(-1, RECORD_BYTES)
        scale = records[:, :4].view(torch.float32)
        good = torch.isfinite(scale) & (scale > 0)
        reserved = records[:, 4:HEADER_BYTES].any(dim=1, keepdim=True)
        wrong = (~good | reserved).view(-1).nonzero()
        if wrong.numel():
            index = int(wrong[0])
            record = offset // RECORD_BYTES + index
            what = (f"scale {float(scale[index, 0])}" if not bool(good[index, 0])
                    else f"reserved header bytes {records[index, 4:HEADER_BYTES].tolist()}")
            raise EncodingError(f"int8 record {record} (values {first + index * BLOCK_VALUES}...) has {what}; "
                                "a scale must be a positive finite float32 and the reserved bytes zero: "
                                "the update is refused")
        full = count // BLOCK_VALUES
        values = records[:, HEADER_BYTES:].view(torch.int8)
        if full:
            out[: full * BLOCK_VALUES].view(full, BLOCK_VALUES).copy_(values[:full]).mul_(scale[:full])
        if count % BLOCK_VALUES:
            rest = out[full * BLOCK_VALUES :]
            rest.copy_(values[full, : rest.numel()]).mul_(scale[full])
        return out

    # -- internals -------------------------------------------------------------------

    def _check(self, tensor: torch.Tensor, dtype: torch.dtype, numel: int, what: str) -> None:
        if tensor.dtype != dtype or tensor.dim() != 1 or tensor.numel() != numel or not tensor.is_contiguous():
            raise EncodingError(f"{what} must be contiguous 1-D {dtype} of {numel}, got "
                                f"{tensor.dtype} {tuple(tensor.shape)}")

    def _where(self, index: int) -> str:
        """Value `index` as a tensor and element, when the layout is known."""
        if self.layout is not None:
            at = index * FLOAT32
            for spec in self.layout.specs:
                if spec.offset <= at < spec.offset + spec.nbytes:
                    return f"tensor {spec.name!r} element {(at - spec.offset) // FLOAT32}"
        return f"value {index}"


class ErrorFeedback:
    """A silo's rounding error, carried from one round's upload to the next.

    Each round sends `encode(update - global + error)` and keeps what that loses as the new
    error, so over R rounds the decoded deltas add up to the true ones within one round's
    rounding, instead of R rounds' (tests/test_formats.py). One float32 state, held between
    rounds; the delta is formed in it, so encoding costs no other state-sized memory.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.error = torch.zeros(codec.numel, dtype=torch.float32)

    def encode(self, update: torch.Tensor, reference: torch.Tensor, out: torch.Tensor) -> None:
        """Encode `update - reference` plus the carried error into `out` (float32 values of the
        state in; uint8 encoded state out). On an EncodingError nothing is sent, and the
        carried error, already spent on the refused delta, starts again from zero."""
        try:
            self.codec.encode(self.error, out, leave_error=True, plus=(update, reference))
        except EncodingError:
            self.reset()
            raise

    def reset(self) -> None:
        """Forget the error (a silo that rejoins from an fp32 broadcast starts over)."""
        self.error.zero_()


class EncodedState:
    """A float32 state's encoded twin, as a silo keeps it: what its uploads are encoded into
    and its encoded broadcasts land in, the reference both are deltas from, and the error
    its uploads carry. Three states beside the model: the encoded one (zero-filled, so no
    page faults while encoding), the reference and the error."""

    def __init__(self, codec: Codec, state: FlatState) -> None:
        self.codec, self.state = codec, state
        self.encoded = FlatState.allocate(codec.encoded_layout, fill=0)
        self.reference = torch.zeros(codec.numel)
        self.feedback = ErrorFeedback(codec)

    @property
    def values(self) -> torch.Tensor:
        return self.state.buffer.view(torch.float32)

    def take(self) -> None:
        """The state is the round's global: the next upload is a delta from it."""
        self.reference.copy_(self.values)

    def encode(self) -> None:
        """The state's delta from the reference, plus the carried error, into `encoded`."""
        self.feedback.encode(self.values, self.reference, self.encoded.buffer)
        self.encoded.touch()

    def decode(self) -> None:
        """The broadcast that landed in `encoded` into the state, as the reference plus it:
        the very additions the aggregator makes to what it holds (`Codec.advance`)."""
        self.codec.decode(self.encoded.buffer, 0, self.values).add_(self.reference)
        self.state.touch()

    def restore(self) -> None:
        """The state back to the reference (an update that was refused)."""
        self.values.copy_(self.reference)
        self.state.touch()
