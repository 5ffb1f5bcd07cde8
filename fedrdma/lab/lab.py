"""The lab as one object: `Lab.up(config)`, `lab.status()`, `lab.down()`.

`up` is all-or-nothing: every step after the first record on disk runs under a guard
that tears down whatever the record lists, so a refused or failed `up` leaves nothing
behind; a killed `up` leaves a record that `down` follows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from fedrdma.lab import delay, netns, probe, shaping
from fedrdma.lab.config import LabConfig, PathShape
from fedrdma.lab.errors import LabError
from fedrdma.lab.netns import PathLinks
from fedrdma.lab.state import LabState, ceiling_key, load_ceiling, state_dir, store_ceiling
from fedrdma.lab.units import format_duration, format_rate

CEILING_TRANSFER_S = 1.5
"""Counted seconds of each ceiling transfer: slow start at 20 ms is over inside iperf3's omit second."""

CEILING_TRIES = 3
"""The ceiling is the best of a few transfers: on a shared host other tenants' load only ever
lowers a figure, and single runs differ severalfold, so the maximum is the element's."""

ELEMENT_BACKEND, NETEM_BACKEND, NO_DELAY = "element", "netem", "none"
"""How a lab delays packets: the userspace element, the kernel's netem, or not at all."""

SLOW_START_AFTER_IDLE = "0"
"""Keep a connection's window across idle gaps (training between rounds): otherwise every
upload restarts slow start, ~10 RTTs before a 5 Gbit/s x 20 ms path is full. Real hosts want the same."""

REQUIRED_TOOLS = ("ip", "tc", "ethtool", "sysctl")
"""Needed to build any lab."""

PROBE_TOOLS = ("ping", "iperf3")
"""Needed to measure a lab (status, ceiling)."""


@dataclass(frozen=True)
class LabPath:
    """One silo's path as users of the lab see it."""

    silo: int
    silo_ns: str
    silo_addr: str
    agg_ns: str
    agg_addr: str
    shape: PathShape
    links: PathLinks


@dataclass(frozen=True)
class PathStatus:
    """A path as configured and as measured; measured fields are None when not probed."""

    path: LabPath
    rtt_s: float | None
    upload: probe.TransferResult | None
    download: probe.TransferResult | None


