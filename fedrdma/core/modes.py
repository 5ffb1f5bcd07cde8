"""The words for how a transfer moves: one `Mode`, `Role` and `Wire` for config, wire, CLI and bench.

A mode names how the bytes of one transfer travel between two peers; its properties say
what the mode needs (an agent, a pool registered once) and which side posts the one-sided
operations. Everything else that branches on a mode asks these properties instead of
comparing strings, so a new mode is one new member here and one new mover.
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    """The two sides of a transfer: who holds the bytes, and who ends up holding them."""

    SENDER = "sender"
    RECEIVER = "receiver"

    @property
    def other(self) -> Role:
        return Role.RECEIVER if self is Role.SENDER else Role.SENDER


class Mode(enum.StrEnum):
    GRPC = "grpc"
    """The baseline, as FATE and Flower move a model: serialize, stream, join, deserialize."""
    RDMA = "rdma"
    """FedRDMA: chunked one-sided WRITEs through staging buffers registered per transfer."""
    RDMA_E = "rdma-e"
    """FedRDMA-E push: the holder WRITEs each chunk into the receiver's pool, in place."""
    RDMA_E_PULL = "rdma-e-pull"
    """FedRDMA-E pull ("reversed receiving"): the receiver READs each chunk from the holder's pool."""
    TCP_E = "tcp-e"
    """FedRDMA-E over TCP: the receiver's own code places each sealed chunk in its pool, in place."""

    @property
    def one_sided(self) -> bool:
        """Moves bytes with NIXL one-sided operations, so it needs an agent on both sides.

        Over UCX's software transports (TCP, shared memory) a one-sided peer can reach the
        whole process, so these modes there need an operator's `trusted_fabric`.
        """
        return self in (Mode.RDMA, Mode.RDMA_E, Mode.RDMA_E_PULL)

    @property
    def registers_pool(self) -> bool:
        """Registers the state with NIXL once per peer and reuses it for every transfer."""
        return self in (Mode.RDMA_E, Mode.RDMA_E_PULL)

    @property
    def in_place(self) -> bool:
        """Chunks land at their final offsets in the receiver's state: no staging, no reassembly."""
        return self in (Mode.RDMA_E, Mode.RDMA_E_PULL, Mode.TCP_E)

    @property
    def receiver_places(self) -> bool:
        """The receiver decides where each chunk lands (its own code places it, its own READ
        fetches it, or it grants the slot a WRITE lands in), so chunks can land in a few reused
        slots: a bounded inbox. Staged `rdma` registers per transfer and gRPC joins whole."""
        return self in (Mode.TCP_E, Mode.RDMA_E_PULL, Mode.RDMA_E)

    @property
    def registers_slots(self) -> bool:
        """A bounded inbox's shared slots are registered with NIXL, because this mode's READs land
        in them. A push lands in landing slots of its own, granted per chunk, and tcp-e's own code
        places each chunk, so neither exposes the slots every silo shares to a NIXL peer."""
        return self.receiver_places and self.one_sided and self.initiator is Role.RECEIVER

    @property
    def seals(self) -> bool:
        """Encrypts and authenticates every chunk on the wire, whatever the fabric."""
        return self is Mode.TCP_E

    @property
    def initiator(self) -> Role:
        """The side that posts the operations (and runs the chunk scheduler)."""
        return Role.RECEIVER if self is Mode.RDMA_E_PULL else Role.SENDER

    @property
    def broadcast(self) -> Mode:
        """The mode of the aggregator's broadcast in a federation that uploads with this one.

        The aggregator holds the global state and always initiates the broadcast: a pull
        federation broadcasts by push, so a silo never holds a key to aggregator memory.
        """
        return Mode.RDMA_E if self is Mode.RDMA_E_PULL else self

    @classmethod
    def parse_list(cls, text: str) -> list[Mode]:
        """`"grpc,rdma-e"` as modes; a ValueError names the unknown ones and the choices."""
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in cls._value2member_map_]
        if not names or unknown:
            raise ValueError(f"unknown mode(s) {', '.join(unknown) or '(none)'}; choose from {choices()}")
        return [cls(name) for name in names]


def choices() -> str:
    """Every mode's name, as help texts and errors list them."""
    return ", ".join(mode.value for mode in Mode)


class Wire(enum.StrEnum):
    """A federation's wire format, what each value of an update travels as (`core.formats`):
    one word in config, CLI, JSON and docs. Here rather than there, so settings need no torch."""

    FP32 = "fp32"
    BF16 = "bf16"
    INT8 = "int8"

    @property
    def compressed(self) -> bool:
        """Travels deltas through a `Codec`; fp32 travels the state's own bytes."""
        return self is not Wire.FP32
