"""Which landing slots a pushing peer may WRITE: the receiver's half of a push into a bounded inbox.

A push's sender posts its WRITEs itself, so a receiver with a bounded inbox cannot choose
where each chunk lands the way a pull's READ or tcp-e's own reader does. It grants slots
instead: the sender may WRITE one chunk into each slot granted to it, and the chunk's notice
names the slot. The receiver takes bytes only from a slot it granted in the current
connection, so a late WRITE of an older connection, or a peer that names a slot it was not
given, never makes it read a slot whose chunk is being copied out.

In the manner of `core.receiver`: the transport calls these methods and sends the grants
that come out; nothing here touches a socket or NIXL.

A slot is free (the receiver's), granted (the sender may WRITE it once) or held (a chunk
landed in it and the receiver has not copied it out yet).
"""

from __future__ import annotations

import enum

from fedrdma.core.errors import ProtocolError


class _Use(enum.Enum):
    FREE = "free"
    GRANTED = "granted"
    HELD = "held"


class Grants:
    """The landing slots of one push receiver, `count` of them, for one connection at a time."""

    def __init__(self, count: int, generation: int = 0) -> None:
        if count < 1:
            raise ValueError(f"a push into slots needs at least one landing slot, not {count}")
        self.count = count
        self.generation = generation
        self._use = [_Use.FREE] * count

    @property
    def held(self) -> int:
        return sum(use is _Use.HELD for use in self._use)

    @property
    def granted(self) -> int:
        return sum(use is _Use.GRANTED for use in self._use)

    def grant(self) -> list[int]:
        """Every free slot, granted from now on: what the next grant message hands the sender."""
        fresh = [slot for slot, use in enumerate(self._use) if use is _Use.FREE]
        for slot in fresh:
            self._use[slot] = _Use.GRANTED
        return fresh

    def claim(self, generation: int, slot: int) -> bool:
        """A notice says a chunk landed in `slot` in connection `generation`.

        True: the slot was granted in this connection and is held until `release`. False: a
        late notice of an older connection, whose slot may be granted again: leave it alone.
        A slot outside the area, one not granted, or a connection not yet begun is the
        peer breaking the protocol (ProtocolError).
        """
        if generation < self.generation:
            return False
        if generation > self.generation:
            raise ProtocolError(f"the peer's notice names connection {generation}; this side is at {self.generation}")
        if not 0 <= slot < self.count:
            raise ProtocolError(f"the peer named landing slot {slot}, outside the {self.count} it was granted")
        if self._use[slot] is not _Use.GRANTED:
            raise ProtocolError(f"the peer wrote landing slot {slot}, which is not granted to it now "
                                f"({self._use[slot].value})")
        self._use[slot] = _Use.HELD
        return True

    def release(self, slot: int) -> None:
        """The chunk in `slot` was copied out (or dropped): the slot is the receiver's again."""
        if self._use[slot] is not _Use.HELD:
            raise ValueError(f"landing slot {slot} is {self._use[slot].value}, not held")
        self._use[slot] = _Use.FREE

    def reconnected(self, generation: int) -> None:
        """The sender resumed as `generation`: what the old connection was granted is void.

        Held slots stay held until released: the transport drops their chunks (unverified
        landings of a broken connection may be torn) and releases them.
        """
        if generation <= self.generation:
            return
        self.generation = generation
        self._use = [_Use.FREE if use is _Use.GRANTED else use for use in self._use]
