"""One side of a transfer, as its own OS process: `python -m fedrdma.bench.peer ...`.

The transfer benchmark and the fault tests start two of these (on loopback or in two
network namespaces) and read the JSON lines each prints: one `ready` line with the port
it listens on, one `transfer` line per transfer, and an `error` line on failure. Real
processes, real sockets, real NIXL: nothing is shared but the network.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch

from fedrdma.bench.certs import DIALER, LISTENER
from fedrdma.bench.procs import RAW_MODES
from fedrdma.bench.states import gpt2_layout, make_state, synthetic_layout
from fedrdma.config import Inbox, Verify
from fedrdma.core.addresses import split_host_port
from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, Region, state_digest
from fedrdma.core.errors import FedRDMAError, ProtocolError, TransferError
from fedrdma.core.formats import Codec, EncodedState
from fedrdma.core.layout import FlatState
from fedrdma.core.liveness import PEER_TIMEOUT_S
from fedrdma.core.modes import Mode, Role, Wire
from fedrdma.core.scheduler import RetryPolicy
from fedrdma.memory import pin_mmap_threshold
from fedrdma.metrics import Meter
from fedrdma.transport import fabric, wire
from fedrdma.transport.agent import Agent
from fedrdma.transport.channel import Channel, Listener, dial
from fedrdma.transport.pacing import Pacer, recv_serving
from fedrdma.transport.session import Session
from fedrdma.transport.slots import SlotPool, Slots, receiver_share
from fedrdma.transport.streams import DEFAULT_STREAMS, DataListener
from fedrdma.transport.tls import Credentials

SENDER_SEED = 1234
"""Values the sender fills its state with; the receiver starts from zeros."""

RAW_DEADLINE_S = 600.0
"""Longest a raw reference operation may take before the benchmark calls it hung."""

RAW_POLL_S = 50e-6
"""The raw initiator's pause between polls: short, so the reference is the ceiling."""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def build_state(args: argparse.Namespace) -> FlatState:
    layout = gpt2_layout(args.model, args.lora) if args.model else synthetic_layout(args.size_bytes)
    return make_state(layout, SENDER_SEED if args.role == Role.SENDER else None)


def raw_reference(args: argparse.Namespace, agent: Agent, state: FlatState, channel: Channel) -> None:
    """One NIXL operation over the whole buffer: what chunked modes are measured against."""
    op = "WRITE" if args.mode == "raw-write" else "READ"
    initiator = (args.role == Role.SENDER) == (op == "WRITE")
    fabric.require_trust(Mode.RDMA_E, args.trusted_fabric, fabric.detect())  # one-sided, like the modes it rates
    pool = agent.register(state.buffer)
    if not initiator:
        channel.send(
            wire.Hello(
                mode=Mode.RDMA_E, layout_id=state.layout_id, nbytes=state.nbytes,
                metadata=wire.b64(agent.metadata()), region=wire.RegionMsg.of(pool.region),
            )
        )
    else:
        hello = recv_serving(channel, agent, PEER_TIMEOUT_S, Pacer())
        if not isinstance(hello, wire.Hello) or hello.region is None:
            raise ProtocolError(f"the raw reference's target sent {type(hello).__name__}, not a hello with its pool")
        peer = agent.add_peer(wire.unb64(hello.metadata))
        remote = Region(*hello.region.region().slice(0, state.nbytes))
    for _ in range(args.transfers):
        at_start_line(initiator, channel, agent)
        with Meter() as meter:
            if initiator:
                operation = agent.post_whole(op, pool.region, remote, peer)
                deadline = time.monotonic() + RAW_DEADLINE_S
                while (status := operation.state()) == "PROC" and time.monotonic() < deadline:
                    time.sleep(RAW_POLL_S)
                operation.release()
                if status != "DONE":
                    raise TransferError(f"raw {op} ended in state {status}: {operation.error}")
                channel.send(wire.Status(transfer=0, complete=True))
            else:
                msg = recv_serving(channel, agent, RAW_DEADLINE_S, Pacer())  # our worker serves the peer
                if not isinstance(msg, wire.Status):
                    raise ProtocolError(f"the raw reference's initiator sent {type(msg).__name__}, not its status")
        report(args, state, meter, {"seconds": meter.span.seconds})
    pool.close()


