"""The node's Unix socket: length-prefixed messages, descriptors passed alongside, who is calling.

A frame is a 4-byte big-endian length and a `transport.wire` message; a pool's memfd rides
with the first byte of the frame that names it (`SCM_RIGHTS`). The kernel, not the caller,
says which user is on the other end (`SO_PEERCRED`).
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from fedrdma.core.errors import PeerLost, ProtocolError
from fedrdma.transport import wire

MAX_FRAME_BYTES = 4 << 20
"""Largest local message: a layout of tens of thousands of tensors fits, a runaway app does not."""

MAX_FDS = 64
"""Descriptors taken with one frame: a round's deliveries from up to this many sites."""

_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCredentials(*struct.unpack("3i", raw))


def send(sock: socket.socket, msg: wire.Message, fds: list[int] | None = None) -> None:
    body = wire.encode(msg)
    frame = _HEADER.pack(len(body)) + body
    if fds:
        sent = socket.send_fds(sock, [frame[:1]], fds)
        if sent != 1:
            raise PeerLost("the node's socket took no byte of a frame with descriptors")
        frame = frame[1:]
    sock.sendall(frame)


def recv(sock: socket.socket, timeout: float | None) -> tuple[wire.Message, list[int]]:
    """One message and the descriptors that came with it; PeerLost when the other end is gone."""
    deadline = None if timeout is None else time.monotonic() + timeout
    fds: list[int] = []
    head = b""
    while len(head) < _HEADER.size:
        _arm(sock, deadline)
        data, got, _, _ = socket.recv_fds(sock, _HEADER.size - len(head), MAX_FDS)
        fds.extend(got)
        if not data:
            _close_all(fds)
            raise PeerLost("the other end of the node's socket closed")
        head += data
    (length,) = _HEADER.unpack(head)
    if length > MAX_FRAME_BYTES:
        _close_all(fds)
        raise ProtocolError(f"a {length}-byte message on the node's socket; at most {MAX_FRAME_BYTES}")
    body = bytearray()
    while len(body) < length:
        _arm(sock, deadline)
        chunk = sock.recv(length - len(body))
        if not chunk:
            _close_all(fds)
            raise PeerLost("the other end of the node's socket closed mid-message")
        body += chunk
    try:
        return wire.decode(bytes(body)), fds
    except ProtocolError:
        _close_all(fds)
        raise


def _arm(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no message on the node's socket in time")
    sock.settimeout(left)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)

