"""Place a benchmark's two peers on a shaped lab path instead of loopback.

The sender runs in the silo's namespace and the receiver in the aggregator's, so a transfer
is a silo's upload crossing the router's rate limit, delay element and loss rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedrdma.core.addresses import LOOPBACK_HOST
from fedrdma.lab.config import DEFAULT_MTU, LabConfig, PathShape
from fedrdma.lab.lab import Lab
from fedrdma.lab.lab import lab as running_lab
from fedrdma.lab.netns import SILO_IFACE, PathLinks

if TYPE_CHECKING:
    from fedrdma.fl.demo import Hosts

LOOPBACK_PATH = "loopback"
"""How results name the path of peers on one host (the `path` of a row)."""

BENCH_LAB_NAME = "frbench"
"""Benchmarks build their own lab so a user's `fedrdma lab up` (named `frl`) is never touched."""

BENCH_SILO = 1
"""A transfer benchmark needs one path: silo 1's."""


@dataclass(frozen=True)
class Placement:
    """Where the two peers run and how they reach each other."""

    sender_prefix: Sequence[str]
    receiver_prefix: Sequence[str]
    listen_host: str
    shape: PathShape | None
    mtu: int | None

    @property
    def prefixes(self) -> tuple[Sequence[str], Sequence[str]]:
        return self.sender_prefix, self.receiver_prefix

    def describe(self) -> str:
        if self.shape is None:
            return LOOPBACK_PATH
        return f"lab path {self.shape.describe()}, MTU {self.mtu}"

    def fields(self) -> dict[str, float | int | None]:
        """What the benchmark's JSON records about the path (None on loopback)."""
        if self.shape is None:
            return {"link_rate_gbit": None, "rtt_ms": None, "loss": None, "mtu": None}
        rate = self.shape.rate_bps / 1e9 if self.shape.rate_bps is not None else None
        return {"link_rate_gbit": rate, "rtt_ms": self.shape.rtt_s * 1e3, "loss": self.shape.loss, "mtu": self.mtu}

    def line_bytes_per_s(self) -> float | None:
        if self.shape is None or self.shape.rate_bps is None:
            return None
        return self.shape.rate_bps / 8


ON_LOOPBACK = Placement((), (), LOOPBACK_HOST, None, None)
"""Both peers on this host, talking over loopback."""


def _with_device(prefix: Sequence[str], device: str) -> list[str]:
    """UCX would otherwise also try the namespace's loopback and other links."""
    return [*prefix, "env", f"UCX_NET_DEVICES={device}"]


def placement(lab: Lab, silo: int = BENCH_SILO) -> Placement:
    """Sender in silo `silo`'s namespace, receiver in the aggregator's, over that silo's path."""
    links = PathLinks(lab.config.name, silo)
    path = lab.paths[silo - 1]
    return Placement(
        sender_prefix=_with_device(lab.exec_prefix(links.silo_ns), SILO_IFACE),
        receiver_prefix=_with_device(lab.exec_prefix(links.agg_ns), links.agg_iface),
        listen_host=path.agg_addr,
        shape=path.shape,
        mtu=lab.config.mtu,
    )


@contextmanager
def shaped_path(shape: PathShape, mtu: int = DEFAULT_MTU,
                log: Callable[[str], None] | None = None) -> Iterator[Placement]:
    """A one-silo lab shaped as asked, up for the duration of the block and down afterwards."""
    with running_lab(LabConfig(name=BENCH_LAB_NAME, mtu=mtu, paths=(shape,)), log) as lab:
        yield placement(lab)


def federation_hosts(lab: Lab) -> Hosts:
    """The aggregator in the lab's aggregator namespace, silo k in silo k's, each on its path."""
    from fedrdma.fl.demo import Hosts

    paths = lab.paths
    agg_devices = ",".join(PathLinks(lab.config.name, p.silo).agg_iface for p in paths)
    return Hosts(
        listen_host="0.0.0.0",
        agg_prefix=_with_device(lab.exec_prefix("agg"), agg_devices),
        silo_prefixes=[_with_device(lab.exec_prefix(p.silo_ns), SILO_IFACE) for p in paths],
        dial_hosts=[p.agg_addr for p in paths],
    )