def at_start_line(starts: bool, channel: Channel, agent: Agent | None) -> None:
    """Both peers waiting before a timed transfer. Without it, the other side's bookkeeping of
    the transfer before (`report` digests the whole state: tens of ms for 512 MiB) ran on into
    this one's clock, so a mode was charged for the benchmark's own work.

    The side that starts the transfer (`starts`) asks and the other answers: the question goes
    out only once the starter's own transfer has returned, so none of its movers, which take
    every message that arrives while they run, can take the answer for theirs.
    """
    if starts:
        channel.send(wire.Status(transfer=0))
    msg = recv_serving(channel, agent, RAW_DEADLINE_S, Pacer())
    if not isinstance(msg, wire.Status):
        raise ProtocolError(f"the peer sent {type(msg).__name__} where it says it is ready for a transfer")
    if not starts:
        channel.send(wire.Status(transfer=0))


PAIRED_OPS = {Mode.RDMA_E: "WRITE", Mode.RDMA_E_PULL: "READ"}
"""The raw operation each pool mode is paired with: the same initiator, pools and endpoint."""


def paired_raw(session: Session, channel: Channel) -> float | None:
    """Right after a transfer, the same bytes in one raw NIXL operation between the same pools.

    The ceiling measured beside each transfer, by the same two processes over the same
    endpoint: a host whose speed drifts moves both alike, which a reference measured by
    another pair of processes, seconds apart, cannot promise. Returns the raw operation's
    seconds on the initiator, None on the target (which serves it).
    """
    op = PAIRED_OPS[session.mode]
    agent = session.ctx.agent
    assert agent is not None and session.ctx.pool is not None
    if session.role is not session.mode.initiator:
        msg = recv_serving(channel, agent, RAW_DEADLINE_S, Pacer())  # our worker serves the peer's operation
        if not isinstance(msg, wire.Status):
            raise ProtocolError(f"the paired reference's initiator sent {type(msg).__name__}, not its status")
        return None
    remote = session.mover.remote  # type: ignore[attr-defined]
    start = time.perf_counter()
    operation = agent.post_whole(op, session.ctx.pool.region, remote.regions[0], remote.name)
    deadline = time.monotonic() + RAW_DEADLINE_S
    while (status := operation.state()) == "PROC" and time.monotonic() < deadline:
        time.sleep(RAW_POLL_S)
    seconds = time.perf_counter() - start
    operation.release()
    if status != "DONE":
        raise TransferError(f"the paired raw {op} ended in state {status}: {operation.error}")
    channel.send(wire.Status(transfer=0, complete=True))
    return seconds


def parse_cells(text: str) -> list[tuple[int, int]]:
    """`4194304:8,1048576:32` -> [(chunk size, window), ...]; empty text, no sweep."""
    cells = []
    for item in filter(None, text.split(",")):
        chunk, _, window = item.partition(":")
        cells.append((int(chunk), int(window)))
    return cells


def format_cells(cells: list[tuple[int, int]]) -> str:
    return ",".join(f"{chunk}:{window}" for chunk, window in cells)


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def report(args: argparse.Namespace, state: FlatState, meter: Meter, fields: dict[str, Any]) -> None:
    span = meter.span
    emit(
        "transfer",
        role=args.role,
        cpu_seconds=span.cpu_seconds,
        rss_before=span.rss_before,
        extra_rss=span.extra_rss,
        pool_bytes=state.nbytes,
        digest=state_digest(state.memoryview()),
        **fields,
    )


