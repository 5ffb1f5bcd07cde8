"""A node's other door: peer nodes, over mutual TLS, and this node dialing them.

A peer's site is the name in its certificate; its first message (`Want`) says what it wants,
and `Holdings` decides whether it may have it. Then a session moves one whole pool, and its
waits are the session's own, which follow progress. The session is `tcp-e`, or `rdma-e` where
the fabric enforces remote keys (or the operator said every peer may reach every process,
`--trusted-fabric`): the holder WRITEs its pool into the other node's. A pool this node
sends from is registered on its first transfer and kept (`Registrations`); a pool a peer
WRITEs into is registered for that transfer alone, so the keys the peer was handed die with it.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from fedrdma.config import NodeConfig
from fedrdma.core.addresses import is_loopback, is_unspecified, join_host_port, split_host_port
from fedrdma.core.errors import FedRDMAError, PeerLost, ProtocolError
from fedrdma.core.modes import Mode, Role
from fedrdma.node import messages as m
from fedrdma.node.holdings import Holdings, NodeError
from fedrdma.node.shm import SharedPool
from fedrdma.transport import fabric, wire
from fedrdma.transport.agent import Agent, Pool
from fedrdma.transport.channel import Channel, Listener, dial
from fedrdma.transport.session import REFUSE_LINGER_S, Session
from fedrdma.transport.streams import DataListener
from fedrdma.transport.tls import Credentials

log = logging.getLogger(__name__)

MAX_PEERS = 128
"""Peer streams served at once: a fetch or a delivery per site of a 64-site federation."""

WANT_TIMEOUT_S = 10.0
"""A peer node's stream must say what it wants within this."""

CONNECT_TIMEOUT_S = 30.0
"""Dialing a peer node: a WAN path and its TLS handshake, with room."""

ACCEPT_POLL_S = 0.5
"""How often the accept loop looks up to see whether the node is stopping."""


class Peers:
    def __init__(self, cfg: NodeConfig, credentials: Credentials | None, holdings: Holdings) -> None:
        self.cfg = cfg
        self.credentials = credentials
        self.holdings = holdings
        here = fabric.detect()
        self.mode = fabric.resolve(cfg.mode, here)
        fabric.require_trust(self.mode, cfg.trusted_fabric, here)  # before the agent exists
        fabric.require_checks(cfg.verify, self.mode, here)
        self.agent = Agent(f"fedrdma-node-{cfg.site}-{os.getpid()}") if self.mode.one_sided else None
        self.listener: Listener | None = None
        self.streams: DataListener | None = None
        self.address = ""
        self.registrations = Registrations(self.agent, holdings) if self.agent is not None else None

    def listen(self, stop: threading.Event) -> threading.Thread:
        self.listener = Listener(self.cfg.listen, self.credentials, max_streams=MAX_PEERS)
        if self.mode is Mode.TCP_E:  # rdma-e's bytes travel on the agent's own connections
            self.streams = DataListener(split_host_port(self.cfg.listen)[0], self.cfg.data_port)
        self.address = self.listener.address
        t = threading.Thread(target=self._accept, args=(stop,), daemon=True, name="node-peers")
        t.start()
        return t

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.streams is not None:
            self.streams.close()
        if self.agent is not None:
            self.agent.close()

    # -- this node dials ------------------------------------------------------------------
    def move(self, msg: m.Fetch | m.Deliver) -> m.Done:
        d = msg.descriptor
        pool = self.holdings.pool(msg.pool)
        if pool.layout.layout_id != d.layout_id:
            raise NodeError(f"the descriptor is for layout {d.layout_id}; pool {msg.pool!r} holds "
                            f"{pool.layout.layout_id}")
        if d.mode != self.mode.value:
            raise NodeError(f"the serving node moves its pools as {d.mode} and this node as {self.mode}: start this "
                            f"node with --mode {d.mode}" + (" (and --trusted-fabric where the fabric does not enforce "
                                                            "remote keys)" if d.mode != Mode.TCP_E.value else ""))
        address = self._peer_address(d.address)
        if self.credentials is None and not is_loopback(split_host_port(address)[0]):
            raise NodeError(f"this node runs without certificates and dials loopback only, not {address}: "
                            "start it with --certs DIR")
        fetch = isinstance(msg, m.Fetch)
        channel = dial(address, CONNECT_TIMEOUT_S, self.credentials)
        channel.send(m.Want(kind=m.FETCH if fetch else m.DELIVER, site=self.cfg.site, round=d.round,
                            layout_id=d.layout_id, token=d.token))
        return self._move(pool, channel, Role.RECEIVER if fetch else Role.SENDER, None)

    def _peer_address(self, announced: str) -> str:
        """Where to dial the node a descriptor names: its host, or this node's --peer-host."""
        host, port = split_host_port(announced)
        if self.cfg.peer_host:
            return join_host_port(self.cfg.peer_host, port)
        if is_unspecified(host):
            raise NodeError(f"the serving node announces {announced}, every address of its host, which names "
                            "none to dial: start this node with --peer-host HOST, the host it reaches that "
                            "node at")
        return announced

    def _move(self, pool: SharedPool, channel: Channel, role: Role, streams: DataListener | None) -> m.Done:
        """One session moving `pool` whole, with the registration `Registrations` leases it."""
        leased = self.registrations.lease(pool, role) if self.registrations is not None else None  # may refuse
        try:
            cfg = self.cfg
            chunk_size = min(cfg.chunk_size, pool.layout.nbytes)  # a state smaller than a chunk is one chunk
            session = Session(self.agent, pool.state, channel, self.mode, role, chunk_size, cfg.window, pool=leased,
                              streams=streams, data_streams=cfg.data_streams,
                              trusted_fabric=cfg.trusted_fabric, verify=cfg.verify != fabric.VERIFY_FABRIC)
            return _run(session)
        finally:
            if self.registrations is not None:
                self.registrations.end(pool, role)

    # -- peers dial this node -------------------------------------------------------------
    def _accept(self, stop: threading.Event) -> None:
        assert self.listener is not None
        while not stop.is_set():
            try:
                channel = self.listener.accept(ACCEPT_POLL_S)
            except PeerLost:
                continue
            threading.Thread(target=self._serve, args=(channel,), daemon=True, name="node-peer").start()

    def _serve(self, channel: Channel) -> None:
        try:
            want = channel.recv(WANT_TIMEOUT_S)
            if not isinstance(want, m.Want):
                raise NodeError(f"a peer node says what it wants first, not {type(want).__name__}")
            if channel.identity is not None and channel.identity != want.site:
                raise NodeError(f"the peer's certificate names site {channel.identity!r}, not {want.site!r}")
            if want.kind == m.FETCH:
                self._move(self.holdings.offered(want), channel, Role.SENDER, self.streams)
            else:
                self._land(want, channel)
        except (FedRDMAError, TimeoutError, ValueError) as exc:
            log.info("peer %s: %s", channel.identity or channel.peer, exc)
            if not channel.closed.is_set() and isinstance(exc, NodeError):
                _refuse(channel, str(exc))
        finally:
            channel.close()

    def _land(self, want: m.Want, channel: Channel) -> None:
        collection, inbox = self.holdings.inbox_for(want)
        kept = None
        try:
            started = time.monotonic()
            self._move(inbox, channel, Role.RECEIVER, self.streams)
            log.info("round %d: %s delivered %d bytes in %.2f s", want.round, want.site, inbox.layout.nbytes,
                     time.monotonic() - started)
            kept = inbox
        finally:
            if kept is None:
                inbox.close()
            self.holdings.landed(collection, want.site, kept)


