import random

import pytest
import torch

from fedrdma.core.errors import LayoutError
from fedrdma.core.fedavg import (
    MAX_SAMPLES,
    NORM_FACTOR,
    WEIGHT_FACTOR,
    AggregationError,
    NotEnoughSilos,
    RoundAggregate,
)
from fedrdma.core.folds import weighted_mean
from fedrdma.core.layout import FlatState, Layout

SHAPES = [("w", torch.float32, (37, 11)), ("b", torch.float32, (11,)), ("h", torch.float16, (5, 13))]


def make_state(seed: int, scale: float = 1.0, base: FlatState | None = None, shapes=None) -> FlatState:
    """A state with the test layout: `base` plus a seeded delta of size `scale` (or random)."""
    gen = torch.Generator().manual_seed(seed)
    state = FlatState.allocate(Layout.from_shapes(shapes or SHAPES), fill=0xAB)  # padding bytes are junk on purpose
    for name, view in state.views.items():
        noise = torch.randn(view.shape, generator=gen) * scale
        if base is not None:
            noise = base.views[name].float() + noise
        view.copy_(noise.to(view.dtype))
    return state


def chunks(nbytes: int, rng: random.Random) -> list[tuple[int, int]]:
    """Random chunk sizes, multiples of 8 bytes except the last, covering [0, nbytes)."""
    out, pos = [], 0
    while pos < nbytes:
        size = min(8 * rng.randint(1, 120), nbytes - pos)
        out.append((pos, size))
        pos += size
    return out


def fold_all(
    agg: RoundAggregate, updates: dict[str, FlatState], samples: dict[str, int], seed: int = 0, agreed: bool = True
) -> None:
    """Start every silo, then fold all their chunks in one random interleaved order.

    The weights are agreed ones (never capped) unless `agreed=False`, so the arithmetic tests
    may use any spread of weights."""
    rng = random.Random(seed)
    for silo, n in samples.items():
        agg.start_silo(silo, n, agreed=agreed)
    work = [(silo, off, ln) for silo, upd in updates.items() for off, ln in chunks(upd.nbytes, rng)]
    rng.shuffle(work)
    for silo, off, ln in work:
        agg.fold(silo, updates[silo], off, ln)


def reference(updates: dict[str, FlatState], samples: dict[str, int]) -> dict[str, torch.Tensor]:
    names = list(updates)
    return {
        spec.name: weighted_mean([updates[s].views[spec.name] for s in names], [samples[s] for s in names])
        for spec in next(iter(updates.values())).layout.specs
    }


def test_weighted_mean_matches_hand_computed_example():
    a = torch.tensor([1.0, 2.0, -4.0])
    b = torch.tensor([3.0, 0.0, 8.0])
    c = torch.tensor([0.5, 10.0, 2.0])
    # weights 100, 300, 600 (sum 1000): 0.1*a + 0.3*b + 0.6*c
    out = weighted_mean([a, b, c], [100, 300, 600])
    assert torch.allclose(out, torch.tensor([0.1 + 0.9 + 0.3, 0.2 + 0.0 + 6.0, -0.4 + 2.4 + 1.2]), atol=1e-6)
    assert out.dtype == torch.float32


def test_weighted_mean_rejects_bad_input():
    with pytest.raises(AggregationError, match="one weight per tensor"):
        weighted_mean([torch.zeros(2)], [1, 2])
    with pytest.raises(AggregationError, match="sum to 0"):
        weighted_mean([torch.zeros(2)], [0])


def test_streaming_equals_all_at_once_mean_for_any_chunk_order():
    glob = make_state(0)
    updates = {s: make_state(i + 1, 0.05, base=glob) for i, s in enumerate(["a", "b", "c"])}
    samples = {"a": 120, "b": 45, "c": 901}
    expected = reference(updates, samples)
    for order_seed in range(3):
        agg = RoundAggregate(glob)
        fold_all(agg, updates, samples, seed=order_seed)
        into = FlatState.allocate(glob.layout)
        result = agg.finish(into, min_silos=3)
        assert result.accepted == ("a", "b", "c")
        assert result.weights == pytest.approx({"a": 120 / 1066, "b": 45 / 1066, "c": 901 / 1066})
        for name, ref in expected.items():
            assert into.views[name].dtype == ref.dtype
            assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_float32_accumulator_stays_close_to_the_reference():
    glob = make_state(0)
    updates = {s: make_state(i + 1, 0.05, base=glob) for i, s in enumerate(["a", "b", "c"])}
    samples = {"a": 3, "b": 1000, "c": 77}
    agg = RoundAggregate(glob, accumulate_dtype=torch.float32)
    assert agg.sum_nbytes == sum(v.numel() for v in glob.views.values()) * 4
    fold_all(agg, updates, samples)
    into = FlatState.allocate(glob.layout)
    agg.finish(into)
    for name, ref in reference(updates, samples).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-5, rtol=0), name