def parser(prog: str = "python -m fedrdma.bench.peer") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--role", choices=tuple(Role), required=True)
    p.add_argument("--mode", choices=(*Mode, *RAW_MODES), required=True)
    p.add_argument("--listen", help="HOST:PORT to accept the peer on (port 0: any)")
    p.add_argument("--connect", help="HOST:PORT of the listening peer")
    p.add_argument("--size-bytes", type=int, default=64 << 20)
    p.add_argument("--model", default="")
    p.add_argument("--lora", action="store_true", help="with --model: move the LoRA adapters only")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    p.add_argument("--transfers", type=int, default=1)
    p.add_argument("--cells", default="",
                   help="sender: CHUNK:WINDOW,... settings to sweep, --transfers each, on one connection")
    p.add_argument("--peer-timeout", type=float, default=PEER_TIMEOUT_S)
    p.add_argument("--chunk-timeout", type=float, default=RetryPolicy().chunk_timeout_s)
    p.add_argument("--data-streams", type=int, default=DEFAULT_STREAMS, help="tcp-e: data connections per session")
    p.add_argument("--wire", choices=tuple(Wire), default=Wire.FP32, help="bf16, int8: move the state encoded, "
                   "encoding before each send and decoding after each receive (timed, reported as codec_seconds)")
    p.add_argument("--certs", type=Path, default=None, help="mutual TLS with the listener's or dialer's certificate "
                   "from this directory (`fedrdma.bench.certs`); plaintext without")
    p.add_argument("--trusted-fabric", action="store_true", help="one-sided modes over a fabric that does not "
                   "enforce keys: the benchmark's peers are its own processes")
    p.add_argument("--verify", choices=get_args(Verify), default="xxh3", help="fabric: the receiver takes landed "
                   "chunks as good without hashing them, to measure what xxh3 costs (the runtime allows it only on "
                   "InfiniBand or RoCE)")
    p.add_argument("--inbox", choices=get_args(Inbox), default="full", help="slots: the receiver lands chunks in "
                   "a few reused slots (a push in granted landing slots) and copies each verified chunk into its "
                   "state, as the aggregator folds one (tcp-e, rdma-e, rdma-e-pull)")
    p.add_argument("--paired", action="store_true", help="rdma-e and rdma-e-pull: after each transfer, the same "
                   "bytes in one raw NIXL operation between the same pools (paired_seconds)")
    return p


def inbox_slots(args: argparse.Namespace, agent: Agent | None, state: FlatState, chunk_size: int) -> Slots | None:
    """With --inbox slots, the receiver's bounded inbox: as many slots as the aggregator would
    give one silo, each verified chunk copied to its offset in `state` (so the digest still
    says whether the bytes arrived)."""
    mode = Mode(args.mode)
    if args.inbox != "slots" or args.role != Role.RECEIVER:
        return None
    if not mode.receiver_places or args.cells:
        raise SystemExit(f"--inbox slots needs tcp-e, rdma-e or rdma-e-pull and no --cells, not {mode}")

    def land(offset: int, data: torch.Tensor) -> None:
        state.buffer[offset : offset + data.numel()].copy_(data)

    count = receiver_share(mode.one_sided, args.window, args.data_streams)
    pool = SlotPool(count, min(chunk_size, state.nbytes))
    if mode.registers_slots:
        assert agent is not None
        pool.register(agent)  # a pull READs into them
    return pool.share(count, land)


def one_sided(mode: str) -> bool:
    return mode in RAW_MODES or Mode(mode).one_sided


