"""Heartbeats: both ends of a control stream say they are alive, and notice when the other stops.

The control plane, not the data plane, declares a peer dead: a one-sided transfer to a
peer that left silently can hang without an error (NIXL has no deadline of its own).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fedrdma.control import messages as m
from fedrdma.transport.channel import Channel

MISSED_BEATS = 3
"""Heartbeats a peer may miss before it is declared dead: one late beat is not a dead peer."""


def beat(channels: Callable[[], list[Channel]], every: float, stop: threading.Event) -> None:
    """Send a heartbeat on each live control stream every `every` seconds until `stop`."""
    while not stop.wait(every):
        for channel in channels():
            channel.offer(m.Heartbeat())  # a peer that reads nothing misses beats; the others still get theirs