def test_mixed_dtypes_keep_each_spec_dtype_and_average_float16():
    glob = make_state(0)
    updates = {"a": make_state(1, 0.1, base=glob), "b": make_state(2, 0.1, base=glob)}
    agg = RoundAggregate(glob)
    fold_all(agg, updates, {"a": 1, "b": 3})
    into = FlatState.allocate(glob.layout)
    agg.finish(into)
    expected = (updates["a"].views["h"].double() + 3 * updates["b"].views["h"].double()) / 4
    assert into.views["h"].dtype == torch.float16
    assert torch.equal(into.views["h"], expected.half())
    assert into.views["w"].dtype == torch.float32


def test_nan_update_is_rejected_and_others_average_unchanged():
    glob = make_state(0)
    good = {s: make_state(i + 1, 0.05, base=glob) for i, s in enumerate(["a", "b"])}
    samples = {"a": 10, "b": 30}

    clean = RoundAggregate(glob)
    fold_all(clean, good, samples)
    without = FlatState.allocate(glob.layout)
    clean.finish(without)

    for bad_value, where in [(float("nan"), ("h", (4, 12))), (float("inf"), ("w", (36, 10)))]:
        bad = make_state(9, 0.05, base=glob)
        bad.views[where[0]][where[1]] = bad_value  # near the end: earlier chunks get folded first
        agg = RoundAggregate(glob)
        fold_all(agg, good, samples)
        agg.start_silo("bad", 1000)
        for off in range(0, glob.nbytes, 64):
            agg.fold("bad", bad, off, min(64, glob.nbytes - off))
        into = FlatState.allocate(glob.layout)
        result = agg.finish(into)
        assert result.accepted == ("a", "b")
        assert "NaN or Inf" in result.rejected["bad"]
        assert result.weights == pytest.approx({"a": 0.25, "b": 0.75})
        for name in glob.views:
            assert torch.allclose(into.views[name].float(), without.views[name].float(), atol=1e-7, rtol=0), name


def test_norm_outlier_is_rejected_and_retracted():
    glob = make_state(0)
    updates = {s: make_state(i + 1, 0.01, base=glob) for i, s in enumerate(["a", "b", "c"])}
    updates["evil"] = make_state(7, 0.01 * NORM_FACTOR * 5, base=glob)
    samples = {"a": 5, "b": 7, "c": 11, "evil": 50}
    agg = RoundAggregate(glob)
    fold_all(agg, updates, samples)
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.accepted == ("a", "b", "c")
    assert "delta norm" in result.rejected["evil"]
    assert result.delta_norms["evil"] > NORM_FACTOR * result.delta_norms["a"]
    honest = {s: updates[s] for s in ("a", "b", "c")}
    for name, ref in reference(honest, samples).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_similar_norms_all_accepted_with_two_silos():
    glob = make_state(0)
    updates = {"a": make_state(1, 0.01, base=glob), "b": make_state(2, 0.03, base=glob)}
    agg = RoundAggregate(glob)
    fold_all(agg, updates, {"a": 1, "b": 1})
    assert agg.finish(FlatState.allocate(glob.layout)).accepted == ("a", "b")


def test_double_fold_is_an_error():
    glob = make_state(0)
    upd = make_state(1, 0.1, base=glob)
    agg = RoundAggregate(glob)
    agg.start_silo("a", 3)
    agg.fold("a", upd, 0, 512)
    agg.fold("a", upd, 1024, 256)
    with pytest.raises(AggregationError, match="overlap"):
        agg.fold("a", upd, 0, 512)
    with pytest.raises(AggregationError, match="overlap"):
        agg.fold("a", upd, 1016, 16)  # straddles the start of a folded range


