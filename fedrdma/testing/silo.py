"""A silo with a fault: `python -m fedrdma.testing.silo --fault nan --config silo.toml`.

Each fault is a `Silo` subclass that overrides one step of the round; the rest of the silo
is the production one, so the aggregator meets the fault exactly as it would meet a
broken or hostile silo.

Faults: `exit-after-broadcast:R` (dies in round R once the global arrived), `stall-once:R:S`
(round R's training takes S seconds longer, once per process), `nan` (a NaN in the update's last value;
`nan:R` in round R's only), `poison-encoded:X` (with wire bf16 or int8: the first encoded value, or
the first int8 record's scale, set to X after encoding, as no honest encoder would),
`scale` (the update times 1000), `claim:N` (reports N training samples, whatever it holds),
`exit-mid-upload:R` (tcp-e: in round R sends STOP_AFTER_CHUNKS chunks of its upload, and
dies once the aggregator says it verified some, so they are folded), `stop:PHASE:R` (round R: the process stops itself with SIGSTOP, as a host that freezes, once
STOP_AFTER_CHUNKS chunks of its broadcast landed or of its upload went out (in a pull: at the
first status that vouches for chunks read), or as its training starts; PHASE is `broadcast`, `train` or `upload`, one-sided modes only), `record:DIR` (an honest silo that keeps a copy
of every update it uploads as DIR/ID-RRRRR.safetensors, for a check that recomputes the mean).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedrdma.bench.soak import update_path
from fedrdma.config import ConfigError, SiloConfig, load
from fedrdma.control.link import JoinRefused
from fedrdma.core.errors import FedRDMAError
from fedrdma.core.modes import Role
from fedrdma.fl.silo import Silo
from fedrdma.testing.faults import Faults, FaultyAgent
from fedrdma.transport import wire
from fedrdma.transport.session import Session

EXIT_CODE = 17
"""The exit code of a silo that dies mid-round on purpose, so a test can tell it from a crash."""

STOP_AFTER_CHUNKS = 2
"""A hung silo stops this many chunks into the phase: mid-transfer, with chunks already folded."""

PHASES = ("broadcast", "train", "upload")

HOLD_STEP_S = 0.05
"""How often a held data connection of a dying silo looks again (it never sends again)."""


class ExitAfterBroadcast(Silo):
    def __init__(self, cfg: SiloConfig, rnd: int) -> None:
        super().__init__(cfg)
        self.rnd = rnd

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        if rnd == self.rnd:
            os._exit(EXIT_CODE)
        return super().train(rnd, upload)


class ExitMidUpload(Silo):
    """Dies in round `rnd` a few chunks into its tcp-e upload, once the aggregator said it
    verified (and so folded) some: chunks it can no longer read again, so the round's sum must
    be rebuilt from the others. Dying as the chunks leave would race their landing."""

    def __init__(self, cfg: SiloConfig, rnd: int) -> None:
        super().__init__(cfg)
        self.rnd = rnd

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        if rnd == self.rnd:
            mover = upload.mover
            report, drain, sent = mover._report, mover.drain, []  # type: ignore[attr-defined]

            def counting(event: tuple) -> None:
                report(event)
                sent.append(event[0] == "sent")
                while sum(sent) >= STOP_AFTER_CHUNKS:  # this connection sends nothing more
                    time.sleep(HOLD_STEP_S)

            def draining() -> list:
                msgs = drain()
                if sum(sent) >= STOP_AFTER_CHUNKS and any(isinstance(msg, wire.Status) and msg.verified
                                                          for msg in msgs):
                    os._exit(EXIT_CODE)  # the receiver's timed status: folded chunks, within a second
                return msgs

            mover._report, mover.drain = counting, draining  # type: ignore[attr-defined]
        return super().train(rnd, upload)


class StallOnce(Silo):
    """A slow round, once per process: a window in which a test can kill the aggregator."""

    def __init__(self, cfg: SiloConfig, rnd: int, seconds: float) -> None:
        super().__init__(cfg)
        self.rnd, self.seconds, self.stalled = rnd, seconds, False

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        if rnd == self.rnd and not self.stalled:
            self.stalled = True
            time.sleep(self.seconds)
        return super().train(rnd, upload)


class NanUpdate(Silo):
    """A NaN in every round's update, or only in round `rnd`'s."""

    def __init__(self, cfg: SiloConfig, rnd: int | None = None) -> None:
        super().__init__(cfg)
        self.rnd = rnd

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        result = super().train(rnd, upload)
        if self.rnd is None or rnd == self.rnd:
            # In the last value: every chunk before it is folded first, and must be taken out again.
            list(self.state.views.values())[-1].view(-1)[-1] = float("nan")
        return result


class PoisonedEncoding(Silo):
    """Encodes honestly, then breaks what it sends in a way its own encoder never would: the
    first int8 record's scale set to `value`, or the first bf16 value set to it."""

    def __init__(self, cfg: SiloConfig, value: float) -> None:
        super().__init__(cfg)
        self.value = value

    def _encode(self, link, rnd: int) -> float:  # type: ignore[no-untyped-def]
        seconds = super()._encode(link, rnd)
        dtype = torch.bfloat16 if self.cfg.wire == "bf16" else torch.float32
        self.upload_state.buffer[: dtype.itemsize].view(dtype)[0] = self.value
        self.upload_state.touch()
        return seconds


