"""Host and port vocabulary: what loopback is, and how an address is split. No I/O."""

from __future__ import annotations

import ipaddress

LOOPBACK_HOST = "127.0.0.1"
"""The host every default binds to and dials: exposing a port beyond this host is a deliberate act."""


def split_host_port(address: str) -> tuple[str, int]:
    """`"host:port"` (or `"[v6]:port"`) as its parts; a ValueError names the form expected."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. {LOOPBACK_HOST}:7700)")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    """The inverse of `split_host_port`: an IPv6 host goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_unspecified(host: str) -> bool:
    """Whether `host` is a bind-to-every-address host (0.0.0.0, ::), which nobody can dial."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only (127.0.0.0/8, ::1 or `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
