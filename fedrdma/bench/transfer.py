"""`fedrdma bench transfer`: move one state with each mode between two processes, in one run.

Every figure is a median over `repeat` transfers after one uncounted warm-up (memory on
these VMs is slow on first touch), and every speed claim is read as a ratio against the
raw NIXL references measured in the same run. Interleaved, each mode's transfers are
spread over the run (a fresh pair per repetition, modes taking turns), so a host that
drifts mid-run moves every mode alike rather than whichever mode ran last.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrdma.bench.certs import bench_certs
from fedrdma.bench.procs import RAW_MODES, PeerProcess, start_pair
from fedrdma.bench.records import ModeSummary, TransferResult
from fedrdma.bench.wan import ON_LOOPBACK, Placement
from fedrdma.core.chunks import DEFAULT_CHUNK_SIZE, DEFAULT_WINDOW
from fedrdma.core.errors import RunError
from fedrdma.core.modes import Mode, Wire
from fedrdma.transport.streams import DEFAULT_STREAMS

DEFAULT_REPEAT = 3
"""Counted transfers per mode: enough for a median on a noisy 2-core VM."""

WARMUP = 1
"""Uncounted first transfers per mode: memory on these VMs is slow on first touch (see the README)."""

LOOPBACK_TLS = "tcp"
"""On loopback UCX would pick shared memory; tcp makes the benchmark measure a network path."""

TRANSFER_TIMEOUT_S = 600.0
"""Longest one transfer may take before the benchmark calls the run hung."""

FINISH_TIMEOUT_S = 60.0
"""How long a peer may take to say goodbye and exit after its last transfer."""

GATHER_POLL_S = 0.05
"""How often the benchmark looks at its peers' output: often against a transfer, rare for the CPU."""

REFERENCES = {"reference": "raw-write", "reference_read": "raw-read"}

PAIRED_MODES = (Mode.RDMA_E, Mode.RDMA_E_PULL)
"""Modes whose peers also time a raw NIXL operation after each transfer (`peer.paired_raw`)."""


@dataclass
class ModeResult:
    mode: str
    seconds: list[float]
    cpu_seconds: list[float]
    receiver_extra_rss: list[int]
    sender_extra_rss: list[int]
    identical: bool
    extra: dict[str, list[float]]
    bytes_posted: list[int]
    paired: list[float] = field(default_factory=list)
    """Per counted transfer: the raw operation's seconds over the transfer's, same pair, right after."""
    encode: list[float] = field(default_factory=list)
    """With a compressed wire format, per counted transfer: the sender's encoding seconds."""
    decode: list[float] = field(default_factory=list)
    """... and the receiver's decoding seconds."""

    def extend(self, later: ModeResult) -> ModeResult:
        """This mode's transfers together with those of a later pair: one set of figures."""
        extra = {key: self.extra.get(key, []) + later.extra.get(key, []) for key in {*self.extra, *later.extra}}
        return ModeResult(
            mode=self.mode,
            seconds=self.seconds + later.seconds,
            cpu_seconds=self.cpu_seconds + later.cpu_seconds,
            receiver_extra_rss=self.receiver_extra_rss + later.receiver_extra_rss,
            sender_extra_rss=self.sender_extra_rss + later.sender_extra_rss,
            identical=self.identical and later.identical,
            extra=extra,
            bytes_posted=self.bytes_posted + later.bytes_posted,
            paired=self.paired + later.paired,
            encode=self.encode + later.encode,
            decode=self.decode + later.decode,
        )

    def summary(self, nbytes: int) -> ModeSummary:
        med = statistics.median(self.seconds)
        extra = {key: statistics.median(values) for key, values in self.extra.items()}
        if "wire_seconds" in extra:
            extra["goodput_wire_gb_s"] = nbytes / extra["wire_seconds"] / 1e9
        return ModeSummary(
            seconds=med,
            seconds_min=min(self.seconds),
            goodput_gb_s=nbytes / med / 1e9,
            cpu_seconds=statistics.median(self.cpu_seconds),
            cpu_seconds_min=min(self.cpu_seconds),
            receiver_extra_rss_mb=max(self.receiver_extra_rss) / 2**20,
            sender_extra_rss_mb=max(self.sender_extra_rss) / 2**20,
            identical=self.identical,
            repeat=len(self.seconds),
            bytes_posted=max(self.bytes_posted) if self.bytes_posted else None,
            vs_raw_same_pair=statistics.median(self.paired) if self.paired else None,
            encode_seconds=statistics.median(self.encode) if self.encode else None,
            decode_seconds=statistics.median(self.decode) if self.decode else None,
            **extra,
        )


