"""A silo's update read once more, for a round that has to take it back out of the sum.

With a bounded inbox (`transport.slots`) the aggregator folds each chunk and forgets it. A
silo rejected at the round's close (a norm outlier, a NaN, its weight capped) must then be
subtracted again with the very bytes that were added, so the aggregator asks the silo to
upload them again (`Resend`) and streams them into the retraction chunk by chunk, through
the same slots: memory stays a few chunks, whatever the state's size.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)

HANDOFF_POLL_S = 0.1
"""How often a landed chunk waiting for the retraction looks whether the retraction gave up."""


class Replay:
    """`core.fedavg`'s Source for one silo and round: call it to stream the update again.

    `ask` requests the resend and says whether it could be asked (False: the silo is gone
    or busy, so the bytes cannot be had); `receive` runs one transfer on the silo's upload
    session, whose verified chunks reach `land`. A chunk stays in its slot until the
    retraction took it, so nothing is copied and at most one chunk waits.
    """

    def __init__(self, silo: str, ask: Callable[[], bool], receive: Callable[[], object], wait_s: float) -> None:
        self.silo = silo
        self._ask, self._receive, self._wait_s = ask, receive, wait_s
        self._handoff: queue.Queue[tuple[int, torch.Tensor, threading.Event] | None] = queue.Queue()
        """This resend's chunks; a new queue per resend, so one given up leaves nothing behind."""
        self.active = False
        """Whether a retraction is reading: only then do this silo's chunks go to `land`."""
        self.failed: str | None = None
        """Why the last resend did not complete (then the upload session is spent)."""

    def __call__(self) -> Iterator[tuple[int, torch.Tensor]] | None:
        if self.failed is not None:
            return None  # the upload session is spent: asking again would wait on nothing
        if not self._ask():
            return None
        return self._stream()

    def _stream(self) -> Iterator[tuple[int, torch.Tensor]]:
        self._handoff = handoff = queue.Queue()
        self.active = True
        thread = threading.Thread(target=self._run, args=(handoff,), daemon=True, name=f"replay-{self.silo}")
        thread.start()
        try:
            while True:
                try:  # the transfer's own liveness ends a silent silo well before this
                    item = handoff.get(timeout=self._wait_s)
                except queue.Empty:
                    self.failed = self.failed or f"no chunk within {self._wait_s:.0f} s"
                    return
                if item is None:
                    return
                offset, data, taken = item
                try:
                    yield offset, data
                finally:
                    taken.set()
        finally:
            self.active = False  # chunks still landing are dropped, and the transfer runs out
            thread.join(self._wait_s)

    def _run(self, handoff: queue.Queue) -> None:
        try:
            self._receive()
        except Exception as exc:  # noqa: BLE001  (the retraction sees a stream that ended early)
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("silo %s: its update could not be read again: %s", self.silo, self.failed)
        finally:
            handoff.put(None)

    def land(self, offset: int, data: torch.Tensor) -> None:
        """A verified chunk of the resend: wait until the retraction took it (or gave up)."""
        if not self.active:
            return
        taken = threading.Event()
        self._handoff.put((offset, data, taken))
        while self.active and not taken.wait(HANDOFF_POLL_S):
            pass