def run(
    args: argparse.Namespace,
    make_agent: Callable[[], Agent] = Agent,
    build: Callable[[argparse.Namespace], FlatState] = build_state,
) -> int:
    """One peer's whole life; every failure ends in an `error` line, whatever raised it.

    `make_agent` and `build` are where `fedrdma.testing.peer` injects its faults.
    """
    if bool(args.listen) == bool(args.connect):
        raise SystemExit("give exactly one of --listen and --connect")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a benchmark that sees us hang asks where
    if one_sided(args.mode):  # as in the runtime; see fedrdma.memory
        pin_mmap_threshold()
    listener = None
    streams: DataListener | None = None
    session: Session | None = None
    agent: Agent | None = None
    state: FlatState | None = None
    try:
        state = build(args)
        agent = make_agent() if one_sided(args.mode) else None
        credentials = Credentials.load(args.certs, LISTENER if args.listen else DIALER) if args.certs else None
        if args.listen:
            listener = Listener(args.listen, credentials)
            emit("ready", port=listener.port, pid=os.getpid())
            channel = listener.accept(timeout=args.peer_timeout * 6)
        else:
            channel = dial(args.connect, credentials=credentials)
            emit("ready", port=0, pid=os.getpid())
        if args.mode in RAW_MODES:
            assert agent is not None
            raw_reference(args, agent, state, channel)
            channel.close()
            return 0
        if args.listen and Mode(args.mode) is Mode.TCP_E:
            streams = DataListener(split_host_port(args.listen)[0])
        # A federation's silo end of the codec on both sides; their references stay zeros, as
        # good as a global for timing: the codec's cost does not depend on the values.
        encoded = EncodedState(Codec.of(Wire(args.wire), state.layout), state) if Wire(args.wire).compressed else None
        if encoded and args.cells:
            raise SystemExit("--wire and --cells do not go together: a sweep tunes the plan of fp32 states")
        moved = encoded.encoded if encoded else state
        chunk_size = encoded.codec.chunk_size(args.chunk_size) if encoded else args.chunk_size
        session = Session(
            agent, moved, channel, args.mode, args.role, chunk_size, args.window,
            policy=RetryPolicy(chunk_timeout_s=args.chunk_timeout), peer_timeout=args.peer_timeout,
            streams=streams, data_streams=args.data_streams, trusted_fabric=args.trusted_fabric,
            follow_plan=bool(args.cells), verify=args.verify != fabric.VERIFY_FABRIC,
            slots=inbox_slots(args, agent, moved, chunk_size),
        )
        session.open()
        pools = agent.registered_pools if agent else 0
        for chunk_size, window in parse_cells(args.cells) or [(args.chunk_size, args.window)]:
            if args.cells and args.role == Role.SENDER:
                session.retune(chunk_size, window)
            for _ in range(args.transfers):
                at_start_line(args.role == Role.SENDER, channel, agent)
                with Meter() as meter:
                    codec = timed(encoded.encode) if encoded and args.role == Role.SENDER else 0.0
                    stats = session.send() if args.role == Role.SENDER else session.receive()
                    codec += timed(encoded.decode) if encoded and args.role == Role.RECEIVER else 0.0
                paired = paired_raw(session, channel) if args.paired else None
                report(
                    args, moved, meter,
                    {
                        "seconds": stats.seconds, "nbytes": stats.nbytes, "bytes_posted": stats.bytes_posted,
                        "reconnects": stats.reconnects, "corrupt": stats.corrupt, "extra": stats.extra,
                        "registered_pools": agent.registered_pools if agent else 0,
                        "chunk_size": session.plan.chunk_size, "window": window, "paired_seconds": paired,
                        "codec_seconds": codec,
                    },
                )
        session.close()
        emit("closed", registered_pools_before=pools, registered_pools=agent.registered_pools if agent else 0)
        return 0
    except Exception as exc:  # noqa: BLE001  (the benchmark must see every failure, not a silent exit)
        if session is not None:
            session.abort()
        expected = isinstance(exc, (FedRDMAError, ValueError, TimeoutError))
        emit(
            "error", type=type(exc).__name__, message=str(exc),
            traceback="" if expected else traceback.format_exc(limit=8),
            registered_pools=agent.registered_pools if agent else 0,
            digest=state_digest(state.memoryview()) if state is not None else "",
        )
        return 1
    finally:
        if listener is not None:
            listener.close()
        if streams is not None:
            streams.close()


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
