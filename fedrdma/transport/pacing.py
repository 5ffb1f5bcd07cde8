"""How long a polling loop sleeps when nothing happened: short on a fast line, long on a slow one.

Without NIXL's progress thread (see `agent.PROGRESS_THREAD`) our polls are what moves UCX:
over TCP it refills the sender's socket and drains the receiver's only when polled. So a
pause must stay below the time the line takes to move what a socket buffer surely holds,
or the line idles. On a fast line that is microseconds; on a 100 Mbit/s WAN path it is
tens of milliseconds, and polling every 200 us there only burns a core (2 x 13 % for two
peers that wait on the line). The pacer learns the line's rate from the bytes that move and
lets its pauses grow to what that rate allows (what that saves: README: Measurements behind the defaults).
"""

from __future__ import annotations

import time

from fedrdma.transport import wire
from fedrdma.transport.agent import Agent
from fedrdma.transport.channel import Blob, Channel

IDLE_MIN_S = 5e-6
"""First pause after progress: completions of a window arrive in bursts."""

IDLE_FLOOR_S = 200e-6
"""Longest pause before the line's rate is known, and never a shorter ceiling than this: shorter
pauses only take CPU from the network stack on fast paths, longer ones let socket buffers
drain there (README: Measurements behind the defaults)."""

IDLE_CAP_S = 10e-3
"""Longest pause on any line: bounds how late a loop notices a message or a dead peer."""

SOCKET_SLACK_BYTES = 256 << 10
"""Bytes a TCP socket buffer holds beyond what is in flight, on any path worth the name: the
pause ceiling is the time the line takes to move this many bytes."""


class Pacer:
    """Pauses that double while nothing happens and reset on progress, capped by the line's rate."""

    def __init__(self, now: float | None = None, floor: float = IDLE_FLOOR_S) -> None:
        self.pause = IDLE_MIN_S
        self.cap = floor
        self._floor = floor
        self._start = time.monotonic() if now is None else now
        self._moved = 0

    def moved(self, nbytes: int, now: float) -> None:
        """`nbytes` more went over the line: the ceiling follows the rate seen since the start."""
        self._moved += nbytes
        elapsed = now - self._start
        if elapsed <= 0 or self._moved <= 0:
            return
        rate = self._moved / elapsed
        self.cap = min(IDLE_CAP_S, max(self._floor, SOCKET_SLACK_BYTES / rate))

    def next(self, progressed: bool) -> float:
        """The pause to take now: none after progress, then doubling up to the ceiling."""
        if progressed:
            self.pause = IDLE_MIN_S
            return 0.0
        pause = self.pause
        self.pause = min(self.cap, self.pause * 2)
        return pause

    def __call__(self, progressed: bool) -> None:
        pause = self.next(progressed)
        if pause:
            time.sleep(pause)



def recv_serving(channel: Channel, agent: Agent | None, timeout: float, pacer: Pacer) -> wire.Message | Blob:
    """The next message, while driving NIXL so that one-sided peers are served meanwhile.

    Without a progress thread the memory owner's UCX worker moves only when polled: over TCP
    it must answer emulated READs and connection set-up. The wait wakes at once when a
    message arrives; between polls of UCX it pauses as `pacer` says.
    """
    if agent is None:
        return channel.recv(timeout)
    deadline = time.monotonic() + timeout
    while True:
        agent.progress()
        msg = channel.wait(min(pacer.next(False), max(0.0, deadline - time.monotonic())))
        if msg is not None:
            return msg
        if time.monotonic() > deadline:
            raise TimeoutError(f"no message from {channel.peer} within {timeout:.1f} s")