def test_incomplete_coverage_rejects_and_min_silos_leaves_into_untouched():
    glob = make_state(0)
    full, partial = make_state(1, 0.1, base=glob), make_state(2, 0.1, base=glob)
    agg = RoundAggregate(glob)
    agg.start_silo("full", 3)
    agg.start_silo("partial", 4)
    agg.fold("full", full, 0, glob.nbytes)
    agg.fold("partial", partial, 0, glob.nbytes - glob.nbytes % 8 - 8)
    into = make_state(5)
    before = into.buffer.clone()
    with pytest.raises(NotEnoughSilos, match="only 1 silo.*min_silos is 2.*incomplete upload"):
        agg.finish(into, min_silos=2)
    assert torch.equal(into.buffer, before)
    result = agg.finish(into, min_silos=1)
    assert result.accepted == ("full",)
    assert "incomplete upload" in result.rejected["partial"]
    for name in glob.views:
        assert torch.equal(into.views[name], full.views[name])


def test_finish_into_the_global_state_itself():
    glob = make_state(0)
    upd = {"a": make_state(1, 0.1, base=glob), "b": make_state(2, 0.1, base=glob)}
    expected = reference(upd, {"a": 1, "b": 2})
    agg = RoundAggregate(glob)
    fold_all(agg, upd, {"a": 1, "b": 2})
    agg.finish(glob)
    for name, ref in expected.items():
        assert torch.allclose(glob.views[name].float(), ref.float(), atol=1e-6, rtol=0)


def test_bad_calls_name_the_problem():
    glob = make_state(0)
    upd = make_state(1)
    agg = RoundAggregate(glob)
    with pytest.raises(AggregationError, match="call start_silo first"):
        agg.fold("x", upd, 0, 8)
    agg.start_silo("a", 1)
    with pytest.raises(AggregationError, match="already started"):
        agg.start_silo("a", 1)
    with pytest.raises(AggregationError, match="n_samples"):
        agg.start_silo("b", 0)
    with pytest.raises(AggregationError, match="outside the buffer"):
        agg.fold("a", upd, glob.nbytes - 8, 16)
    with pytest.raises(AggregationError, match="multiples of 8"):
        agg.fold("a", upd, 4, 8)
    other = FlatState.allocate(Layout.from_shapes([("w", torch.float32, (3,))]))
    with pytest.raises(LayoutError, match="layout"):
        agg.fold("a", other, 0, 8)
    agg.fold("a", upd, 0, glob.nbytes)
    agg.finish(FlatState.allocate(glob.layout))
    with pytest.raises(AggregationError, match="already finished"):
        agg.fold("a", upd, 0, 8)


def test_explicit_reject_retracts_folded_chunks():
    glob = make_state(0)
    upd = {"a": make_state(1, 0.1, base=glob), "gone": make_state(2, 0.1, base=glob)}
    agg = RoundAggregate(glob)
    fold_all(agg, upd, {"a": 2, "gone": 2})
    agg.reject("gone", "left the round")
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.rejected == {"gone": "left the round"}
    for name in glob.views:
        assert torch.allclose(into.views[name].float(), upd["a"].views[name].float(), atol=1e-7, rtol=0)


def test_integer_layouts_are_refused():
    state = FlatState.allocate(Layout.from_shapes([("steps", torch.int64, (1,))]))
    with pytest.raises(LayoutError, match="cannot be averaged"):
        RoundAggregate(state)


