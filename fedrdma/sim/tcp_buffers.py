"""Does this host's TCP let one connection fill a path? Bandwidth-delay product vs buffer limits.

UCX's TCP transport and the gRPC baseline both ride on kernel TCP, whose window is capped
by the socket buffers (the README's "TCP buffers on real hosts" gives what that cost on a lab
path). Only `read_tcp_limits` touches the file system, and it takes the proc root as a
parameter so tests can point it at a temporary directory.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BUFFER_BDP_FACTOR = 2.0
"""Buffers must hold 2 x BDP: the kernel keeps part of the buffer for overhead (tcp_adv_win_scale),
and under loss the sender holds unacknowledged data for longer than one RTT."""

SYSCTL_FILES: dict[str, str] = {
    "net.ipv4.tcp_rmem": "sys/net/ipv4/tcp_rmem",
    "net.ipv4.tcp_wmem": "sys/net/ipv4/tcp_wmem",
    "net.core.rmem_max": "sys/net/core/rmem_max",
    "net.core.wmem_max": "sys/net/core/wmem_max",
}
"""The four limits: autotuning caps (tcp_*mem max) and the caps on explicit SO_RCVBUF/SO_SNDBUF (*mem_max)."""


@dataclass(frozen=True)
class TcpLimits:
    """The host's limits, in bytes: (min, default, max) triples for the tcp_* autotuning ranges."""

    tcp_rmem: tuple[int, int, int]
    tcp_wmem: tuple[int, int, int]
    rmem_max: int
    wmem_max: int


@dataclass(frozen=True)
class Finding:
    """One limit below what the path needs, and the command that fixes it."""

    sysctl: str
    current: int
    required: int
    command: str


def bdp_bytes(rate_bps: float, rtt_s: float) -> int:
    """Bytes in flight needed to keep a path of this rate and RTT busy."""
    if rate_bps <= 0 or rtt_s < 0:
        raise ValueError(f"BDP needs a positive rate and a non-negative RTT, got {rate_bps} bit/s, {rtt_s} s")
    return math.ceil(rate_bps * rtt_s / 8)


def read_tcp_limits(proc_root: Path | str = Path("/proc")) -> TcpLimits:
    """Read the four sysctls from `proc_root` (normally /proc)."""
    root = Path(proc_root)
    values: dict[str, list[int]] = {}
    for name, rel in SYSCTL_FILES.items():
        path = root / rel
        try:
            text = path.read_text()
        except OSError as exc:
            raise OSError(f"cannot read {name} from {path} ({exc.strerror or exc}); "
                          f"the TCP buffer check needs Linux's /proc") from None
        try:
            values[name] = [int(v) for v in text.split()]
        except ValueError:
            raise ValueError(f"{path} holds {text.strip()!r}, not integers; is {root} a proc tree?") from None
    for name in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
        if len(values[name]) != 3:
            raise ValueError(f"{name} should hold three numbers (min default max), got {values[name]}")
    for name in ("net.core.rmem_max", "net.core.wmem_max"):
        if len(values[name]) != 1:
            raise ValueError(f"{name} should hold one number, got {values[name]}")
    rmem = values["net.ipv4.tcp_rmem"]
    wmem = values["net.ipv4.tcp_wmem"]
    return TcpLimits((rmem[0], rmem[1], rmem[2]), (wmem[0], wmem[1], wmem[2]),
                     values["net.core.rmem_max"][0], values["net.core.wmem_max"][0])


def _round_up_pow2(n: int) -> int:
    """Suggested values are powers of two: the conventional sysctl values, with headroom."""
    return 1 << max(0, math.ceil(math.log2(n))) if n > 0 else 1


def check_buffers(limits: TcpLimits, rate_bps: float, rtt_s: float,
                  factor: float = BUFFER_BDP_FACTOR) -> list[Finding]:
    """Every limit below `factor` x BDP, with the `sysctl -w` line that raises it (empty: fine)."""
    need = math.ceil(factor * bdp_bytes(rate_bps, rtt_s))
    value = _round_up_pow2(need)
    found: list[Finding] = []
    for name, triple in (("net.ipv4.tcp_rmem", limits.tcp_rmem), ("net.ipv4.tcp_wmem", limits.tcp_wmem)):
        if triple[2] < need:
            found.append(Finding(name, triple[2], need, f'sysctl -w {name}="{triple[0]} {triple[1]} {value}"'))
    for name, current in (("net.core.rmem_max", limits.rmem_max), ("net.core.wmem_max", limits.wmem_max)):
        if current < need:
            found.append(Finding(name, current, need, f"sysctl -w {name}={value}"))
    return found


def tcp_check(rate_bps: float, rtt_s: float, proc_root: Path | str = Path("/proc")) -> dict[str, Any]:
    """The findings as `tune --json` records them; off Linux the check is skipped, with the reason."""
    bdp = bdp_bytes(rate_bps, rtt_s)
    try:
        limits = read_tcp_limits(proc_root)
    except (OSError, ValueError) as exc:
        return {"bdp_bytes": bdp, "checked": False, "error": str(exc), "findings": []}
    findings = check_buffers(limits, rate_bps, rtt_s)
    return {"bdp_bytes": bdp, "checked": True, "required_bytes": round(BUFFER_BDP_FACTOR * bdp),
            "findings": [asdict(f) for f in findings]}
