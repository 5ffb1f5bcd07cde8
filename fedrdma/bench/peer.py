"""One side of a transfer, as its own OS process: `python -m fedrdma.bench.peer ...`.

The transfer benchmark and the fault tests start two of these (on loopback or in two
network namespaces) and read the JSON lines each prints: one `ready` line with the port
it listens on, one `transfer` line per transfer, and an `error` line on failure. Real
processes, real sockets, real NIXL: nothing is shared but the network.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from fedrdma.bench.states import gpt2_layout, make_state, synthetic_layout
from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW, Region, state_digest
from fedrdma.core.errors import FedRDMAError
from fedrdma.core.layout import FlatState
from fedrdma.core.modes import Mode, Role
from fedrdma.core.scheduler import RetryPolicy
from fedrdma.memory import pin_mmap_threshold
from fedrdma.metrics import Meter
from fedrdma.transport import wire
from fedrdma.transport.agent import Agent
from fedrdma.transport.channel import Channel, Listener, dial
from fedrdma.transport.session import PEER_TIMEOUT_S, Faults, Session, recv_progressing

RAW_MODES = ("raw-write", "raw-read")
"""References: the whole state in one NIXL operation, no chunks, no checks."""

SENDER_SEED = 1234
"""Values the sender fills its state with; the receiver starts from zeros."""

RAW_DEADLINE_S = 600.0
"""Longest a raw reference operation may take before the benchmark calls it hung."""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def build_state(args: argparse.Namespace) -> FlatState:
    layout = gpt2_layout(args.model, args.lora) if args.model else synthetic_layout(args.size_bytes)
    seed = SENDER_SEED if args.role == "sender" else None
    if args.layout_skew:
        layout = synthetic_layout(layout.nbytes + args.layout_skew)
    return make_state(layout, seed)


def raw_reference(args: argparse.Namespace, agent: Agent, state: FlatState, channel: Channel) -> None:
    """One NIXL operation over the whole buffer: what chunked modes are measured against."""
    op = "WRITE" if args.mode == "raw-write" else "READ"
    initiator = (args.role == "sender") == (op == "WRITE")
    pool = agent.register(state.buffer)
    if not initiator:
        channel.send(
            wire.Hello(
                mode="rdma-e", layout_id=state.layout_id, nbytes=state.nbytes,
                metadata=wire.b64(agent.metadata()), region=wire.RegionMsg.of(pool.region),
            )
        )
    else:
        hello = recv_progressing(channel, agent, PEER_TIMEOUT_S)
        assert isinstance(hello, wire.Hello) and hello.region is not None
        peer = agent.add_peer(wire.unb64(hello.metadata))
        remote = Region(hello.region.address, hello.region.length).slice(0, state.nbytes)
    for _ in range(args.transfers):
        with Meter() as meter:
            if initiator:
                local = agent.nixl.get_xfer_descs([(pool.region.address, state.nbytes, 0)], "DRAM")
                far = agent.nixl.get_xfer_descs([(remote[0], remote[1], 0)], "DRAM")
                handle = agent.nixl.initialize_xfer(op, local, far, peer)
                status = agent.nixl.transfer(handle)
                deadline = time.monotonic() + RAW_DEADLINE_S
                while status == "PROC" and time.monotonic() < deadline:
                    time.sleep(50e-6)
                    status = agent.nixl.check_xfer_state(handle)
                agent.nixl.release_xfer_handle(handle)
                if status != "DONE":
                    raise FedRDMAError(f"raw {op} ended in state {status}")
                channel.send(wire.Status(transfer=0, complete=True))
            else:
                msg = recv_progressing(channel, agent, RAW_DEADLINE_S)  # our worker serves the peer
                assert isinstance(msg, wire.Status)
        report(args, state, meter, {"seconds": meter.span.seconds})
    pool.close()


def parse_cells(text: str) -> list[tuple[int, int]]:
    """`4194304:8,1048576:32` -> [(chunk size, window), ...]; empty text, no sweep."""
    cells = []
    for item in filter(None, text.split(",")):
        chunk, _, window = item.partition(":")
        cells.append((int(chunk), int(window)))
    return cells


def format_cells(cells: list[tuple[int, int]]) -> str:
    return ",".join(f"{chunk}:{window}" for chunk, window in cells)


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedrdma.bench.peer")
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
    p.add_argument("--corrupt-once", default="", help="comma list of chunk indices to corrupt once (test fault)")
    p.add_argument("--cut-after", type=int, default=None, help="tear down the endpoint after N chunks (test fault)")
    p.add_argument("--advertise-bytes", type=int, default=None, help="advertise a pool of N bytes (test fault)")
    p.add_argument("--layout-skew", type=int, default=0, help="add bytes to the layout (test fault)")
    args = p.parse_args(argv)
    if bool(args.listen) == bool(args.connect):
        p.error("give exactly one of --listen and --connect")
    if args.mode in RAW_MODES or Mode(args.mode).one_sided:  # as in the runtime; see fedrdma.memory
        pin_mmap_threshold()
    listener = None
    session: Session | None = None
    agent: Agent | None = None
    state: FlatState | None = None
    try:
        state = build_state(args)
        agent = Agent() if args.mode in RAW_MODES or Mode(args.mode).one_sided else None
        if args.listen:
            listener = Listener(args.listen)
            emit("ready", port=listener.port, pid=os.getpid())
            channel = listener.accept(timeout=args.peer_timeout * 6)
        else:
            channel = dial(args.connect)
            emit("ready", port=0, pid=os.getpid())
        if args.mode in RAW_MODES:
            assert agent is not None
            raw_reference(args, agent, state, channel)
            channel.close()
            return 0
        faults = Faults(
            corrupt_once=frozenset(int(i) for i in args.corrupt_once.split(",") if i),
            cut_after=args.cut_after,
            advertise_bytes=args.advertise_bytes,
        )
        session = Session(
            agent, state, channel, args.mode, args.role, args.chunk_size, args.window,
            policy=RetryPolicy(chunk_timeout_s=args.chunk_timeout), faults=faults, peer_timeout=args.peer_timeout,
        )
        session.open()
        pools = agent.registered_pools if agent else 0
        for chunk_size, window in parse_cells(args.cells) or [(args.chunk_size, args.window)]:
            if args.cells and args.role == "sender":
                session.retune(chunk_size, window)
            for _ in range(args.transfers):
                with Meter() as meter:
                    stats = session.send() if args.role == "sender" else session.receive()
                report(
                    args, state, meter,
                    {
                        "seconds": stats.seconds, "nbytes": stats.nbytes, "bytes_posted": stats.bytes_posted,
                        "reconnects": stats.reconnects, "corrupt": stats.corrupt, "extra": stats.extra,
                        "registered_pools": agent.registered_pools if agent else 0,
                        "chunk_size": session.plan.chunk_size, "window": window,
                    },
                )
        session.close()
        emit("closed", registered_pools_before=pools, registered_pools=agent.registered_pools if agent else 0)
        return 0
    except (FedRDMAError, ValueError, TimeoutError) as exc:
        if session is not None:
            session.abort()
        emit(
            "error", type=type(exc).__name__, message=str(exc),
            registered_pools=agent.registered_pools if agent else 0,
            digest=state_digest(state.memoryview()) if state is not None else "",
        )
        return 1
    finally:
        if listener is not None:
            listener.close()


if __name__ == "__main__":
    sys.exit(main())