def test_folds_from_several_threads_give_the_same_mean():
    from concurrent.futures import ThreadPoolExecutor

    glob = make_state(0)
    updates = {s: make_state(i + 1, 0.05, base=glob) for i, s in enumerate(["a", "b", "c", "d"])}
    samples = {"a": 2, "b": 9, "c": 4, "d": 31}
    agg = RoundAggregate(glob)
    for silo, n in samples.items():
        agg.start_silo(silo, n, agreed=True)
    rng = random.Random(5)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [
            pool.submit(lambda s=silo, o=off, n=ln: agg.fold(s, updates[s], o, n))
            for silo in updates
            for off, ln in chunks(glob.nbytes, rng)
        ]
        for f in futures:
            f.result()
    into = FlatState.allocate(glob.layout)
    agg.finish(into)
    for name, ref in reference(updates, samples).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_a_rejected_silo_rewriting_its_buffer_cannot_skew_the_retraction():
    glob = make_state(0)
    good = {s: make_state(i + 1, 0.01, base=glob) for i, s in enumerate(["a", "b", "c"])}
    samples = {"a": 5, "b": 7, "c": 11}
    expected = reference(good, samples)
    evil = make_state(7, 1.0, base=glob)  # a norm outlier
    agg = RoundAggregate(glob)
    fold_all(agg, {**good, "evil": evil}, {**samples, "evil": 50})
    evil.buffer.zero_()  # writes into its inbox after its chunks were folded (push mode can)
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.accepted == ("a", "b", "c") and "delta norm" in result.rejected["evil"]
    for name, ref in expected.items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_an_accepted_silo_rewriting_its_buffer_is_caught_when_the_sum_is_rebuilt():
    glob = make_state(0)
    updates = {s: make_state(i + 1, 0.01, base=glob) for i, s in enumerate(["a", "b", "c"])}
    nan = make_state(9, 0.01, base=glob)
    nan.views["h"][4, 12] = float("nan")
    agg = RoundAggregate(glob)
    fold_all(agg, updates, {"a": 1, "b": 2, "c": 3})
    agg.start_silo("nan", 4)
    for off in range(0, glob.nbytes, 64):
        agg.fold("nan", nan, off, min(64, glob.nbytes - off))
    nan.buffer.fill_(0)  # forces a rebuild from the accepted silos...
    updates["c"].views["w"][0, 0] += 1.0  # ...during which c's changed bytes are found
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.accepted == ("a", "b")
    assert "changed after they were verified" in result.rejected["c"]
    for name, ref in reference({s: updates[s] for s in ("a", "b")}, {"a": 1, "b": 2}).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def honest_and_liar(glob: FlatState) -> dict[str, FlatState]:
    return {s: make_state(i + 1, 0.01, base=glob) for i, s in enumerate(["a", "b", "c", "liar"])}


def test_a_silo_claiming_2_29_samples_counts_as_weight_factor_times_the_others_median():
    glob = make_state(0)
    updates = honest_and_liar(glob)
    claims = {"a": 100, "b": 110, "c": 120, "liar": MAX_SAMPLES - 1}
    agg = RoundAggregate(glob)
    fold_all(agg, updates, claims, agreed=False)
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    cap = int(WEIGHT_FACTOR * 110)
    assert result.accepted == ("a", "b", "c", "liar")
    assert result.capped == {"liar": cap}
    assert result.n_samples["liar"] == MAX_SAMPLES - 1  # the claim is recorded as made
    assert result.weights["liar"] == pytest.approx(cap / (330 + cap))
    assert result.weights["liar"] <= 0.5
    expected = reference(updates, {**claims, "liar": cap})
    for name, ref in expected.items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_an_agreed_weight_is_never_capped():
    glob = make_state(0)
    updates = honest_and_liar(glob)
    agg = RoundAggregate(glob)
    weights = {"a": 100, "b": 110, "c": 120, "liar": 5000}
    for silo, n in weights.items():
        agg.start_silo(silo, n, agreed=silo == "liar")
    for silo, update in updates.items():
        agg.fold(silo, update, 0, update.nbytes)
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.capped == {}
    assert result.weights["liar"] == pytest.approx(5000 / 5330)
    for name, ref in reference(updates, weights).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_a_capped_silo_that_rewrote_its_buffer_is_rejected_and_the_rest_stand():
    glob = make_state(0)
    updates = honest_and_liar(glob)
    claims = {"a": 100, "b": 110, "c": 120, "liar": 10_000}
    agg = RoundAggregate(glob)
    fold_all(agg, updates, claims, agreed=False)
    updates["liar"].buffer.zero_()  # so its excess weight cannot be subtracted again
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.accepted == ("a", "b", "c")
    assert "changed after they were verified" in result.rejected["liar"]
    honest = {s: updates[s] for s in ("a", "b", "c")}
    for name, ref in reference(honest, claims).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


F32_SHAPES = [("w", torch.float32, (37, 11)), ("b", torch.float32, (13,))]


def float32_state(seed: int, base: FlatState | None = None, scale: float = 1.0) -> FlatState:
    return make_state(seed, scale, base, shapes=F32_SHAPES)


