"""The TCP connections `tcp-e` moves sealed chunks over, and how each finds its session.

The side that accepted the session's control stream (the aggregator, a benchmark's
receiver) listens on one data port for all its sessions; the side that dialed (a silo,
behind its firewall) dials that port, several connections per session. The first bytes
on each connection are the session's ticket, handed out over the control plane: a
connection that does not present a live ticket within `TICKET_TIMEOUT_S` is closed, and no
more than `MAX_PENDING` unidentified connections are held at once.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Iterator

from fedrdma.core.addresses import LOOPBACK_HOST
from fedrdma.core.errors import PeerLost

log = logging.getLogger(__name__)

TICKET_BYTES = 16
"""Random bytes naming a session's data connections: unguessable, and only ever sent inside
the mutual-TLS control plane."""

TICKET_TIMEOUT_S = 5.0
"""A connection that has not presented its ticket this long after it opened is closed."""

MAX_PENDING = 64
"""Connections held open before they presented a ticket; beyond this new ones are closed."""

ACCEPT_BACKLOG = 128
"""The kernel's queue of connections not yet accepted: a few per silo of a large federation."""

SOCKET_BUFFER_BYTES = 32 << 20
"""Socket buffers asked for: a 5 Gbit/s x 20 ms path holds 12.5 MB in flight (the kernel caps
the request at its own limits; README: TCP buffers on real hosts)."""

DEFAULT_STREAMS = 4
"""Data connections per session: one connection's sealing and sending is bound to a core's
share, and a fast long path needs several to fill (README: Measurements behind the defaults)."""

MAX_STREAMS = 16
"""More connections than this per session only add sockets and threads."""

CONNECT_TIMEOUT_S = 10.0
"""One dial of a data connection."""


def new_ticket() -> bytes:
    return os.urandom(TICKET_BYTES)


def tune(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
    return sock


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from `sock`; a peer that closes first is lost."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise PeerLost("the data connection closed mid-chunk")
        got += n


class DataListener:
    """One listening data port; accepted connections are handed to the session whose ticket they show."""

    def __init__(self, host: str = LOOPBACK_HOST, port: int = 0) -> None:
        self._sock = socket.create_server((host, port), backlog=ACCEPT_BACKLOG, reuse_port=False)
        self.port = int(self._sock.getsockname()[1])
        self._lock = threading.Lock()
        self._sessions: dict[bytes, queue.Queue[socket.socket]] = {}
        self._pending = 0
        self._closed = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True, name="data-accept").start()

    def register(self) -> tuple[bytes, queue.Queue[socket.socket]]:
        """A new ticket, and the queue its connections will arrive on."""
        ticket = new_ticket()
        arrivals: queue.Queue[socket.socket] = queue.Queue()
        with self._lock:
            self._sessions[ticket] = arrivals
        return ticket, arrivals

    def unregister(self, ticket: bytes) -> None:
        with self._lock:
            arrivals = self._sessions.pop(ticket, None)
        while arrivals is not None and not arrivals.empty():
            arrivals.get_nowait().close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                full = self._pending >= MAX_PENDING
                if not full:
                    self._pending += 1
            if full:
                sock.close()
                continue
            threading.Thread(target=self._identify, args=(sock,), daemon=True, name="data-ticket").start()

    def _identify(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(TICKET_TIMEOUT_S)
            ticket = bytearray(TICKET_BYTES)
            recv_exact(sock, memoryview(ticket))
            sock.settimeout(None)
            with self._lock:
                arrivals = self._sessions.get(bytes(ticket))
            if arrivals is None:
                sock.close()
                return
            arrivals.put(self.admit(tune(sock)))
        except (OSError, PeerLost):
            sock.close()
        finally:
            with self._lock:
                self._pending -= 1

    def admit(self, sock: socket.socket) -> socket.socket:
        """A connection as its session gets it (`fedrdma.testing.faults.FaultyStreams` wraps it here)."""
        return sock

    def close(self) -> None:
        self._closed.set()
        self._sock.close()


def dial(host: str, port: int, ticket: bytes, count: int) -> list[socket.socket]:
    """`count` connections to a session's data port, each identified by its ticket."""
    socks = []
    try:
        for _ in range(count):
            sock = tune(socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S))
            sock.settimeout(None)
            sock.sendall(ticket)
            socks.append(sock)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise PeerLost(f"could not open a data connection to {host}:{port}: {exc}") from None
    return socks


def take(arrivals: queue.Queue[socket.socket], count: int, timeout: float) -> Iterator[socket.socket]:
    """The next `count` connections to arrive for a session, each within `timeout`."""
    for k in range(count):
        try:
            yield arrivals.get(timeout=timeout)
        except queue.Empty:
            raise PeerLost(f"the peer opened {k} of {count} data connections within {timeout:.0f} s") from None


def close_all(socks: list[socket.socket]) -> None:
    """Close connections so that a thread blocked on one of them wakes at once."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
    log.debug("closed %d data connections", len(socks))
