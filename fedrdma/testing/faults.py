"""Agents and data ports with faults: what a lossy wire, a cut endpoint or a lying peer does.

`FaultyAgent` is the production `Agent` with a few calls wrapped; the session and its
movers run unchanged on top of it, so the faults reach them exactly as real ones would:
bytes that land wrong, an endpoint that disappears, a pool advertised smaller than it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedrdma.core.chunks import Region
from fedrdma.core.errors import ProtocolError
from fedrdma.transport import wire
from fedrdma.transport.agent import Agent, Operation, Pool, Staging
from fedrdma.transport.streams import DataListener


@dataclass(frozen=True)
class Faults:
    """Faults to inject; all off by default."""

    corrupt_once: frozenset[int] = frozenset()
    """Chunk indices whose landed bytes are flipped once before their first verification."""
    cut_after: int | None = None
    """Initiator: tear down the endpoint to the peer once this many operations completed."""
    advertise_bytes: int | None = None
    """Target: advertise a pool of this many bytes instead of its real length."""
    slots: bool = False
    """A bounded inbox: a pull's READs land in its slots, a push's WRITEs in granted landing
    slots, so a flip lands in the slot the chunk landed in."""


class FaultyAgent(Agent):
    """An agent that corrupts landed chunks, cuts its endpoint, or understates its pool."""

    def __init__(self, faults: Faults, chunk_size: int, name: str | None = None) -> None:
        super().__init__(name)
        self.faults = faults
        self.chunk_size = chunk_size
        self._pool: Pool | None = None
        self._staging: Staging | None = None
        self._peer = ""
        self._flipped: set[int] = set()
        self._completed = 0
        self._cut = False

    # -- a target's faults ---------------------------------------------------------------
    def register(self, buffer: torch.Tensor) -> Pool:
        pool = super().register(buffer)
        if self.faults.advertise_bytes is not None:
            pool.region = Region(pool.region.address, self.faults.advertise_bytes)
        self._pool = pool
        return pool

    def stage(self, tensors: Sequence[torch.Tensor]) -> Staging:
        self._staging = super().stage(tensors)
        return self._staging

    def notifications(self, peer: str) -> list[bytes]:
        """A push target learns of a landed chunk here: flip its bytes before they are hashed."""
        notes = super().notifications(peer)
        for note in notes:
            try:
                notice = wire.parse_notice(note)
            except ProtocolError:
                continue
            self._corrupt(notice.index, notice.slot)  # a push into slots names where it landed
        return notes

    # -- an initiator's faults -------------------------------------------------------------
    def add_peer(self, metadata: bytes) -> str:
        self._peer = super().add_peer(metadata)
        return self._peer

    def post(self, op: str, local: object, remote: object, index: int, notif: bytes,
             place: int | None = None, far: int | None = None) -> Operation:
        return _Watched(self, super().post(op, local, remote, index, notif, place, far), op)

    def completed(self, op: str, index: int, place: int) -> None:
        self._completed += 1
        if op == "READ":  # a pull's bytes land in our own pool (or a slot of it) when our READ completes
            self._corrupt(index, place)
        if self.faults.cut_after is not None and not self._cut and self._completed >= self.faults.cut_after:
            self._cut = True
            self.remove_peer(self._peer)  # the fault: our endpoint to the peer is gone

    def _corrupt(self, index: int, place: int | None = None) -> None:
        if index not in self.faults.corrupt_once or index in self._flipped:
            return
        self._flipped.add(index)
        if self._staging is not None:
            self._staging.tensors[index][0] ^= 0xFF
        elif self._pool is not None:
            at = index  # a chunk's own offset, or its slot's (entries repeat the slots per chunk length)
            if self.faults.slots and place is not None:
                at = place % (self._pool.region.length // self.chunk_size)
            self._pool.buffer[at * self.chunk_size] ^= 0xFF


class _Watched:
    """An operation whose completion the faulty agent hears of."""

    def __init__(self, agent: FaultyAgent, operation: Operation, op: str) -> None:
        self._agent = agent
        self._operation = operation
        self._op = op
        self._seen = False
        self.index = operation.index
        self.place = operation.place

    @property
    def error(self) -> str:
        return self._operation.error

    def state(self) -> str:
        state = self._operation.state()
        if state == "DONE" and not self._seen:
            self._seen = True
            self._agent.completed(self._op, self.index, self.place)
        return state

    def release(self) -> bool:
        return self._operation.release()


class _FaultySocket:
    """A data connection that flips one byte of what it receives, or dies, after so many bytes."""

    def __init__(self, sock, flip_after: int | None, cut_after: int | None) -> None:  # type: ignore[no-untyped-def]
        self._sock = sock
        self._flip_after = flip_after
        self._cut_after = cut_after
        self._received = 0

    def recv_into(self, view: memoryview, nbytes: int = 0) -> int:
        if self._cut_after is not None and self._received >= self._cut_after:
            self._cut_after = None
            self._sock.shutdown(2)  # the line goes down: both directions, at once
            return 0
        n = self._sock.recv_into(view, nbytes) if nbytes else self._sock.recv_into(view)
        if self._flip_after is not None and self._received <= self._flip_after < self._received + n:
            view[self._flip_after - self._received] ^= 0xFF
            self._flip_after = None  # once: a resent chunk arrives intact
        self._received += n
        return n

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._sock, name)


class FaultyStreams(DataListener):
    """A tcp-e data port whose first connection corrupts or cuts what it receives."""

    def __init__(self, flip_after: int | None = None, cut_after: int | None = None) -> None:
        super().__init__()
        self._faults: tuple[int | None, int | None] | None = (flip_after, cut_after)

    def admit(self, sock):  # type: ignore[no-untyped-def]
        if self._faults is None:
            return sock
        flip, cut = self._faults
        self._faults = None
        return _FaultySocket(sock, flip, cut)
