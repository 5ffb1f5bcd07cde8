"""The node: a site's pools and data-plane endpoint, serving the apps that attach to it.

Two doors, two kinds of caller:
- **Apps of this site**, on the Unix socket. The kernel names the calling user
  (`SO_PEERCRED`): only this node's user (or root) gets further, and only by presenting the
  token from the node's private directory, as this node's site. An app opens pools (shared
  memory it maps, `shm.py`), publishes one for a round, collects a round's deliveries, or
  asks this node to fetch from or deliver to a peer node.
- **Peer nodes**, on the serving node's mutual-TLS listener. A peer's site is the name in
  its certificate. A peer reaches only what an app of this site opened to it: the pool
  published for a round, to a peer presenting that round's token; or one fresh inbox per
  peer site for a round being collected. Bytes move as `tcp-e`: sealed chunks over TCP.

Every request runs on its own thread; apps and peer streams are counted against limits, and
every wait on a peer is the session's own, which follows progress.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fedrdma.config import NodeConfig
from fedrdma.core.addresses import is_loopback, split_host_port
from fedrdma.core.errors import FedRDMAError, PeerLost, ProtocolError
from fedrdma.core.layout import Layout
from fedrdma.core.modes import Mode, Role
from fedrdma.node import messages as m
from fedrdma.node import unix
from fedrdma.node.paths import NodePaths, NodeUnavailable, same_token
from fedrdma.node.shm import PoolError, SharedPool
from fedrdma.transport import wire
from fedrdma.transport.channel import Channel, Listener, dial
from fedrdma.transport.session import REFUSE_LINGER_S, Session
from fedrdma.transport.streams import DataListener
from fedrdma.transport.tls import CLIENT, SERVER, Credentials

log = logging.getLogger(__name__)

MAX_APPS = 32
"""Apps attached at once: a ServerApp and a few ClientApps per site, with room for restarts."""

MAX_PEERS = 128
"""Peer streams served at once: a fetch or a delivery per site of a 64-site federation."""

MAX_POOLS = 16
"""Pools one node holds for its apps: a global and an update per model, a few models."""

MAX_ROUNDS = 4
"""Rounds collected at once: the current one and stragglers of a few before."""

ATTACH_TIMEOUT_S = 10.0
"""An app's connection must attach within this: a connection that says nothing is dropped."""

WANT_TIMEOUT_S = 10.0
"""A peer node's stream must say what it wants within this."""

WORKING_EVERY_S = 2.0
"""While a transfer runs, the node tells the waiting app it is alive this often."""

CONNECT_TIMEOUT_S = 30.0
"""Dialing a peer node: a WAN path and its TLS handshake, with room."""

ACCEPT_POLL_S = 0.5
"""How often the accept loops look up to see whether the node is stopping."""


class NodeError(FedRDMAError):
    """A request this node refuses; the reason goes back to the app or peer that asked."""


@dataclass
class Offer:
    round: int
    token: str


@dataclass
class Collection:
    layout: Layout
    token: str
    sites: int
    landing: set[str] = field(default_factory=set)
    landed: dict[str, SharedPool] = field(default_factory=dict)
    open: bool = True


