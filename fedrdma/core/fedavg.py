"""FedAvg arithmetic: the weighted mean of silo updates, streamed chunk by chunk.

Pure torch, no I/O. The aggregator folds each verified chunk of an upload into the running
sum the moment it lands, so no silo's update needs to stay in memory (`transport.slots`).

The sum's precision, chosen per layout. An all-float32 model (the aggregator's usual case)
sums in float32, in place, in the spare half of the double-buffered global: no memory beyond
the two globals, where a float64 sum (or a Kahan compensation buffer) would add 2x (or 1x) the
model, 950 MiB (475 MiB) for GPT-2 small, the largest allocation left once inboxes are
bounded. Its cost: each of N silos' additions rounds once, so the mean is within N/2 float32
ulps of the exact one (in practice ~sqrt(N) ulps, order-dependent in the last bit), far below
the noise of a training step. Other layouts (float16, bfloat16) sum in float64, where
`n_samples * x` is exact and the order chunks land in changes nothing.

Taking a silo back out (rejected, or its claimed weight capped) subtracts what it added,
which in a rounded sum is only exact when it added little next to what stays: a finite
outlier of 1e6 or a weight of 2**29 would leave its rounding in everyone's mean. So a silo
is subtracted only when `core.rules.subtractable` bounds the cost to SUBTRACT_ULPS; otherwise
the sum is rebuilt from the accepted silos' bytes, read again.
"""

from __future__ import annotations

import bisect
import math
import statistics
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from fedrdma.core.chunks import CHUNK_ALIGN
from fedrdma.core.errors import AggregationError, LayoutError, NotEnoughSilos
from fedrdma.core.folds import Scratch, delta_stats, digest, insert_disjoint
from fedrdma.core.layout import FlatState, TensorSpec
from fedrdma.core.rules import MAX_SAMPLES, MIN_SILOS, NORM_FACTOR, WEIGHT_FACTOR, subtractable

ACCUMULATE_DTYPE = torch.float64
"""Dtype of the running sum without an `accumulator`; see the module docstring."""

_AVERAGEABLE = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


@dataclass(frozen=True)
class RoundResult:
    """What a closed round decided: who counted, with which weight, who was left out and why."""

    accepted: tuple[str, ...]
    rejected: dict[str, str]
    weights: dict[str, float]
    n_samples: dict[str, int]
    """The counts the silos reported (or the agreed weights, for silos that have one)."""
    delta_norms: dict[str, float]
    """L2 norm of `update - global` per silo that delivered finite values (for metrics);
    computed in float32 per chunk, so good to ~1e-6 relative, which the outlier test needs."""
    capped: dict[str, int] = field(default_factory=dict)
    """Silos whose reported count exceeded `weight_factor` times the others' median, with the
    weight they counted with instead."""


@dataclass
class _Silo:
    n_samples: int
    """What the silo reported, or its agreed weight."""
    agreed: bool = False
    """The weight comes from the aggregator's configuration, so it is never capped."""
    weight: int = 0
    """What its chunks were added with; a cap lowers it at `finish`."""
    covered: list[tuple[int, int]] = field(default_factory=list)
    """Sorted, disjoint [start, end) byte ranges already folded (coverage)."""
    summed: dict[tuple[int, int], int] = field(default_factory=dict)
    """Ranges whose values went into the running sum, with a hash of the bytes that were
    added: retraction re-reads the buffer and must find the same bytes."""
    update: FlatState | None = None
    """The buffer its chunks were folded from, when they stay there until the round closes."""
    source: Source | None = None
    """Else: how to stream its update again (see `Source`)."""
    unfetchable: bool = False
    finite: bool = True
    sq_norm: float = 0.0
    largest: float = 0.0
    """The largest delta magnitude it added: what subtracting it again would cost."""
    rejected: str | None = None

    @property
    def covered_bytes(self) -> int:
        return sum(end - start for start, end in self.covered)