class ScaledUpdate(Silo):
    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        result = super().train(rnd, upload)
        self.state.buffer.view(torch.float32).mul_(1000.0)
        return result


class ClaimSamples(Silo):
    """Trains honestly but claims `n` samples, to take a larger share of the FedAvg mean."""

    def __init__(self, cfg: SiloConfig, n: int) -> None:
        super().__init__(cfg)
        self.n = n

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        _, loss, seconds = super().train(rnd, upload)
        return self.n, loss, seconds


class _StoppingAgent(FaultyAgent):
    """Counts the chunks of one phase (broadcast notices as a target, upload completions as
    an initiator) while armed, and stops the whole process at STOP_AFTER_CHUNKS."""

    def __init__(self, name: str, phase: str) -> None:
        super().__init__(Faults(), 1, name)
        self.phase = phase
        self.armed = False
        self._seen = 0

    def notifications(self, peer: str) -> list[bytes]:
        notes = super().notifications(peer)
        if self.phase == "broadcast":
            self._count(len(notes))
        return notes

    def completed(self, op: str, index: int, place: int) -> None:
        super().completed(op, index, place)
        if self.phase == "upload" and op == "WRITE":
            self._count(1)

    def _count(self, n: int) -> None:
        if not self.armed or not n:
            return
        self._seen += n
        if self._seen >= STOP_AFTER_CHUNKS:
            self.armed = False
            os.kill(os.getpid(), signal.SIGSTOP)  # resumes here on SIGCONT


class StopAt(Silo):
    """Hangs once, in round `rnd`, mid-broadcast, as training starts, or mid-upload: alive but
    silent, until SIGCONT."""

    def __init__(self, cfg: SiloConfig, phase: str, rnd: int) -> None:
        super().__init__(cfg)
        if phase not in PHASES:
            raise SystemExit(f"stop:{phase}: the phase is one of {', '.join(PHASES)}")
        self.stopper = _StoppingAgent(f"silo-{cfg.id}-{os.getpid()}", phase)
        self.agent = self.stopper
        self.rnd = rnd

    def _round(self, link, broadcast, upload, rnd: int) -> None:  # type: ignore[no-untyped-def]
        self.stopper.armed = rnd == self.rnd
        try:
            super()._round(link, broadcast, upload, rnd)
        finally:
            self.stopper.armed = False

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        if self.stopper.armed and self.stopper.phase == "train":
            self.stopper.armed = False
            os.kill(os.getpid(), signal.SIGSTOP)  # resumes here on SIGCONT, and trains
        if self.stopper.phase == "upload" and upload.mode.initiator is Role.RECEIVER:
            self._stop_when_read(upload)
        return super().train(rnd, upload)

    def _stop_when_read(self, upload: Session) -> None:
        """A pull's holder completes no operation of its own: it learns that chunks were read
        (and folded) from the receiver's statuses, so it stops at the first of them."""
        before = upload.ctx.on_moved

        def moved(nbytes: int) -> None:
            if before is not None:
                before(nbytes)
            if self.stopper.armed:
                self.stopper.armed = False
                os.kill(os.getpid(), signal.SIGSTOP)  # resumes here on SIGCONT

        upload.ctx.on_moved = moved


class Recording(Silo):
    """Honest, and keeps what it uploads: the soak recomputes each round's mean from these."""

    def __init__(self, cfg: SiloConfig, directory: Path) -> None:
        super().__init__(cfg)
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def train(self, rnd: int, upload: Session) -> tuple[int, float, float]:
        result = super().train(rnd, upload)
        path = update_path(self.directory, self.cfg.id, rnd)
        tmp = path.with_suffix(".tmp")
        save_file({name: view.clone() for name, view in self.state.views.items()}, str(tmp))
        os.replace(tmp, path)  # a reader never sees half a file, even if this silo is killed
        return result


def faulty(cfg: SiloConfig, fault: str) -> Silo:
    name, _, rest = fault.partition(":")
    args = rest.split(":") if rest else []
    if name == "exit-after-broadcast":
        return ExitAfterBroadcast(cfg, int(args[0]))
    if name == "exit-mid-upload":
        return ExitMidUpload(cfg, int(args[0]))
    if name == "stall-once":
        return StallOnce(cfg, int(args[0]), float(args[1]))
    if name == "nan":
        return NanUpdate(cfg, int(args[0]) if args else None)
    if name == "poison-encoded":
        return PoisonedEncoding(cfg, float(args[0]))
    if name == "scale":
        return ScaledUpdate(cfg)
    if name == "claim":
        return ClaimSamples(cfg, int(args[0]))
    if name == "stop":
        return StopAt(cfg, args[0], int(args[1]))
    if name == "record":
        return Recording(cfg, Path(rest))
    raise SystemExit(f"unknown fault {fault!r}; see `python -m fedrdma.testing.silo --help`")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedrdma.testing.silo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fault", required=True)
    p.add_argument("--config", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        cfg = load(SiloConfig, args.config, {})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        faulty(cfg, args.fault).run()
    except (JoinRefused, FedRDMAError) as exc:
        print(f"silo {cfg.id} failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
