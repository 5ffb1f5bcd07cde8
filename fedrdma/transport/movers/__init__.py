"""One mover per mode. A new mode is one module here plus its line in `MOVERS`."""

from __future__ import annotations

from fedrdma.core.modes import Mode
from fedrdma.transport.movers.base import Context, Mover, Offered
from fedrdma.transport.movers.grpc import GrpcMover
from fedrdma.transport.movers.pull import PullMover
from fedrdma.transport.movers.push import PushMover
from fedrdma.transport.movers.staged import StagedMover
from fedrdma.transport.movers.tcpe import TcpMover

MOVERS: dict[Mode, type[Mover]] = {
    Mode.GRPC: GrpcMover,
    Mode.RDMA: StagedMover,
    Mode.RDMA_E: PushMover,
    Mode.RDMA_E_PULL: PullMover,
    Mode.TCP_E: TcpMover,
}


def mover_for(ctx: Context) -> Mover:
    return MOVERS[ctx.mode](ctx)


__all__ = ["MOVERS", "Context", "Mover", "Offered", "mover_for"]