def test_in_place_accumulator_holds_the_sum_and_finishes_into_itself():
    glob = float32_state(0)
    spare = float32_state(99)  # junk from a previous round: must be zeroed first
    updates = {s: float32_state(i + 1, glob, 0.05) for i, s in enumerate(["a", "b"])}
    samples = {"a": 7, "b": 300}
    before = glob.buffer.clone()
    agg = RoundAggregate(glob, accumulator=spare)
    fold_all(agg, updates, samples)
    result = agg.finish(spare)
    assert result.accepted == ("a", "b")
    for name, ref in reference(updates, samples).items():
        assert torch.allclose(spare.views[name], ref, atol=1e-6, rtol=0), name
    assert torch.equal(glob.buffer, before)  # the global is only read


def test_in_place_accumulator_refuses_what_it_cannot_hold():
    glob = float32_state(0)
    with pytest.raises(Exception, match="must not be the global"):
        RoundAggregate(glob, accumulator=glob)
    with pytest.raises(LayoutError, match="float32"):
        mixed = make_state(0)
        RoundAggregate(mixed, accumulator=make_state(1))


def test_fold_scratch_is_reused_and_grows_only_when_asked():
    """Folds copy each chunk into one reused buffer rather than a fresh block per chunk
    (each a page-faulted mmap under the RDMA modes' pinned threshold)."""
    from fedrdma.core.folds import Scratch

    scratch = Scratch()
    first = scratch.copy(torch.arange(16, dtype=torch.uint8))
    assert first.tolist() == list(range(16))
    again = scratch.copy(torch.full((8,), 7, dtype=torch.uint8))
    assert again.data_ptr() == first.data_ptr() and again.tolist() == [7] * 8
    grown = scratch.copy(torch.ones(32, dtype=torch.uint8))
    assert grown.numel() == 32 and int(grown.sum()) == 32
    floats = scratch.floats(10)
    assert floats.dtype == torch.float32 and floats.numel() == 10
    assert scratch.floats(4).data_ptr() == floats.data_ptr()


# --- chunks folded from reused buffers: their bytes are fetched again through a source ----------


class Fetcher:
    """A silo's `source`: its update streamed again in 512-byte chunks, last chunk first (a
    stream need not keep order), or None once the silo is gone; `cut` ends it early."""

    def __init__(self, update: FlatState) -> None:
        self.update, self.gone, self.asked, self.cut = update, False, 0, None

    def __call__(self):
        self.asked += 1
        if self.gone:
            return None
        offsets = list(range(0, self.update.nbytes, 512))[::-1][: self.cut]
        return ((off, self.update.buffer[off : off + 512].clone()) for off in offsets)


def fold_through_one_slot(agg: RoundAggregate, updates: dict[str, FlatState], samples: dict[str, int],
                          fetchers: dict[str, Fetcher]) -> None:
    """Every chunk lands in one slot that the next chunk overwrites, as a bounded inbox does."""
    slot = torch.empty(512, dtype=torch.uint8)
    for silo, n in samples.items():
        agg.start_silo(silo, n, agreed=True, source=fetchers[silo])
    for silo, update in updates.items():
        for off in range(0, update.nbytes, 512):
            n = min(512, update.nbytes - off)
            slot[:n].copy_(update.buffer[off : off + n])
            agg.fold_chunk(silo, off, slot[:n])
            slot.fill_(0xEE)


def test_a_rejected_silo_folded_from_a_reused_slot_is_retracted_with_bytes_fetched_again():
    glob = make_state(0)
    good = {s: make_state(i + 1, 0.01, base=glob) for i, s in enumerate(["a", "b", "c"])}
    samples = {"a": 5, "b": 7, "c": 11, "evil": 50}
    updates = {**good, "evil": make_state(7, 1.0, base=glob)}  # a norm outlier
    fetchers = {s: Fetcher(u) for s, u in updates.items()}
    agg = RoundAggregate(glob)
    fold_through_one_slot(agg, updates, samples, fetchers)
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.accepted == ("a", "b", "c") and "delta norm" in result.rejected["evil"]
    assert fetchers["evil"].asked > 0 and all(fetchers[s].asked == 0 for s in good)
    for name, ref in reference(good, samples).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_a_silo_gone_before_its_retraction_makes_the_sum_rebuilt_from_the_others():
    glob = make_state(0)
    good = {s: make_state(i + 1, 0.01, base=glob) for i, s in enumerate(["a", "b", "c"])}
    samples = {"a": 5, "b": 7, "c": 11, "left": 3}
    updates = {**good, "left": make_state(9, 0.01, base=glob)}
    fetchers = {s: Fetcher(u) for s, u in updates.items()}
    agg = RoundAggregate(glob)
    fold_through_one_slot(agg, updates, samples, fetchers)
    agg.reject("left", "it left mid-round")
    fetchers["left"].gone = True
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.accepted == ("a", "b", "c") and result.rejected["left"] == "it left mid-round"
    assert all(fetchers[s].asked > 0 for s in good), "the others' bytes were fetched to rebuild the sum"
    for name, ref in reference(good, samples).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_an_accepted_silo_whose_bytes_cannot_be_fetched_for_a_rebuild_is_rejected_and_named():
    glob = make_state(0)
    updates = {s: make_state(i + 1, 0.01, base=glob) for i, s in enumerate(["a", "b", "c", "left"])}
    samples = {"a": 5, "b": 7, "c": 11, "left": 3}
    fetchers = {s: Fetcher(u) for s, u in updates.items()}
    agg = RoundAggregate(glob)
    fold_through_one_slot(agg, updates, samples, fetchers)
    agg.reject("left", "it left mid-round")
    fetchers["left"].gone = fetchers["c"].gone = True
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.accepted == ("a", "b")
    assert "could not be fetched again" in result.rejected["c"]
    for name, ref in reference({s: updates[s] for s in ("a", "b")}, samples).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