class Registrations:
    """Which of a node's named pools are registered with its agent, and who is moving them.

    A pool a sender reads from is registered on its first send and kept while the node lives:
    registering is what an RDMA NIC charges most for (pinning the pages, making keys), and an
    initiating sender hands the peer no key to it, so keeping it widens nobody's reach; every
    send from the pool shares it. A pool a peer WRITEs into is registered by its session for
    that transfer alone, and a kept registration of it is let go of first: one buffer is never
    registered twice (a node segfaulted in NIXL's transfer when a pool was received into under
    a second registration beside its kept one). So a pool is not received into while it is
    sent from, nor sent from while it is received into: either would move half a model.
    Inboxes, and every pool over tcp-e, are the sessions' own business.
    """

    def __init__(self, agent: Agent, holdings: Holdings) -> None:
        self.agent = agent
        self.holdings = holdings
        self.kept: dict[str, Pool] = {}
        self.senders: dict[str, int] = {}
        self.receiving: set[str] = set()
        self._lock = threading.Lock()

    def lease(self, pool: SharedPool, role: Role) -> Pool | None:
        """The registration a session over `pool` runs on (None: the session registers its own)."""
        name = pool.name
        if not self._named(pool):
            return None  # an inbox: its one session registers it
        with self._lock:
            if name in self.receiving or (role is Role.RECEIVER and self.senders.get(name)):
                raise NodeError(f"pool {name!r} is being {'received into' if name in self.receiving else 'sent from'}: "
                                "move it again once that transfer is done")
            if role is Role.RECEIVER:
                self.receiving.add(name)
                kept = self.kept.pop(name, None)
                if kept is not None:
                    kept.close()
                return None
            kept = self.kept.get(name)
            if kept is None:
                kept = self.kept[name] = self.agent.register(pool.state.buffer)
                log.info("pool %r registered for sending, and kept", name)
            self.senders[name] = self.senders.get(name, 0) + 1
            return kept

    def end(self, pool: SharedPool, role: Role) -> None:
        """The session `lease` let run is over (or never began)."""
        if not self._named(pool):
            return
        with self._lock:
            if role is Role.RECEIVER:
                self.receiving.discard(pool.name)
            elif self.senders.get(pool.name):
                self.senders[pool.name] -= 1

    def _named(self, pool: SharedPool) -> bool:
        """Whether `pool` is one of the node's named pools (not an inbox that shares a name)."""
        return self.holdings.pools.get(pool.name) is pool


def _run(session: Session) -> m.Done:
    try:
        session.open()
        stats = session.receive() if session.role is Role.RECEIVER else session.send()
    except BaseException:
        session.abort()
        raise
    session.close()
    return m.Done(nbytes=stats.nbytes, seconds=stats.seconds)


def _refuse(channel: Channel, reason: str) -> None:
    """Refuse, then read until the peer hangs up: its hello is already on the way, and closing
    before it read the refusal could lose it."""
    deadline = time.monotonic() + REFUSE_LINGER_S
    try:
        channel.send(wire.Refuse(reason=reason))
        while time.monotonic() < deadline:
            channel.recv(max(0.0, deadline - time.monotonic()))
    except (PeerLost, TimeoutError, ProtocolError):
        pass