class Lab:
    """A running lab, rebuilt from its state file; cheap to construct."""

    def __init__(self, state: LabState) -> None:
        if state.config is None:
            raise LabError(f"lab {state.name!r} has no configuration on record")
        self.state = state
        self.config: LabConfig = state.config

    # --- public API -------------------------------------------------------------------------

    @classmethod
    def up(cls, config: LabConfig, remeasure: bool = False, log: Callable[[str], None] | None = None) -> "Lab":
        """Build the lab, or return it as it is when the same config is already up and healthy."""
        say = log or (lambda _msg: None)
        netns.require_root()
        netns.require_tools(REQUIRED_TOOLS + PROBE_TOOLS)
        shaping.iptables()
        existing = LabState.load(config.name)
        if existing is not None:
            if existing.complete and existing.config == config and not remeasure and cls(existing).healthy():
                say(f"lab {config.name!r} is already up with these settings")
                return cls(existing)
            say(f"lab {config.name!r} is up with other settings or half-built: taking it down first")
            cls.down_by_name(config.name)
        _check_collisions(config)
        needs_delay = any(p.rtt_s > 0 for p in config.paths)
        if needs_delay and config.delay_backend == ELEMENT_BACKEND:
            delay.require_helper()

        state = LabState(name=config.name, config=config)
        state.save()
        try:
            lab = cls(state)
            lab._build(remeasure, say)
            state.complete = True
            state.save()
            return lab
        except BaseException:
            cls._teardown(state)
            raise

    @classmethod
    def attach(cls, name: str) -> "Lab":
        """The lab `name` as `up` left it; refuses when it is not (fully) up."""
        state = LabState.load(name)
        if state is None or not state.complete:
            raise LabError(f"no lab named {name!r} is up: start one with `fedrdma lab up --name {name}`")
        return cls(state)

    def down(self) -> None:
        self._teardown(self.state)

    @classmethod
    def down_by_name(cls, name: str) -> bool:
        """Remove everything lab `name` recorded; False when there was no record."""
        netns.require_root()
        state = LabState.load(name)
        if state is None:
            return False
        cls._teardown(state)
        return True

    @property
    def paths(self) -> list[LabPath]:
        out = []
        for k, shape in enumerate(self.config.paths, start=1):
            links = PathLinks(self.config.name, k)
            out.append(LabPath(k, links.silo_ns, links.silo_addr, links.agg_ns, links.agg_addr, shape, links))
        return out

    @property
    def aggregator(self) -> str:
        return f"{self.config.name}-agg"

    @property
    def router(self) -> str:
        return f"{self.config.name}-wan"

    @property
    def silos(self) -> list[str]:
        return [p.silo_ns for p in self.paths]

    @property
    def namespaces(self) -> list[str]:
        return netns.lab_namespaces(self.config.name, len(self.config.paths))

    def resolve(self, name: str) -> str:
        """A namespace from `agg`, `wan`, `silo2` or a full name such as `frl-silo2`."""
        full = name if name in self.namespaces else f"{self.config.name}-{name}"
        if full not in self.namespaces:
            raise LabError(f"lab {self.config.name!r} has no namespace {name!r}; it has "
                           f"{', '.join(self.namespaces)}")
        return full

    def exec_prefix(self, ns: str) -> list[str]:
        """Prepend to a command to run it inside namespace `ns` of this lab."""
        return netns.in_ns(self.resolve(ns), [])

    def address(self, ns: str, silo: int = 1) -> str:
        """The address of `ns` on silo `silo`'s path (the aggregator has one per silo)."""
        full = self.resolve(ns)
        if full == self.aggregator:
            return self.paths[silo - 1].agg_addr
        for p in self.paths:
            if full == p.silo_ns:
                return p.silo_addr
        raise LabError(f"{full} is the router; it has no address of its own for lab traffic")

    def healthy(self) -> bool:
        """All namespaces present and the element (if any) alive."""
        if not all(netns.namespace_exists(ns) for ns in self.namespaces):
            return False
        return self.state.element is None or delay.element_alive(self.state.element)

    def congestion_control(self) -> str:
        """The silos' TCP congestion control: BBR shrugs off random loss, CUBIC does not."""
        proc = netns.run(netns.in_ns(self.silos[0], ["sysctl", "-n", "net.ipv4.tcp_congestion_control"]),
                         check=False)
        return proc.stdout.strip() or "unknown"

    @property
    def ceiling_bps(self) -> float | None:
        return self.state.ceiling_bps

    @property
    def backend(self) -> str:
        return self.state.backend or NO_DELAY

    def status(self, measure: bool = True, seconds: float = probe.DEFAULT_TRANSFER_S,
               both_ways: bool = True) -> list[PathStatus]:
        out = []
        for p in self.paths:
            if not measure:
                out.append(PathStatus(p, None, None, None))
                continue
            rtt = probe.ping_rtt(p.links)
            up = probe.tcp_transfer(p.links, seconds, upload=True)
            down = probe.tcp_transfer(p.links, seconds, upload=False) if both_ways else None
            out.append(PathStatus(p, rtt, up, down))
        return out

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # --- building and tearing down ------------------------------------------------------------

    def checkpoint(self, step: str) -> None:
        """A step of `up` is about to begin (`fedrdma.testing.lab` fails or crashes here)."""

    def _build(self, remeasure: bool, say: Callable[[str], None]) -> None:
        cfg, state = self.config, self.state
        for ns in self.namespaces:
            state.namespaces.append(ns)
            state.save()
            self.checkpoint(f"netns:{ns}")
            netns.add_namespace(ns)
        netns.set_sysctls(self.router, {"net.ipv4.ip_forward": "1"})
        buffers = f"4096 131072 {cfg.tcp_buffer_max}"
        for ns in [self.aggregator, *self.silos]:
            netns.set_sysctls(ns, {"net.ipv4.tcp_rmem": buffers, "net.ipv4.tcp_wmem": buffers,
                                   "net.ipv4.tcp_slow_start_after_idle": SLOW_START_AFTER_IDLE})
        for p in self.paths:
            self.checkpoint(f"path:{p.silo}")
            netns.build_path(p.links, cfg.mtu)

        backend = self._choose_backend()
        state.backend = backend
        state.save()
        self.checkpoint("element")
        if backend == ELEMENT_BACKEND:
            queues = [(d.queue, p.shape.rtt_s / 2) for p in self.paths if p.shape.rtt_s > 0
                      for d in shaping.directions(p.links)]
            log_path = state_dir() / f"{cfg.name}-delay.log"

            def remember(record: "delay.ElementRecord") -> None:
                state.element = record
                state.save()

            delay.start_element(self.router, queues, log_path, remember)
        for p in self.paths:
            uses_element = backend == ELEMENT_BACKEND and p.shape.rtt_s > 0
            for d in shaping.directions(p.links):
                shaping.install_chain(d, loss=0.0, queue=uses_element)
                netem = p.shape.rtt_s / 2 if backend == NETEM_BACKEND else 0.0
                if netem:
                    shaping.install_qdisc(d, None, cfg.mtu, p.shape.rtt_s, netem)
        self.checkpoint("ceiling")
        if backend == ELEMENT_BACKEND:
            state.ceiling_bps = self._ceiling(remeasure, say)
            state.save()
            _check_ceiling(cfg, state.ceiling_bps)
        self.checkpoint("shape")
        for p in self.paths:
            for d in shaping.directions(p.links):
                shaping.install_qdisc(d, p.shape.rate_bps, cfg.mtu, p.shape.rtt_s, netem_delay_s=0.0)
                if p.shape.loss > 0:
                    shaping.set_loss(d, p.shape.loss)
        self.checkpoint("done")

    def _choose_backend(self) -> str:
        if not any(p.rtt_s > 0 for p in self.config.paths):
            return NO_DELAY
        want = self.config.delay_backend
        if want == ELEMENT_BACKEND:
            return ELEMENT_BACKEND
        has_netem = shaping.netem_available(self.router)
        if want == NETEM_BACKEND and not has_netem:
            raise LabError("delay backend 'netem' asked for, but tc here has no netem qdisc: "
                           "use --delay-backend auto (the userspace element)")
        return NETEM_BACKEND if has_netem else ELEMENT_BACKEND

    def _ceiling(self, remeasure: bool, say: Callable[[str], None]) -> float:
        """What the element carries on this host: one TCP flow through it, no rate limit, no loss."""
        key = _ceiling_key(self.config)
        cached = None if remeasure else load_ceiling(key)
        if cached is not None and not _over_ceiling(self.config, cached):
            return cached
        if cached is not None:  # taken while the host was busy, perhaps: a refusal rests on a fresh figure
            say(f"the stored ceiling, {format_rate(cached)}, is below these settings: measuring it again")
        delay.require_helper()
        path = max(self.paths, key=lambda p: p.shape.rtt_s)
        say(f"measuring the delay element's ceiling at {format_duration(path.shape.rtt_s)} RTT, "
            f"MTU {self.config.mtu} ...")
        runs = [probe.tcp_transfer(path.links, CEILING_TRANSFER_S, upload=True).bits_per_second
                for _ in range(CEILING_TRIES)]
        best = max(runs)
        store_ceiling(key, best)
        say(f"delay element ceiling: {format_rate(best)} (best of {', '.join(format_rate(r) for r in runs)})")
        return best

    @staticmethod
    def _teardown(state: LabState) -> None:
        """Remove what `state` lists, tolerating anything already gone; then the record."""
        if state.element is not None:
            delay.stop_element(state.element)
        owned = [ns for ns in state.namespaces if netns.namespace_exists(ns)]
        for ns in owned:
            netns.kill_pids(netns.pids_in(ns))
        for ns in reversed(owned):
            netns.delete_namespace(ns)
        state.remove()


