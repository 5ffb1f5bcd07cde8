"""Namespaces, veth links and addresses: the lab's topology, nothing about shaping.

Topology for silo k (1 <= k <= 250), all links veth, created directly inside their
namespaces so the host's own namespace never gains or loses an interface:

    <name>-silok [wan0 198.18.k.1/30] -- [sk 198.18.k.2/30] <name>-wan [ak 198.19.k.2/30] -- [silok 198.19.k.1/30] <name>-agg

Each silo gets its own link into the aggregator, so a path's shaping never shares a
queue with another silo's. Addresses come only from 198.18.0.0/15 (RFC 2544 benchmark
space), and routes cover only that block, so lab traffic cannot leave the lab.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedrdma.lab.errors import LabError

NETNS_DIR = Path("/run/netns")
"""Where `ip netns add` pins named namespaces."""

LAB_BLOCK = "198.18.0.0/15"
"""RFC 2544 benchmarking block: never routed on the internet, so lab traffic stays in the lab."""

SILO_IFACE = "wan0"
"""A silo's one interface: the same name in every silo, so UCX_NET_DEVICES=wan0 works everywhere."""

CMD_TIMEOUT_S = 30.0
"""ip/tc/iptables finish in milliseconds; this only bounds a hang."""

KILL_GRACE_S = 2.0
"""How long a process in a lab namespace gets to exit on SIGTERM before SIGKILL."""

DEPS_HINT = "run scripts/lab-deps.sh as root (installs iproute2, iptables, ethtool, iputils-ping, iperf3, " \
            "libnetfilter-queue-dev, gcc and builds build/fedrdma-delay)"


def require_root(euid: int | None = None) -> None:
    """Namespaces, tc and iptables all need CAP_NET_ADMIN; say so before touching anything."""
    uid = os.geteuid() if euid is None else euid
    if uid != 0:
        raise LabError(f"the WAN lab needs root (euid is {uid}): run it with sudo, e.g. "
                       "`sudo .venv/bin/fedrdma lab up`")


def require_tools(names: Sequence[str]) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise LabError(f"missing {', '.join(missing)} on PATH: {DEPS_HINT}")


def run(cmd: Sequence[str], check: bool = True, timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise LabError quoting it and its stderr."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def in_ns(ns: str, cmd: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def list_namespaces() -> set[str]:
    """Named namespaces on this host (as `ip netns list` would show them)."""
    try:
        return {p.name for p in NETNS_DIR.iterdir()}
    except FileNotFoundError:
        return set()


def namespace_exists(ns: str) -> bool:
    return (NETNS_DIR / ns).exists()


def add_namespace(ns: str) -> None:
    """Create a namespace with loopback up (NIXL opens an endpoint to itself at start)."""
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def delete_namespace(ns: str) -> None:
    if namespace_exists(ns):
        run(["ip", "netns", "del", ns])


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is `ns` (the element, servers, `lab exec` children)."""
    if not namespace_exists(ns):
        return []
    proc = run(["ip", "netns", "pids", ns], check=False)
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def kill_pids(pids: Sequence[int], grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL whatever is left."""
    alive = [p for p in pids if _signal(p, signal.SIGTERM)]
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    for p in alive:
        _signal(p, signal.SIGKILL)
    for p in alive:
        _wait_gone(p)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    if state == "Z":
        _reap(pid)
        return False
    return True


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: with the pid, a process's identity across pid reuse."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_gone(pid: int, timeout_s: float = KILL_GRACE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)


@dataclass(frozen=True)
class PathLinks:
    """Names and addresses of silo k's two links; pure arithmetic, no I/O."""

    lab: str
    silo: int

    @property
    def silo_ns(self) -> str:
        return f"{self.lab}-silo{self.silo}"

    @property
    def agg_ns(self) -> str:
        return f"{self.lab}-agg"

    @property
    def wan_ns(self) -> str:
        return f"{self.lab}-wan"

    silo_iface = SILO_IFACE

    @property
    def wan_silo_iface(self) -> str:
        """Router side facing the silo; egress here is the download direction."""
        return f"s{self.silo}"

    @property
    def wan_agg_iface(self) -> str:
        """Router side facing the aggregator; egress here is the upload direction."""
        return f"a{self.silo}"

    @property
    def agg_iface(self) -> str:
        return f"silo{self.silo}"

    @property
    def silo_addr(self) -> str:
        return f"198.18.{self.silo}.1"

    @property
    def wan_silo_addr(self) -> str:
        return f"198.18.{self.silo}.2"

    @property
    def agg_addr(self) -> str:
        """The aggregator as silo k reaches it: through this path and no other."""
        return f"198.19.{self.silo}.1"

    @property
    def wan_agg_addr(self) -> str:
        return f"198.19.{self.silo}.2"


def lab_namespaces(lab: str, silos: int) -> list[str]:
    """Every namespace a lab of `silos` silos owns, in creation order."""
    return [f"{lab}-agg", f"{lab}-wan", *(PathLinks(lab, k).silo_ns for k in range(1, silos + 1))]


def build_path(links: PathLinks, mtu: int) -> None:
    """Create silo k's two veth links, addresses and routes; offloads off, MTU set."""
    run(["ip", "-n", links.silo_ns, "link", "add", links.silo_iface, "type", "veth",
         "peer", "name", links.wan_silo_iface, "netns", links.wan_ns])
    run(["ip", "-n", links.agg_ns, "link", "add", links.agg_iface, "type", "veth",
         "peer", "name", links.wan_agg_iface, "netns", links.wan_ns])
    ends = [
        (links.silo_ns, links.silo_iface, links.silo_addr),
        (links.wan_ns, links.wan_silo_iface, links.wan_silo_addr),
        (links.wan_ns, links.wan_agg_iface, links.wan_agg_addr),
        (links.agg_ns, links.agg_iface, links.agg_addr),
    ]
    for ns, iface, addr in ends:
        run(["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", iface])
        run(["ip", "-n", ns, "link", "set", iface, "mtu", str(mtu), "up"])
        disable_offloads(ns, iface)
    run(["ip", "-n", links.silo_ns, "route", "add", LAB_BLOCK, "via", links.wan_silo_addr])
    run(["ip", "-n", links.agg_ns, "route", "add", f"198.18.{links.silo}.0/24", "via", links.wan_agg_addr])


def disable_offloads(ns: str, iface: str) -> None:
    """One packet, at most one MTU: dropping a 64 KiB GSO super-packet is not '1 % loss'."""
    run(in_ns(ns, ["ethtool", "-K", iface, "tso", "off", "gso", "off", "gro", "off"]))


def set_sysctls(ns: str, values: dict[str, str]) -> None:
    for key, value in values.items():
        run(in_ns(ns, ["sysctl", "-q", "-w", f"{key}={value}"]))