def run_pair_events(
    mode: str,
    common: Sequence[str],
    transfers: int,
    env: dict[str, str],
    where: Placement = ON_LOOPBACK,
    on_transfer: Callable[[], None] = lambda: None,
    tls: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Start a sender and a receiver at `where`, and gather each side's `transfer` events.

    The peers speak mutual TLS with certificates made for the run (unless `tls` is off),
    and one-sided modes run as a trusted fabric: both peers are the benchmark's own.
    Both processes are gone on return, however it ends; a failed side raises with both
    sides' stderr, since the cause is often on the other one.
    """
    security = ["--certs", str(bench_certs(where.listen_host))] if tls else []
    if mode in RAW_MODES or Mode(mode).one_sided:
        security.append("--trusted-fabric")
    sender, receiver = start_pair(
        mode, [*common, *security], env=env, sender_prefix=where.sender_prefix,
        receiver_prefix=where.receiver_prefix, listen_host=where.listen_host,
    )
    procs = {"sender": sender, "receiver": receiver}
    try:
        rows = _gather(mode, procs, transfers, on_transfer)
        for role, proc in procs.items():
            try:
                proc.finish(FINISH_TIMEOUT_S)
            except TimeoutError as exc:
                raise RunError(f"{mode} {role} did not exit after its transfers: {exc}") from None
    finally:
        sender.kill()
        receiver.kill()
    return rows


def _gather(
    mode: str, procs: dict[str, PeerProcess], transfers: int, on_transfer: Callable[[], None]
) -> dict[str, list[dict[str, Any]]]:
    """Both sides' `transfer` events; the first failure of either side ends the run, naming both.

    Both sides are read as their lines arrive, so a receiver that fails while the sender
    still waits on it is reported at once, with what each side printed.
    """
    rows: dict[str, list[dict[str, Any]]] = {role: [] for role in procs}
    last = time.monotonic()
    while any(len(rows[role]) < transfers for role in procs):
        progressed = False
        for role, proc in procs.items():
            events, ended = proc.events_now()
            for event in events:
                if event["event"] == "error":
                    trace = f"\n{event['traceback']}" if event.get("traceback") else ""
                    raise RunError(_failure(mode, role, procs, f"{event['type']}: {event['message']}{trace}"))
                if event["event"] == "transfer" and len(rows[role]) < transfers:
                    rows[role].append(event)
                    progressed = True
                    if role == "sender":
                        on_transfer()
            if ended and len(rows[role]) < transfers:
                raise RunError(_failure(mode, role, procs, f"exited with code {proc.proc.wait(10)} after "
                                                           f"{len(rows[role])} of {transfers} transfers"))
        now = time.monotonic()
        if progressed:
            last = now
        elif now - last > TRANSFER_TIMEOUT_S:
            stacks = "\n".join(f"--- {role}: {proc.stacks()}" for role, proc in procs.items())
            raise RunError(f"{mode}: no transfer finished for {TRANSFER_TIMEOUT_S:.0f} s; the peers hung\n{stacks}")
        else:
            time.sleep(GATHER_POLL_S)
    return rows


def _failure(mode: str, role: str, procs: dict[str, PeerProcess], what: str) -> str:
    other = "receiver" if role == "sender" else "sender"
    return (f"{mode} {role} failed: {what}\n--- {role}'s stderr:\n{procs[role].stderr()}"
            f"\n--- {other}'s stderr:\n{procs[other].stderr()}")


def run_mode(
    mode: str,
    size_args: Sequence[str],
    chunk_size: int,
    window: int,
    repeat: int,
    env: dict[str, str],
    on_transfer: Callable[[], None] = lambda: None,
    where: Placement = ON_LOOPBACK,
    tls: bool = True,
    data_streams: int = DEFAULT_STREAMS,
    wire: Wire = Wire.FP32,
    verify: str = "xxh3",
    inbox: str = "full",
) -> ModeResult:
    transfers = repeat + WARMUP
    coded = wire.compressed and mode not in RAW_MODES
    # the raw references move the fp32 state: they are the line's ceiling, not a format's
    common = [*size_args, "--chunk-size", str(chunk_size), "--window", str(window), "--transfers", str(transfers),
              "--data-streams", str(data_streams), *(["--wire", wire] if coded else []),
              *(["--verify", verify] if mode not in RAW_MODES else []),
              *(["--inbox", inbox] if mode not in RAW_MODES and Mode(mode).receiver_places else [])]
    paired = mode in PAIRED_MODES and inbox != "slots"  # a raw operation needs whole pools on both sides
    rows = run_pair_events(mode, [*common, *(["--paired"] if paired else [])], transfers, env, where, on_transfer, tls)
    s, r = rows["sender"][WARMUP:], rows["receiver"][WARMUP:]
    # The time of a transfer is the initiator's: the raw READ is timed where it is posted.
    timed = r if mode == "raw-read" else s
    extra: dict[str, list[float]] = {}
    for row in s:
        for key, value in (row.get("extra") or {}).items():
            extra.setdefault(key, []).append(float(value))
    return ModeResult(
        mode=mode,
        seconds=[row["seconds"] for row in timed],
        cpu_seconds=[a["cpu_seconds"] + b["cpu_seconds"] for a, b in zip(s, r, strict=True)],
        receiver_extra_rss=[row["extra_rss"] for row in r],
        sender_extra_rss=[row["extra_rss"] for row in s],
        # transfer by transfer: an encoded state changes between sends (its error feedback does)
        identical=all(a["digest"] == b["digest"] for a, b in zip(s, r, strict=True)),
        extra=extra,
        bytes_posted=[row["bytes_posted"] for row in s + r if row.get("bytes_posted")],
        paired=[row["paired_seconds"] / row["seconds"] for row in s + r if row.get("paired_seconds")],
        encode=[row["codec_seconds"] for row in s] if coded else [],
        decode=[row["codec_seconds"] for row in r] if coded else [],
    )


def transfer_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("UCX_TLS", LOOPBACK_TLS)
    return env


def run(
    size_args: Sequence[str],
    nbytes: int,
    modes: Sequence[str],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    window: int = DEFAULT_WINDOW,
    repeat: int = DEFAULT_REPEAT,
    on_transfer: Callable[[], None] = lambda: None,
    on_mode: Callable[[str], None] = lambda m: None,
    env: dict[str, str] | None = None,
    where: Placement = ON_LOOPBACK,
    references: bool = True,
    interleave: bool = False,
    tls: bool = True,
    data_streams: int = DEFAULT_STREAMS,
    wire: Wire = Wire.FP32,
    verify: str = "xxh3",
    inbox: str = "full",
) -> TransferResult:
    """Every mode (and, unless told not to, the raw references) between two fresh processes.

    Interleaved, each mode gets `repeat` pairs of one counted transfer each, the modes
    taking turns: it costs a start-up and a warm-up per transfer, and buys figures that a
    drifting host moves together.
    """
    env = env or transfer_env()
    order = [*(REFERENCES.values() if references else ()), *modes]
    measured: dict[str, ModeResult] = {}
    for turn in range(repeat if interleave else 1):
        for mode in order:
            on_mode(mode)
            res = run_mode(mode, size_args, chunk_size, window, 1 if interleave else repeat, env, on_transfer, where,
                           tls, data_streams, wire, verify, inbox)
            measured[mode] = measured[mode].extend(res) if turn else res
    result = TransferResult(
        size_bytes=nbytes, chunk_size=chunk_size, window=window, repeat=repeat, interleaved=interleave,
        data_streams=data_streams, wire=wire, verify=verify, inbox=inbox,
        ucx_tls=env.get("UCX_TLS", ""), path=where.describe(), **where.fields(),
        modes={Mode(mode): measured[mode].summary(nbytes).model_copy(update={"tls": tls and encrypts(Mode(mode))})
               for mode in modes},
        reference=measured[REFERENCES["reference"]].summary(nbytes) if references else None,
        reference_read=measured[REFERENCES["reference_read"]].summary(nbytes) if references else None,
    )
    add_ratios(result, where.line_bytes_per_s())
    return result


def encrypts(mode: Mode) -> bool:
    """Whether a mode's bytes cross the wire encrypted when its peers hold certificates: the baseline's
    stream is TLS, tcp-e seals every chunk; the NIXL modes' bytes go as they are."""
    return mode is Mode.GRPC or mode.seals


def add_ratios(result: TransferResult, line_bytes_per_s: float | None = None) -> None:
    """Ratios against the same run's references, baseline and line: the figures worth quoting."""
    grpc = result.modes.get(Mode.GRPC)
    references = [row for row in (result.reference, result.reference_read) if row is not None]
    for row in [*references, *result.modes.values()]:
        if line_bytes_per_s:
            row.vs_line = row.goodput_gb_s * 1e9 / line_bytes_per_s
    for mode, row in result.modes.items():
        base = result.reference_read if mode == Mode.RDMA_E_PULL else result.reference
        if base is not None:
            row.vs_reference = row.goodput_gb_s / base.goodput_gb_s
        if grpc is not None:
            row.vs_grpc = row.goodput_gb_s / grpc.goodput_gb_s


def write_json(result: TransferResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.model_dump(mode="json"), indent=2) + "\n")
