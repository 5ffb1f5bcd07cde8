"""Which fabric carries one-sided operations here, and what that lets a peer touch.

On hardware RMA (InfiniBand or RoCE verbs) the NIC checks every remote key and bound: a
peer reaches only the memory it was handed a key to. On UCX's software transports (TCP,
shared memory, CMA) the target's UCX does each remote write or read itself, at whatever
address the request names: any connected peer can reach the whole process, whatever it
was handed (`tests/test_trust.py` shows it). So one-sided modes are safe only on hardware
RMA, or where the operator states that every peer may read and write every process
(`trusted_fabric`). `tcp-e` is the mode for everywhere else.

The fabric is read conservatively: it is hardware only when this host has an RDMA device
and `UCX_TLS` restricts UCX to verbs transports, so that UCX cannot fall back to TCP or
shared memory for any peer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedrdma.core.errors import FedRDMAError
from fedrdma.core.modes import Mode

RDMA_DEVICES = Path("/sys/class/infiniband")
"""Where Linux lists RDMA devices (InfiniBand HCAs and RoCE NICs alike)."""

VERBS_TRANSPORTS = frozenset({"rc", "rc_v", "rc_x", "rc_mlx5", "dc", "dc_x", "dc_mlx5", "ud", "ud_v", "ud_x",
                              "ud_mlx5", "ib", "self"})
"""UCX transports whose one-sided operations the NIC executes and checks (`self` is this process)."""

AUTO = "auto"
"""The mode setting that lets the fabric choose: rdma-e where the fabric enforces keys, tcp-e elsewhere."""


class UntrustedFabric(FedRDMAError):
    """A one-sided mode over a fabric that does not enforce remote keys, without the operator's say-so."""


@dataclass(frozen=True)
class Fabric:
    hardware: bool
    reason: str

    def describe(self) -> str:
        return ("hardware RMA (the NIC enforces keys and bounds)" if self.hardware
                else "software RMA (UCX over TCP or shared memory: any peer can reach the whole process)")


def detect(environ: Mapping[str, str] = os.environ, devices: Path = RDMA_DEVICES) -> Fabric:
    found = sorted(p.name for p in devices.iterdir()) if devices.is_dir() else []
    tls = environ.get("UCX_TLS", "").strip()
    if not found:
        return Fabric(False, f"no RDMA device in {devices}")
    names = {t.strip() for t in tls.split(",") if t.strip()}
    if not names or tls.startswith("^") or not names <= VERBS_TRANSPORTS:
        return Fabric(False, f"RDMA devices {', '.join(found)}, but UCX_TLS={tls or '(unset)'} lets UCX use "
                             "TCP or shared memory; restrict it to verbs (e.g. UCX_TLS=rc,self)")
    return Fabric(True, f"RDMA devices {', '.join(found)} and UCX_TLS={tls}")


def resolve(setting: str, fabric: Fabric) -> Mode:
    """The mode a setting names; `auto` picks rdma-e on hardware RMA and tcp-e elsewhere."""
    if setting == AUTO:
        return Mode.RDMA_E if fabric.hardware else Mode.TCP_E
    return Mode(setting)


def require_trust(mode: Mode, trusted: bool, fabric: Fabric) -> None:
    """Refuse a one-sided mode that would let peers reach this whole process, unless the operator said so."""
    if not mode.one_sided or fabric.hardware or trusted:
        return
    raise UntrustedFabric(
        f"mode {mode} needs a fabric that enforces remote keys, and this host's is {fabric.describe()} "
        f"({fabric.reason}): over it any connected peer could write or read all of this process's memory. "
        f"Use --mode tcp-e (FedRDMA-E over TLS-keyed sealed chunks) or --mode auto, or set trusted_fabric = true "
        "(--trusted-fabric) if every peer may read and write every process"
    )


VERIFY_FABRIC = "fabric"
"""The `verify` setting that trusts the fabric's own CRC instead of hashing every landed chunk."""


def require_checks(verify: str, mode: Mode, fabric: Fabric) -> None:
    """Refuse `verify = fabric` for a one-sided `mode` where no per-packet CRC covers the bytes
    end to end (sealed and gRPC chunks are checked their own way, whatever the setting).

    InfiniBand and RoCE check every packet's ICRC from NIC to NIC, and a reliable connection
    delivers a WRITE's notification after its bytes, so a chunk whose notice arrived holds
    what was sent. Over UCX's TCP or shared memory nothing but the 16-bit TCP checksum (or
    nothing at all) stands between the bytes and the fold.
    """
    if verify != VERIFY_FABRIC or not mode.one_sided or fabric.hardware:
        return
    raise UntrustedFabric(
        f"verify = fabric trusts the fabric's per-packet CRC, and this host's is {fabric.describe()} "
        f"({fabric.reason}), which has none end to end: keep verify = xxh3 (the default) here"
    )