def test_folding_from_a_reused_buffer_needs_a_source():
    glob = make_state(0)
    agg = RoundAggregate(glob)
    agg.start_silo("a", 1)
    with pytest.raises(AggregationError, match="no source to fetch them again"):
        agg.fold_chunk("a", 0, glob.buffer[:8].clone())


def test_a_stream_that_ends_early_counts_as_gone_and_a_changed_chunk_as_rewritten():
    glob = make_state(0)
    good = {s: make_state(i + 1, 0.01, base=glob) for i, s in enumerate(["a", "b", "c"])}
    samples = {"a": 5, "b": 7, "c": 11, "evil": 50}
    updates = {**good, "evil": make_state(7, 1.0, base=glob)}  # a norm outlier, to be retracted
    fetchers = {s: Fetcher(u) for s, u in updates.items()}
    agg = RoundAggregate(glob)
    fold_through_one_slot(agg, updates, samples, fetchers)
    fetchers["evil"].cut = 1  # its retraction gets one chunk back, then the stream ends
    fetchers["b"].update = make_state(3, 0.02, base=glob)  # b sends other bytes when asked again
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    assert result.accepted == ("a", "c")
    assert "delta norm" in result.rejected["evil"]
    assert "changed after they were verified" in result.rejected["b"]
    for name, ref in reference({s: good[s] for s in ("a", "c")}, samples).items():
        assert torch.allclose(into.views[name].float(), ref.float(), atol=1e-6, rtol=0), name


@pytest.mark.parametrize("accumulate", ["float32-in-place", "float64"])
@pytest.mark.parametrize("attack", ["outlier x1e6", "claim 2**29-1"])
def test_what_a_huge_update_or_claim_added_leaves_no_trace_once_taken_out(accumulate, attack):
    """Subtracting 1e6 x a value (or 2**29 x it) again from a float32 sum would leave its
    rounding in the others' mean; the aggregate rebuilds from the accepted silos instead."""
    glob = float32_state(0)
    good = {s: float32_state(i + 1, glob, 0.01) for i, s in enumerate(["a", "b", "c"])}
    samples = {"a": 500, "b": 700, "c": 1100}
    if attack.startswith("outlier"):
        updates = {**good, "evil": float32_state(9, glob, 1e6)}
        samples["evil"] = 900
    else:
        updates = {**good, "evil": float32_state(9, glob, 0.01)}
        samples["evil"] = (1 << 29) - 1
    accumulator = float32_state(5) if accumulate == "float32-in-place" else None
    agg = RoundAggregate(glob, accumulator=accumulator)
    fold_all(agg, updates, samples, agreed=False)
    into = FlatState.allocate(glob.layout)
    result = agg.finish(into)
    counted = dict(samples)
    if attack.startswith("outlier"):
        assert "evil" in result.rejected
        expected = reference(good, samples)
    else:
        counted["evil"] = result.capped["evil"]
        expected = reference(updates, counted)
    for name, ref in expected.items():
        err = float((into.views[name].double() - ref.double()).abs().max())
        assert err <= 2 * torch.finfo(torch.float32).eps * float(ref.abs().max()), (name, err)
