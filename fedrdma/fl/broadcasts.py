"""What the silos hold, and what each round's broadcast sends them.

With fp32 the broadcast is the global itself. With a compressed wire format the silos hold
`held`, the global as the encoded broadcasts have brought it (`Codec.advance`): each round
sends the delta from the last `held` to the new global, a quarter or a half of the bytes,
and moves `held` by what that delta decodes to, as every silo does. A silo that does not
hold the last `held` (a new join, a missed round) gets `held` whole, in fp32, so after any
broadcast all silos hold the same bytes, and silos train from it; the rounding it leaves
against the global is carried by the next round's delta, never lost. With
`first_broadcast = "unless-held"` a silo whose state, as it joined, has the digest of what a
whole broadcast sends (a fresh run's silos build the same initial model) is sent nothing.

Memory: `held` (one state) and the encoded delta, next to the aggregator's globals.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedrdma.core.chunks import state_digest
from fedrdma.core.formats import Codec
from fedrdma.core.layout import FlatState
from fedrdma.core.modes import Wire


class Broadcasts:
    """The aggregator's side: the state a whole broadcast sends, and the delta's buffer."""

    def __init__(self, wire: Wire, state: FlatState) -> None:
        self.codec = Codec.of(wire, state.layout) if wire.compressed else None
        self.held = FlatState.allocate(state.layout) if self.codec else None
        """What every silo that took the last broadcast holds (None with fp32: the global)."""
        self.delta = FlatState.allocate(self.codec.encoded_layout) if self.codec else None
        """The round's encoded delta from the previous `held`, which every delta broadcast sends."""
        self.round = 0
        """The round whose broadcast `held` is (0: none yet)."""
        self.since = 0
        """This round: the round a silo must hold the broadcast of to get the delta (0: none)."""
        self.digest = ""
        """This round: the digest of what a whole broadcast sends, when a silo may skip it."""

    def whole(self, glob: FlatState) -> FlatState:
        """What a whole (fp32) broadcast sends: `held`, or the global itself with fp32."""
        return self.held if self.held is not None else glob

    def offer_skip(self, glob: FlatState, on: bool) -> None:
        """With `on`, this round a silo that joined holding what a whole broadcast sends (by its
        join's digest) is not sent it: the digest is taken (a pass over the state)."""
        self.digest = state_digest(self.whole(glob).memoryview()) if on else ""

    def kind(self, holds: int, joined: str) -> Literal["whole", "delta", "skip"]:
        """How this round's broadcast reaches a silo that took round `holds`'s last (0: none in
        this join), and whose state had digest `joined` when it joined."""
        if self.since and holds == self.since:
            return "delta"
        if not holds and joined and joined == self.digest:
            return "skip"
        return "whole"

    def advance(self, glob: FlatState, rnd: int) -> None:
        """Make round `rnd`'s broadcast from the new global `glob`."""
        if self.codec is None or self.held is None or self.delta is None:
            return
        previous, self.round = self.round, rnd
        target = glob.buffer.view(torch.float32)
        if not previous:
            self.held.buffer.copy_(glob.buffer)
        else:
            self.codec.advance(target, self.held.buffer.view(torch.float32), self.delta.buffer)
            self.delta.touch()
        self.held.touch()
        self.since = previous