Source = Callable[[], "Iterable[tuple[int, torch.Tensor]] | None"]
"""A silo's whole update streamed again: (offset, chunk bytes as 1-D uint8) pairs in any
order, or None when it cannot be had (the silo left). What retraction reads when chunks were
folded from a buffer that was reused (a bounded inbox's slot): the silo keeps its update
until the round closes and sends it again on request. A stream, not random access, because
that is what a transfer is; a stream that ends early means the bytes are gone."""


class RoundAggregate:
    """Streaming FedAvg for one round.

    Call order: `start_silo` for each silo taking part, then `fold` for every verified chunk
    of its upload (any order, interleaved across silos, from any thread), optionally `reject`
    for a silo known to be out (left, missed the deadline), then `finish` once.

    `fold` reads a chunk where it stays until the round closes (the silo's inbox), and so
    does a retraction. `fold_chunk` takes the chunk's bytes from a buffer that will be
    reused (a bounded inbox's slot): the silo's `source` fetches them again if it has to be
    taken back out, and when they cannot be had any more the sum is rebuilt from the others.

    Memory: the running sum (a float64 one, or the `accumulator` state's own tensors; see
    the module docstring) plus two chunk-sized scratch buffers reused by every fold. Each
    folded chunk's xxh3 hash is kept (8 bytes per chunk), so bytes read again that differ
    from what was folded are caught rather than subtracted wrong (see `finish`). How fast
    folds run is in the README's "Measurements behind the defaults".
    """

    def __init__(
        self,
        global_state: FlatState,
        accumulate_dtype: torch.dtype = ACCUMULATE_DTYPE,
        accumulator: FlatState | None = None,
    ) -> None:
        """`accumulator`: keep the running sum in this state's own tensors (zeroed here)
        instead of a new float64 buffer. The aggregator passes the other half of its
        double-buffered global pool, so the sum costs no memory beyond the pools, and then
        finishes `into` that same state. Precision is then the tensors' own (float32: ~1e-7
        relative, order-dependent in the last bit), so only float32 layouts may use it."""
        for spec in global_state.layout.specs:
            if spec.torch_dtype not in _AVERAGEABLE:
                raise LayoutError(
                    f"tensor {spec.name!r} has dtype {spec.dtype}, which cannot be averaged; "
                    "only floating-point tensors may be trainable in a federated layout"
                )
        self.global_state = global_state
        self.layout = global_state.layout
        self._starts = [s.offset for s in self.layout.specs]
        if accumulator is None:
            self._sum: dict[str, torch.Tensor] = {
                s.name: torch.zeros(_numel(s), dtype=accumulate_dtype) for s in self.layout.specs
            }
        else:
            if accumulator.layout_id != self.layout.layout_id:
                raise LayoutError(f"accumulator has layout {accumulator.layout_id}, the round's is {self.layout.layout_id}")
            if any(s.torch_dtype != torch.float32 for s in self.layout.specs):
                raise LayoutError("an in-place accumulator needs an all-float32 layout; use the float64 sum instead")
            if accumulator.address() == global_state.address():
                raise AggregationError("the accumulator must not be the global state: the deltas are taken against it")
            self._sum = {name: view.view(-1) for name, view in accumulator.views.items()}
            for tensor in self._sum.values():
                tensor.zero_()
        self._silos: dict[str, _Silo] = {}
        self._scratch = Scratch()
        """Used only under `_lock`: one fold, retraction or re-addition at a time."""
        self._lock = threading.Lock()
        self._closed = False

    @property
    def sum_nbytes(self) -> int:
        """Bytes held by the running sum, for memory accounting."""
        return sum(t.numel() * t.element_size() for t in self._sum.values())

    def start_silo(self, silo: str, n_samples: int, agreed: bool = False, source: Source | None = None) -> None:
        """Register a silo and its FedAvg weight (local training set size) before its chunks land.

        `agreed`: the weight is the consortium's, from the aggregator's configuration, not the
        silo's own claim, and `finish` never caps it. `source`: how to fetch its bytes again,
        for a silo whose chunks are folded with `fold_chunk` from buffers that are reused.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or not 0 < n_samples < MAX_SAMPLES:
            raise AggregationError(
                f"silo {silo!r} reported n_samples={n_samples!r}; it must be an integer in [1, {MAX_SAMPLES})"
            )
        with self._lock:
            self._check_open()
            if silo in self._silos:
                raise AggregationError(f"silo {silo!r} was already started this round; start each silo once")
            self._silos[silo] = _Silo(n_samples, agreed, n_samples, source=source)

    def fold(self, silo: str, update: FlatState, offset: int, length: int) -> None:
        """Add one verified chunk `[offset, offset+length)` of `silo`'s update to the running sum.

        Values that are not finite are never added: the silo is marked and will be rejected
        at `finish`, and later chunks of it are only counted for coverage.
        """
        with self._lock:
            state = self._started(silo)
            if update.layout_id != self.layout.layout_id:
                raise LayoutError(
                    f"silo {silo!r} update has layout {update.layout_id}, the round's is {self.layout.layout_id}"
                )
            if state.update is None:
                state.update = update
            elif update.address() != state.update.address():
                raise AggregationError(
                    f"silo {silo!r} folded chunks from two different buffers; a silo's whole update "
                    "must stay in one buffer until the round closes"
                )
            self._check_range(silo, offset, length)  # before slicing, which would clip it
            self._fold(state, silo, offset, update.buffer[offset : offset + length])

    def fold_chunk(self, silo: str, offset: int, data: torch.Tensor) -> None:
        """`fold` for bytes that will not stay where they are (a slot that is reused): `data` is
        the chunk at `offset` itself, and the silo's `source` streams it again if the silo has
        to be taken back out. `data` must stay as it is until this returns (a slot that this
        side's own receiver filled, which no peer can write), so it is read where it lies."""
        with self._lock:
            state = self._started(silo)
            if state.source is None:
                raise AggregationError(f"silo {silo!r} folds chunks from reused buffers but has no source to "
                                       "fetch them again; pass source= to start_silo")
            if data.dtype != torch.uint8 or data.dim() != 1:
                raise AggregationError(f"silo {silo!r} chunk must be 1-D uint8 bytes, got {data.dtype} {tuple(data.shape)}")
            self._fold(state, silo, offset, data, private=True)

    def _started(self, silo: str) -> _Silo:
        self._check_open()
        state = self._silos.get(silo)
        if state is None:
            raise AggregationError(f"chunk from silo {silo!r}, which was not started; call start_silo first")
        return state

    def _fold(self, state: _Silo, silo: str, offset: int, data: torch.Tensor, private: bool = False) -> None:
        """Under `_lock`: check, hash and add one chunk's bytes (`private`: no one else can write them)."""
        length = data.numel()
        self._check_range(silo, offset, length)
        if not insert_disjoint(state.covered, offset, offset + length):
            raise AggregationError(
                f"silo {silo!r} folded bytes [{offset}, {offset + length}) that overlap bytes already folded this "
                "round; each chunk may be folded once (fold only after a chunk is verified, and not again on retry)"
            )
        if state.rejected is not None or not state.finite:
            return
        # One private copy of the chunk: the values checked, hashed and added are the same
        # even if the peer writes into its buffer meanwhile (a push-mode silo can).
        raw = data if private else self._scratch.copy(data)
        pieces = list(self._pieces(raw, offset))
        stats = [delta_stats(x, g, self._scratch.floats(x.numel())) for _, _, x, g in pieces]
        squared = sum(q for q, _ in stats)
        # A NaN/Inf value makes the norm non-finite, so the exact check runs only then
        # (a finite but huge delta can also overflow it: that one is a norm outlier).
        if not math.isfinite(squared) and not all(bool(torch.isfinite(x).all()) for _, _, x, _ in pieces):
            state.finite = False
            return
        state.sq_norm += squared
        state.largest = max([state.largest, *(m for _, m in stats)])
        self._add(raw, offset, state.weight)
        state.summed[(offset, offset + length)] = digest(raw)

    def reject(self, silo: str, reason: str) -> None:
        """Leave a silo out of this round (it left, or missed the deadline); its chunks are retracted."""
        with self._lock:
            self._check_open()
            state = self._silos.get(silo)
            if state is None:
                raise AggregationError(f"cannot reject silo {silo!r}: it was not started this round")
            if state.rejected is None:
                state.rejected = reason

    def finish(
        self,
        into: FlatState,
        min_silos: int = MIN_SILOS,
        norm_factor: float = NORM_FACTOR,
        weight_factor: float = WEIGHT_FACTOR,
    ) -> RoundResult:
        """Close the round: check each silo, retract the rejected, cap claimed weights, write the mean into `into`.

        Checks, in order: an explicit `reject`; incomplete coverage; non-finite values; a
        delta norm above `norm_factor` times the median of the other silos still standing
        (skipped when no other silo stands). Rejected silos are retracted by subtracting
        their folded bytes again; if a rejected silo's buffer no longer holds the bytes that
        were folded (hash mismatch: it wrote again after verification), the sum is rebuilt
        from the accepted silos' buffers instead, and any of those whose bytes changed too
        is rejected as well. A reported count above `weight_factor` times the median of the
        other accepted silos' weights is lowered to that (agreed weights are not): the excess
        is subtracted again the way a retraction is. `into` may be the global state itself. If
        fewer than `min_silos` are accepted, `NotEnoughSilos` is raised, `into` is left
        untouched and the round stays open (late chunks may still be folded, then `finish`
        called again).
        """
        if into.layout_id != self.layout.layout_id:
            raise LayoutError(f"`into` has layout {into.layout_id}, the round's is {self.layout.layout_id}")
        with self._lock:
            self._check_open()
            rejected: dict[str, str] = {}
            for name, state in self._silos.items():
                if state.rejected is not None:
                    rejected[name] = state.rejected
                elif state.covered_bytes != self.layout.nbytes:
                    rejected[name] = (
                        f"incomplete upload: {state.covered_bytes} of {self.layout.nbytes} bytes arrived"
                    )
                elif not state.finite:
                    rejected[name] = "update contains NaN or Inf"
            standing = {n: math.sqrt(s.sq_norm) for n, s in self._silos.items() if n not in rejected}
            for name, norm in standing.items():
                others = [v for o, v in standing.items() if o != name]
                if not others:
                    continue
                median = statistics.median(others)
                if norm > norm_factor * median:
                    rejected[name] = (
                        f"delta norm {norm:.4g} exceeds {norm_factor:g} x the median {median:.4g} of the other silos"
                    )
            accepted = [n for n in self._silos if n not in rejected]
            n_samples = {n: s.n_samples for n, s in self._silos.items()}
            norms = {n: math.sqrt(s.sq_norm) for n, s in self._silos.items() if s.finite and s.covered}
            _check_quorum(accepted, rejected, min_silos)
            self._closed = True
            capped = _caps({n: self._silos[n] for n in accepted}, weight_factor)
            taken = {**{n: self._silos[n].weight for n in rejected},
                     **{n: self._silos[n].weight - w for n, w in capped.items()}}
            exact = self._subtractable(taken, sum(capped.get(n, self._silos[n].weight) for n in accepted))
            retracted = exact and all(self._retract(self._silos[name]) for name in rejected)
            reweighed = retracted and all(self._reweigh(self._silos[name], w) for name, w in capped.items())
            if not reweighed:
                for name, weight in capped.items():
                    self._silos[name].weight = weight
                self._rebuild(accepted, rejected)
                _check_quorum(accepted, rejected, min_silos)
            total = sum(self._silos[n].weight for n in accepted)
            weights = {n: self._silos[n].weight / total for n in accepted}
            with torch.no_grad():
                for spec in self.layout.specs:
                    # In place: the sum is spent once the round closes, and a temporary
                    # would double the aggregator's largest allocation.
                    into.views[spec.name].view(-1).copy_(self._sum[spec.name].div_(total))
            capped = {n: w for n, w in capped.items() if n in accepted}
            return RoundResult(tuple(accepted), rejected, weights, n_samples, norms, capped)

    # -- internals -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise AggregationError("this round is already finished; start a new RoundAggregate for the next round")

    def _check_range(self, silo: str, offset: int, length: int) -> None:
        nbytes = self.layout.nbytes
        if offset < 0 or length <= 0 or offset + length > nbytes:
            raise AggregationError(
                f"silo {silo!r} chunk [{offset}, {offset + length}) is outside the buffer [0, {nbytes})"
            )
        end = offset + length
        if offset % CHUNK_ALIGN or (end % CHUNK_ALIGN and end != nbytes):
            raise AggregationError(
                f"silo {silo!r} chunk [{offset}, {end}) does not start and end on multiples of "
                f"{CHUNK_ALIGN} bytes (or at the buffer end); use a chunk size that is a multiple of {CHUNK_ALIGN}"
            )

    def _pieces(self, raw: torch.Tensor, offset: int):
        """(spec, first element, values, global values) for every spec that the bytes `raw`,
        which sit at `offset` in the buffer, touch."""
        end = offset + raw.numel()
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        specs = self.layout.specs
        while i < len(specs) and specs[i].offset < end:
            spec = specs[i]
            lo = max(offset, spec.offset)
            hi = min(end, spec.offset + spec.nbytes)
            if lo < hi:
                size = spec.torch_dtype.itemsize
                if (lo - spec.offset) % size or (hi - spec.offset) % size:
                    raise AggregationError(
                        f"byte range [{offset}, {end}) splits an element of {spec.name!r}; "
                        f"chunk boundaries must be multiples of {CHUNK_ALIGN} bytes"
                    )
                first = (lo - spec.offset) // size
                count = (hi - lo) // size
                x = raw[lo - offset : hi - offset].view(spec.torch_dtype)
                g = self.global_state.views[spec.name].view(-1)[first : first + count]
                yield spec, first, x, g
            i += 1

    def _again(self, state: _Silo) -> Iterator[tuple[int, torch.Tensor]]:
        """The chunks `state` folded, read again from its buffer or streamed by its source
        (then in any order, perhaps with chunks it never added, perhaps ending early)."""
        if state.source is None:
            assert state.update is not None
            yield from ((start, state.update.buffer[start:end]) for start, end in state.summed)
            return
        stream = state.source()
        if stream is None:
            state.unfetchable = True
            return
        try:
            for start, data in stream:
                if data.dtype != torch.uint8 or data.dim() != 1:
                    state.unfetchable = True
                    return
                yield start, data
        finally:
            getattr(stream, "close", lambda: None)()  # the source's transfer is told to stop

    def _subtractable(self, taken: dict[str, int], kept: int) -> bool:
        """Whether subtracting `taken` weight of each silo's chunks again keeps the mean of the
        `kept` weight exact to SUBTRACT_ULPS (`core.rules.subtractable`); else the sum is rebuilt."""
        taken = {n: w for n, w in taken.items() if w and self._silos[n].summed}
        if not taken:
            return True
        scale = max(float(v.abs().max()) if v.numel() else 0.0 for v in self.global_state.views.values())
        eps = torch.finfo(next(iter(self._sum.values())).dtype).eps / 2  # finfo's eps is 2 units of roundoff
        return all(subtractable(w, scale + self._silos[n].largest, kept, scale, eps) for n, w in taken.items())

    def _retract(self, state: _Silo) -> bool:
        """Subtract what `state` added, chunk by chunk; False if its bytes are gone or changed.

        On False the sum is left half-retracted: the caller rebuilds it from scratch.
        """
        return self._readd(state, -1)

    def _reweigh(self, state: _Silo, weight: int) -> bool:
        """Change what `state`'s chunks were added with to `weight`; False if its bytes are gone or changed.

        On False the sum is left half-changed: the caller rebuilds it with the new weight.
        """
        if not self._readd(state, 1, weight - state.weight):
            return False
        state.weight = weight
        return True

    def _rebuild(self, accepted: list[str], rejected: dict[str, str]) -> None:
        """Recompute the sum from the accepted silos' buffers, rejecting any whose bytes changed.

        Only needed when a rejected silo rewrote its buffer after its chunks were folded, so
        subtracting it again would subtract the wrong values. Restarts after each newly found
        rewrite, so at most one pass per silo.
        """
        while True:
            for tensor in self._sum.values():
                tensor.zero_()
            changed = next((name for name in accepted if not self._readd(self._silos[name], 1)), None)
            if changed is None:
                return
            rejected[changed] = _GONE if self._silos[changed].unfetchable else _REWRITTEN
            accepted.remove(changed)

    def _readd(self, state: _Silo, sign: int, weight: int | None = None) -> bool:
        """Add `state`'s folded chunks again, times `sign` and its weight (or `weight`);
        False at the first chunk whose bytes changed, or when some never came back."""
        factor = sign * (state.weight if weight is None else weight)
        if not state.summed:
            return True  # nothing was added (its first chunk was not finite): nothing to read again
        seen: set[tuple[int, int]] = set()
        stream = self._again(state)
        try:
            for start, data in stream:
                key = (start, start + data.numel())
                folded = state.summed.get(key)
                if folded is None or key in seen:  # a chunk it never added (after a NaN), or a repeat
                    continue
                raw = self._scratch.copy(data)
                if digest(raw) != folded:
                    return False
                self._add(raw, start, factor)
                seen.add(key)
        finally:
            stream.close()  # and with it the source's stream, not left waiting
        if len(seen) != len(state.summed):
            state.unfetchable = True
            return False
        if sign < 0:
            state.summed.clear()
        return True

    def _add(self, raw: torch.Tensor, offset: int, weight: int) -> None:
        # x is upcast element by element inside add_: weight * x is exact in float64.
        for spec, first, x, _ in self._pieces(raw, offset):
            self._sum[spec.name][first : first + x.numel()].add_(x, alpha=weight)


def _caps(standing: dict[str, _Silo], weight_factor: float) -> dict[str, int]:
    """The silos whose claimed weight exceeds `weight_factor` times the median of the others',
    with the weight each counts with instead (never below 1, never above its claim)."""
    caps: dict[str, int] = {}
    for name, state in standing.items():
        others = [s.weight for o, s in standing.items() if o != name]
        if state.agreed or not others:
            continue
        cap = max(1, math.floor(weight_factor * statistics.median(others)))
        if state.weight > cap:
            caps[name] = cap
    return caps


def _check_quorum(accepted: list[str], rejected: dict[str, str], min_silos: int) -> None:
    if len(accepted) < min_silos:
        detail = "; ".join(f"{n}: {r}" for n, r in rejected.items()) or "no silo took part"
        raise NotEnoughSilos(
            f"only {len(accepted)} silo(s) accepted, min_silos is {min_silos} ({detail}); "
            "the global state was left unchanged: run the round again or lower min_silos"
        )


_REWRITTEN = "update bytes changed after they were verified and folded"
_GONE = "its update could not be fetched again when the sum had to be rebuilt"


def _numel(spec: TensorSpec) -> int:
    return spec.nbytes // spec.torch_dtype.itemsize
