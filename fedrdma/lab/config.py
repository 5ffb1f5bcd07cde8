"""Validated lab settings: one place for every default and limit of the WAN lab."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedrdma.lab.units import format_duration, format_rate, parse_duration, parse_loss, parse_rate

DEFAULT_LAB_NAME = "frl"
"""Prefix of every namespace the lab makes (frl-agg, frl-wan, frl-silo1): short and greppable."""

LAB_NAME_RE = re.compile(r"[a-z][a-z0-9]{0,9}")
"""Lab names become namespace and file names; a short plain word keeps both safe."""

DEFAULT_SILOS = 1
"""One silo is the smallest lab that has a WAN path."""

MAX_SILOS = 250
"""Silo k gets 198.18.k.0/30 and 198.19.k.0/30, so k must fit one octet (and skip 0)."""

DEFAULT_MTU = 9000
"""Jumbo frames: the paper's data-centre NICs run 9000, and fewer packets keep the delay element fast."""

MIN_MTU = 1280
"""Below IPv6's minimum nothing realistic runs; IPv4 alone could go lower but gains nothing here."""

MAX_MTU = 65000
"""veth accepts up to 65535; stay clear of the IPv4 total-length limit."""

DEFAULT_RATE = "1gbit"
"""The issue's reference WAN path."""

DEFAULT_RTT = "20ms"
"""The issue's reference round-trip time between silos and the aggregator."""

DEFAULT_LOSS = 0.0
"""Clean path unless asked: loss is an experiment variable, not a default."""

MIN_RATE_BPS = 1_000_000
"""Below 1 Mbit/s one 9000-byte packet takes 72 ms to serialise: no longer a WAN of interest."""

MAX_RATE_BPS = 400 * 10**9
"""Sanity bound against unit slips (e.g. 'tbit'); the element's ceiling is checked separately."""

MAX_RTT_S = 1.0
"""The element holds a path's in-flight packets (~0.9 s at 5 Gbit/s fits its kernel queue)."""

DEFAULT_TCP_BUFFER_MAX = 64 * 2**20
"""tcp_rmem/tcp_wmem max in lab namespaces: above the 12.5 MB BDP of 5 Gbit/s x 20 ms, with room for loss recovery."""

DelayBackend = Literal["auto", "netem", "element"]
"""`auto` uses netem where tc accepts it and the userspace element otherwise."""


class PathShape(BaseModel):
    """One silo's WAN path, applied in both directions in the router namespace."""

    model_config = ConfigDict(frozen=True)

    rate_bps: int | None = Field(description="line rate in bit/s each way; None leaves the path unshaped")
    rtt_s: float = Field(description="round-trip time the path adds (half each way)")
    loss: float = Field(description="drop probability per packet, each direction")

    @field_validator("rate_bps", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> int | None:
        if value is None:
            return None
        bps = parse_rate(value)
        if bps is not None and not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
            raise ValueError(f"rate {format_rate(bps)} is outside {format_rate(MIN_RATE_BPS)}.."
                             f"{format_rate(MAX_RATE_BPS)}")
        return bps

    @field_validator("rtt_s", mode="before")
    @classmethod
    def _rtt(cls, value: Any) -> float:
        seconds = parse_duration(value)
        if seconds > MAX_RTT_S:
            raise ValueError(f"rtt {format_duration(seconds)} is above the lab's limit of "
                             f"{format_duration(MAX_RTT_S)}")
        return seconds

    @field_validator("loss", mode="before")
    @classmethod
    def _loss(cls, value: Any) -> float:
        return parse_loss(value)

    @classmethod
    def of(cls, rate: str | int | None = DEFAULT_RATE, rtt: str | float = DEFAULT_RTT,
           loss: str | float = DEFAULT_LOSS) -> "PathShape":
        """Build from the strings users type (`1gbit`, `20ms`, `0.01`)."""
        return cls(rate_bps=rate, rtt_s=rtt, loss=loss)

    def describe(self) -> str:
        return f"{format_rate(self.rate_bps)}, {format_duration(self.rtt_s)} RTT, loss {self.loss:g}"


class LabConfig(BaseModel):
    """Everything `lab up` builds from; equal configs mean `up` has nothing to do."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(DEFAULT_LAB_NAME, description="namespace prefix; two labs need two names")
    mtu: int = Field(DEFAULT_MTU, ge=MIN_MTU, le=MAX_MTU, description="MTU of every lab link")
    paths: tuple[PathShape, ...] = Field(min_length=1, max_length=MAX_SILOS,
                                         description="one shape per silo, silo 1 first")
    delay_backend: DelayBackend = "auto"
    tcp_buffer_max: int = Field(DEFAULT_TCP_BUFFER_MAX, ge=4 * 2**20,
                                description="tcp_rmem/tcp_wmem max set in the lab namespaces")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not LAB_NAME_RE.fullmatch(value):
            raise ValueError(f"lab name {value!r} must be 1-10 lowercase letters or digits, starting with a letter")
        return value

    @classmethod
    def uniform(cls, silos: int = DEFAULT_SILOS, rate: str | int | None = DEFAULT_RATE,
                rtt: str | float = DEFAULT_RTT, loss: str | float = DEFAULT_LOSS, **kwargs: Any) -> "LabConfig":
        """Every silo on the same kind of path: the common case for benchmarks."""
        if not 1 <= silos <= MAX_SILOS:
            raise ValueError(f"silos must be 1..{MAX_SILOS}, got {silos}")
        return cls(paths=(PathShape.of(rate, rtt, loss),) * silos, **kwargs)
