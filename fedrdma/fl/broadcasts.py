"""What the silos hold, and what each round's broadcast sends them.

With fp32 the broadcast is the global itself. With a compressed wire format the silos hold
`held`, the global as the encoded broadcasts have brought it (`Codec.advance`): each round
sends the delta from the last `held` to the new global, a quarter or a half of the bytes,
and moves `held` by what that delta decodes to, as every silo does. A silo that does not
hold the last `held` (a new join, a missed round) gets `held` whole, in fp32, so after any
broadcast all silos hold the same bytes, and silos train from it; the rounding it leaves
against the global is carried by the next round's delta, never lost.

Memory: `held` (one state) and the encoded delta, next to the aggregator's globals.
"""

from __future__ import annotations

import torch

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

    def whole(self, glob: FlatState) -> FlatState:
        """What a whole (fp32) broadcast sends: `held`, or the global itself with fp32."""
        return self.held if self.held is not None else glob

    def advance(self, glob: FlatState, rnd: int) -> int:
        """Round `rnd`'s broadcast is ready: the round whose `held` a silo must hold to get the
        delta (0: no delta this round, every silo gets `held` whole)."""
        if self.codec is None or self.held is None or self.delta is None:
            return 0
        previous, self.round = self.round, rnd
        target = glob.buffer.view(torch.float32)
        if not previous:
            self.held.buffer.copy_(glob.buffer)
        else:
            self.codec.advance(target, self.held.buffer.view(torch.float32), self.delta.buffer)
            self.delta.touch()
        self.held.touch()
        return previous
