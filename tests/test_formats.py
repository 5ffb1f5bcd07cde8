"""Wire formats (core.formats) and folding encoded uploads (core.decoding): pure logic, plain calls."""

import random

import pytest
import torch

from fedrdma.core.decoding import DecodingFold
from fedrdma.core.errors import AggregationError, EncodingError
from fedrdma.core.fedavg import RoundAggregate
from fedrdma.core.formats import BLOCK_VALUES, HEADER_BYTES, LEVELS, RECORD_BYTES, Codec, ErrorFeedback
from fedrdma.core.layout import ALIGNMENT, FlatState, Layout
from fedrdma.core.modes import Wire

# Three tensors whose values (with alignment padding) are not a whole number of int8 blocks.
SHAPES = [("w", torch.float32, (97, 61)), ("b", torch.float32, (61,)), ("h", torch.float32, (3, 700))]
LAYOUT = Layout.from_shapes(SHAPES)
IN_SPECS = torch.zeros(LAYOUT.nbytes // 4)
for _spec in LAYOUT.specs:
    IN_SPECS[_spec.offset // 4 : (_spec.offset + _spec.nbytes) // 4] = 1.0


def values(seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded values for the layout's tensors, 0 in its alignment padding (which no fold reads)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.nbytes // 4, generator=gen).mul_(scale).mul_(IN_SPECS)


def encoded(codec: Codec, delta: torch.Tensor) -> torch.Tensor:
    out = torch.empty(codec.nbytes, dtype=torch.uint8)
    codec.encode(delta.clone(), out)
    return out


def decode_all(codec: Codec, data: torch.Tensor, chunk: int) -> torch.Tensor:
    out = torch.full((codec.numel,), float("nan"))
    for offset in range(0, codec.nbytes, chunk):
        first, count = codec.values(offset, min(chunk, codec.nbytes - offset))
        codec.decode(data[offset : offset + chunk], offset, out[first : first + count])
    return out


# --- sizes ---------------------------------------------------------------------------------


def test_encoded_sizes_are_a_quarter_and_a_half_of_fp32_within_the_headers():
    numel = LAYOUT.nbytes // 4
    int8, bf16 = Codec.of(Wire.INT8, LAYOUT), Codec.of(Wire.BF16, LAYOUT)
    assert bf16.nbytes == -(-2 * numel // ALIGNMENT) * ALIGNMENT > 2 * numel  # this layout's bf16 needs padding
    assert int8.nbytes == -(-numel // BLOCK_VALUES) * RECORD_BYTES
    big = Codec(Wire.INT8, 124_439_808)  # GPT-2 small's values: the bound is 0.27
    assert big.nbytes / big.state_nbytes < 0.252
    assert int8.encoded_layout.nbytes == int8.nbytes and int8.encoded_layout.layout_id != bf16.encoded_layout.layout_id
    assert bf16.encoded_layout.nbytes == bf16.nbytes  # so an encoded state is a FlatState like any other


def test_chunk_sizes_hold_whole_records_the_default_is_kept_and_a_small_state_travels_whole():
    int8, bf16 = Codec.of(Wire.INT8, LAYOUT), Codec.of(Wire.BF16, LAYOUT)
    big = Codec(Wire.INT8, 124_439_808)
    assert big.chunk_size(4 << 20) == 4 << 20 and Codec(Wire.BF16, 124_439_808).chunk_size(4 << 20) == 4 << 20
    assert int8.chunk_size(4 << 20) == int8.nbytes and bf16.chunk_size(4 << 20) == bf16.nbytes
    assert int8.chunk_size(5000) == RECORD_BYTES * 2 and int8.chunk_size(8) == RECORD_BYTES
    assert bf16.chunk_size(13) == 8


def test_layouts_a_format_cannot_carry_are_refused_by_name():
    mixed = Layout.from_shapes([("w", torch.float32, (4,)), ("h", torch.float16, (4,))])
    with pytest.raises(EncodingError, match=r"tensor 'h' is float16.*use wire fp32"):
        Codec.of(Wire.INT8, mixed)
    with pytest.raises(EncodingError, match="no codec"):
        Codec.of(Wire.FP32, LAYOUT)


def test_encoded_ranges_that_split_a_record_or_leave_the_state_are_refused():
    int8 = Codec.of(Wire.INT8, LAYOUT)
    with pytest.raises(EncodingError, match="split a 2048-byte int8 record"):
        int8.values(1024, RECORD_BYTES)
    with pytest.raises(EncodingError, match="outside the encoded state"):
        int8.values(int8.nbytes - RECORD_BYTES, 2 * RECORD_BYTES)
    assert int8.values(RECORD_BYTES, RECORD_BYTES) == (BLOCK_VALUES, BLOCK_VALUES)
    last = int8.nbytes - RECORD_BYTES
    assert int8.values(last, RECORD_BYTES) == (last // RECORD_BYTES * BLOCK_VALUES, int8.numel % BLOCK_VALUES)


# --- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [RECORD_BYTES, 3 * RECORD_BYTES, 1 << 20])
def test_int8_round_trip_is_within_half_a_step_of_each_block_whatever_the_chunking(chunk):
    codec = Codec.of(Wire.INT8, LAYOUT)
    delta = values(1, 1e-3)
    delta[5] = 0.5  # an outlier coarsens its own block only
    back = decode_all(codec, encoded(codec, delta), chunk)
    pad = torch.zeros(codec.records * BLOCK_VALUES)
    pad[: codec.numel] = delta
    step = (pad.view(-1, BLOCK_VALUES).abs().amax(dim=1) / LEVELS).repeat_interleave(BLOCK_VALUES)[: codec.numel]
    assert bool(((back - delta).abs() <= step / 2 * (1 + 1e-6)).all())
    assert float(step[0]) == pytest.approx(0.5 / LEVELS) and float(step[BLOCK_VALUES]) < 1e-4
    assert torch.equal(back, decode_all(codec, encoded(codec, delta), RECORD_BYTES))


def test_bf16_round_trip_keeps_three_significant_digits_and_exact_zeros():
    codec = Codec.of(Wire.BF16, LAYOUT)
    delta = values(2, 1e-4)
    delta[:10] = 0.0
    back = decode_all(codec, encoded(codec, delta), 8 * 1000)
    assert bool(((back - delta).abs() <= delta.abs() * 2.0**-8).all())
    assert torch.equal(back[:10], torch.zeros(10))
    assert torch.equal(back, delta.to(torch.bfloat16).float())


def test_an_all_zero_block_gets_a_positive_scale_and_decodes_to_zeros():
    codec = Codec.of(Wire.INT8, LAYOUT)
    delta = values(3)
    delta[:BLOCK_VALUES] = 0.0
    data = encoded(codec, delta)
    assert float(data[:4].view(torch.float32)) == 1.0
    assert torch.equal(decode_all(codec, data, RECORD_BYTES)[:BLOCK_VALUES], torch.zeros(BLOCK_VALUES))


def test_leave_error_leaves_exactly_what_decoding_loses():
    for wire in (Wire.INT8, Wire.BF16):
        codec = Codec.of(wire, LAYOUT)
        delta = values(4, 1e-2)
        work, out = delta.clone(), torch.empty(codec.nbytes, dtype=torch.uint8)
        codec.encode(work, out, leave_error=True)
        assert torch.allclose(work, delta - decode_all(codec, out, 1 << 16), atol=1e-9, rtol=0), wire


# --- error feedback ------------------------------------------------------------------------


@pytest.mark.parametrize("wire", [Wire.INT8, Wire.BF16])
def test_error_feedback_keeps_the_summed_error_to_one_rounding_over_many_rounds(wire):
    """The same small delta sent 30 times: with feedback the decoded sum is 30 deltas within
    one round's rounding; without, each round's rounding adds up."""
    codec = Codec.of(wire, LAYOUT)
    reference = values(5)
    delta = values(6, 1e-3)
    delta[0] = 0.2  # a block with one large value: its small neighbours round to 0 every round alone
    feedback, out, rounds = ErrorFeedback(codec), torch.empty(codec.nbytes, dtype=torch.uint8), 30
    total, plain = torch.zeros(codec.numel), torch.zeros(codec.numel)
    for _ in range(rounds):
        feedback.encode(reference + delta, reference, out)
        total += decode_all(codec, out, 1 << 16)
        plain += decode_all(codec, encoded(codec, torch.sub(reference + delta, reference)), 1 << 16)
    one_round = (delta - decode_all(codec, encoded(codec, delta), 1 << 16)).abs().max()
    with_feedback = (total - rounds * delta).abs().max()
    without = (plain - rounds * delta).abs().max()
    assert with_feedback <= 2 * one_round + 1e-6
    assert without > 5 * with_feedback


def test_a_nan_in_the_delta_is_caught_before_anything_is_sent_and_named():
    for wire in (Wire.INT8, Wire.BF16):
        codec = Codec.of(wire, LAYOUT)
        feedback = ErrorFeedback(codec)
        update, reference = values(7), values(8)
        offset_b = next(s.offset for s in LAYOUT.specs if s.name == "b") // 4
        update[offset_b + 3] = float("inf")
        with pytest.raises(EncodingError, match=r"inf at tensor 'b' element 3.*not sent"):
            feedback.encode(update, reference, torch.empty(codec.nbytes, dtype=torch.uint8))
        assert torch.equal(feedback.error, torch.zeros(codec.numel)), "a refused delta leaves no error behind"


# --- hostile records -----------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, float("inf"), float("nan"), -1.0])
def test_a_record_with_a_bad_scale_is_refused_naming_the_record(scale):
    codec = Codec.of(Wire.INT8, LAYOUT)
    data = encoded(codec, values(9))
    data[2 * RECORD_BYTES : 2 * RECORD_BYTES + 4].view(torch.float32)[0] = scale
    with pytest.raises(EncodingError, match=rf"int8 record 2 \(values {2 * BLOCK_VALUES}\.\.\.\) has scale"):
        codec.decode(data[RECORD_BYTES : 3 * RECORD_BYTES], RECORD_BYTES, torch.empty(2 * BLOCK_VALUES))


def test_a_record_with_reserved_bytes_set_is_refused():
    codec = Codec.of(Wire.INT8, LAYOUT)
    data = encoded(codec, values(9))
    data[HEADER_BYTES - 1] = 1
    with pytest.raises(EncodingError, match=r"record 0 .*reserved header bytes \[0, 0, 0, 1\]"):
        codec.decode(data[:RECORD_BYTES], 0, torch.empty(BLOCK_VALUES))


# --- folding encoded uploads ---------------------------------------------------------------


def flat(v: torch.Tensor) -> FlatState:
    state = FlatState.allocate(LAYOUT)
    state.buffer.view(torch.float32).copy_(v)
    return state


class EncodedSource:
    """A silo's encoded update streamed again (last chunk first), or None once it is gone."""

    def __init__(self, data: torch.Tensor, chunk: int) -> None:
        self.data, self.chunk, self.asked, self.gone = data, chunk, 0, False

    def __call__(self):
        self.asked += 1
        if self.gone:
            return None
        offsets = list(range(0, self.data.numel(), self.chunk))[::-1]
        return ((o, self.data[o : o + self.chunk].clone()) for o in offsets)


def fold_encoded(wire: Wire, deltas: dict[str, torch.Tensor], samples: dict[str, int], glob: FlatState,
                 tamper=None, chunk_request: int = 3 * RECORD_BYTES):
    codec = Codec.of(wire, LAYOUT)
    chunk = codec.chunk_size(chunk_request)
    agg = RoundAggregate(glob)
    fold = DecodingFold(agg, codec)
    sent = {silo: encoded(codec, d) for silo, d in deltas.items()}
    if tamper:
        tamper(sent)
    sources = {silo: EncodedSource(data, chunk) for silo, data in sent.items()}
    work = [(silo, off) for silo in deltas for off in range(0, codec.nbytes, chunk)]
    random.Random(0).shuffle(work)
    slot = torch.empty(chunk, dtype=torch.uint8)
    for silo, n in samples.items():
        fold.start_silo(silo, n, agreed=True, source=sources[silo])
    for silo, off in work:
        n = min(chunk, codec.nbytes - off)
        slot[:n].copy_(sent[silo][off : off + n])
        fold.fold_chunk(silo, off, slot[:n])
        slot.fill_(0xEE)  # the slot is reused: nothing may read it later
    into = FlatState.allocate(LAYOUT)
    return agg.finish(into), into, codec, sent, sources


@pytest.mark.parametrize("wire,chunk_request", [(Wire.INT8, 3 * RECORD_BYTES), (Wire.BF16, 3 * RECORD_BYTES),
                                                (Wire.BF16, 128)])
def test_encoded_uploads_fold_to_the_mean_of_their_decoded_values(wire, chunk_request):
    """The last case's final chunk is the encoded state's padding alone: folded as nothing."""
    g = values(10)
    glob = flat(g)
    deltas = {s: values(11 + i, 1e-3) for i, s in enumerate("abc")}
    samples = {"a": 5, "b": 7, "c": 11}
    result, into, codec, sent, _ = fold_encoded(wire, deltas, samples, glob, chunk_request=chunk_request)
    assert result.accepted == ("a", "b", "c")
    decoded = {s: (g + decode_all(codec, sent[s], 1 << 16)) * IN_SPECS for s in deltas}
    expected = sum(decoded[s].double() * samples[s] for s in deltas) / sum(samples.values())
    got = into.buffer.view(torch.float32)
    assert torch.allclose(got.double(), expected, atol=1e-6, rtol=0)
    true_mean = g + sum(deltas[s] * samples[s] for s in deltas) / sum(samples.values())
    assert float((got - true_mean).abs().max()) < (2e-3 * 4 / LEVELS if wire is Wire.INT8 else 1e-5)


def test_an_encoded_outlier_is_rejected_on_its_decoded_norm_and_read_again_to_be_taken_out():
    g = values(10)
    deltas = {**{s: values(11 + i, 1e-3) for i, s in enumerate("abc")}, "evil": values(20, 1.0)}
    samples = {"a": 5, "b": 7, "c": 11, "evil": 50}
    result, into, codec, sent, sources = fold_encoded(Wire.INT8, deltas, samples, flat(g))
    assert result.accepted == ("a", "b", "c") and "delta norm" in result.rejected["evil"]
    assert sources["evil"].asked == 1
    honest = {s: (g + decode_all(codec, sent[s], 1 << 16)) * IN_SPECS for s in "abc"}
    expected = sum(honest[s].double() * samples[s] for s in "abc") / 23
    assert torch.allclose(into.buffer.view(torch.float32).double(), expected, atol=1e-6, rtol=0)


def test_a_received_zero_scale_rejects_that_silo_by_name_and_the_global_is_untouched():
    g = values(10)
    glob = flat(g)
    deltas = {s: values(11 + i, 1e-3) for i, s in enumerate("abc")}

    def zero_scale(sent):
        sent["c"][RECORD_BYTES : RECORD_BYTES + 4].view(torch.float32)[0] = 0.0

    result, into, codec, sent, _ = fold_encoded(Wire.INT8, deltas, {"a": 1, "b": 1, "c": 1}, glob, zero_scale)
    assert result.accepted == ("a", "b")
    assert "does not decode" in result.rejected["c"] and "record 1" in result.rejected["c"]
    assert torch.equal(glob.buffer.view(torch.float32), g)
    expected = (2 * g.double() + decode_all(codec, sent["a"], 1 << 16) + decode_all(codec, sent["b"], 1 << 16)) / 2
    expected *= IN_SPECS
    assert torch.allclose(into.buffer.view(torch.float32).double(), expected, atol=1e-6, rtol=0)


def test_a_decoded_inf_is_rejected_as_not_finite():
    """A finite scale of 1e38 times 127 overflows float32: the aggregate's finiteness check
    sees the decoded value, not the record."""
    g = values(10)
    deltas = {s: values(11 + i, 1e-3) for i, s in enumerate("ab")}

    def huge(sent):
        sent["b"][:4].view(torch.float32)[0] = 1e38
        sent["b"][HEADER_BYTES] = LEVELS

    result, *_ = fold_encoded(Wire.INT8, deltas, {"a": 1, "b": 1}, flat(g), huge)
    assert result.accepted == ("a",) and result.rejected["b"] == "update contains NaN or Inf"


def test_an_encoded_chunk_outside_the_state_or_splitting_a_record_is_an_error_not_a_rejection():
    codec = Codec.of(Wire.INT8, LAYOUT)
    fold = DecodingFold(RoundAggregate(flat(values(1))), codec)
    fold.start_silo("a", 1, source=lambda: None)
    with pytest.raises(AggregationError, match="outside the encoded state"):
        fold.fold_chunk("a", codec.nbytes, torch.zeros(RECORD_BYTES, dtype=torch.uint8))
    with pytest.raises(AggregationError, match="split a 2048-byte int8 record"):
        fold.fold_chunk("a", 0, torch.zeros(RECORD_BYTES + 8, dtype=torch.uint8))


@pytest.mark.parametrize("wire", [Wire.INT8, Wire.BF16])
def test_advance_keeps_both_copies_alike_bit_for_bit_and_pays_its_error_back_next_time(wire):
    codec = Codec.of(wire, LAYOUT)
    held = values(40)
    silo = held.clone()
    target = held + values(41, 1e-3)
    out = torch.full((codec.nbytes,), 0xEE, dtype=torch.uint8)
    gaps = []
    for _ in range(3):  # the same target again: only the rounding of the last time is left to send
        codec.advance(target, held, out)
        silo.add_(decode_all(codec, out, 1 << 16))  # what a silo does with the broadcast
        assert torch.equal(silo, held)
        gaps.append(float((target - held).abs().max()))
    assert gaps[0] < (1e-3 * 6 / LEVELS if wire is Wire.INT8 else 1e-5) and gaps[2] < gaps[0] / 50, gaps
    assert not out[codec.records * codec.unit :].any()  # the padding is zeros, not what was there
    target[5] = float("nan")
    with pytest.raises(EncodingError, match="broadcast's delta is not finite"):
        codec.advance(target, held, out)