class Node:
    """One site's data plane; `start()` opens both doors, `stop()` closes them and removes the files."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.paths = NodePaths.of(cfg.site, cfg.runtime_dir)
        self.credentials = Credentials.load(cfg.certs, cfg.site) if cfg.certs else None
        if self.credentials is not None:
            self.credentials.check(SERVER if cfg.serve else CLIENT)
        self.pools: dict[str, SharedPool] = {}
        self.offers: dict[str, Offer] = {}
        self.collections: dict[int, Collection] = {}
        self.address = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._apps = threading.BoundedSemaphore(MAX_APPS)
        self._token = ""
        self._sock: socket.socket | None = None
        self._listener: Listener | None = None
        self._streams: DataListener | None = None
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.paths.make_private()
        self._refuse_second_node()
        if self.cfg.serve:
            host = split_host_port(self.cfg.listen)[0]
            self._listener = Listener(self.cfg.listen, self.credentials, max_streams=MAX_PEERS)
            self._streams = DataListener(host, self.cfg.data_port)
            self.address = self._listener.address
        self._token = self.paths.write_token()
        self.paths.socket.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.paths.socket))
        os.chmod(self.paths.socket, 0o600)
        sock.listen(MAX_APPS)
        sock.settimeout(ACCEPT_POLL_S)
        self._sock = sock
        self._spawn(self._accept_apps, "node-apps")
        if self._listener is not None:
            self._spawn(self._accept_peers, "node-peers")
        log.info("node for site %s: apps at %s%s", self.cfg.site, self.paths.socket,
                 f", peers at {self.address}" if self.address else "")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2 * ACCEPT_POLL_S)
        if self._sock is not None:
            self._sock.close()
            self.paths.socket.unlink(missing_ok=True)
            self.paths.token.unlink(missing_ok=True)
        if self._listener is not None:
            self._listener.close()
        if self._streams is not None:
            self._streams.close()

    def wait(self) -> None:
        """Until `request_stop` (a signal handler calls it); then call `stop`."""
        self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    def _refuse_second_node(self) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.paths.socket))
        except OSError:
            return  # nothing answers: a stale socket of a node that died
        finally:
            probe.close()
        raise NodeUnavailable(f"a node already serves site {self.cfg.site!r} at {self.paths.socket}: stop it first, "
                              "or give this one another --runtime-dir")

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=name)
        t.start()
        if name in ("node-apps", "node-peers"):
            self._threads.append(t)

    # -- apps -----------------------------------------------------------------------------
    def _accept_apps(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._apps.acquire(blocking=False):
                self._refuse(conn, f"this node already serves {MAX_APPS} apps")
                continue
            self._spawn(self._app, "node-app", conn)

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        try:
            unix.send(conn, m.Failed(reason=reason))
        except OSError:
            pass
        conn.close()

    def _app(self, conn: socket.socket) -> None:
        try:
            if self._admit(conn):
                lock = threading.Lock()
                while True:
                    msg, fds = unix.recv(conn, None)
                    for fd in fds:  # an app hands the node nothing
                        os.close(fd)
                    self._answer(conn, lock, msg)
        except (PeerLost, OSError):
            pass
        except ProtocolError as exc:
            self._refuse(conn, str(exc))
        finally:
            conn.close()
            self._apps.release()

    def _admit(self, conn: socket.socket) -> bool:
        caller = unix.peer_credentials(conn)
        if caller.uid not in (os.geteuid(), 0):
            self._refuse(conn, f"uid {caller.uid} is not this site's user (uid {os.geteuid()}): run the app as "
                               "the user that runs `fedrdma node`")
            return False
        try:
            msg, _ = unix.recv(conn, ATTACH_TIMEOUT_S)
        except TimeoutError:
            self._refuse(conn, f"attach within {ATTACH_TIMEOUT_S:.0f} s of connecting")
            return False
        if not isinstance(msg, m.Attach):
            self._refuse(conn, f"attach first, not {msg.type}")
            return False
        if not same_token(msg.token, self._token):
            self._refuse(conn, f"wrong token: read it from {self.paths.token} (a restarted node writes a new one)")
            return False
        if msg.site != self.cfg.site:
            self._refuse(conn, f"this node serves site {self.cfg.site!r}, not {msg.site!r}: an app attaches to its "
                               "own site's node")
            return False
        unix.send(conn, m.Attached(site=self.cfg.site, address=self.address))
        return True

    def _answer(self, conn: socket.socket, lock: threading.Lock, msg: wire.Message) -> None:
        try:
            if isinstance(msg, m.OpenPool):
                pool = self._open_pool(msg)
                with lock:
                    unix.send(conn, m.PoolOpened(name=pool.name, layout_id=pool.layout.layout_id,
                                                 nbytes=pool.layout.nbytes), [pool.fd])
                return
            if isinstance(msg, m.Take):
                layout, taken = self._take(msg.round)
                with lock:
                    unix.send(conn, m.Taken(layout_id=layout.layout_id, deliveries=[
                        m.Delivery(site=site, nbytes=p.layout.nbytes) for site, p in taken]),
                        [p.fd for _, p in taken])
                for _, p in taken:
                    p.close()
                return
            if isinstance(msg, m.Publish):
                done = self._publish(msg)
            elif isinstance(msg, m.Collect):
                done = self._collect(msg)
            elif isinstance(msg, (m.Fetch, m.Deliver)):
                with self._working(conn, lock):
                    done = self._move(msg)
            else:
                raise NodeError(f"an app may not send {msg.type}")
        except (FedRDMAError, ValueError) as exc:
            with lock:
                unix.send(conn, m.Failed(reason=str(exc)))
            return
        with lock:
            unix.send(conn, done)

    @contextmanager
    def _working(self, conn: socket.socket, lock: threading.Lock) -> Iterator[None]:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(WORKING_EVERY_S):
                try:
                    with lock:
                        unix.send(conn, m.Working())
                except OSError:
                    return  # the app is gone; the transfer ends on its own

        t = threading.Thread(target=beat, daemon=True, name="node-working")
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()

    def _open_pool(self, msg: m.OpenPool) -> SharedPool:
        layout = Layout.from_json(msg.layout)
        with self._lock:
            pool = self.pools.get(msg.name)
            if pool is not None:
                if pool.layout.layout_id != layout.layout_id:
                    raise NodeError(f"pool {msg.name!r} holds layout {pool.layout.layout_id}; this model's layout "
                                    f"is {layout.layout_id}: open it under another name")
                return pool
            if len(self.pools) >= MAX_POOLS:
                raise NodeError(f"this node holds {MAX_POOLS} pools already ({', '.join(sorted(self.pools))})")
            pool = self.pools[msg.name] = SharedPool.create(msg.name, layout)
            return pool

    def _pool(self, name: str) -> SharedPool:
        pool = self.pools.get(name)
        if pool is None:
            raise NodeError(f"no pool named {name!r}: open it first")
        return pool

    def _serving(self) -> None:
        if not self.cfg.serve:
            raise NodeError(f"this node serves no peers: start it with `fedrdma node --site {self.cfg.site} --serve`")

    def _publish(self, msg: m.Publish) -> m.Done:
        self._serving()
        with self._lock:
            pool = self._pool(msg.pool)
            self.offers[msg.pool] = Offer(msg.round, msg.token)
        return m.Done(descriptor=m.Descriptor(address=self.address, round=msg.round,
                                              layout_id=pool.layout.layout_id, token=msg.token))

    def _collect(self, msg: m.Collect) -> m.Done:
        self._serving()
        layout = next((p.layout for p in self.pools.values() if p.layout.layout_id == msg.layout_id), None)
        if layout is None:
            raise NodeError(f"no pool of layout {msg.layout_id} is open here: open the model's pool before "
                            "collecting its updates")
        with self._lock:
            if msg.round not in self.collections and len(self.collections) >= MAX_ROUNDS:
                raise NodeError(f"{MAX_ROUNDS} rounds are being collected already "
                                f"({', '.join(map(str, sorted(self.collections)))}): take one first")
            self.collections[msg.round] = Collection(layout, msg.token, msg.sites)
        return m.Done(descriptor=m.Descriptor(address=self.address, round=msg.round,
                                              layout_id=msg.layout_id, token=msg.token))

    def _take(self, rnd: int) -> tuple[Layout, list[tuple[str, SharedPool]]]:
        with self._lock:
            collection = self.collections.pop(rnd, None)
            if collection is None:
                raise NodeError(f"round {rnd} is not being collected")
            collection.open = False
            return collection.layout, sorted(collection.landed.items())

    # -- this node to a peer node ---------------------------------------------------------
    def _move(self, msg: m.Fetch | m.Deliver) -> m.Done:
        d = msg.descriptor
        pool = self._pool(msg.pool)
        if pool.layout.layout_id != d.layout_id:
            raise NodeError(f"the descriptor is for layout {d.layout_id}; pool {msg.pool!r} holds "
                            f"{pool.layout.layout_id}")
        if self.credentials is None and not is_loopback(split_host_port(d.address)[0]):
            raise NodeError(f"this node runs without certificates and dials loopback only, not {d.address}: "
                            "start it with --certs DIR")
        fetch = isinstance(msg, m.Fetch)
        channel = dial(d.address, CONNECT_TIMEOUT_S, self.credentials)
        channel.send(m.Want(kind=m.FETCH if fetch else m.DELIVER, site=self.cfg.site, round=d.round,
                            layout_id=d.layout_id, token=d.token))
        session = self._session(pool, channel, Role.RECEIVER if fetch else Role.SENDER, None)
        return self._run(session, fetch)

    def _session(self, pool: SharedPool, channel: Channel, role: Role, streams: DataListener | None) -> Session:
        cfg = self.cfg
        chunk_size = min(cfg.chunk_size, pool.layout.nbytes)  # a state smaller than a chunk is one chunk
        return Session(None, pool.state, channel, Mode.TCP_E, role, chunk_size, cfg.window,
                       streams=streams, data_streams=cfg.data_streams)

    @staticmethod
    def _run(session: Session, receive: bool) -> m.Done:
        try:
            session.open()
            stats = session.receive() if receive else session.send()
        except BaseException:
            session.abort()
            raise
        session.close()
        return m.Done(nbytes=stats.nbytes, seconds=stats.seconds)

    # -- peer nodes -----------------------------------------------------------------------
    def _accept_peers(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                channel = self._listener.accept(ACCEPT_POLL_S)
            except PeerLost:
                continue
            self._spawn(self._peer, "node-peer", channel)

    def _peer(self, channel: Channel) -> None:
        try:
            want = channel.recv(WANT_TIMEOUT_S)
            if not isinstance(want, m.Want):
                raise NodeError(f"a peer node says what it wants first, not {type(want).__name__}")
            site = want.site
            if channel.identity is not None and channel.identity != site:
                raise NodeError(f"the peer's certificate names site {channel.identity!r}, not {site!r}")
            if want.kind == m.FETCH:
                self._run(self._session(self._offered(want), channel, Role.SENDER, self._streams), False)
            else:
                self._land(want, channel)
        except (FedRDMAError, TimeoutError, ValueError) as exc:
            log.info("peer %s: %s", channel.identity or channel.peer, exc)
            if not channel.closed.is_set() and isinstance(exc, NodeError):
                self._refuse_peer(channel, str(exc))
        finally:
            channel.close()

    @staticmethod
    def _refuse_peer(channel: Channel, reason: str) -> None:
        """Refuse, then read until the peer hangs up: its hello is already on the way, and closing
        before it read the refusal could lose it."""
        deadline = time.monotonic() + REFUSE_LINGER_S
        try:
            channel.send(wire.Refuse(reason=reason))
            while time.monotonic() < deadline:
                channel.recv(max(0.0, deadline - time.monotonic()))
        except (PeerLost, TimeoutError, ProtocolError):
            pass

    def _offered(self, want: m.Want) -> SharedPool:
        with self._lock:
            for name, offer in self.offers.items():
                pool = self.pools[name]
                if offer.round == want.round and pool.layout.layout_id == want.layout_id:
                    if not same_token(want.token, offer.token):
                        raise NodeError(f"round {want.round}: the token does not match (stale or forged)")
                    return pool
            offered = sorted({o.round for o in self.offers.values()})
        raise NodeError(f"round {want.round} of layout {want.layout_id} is not offered here (offered rounds: "
                        f"{', '.join(map(str, offered)) or 'none'})")

    def _land(self, want: m.Want, channel: Channel) -> None:
        with self._lock:
            collection = self.collections.get(want.round)
            if collection is None:
                raise NodeError(f"round {want.round} takes no deliveries here (collecting: "
                                f"{', '.join(map(str, sorted(self.collections))) or 'none'})")
            if not same_token(want.token, collection.token):
                raise NodeError(f"round {want.round}: the token does not match (stale or forged)")
            if want.layout_id != collection.layout.layout_id:
                raise NodeError(f"round {want.round} collects layout {collection.layout.layout_id}, "
                                  f"not {want.layout_id}")
            if want.site in collection.landing or want.site in collection.landed:
                raise NodeError(f"site {want.site!r} delivered round {want.round} already")
            if len(collection.landing) + len(collection.landed) >= collection.sites:
                raise NodeError(f"round {want.round} takes {collection.sites} deliveries, and has them")
            collection.landing.add(want.site)
        try:
            inbox = SharedPool.create(f"inbox-{want.round}-{want.site}", collection.layout)
        except PoolError as exc:
            with self._lock:
                collection.landing.discard(want.site)
            raise NodeError(str(exc)) from None
        kept = False
        try:
            started = time.monotonic()
            self._run(self._session(inbox, channel, Role.RECEIVER, self._streams), True)
            log.info("round %d: %s delivered %d bytes in %.2f s", want.round, want.site, inbox.layout.nbytes,
                     time.monotonic() - started)
            with self._lock:  # one step from landing to landed, so no second delivery slips between
                if collection.open:
                    collection.landed[want.site] = inbox
                    kept = True
        finally:
            with self._lock:
                collection.landing.discard(want.site)
            if not kept:
                inbox.close()