def _ceiling_key(config: LabConfig) -> str:
    return ceiling_key(config.mtu, max(p.rtt_s for p in config.paths), delay.helper_path())


def _over_ceiling(config: LabConfig, ceiling_bps: float) -> list[str]:
    """The delayed paths the element cannot carry at `ceiling_bps`, named as errors name them."""
    return [f"silo{k} unlimited" if p.rate_bps is None else f"silo{k} at {format_rate(p.rate_bps)}"
            for k, p in enumerate(config.paths, start=1)
            if p.rtt_s > 0 and (p.rate_bps is None or p.rate_bps > ceiling_bps)]


def _check_ceiling(config: LabConfig, ceiling_bps: float) -> None:
    over = _over_ceiling(config, ceiling_bps)
    if over:
        which = ", ".join(over)
        raise LabError(f"rate above the delay element's ceiling of {format_rate(ceiling_bps)} at MTU "
                       f"{config.mtu} ({which}): above it the lab would measure the emulator, not the link. "
                       "Choose a lower --rate, a larger --mtu, or --remeasure if the host was busy when "
                       "the ceiling was taken")


def _check_collisions(config: LabConfig) -> None:
    """Refuse when a namespace the lab would make exists and the lab has no record of it."""
    taken = sorted(set(netns.lab_namespaces(config.name, len(config.paths))) & netns.list_namespaces())
    if taken:
        raise LabError(f"namespace(s) {', '.join(taken)} exist and lab {config.name!r} did not make them: "
                       f"choose another --name, or remove them (`ip netns del NAME`) if they are stale")


@contextmanager
def lab(config: LabConfig, log: Callable[[str], None] | None = None) -> Iterator[Lab]:
    """`with lab(cfg) as l:` for benchmarks: always down afterwards."""
    built = Lab.up(config, log=log)
    try:
        yield built
    finally:
        built.down()
