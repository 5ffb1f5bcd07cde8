"""The node: a site's pools and data-plane endpoint, serving the apps that attach to it.

Two doors, two kinds of caller:
- **Apps of this site**, on the Unix socket (here). The kernel names the calling user
  (`SO_PEERCRED`): only this node's user (or root) gets further, and only by presenting the
  token from the node's private directory, as this node's site. An app opens pools (shared
  memory it maps, `shm.py`), publishes one for a round, collects a round's deliveries and
  has them averaged or taken, or asks this node to fetch from or deliver to a peer node.
- **Peer nodes**, on the serving node's mutual-TLS listener (`peers.py`). A peer reaches only
  what an app of this site opened to it (`holdings.py`).

Every request runs on its own thread; apps and peer streams are counted against limits.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from fedrdma.config import NodeConfig
from fedrdma.core.errors import FedRDMAError, PeerLost, ProtocolError
from fedrdma.core.layout import Layout
from fedrdma.node import messages as m
from fedrdma.node import unix
from fedrdma.node.holdings import Holdings, NodeError
from fedrdma.node.paths import NodePaths, NodeUnavailable, same_token
from fedrdma.node.peers import ACCEPT_POLL_S, Peers
from fedrdma.node.shm import SharedPool
from fedrdma.transport import wire
from fedrdma.transport.tls import CLIENT, SERVER, Credentials

log = logging.getLogger(__name__)

MAX_APPS = 32
"""Apps attached at once: a ServerApp and a few ClientApps per site, with room for restarts."""

ATTACH_TIMEOUT_S = 10.0
"""An app's connection must attach within this: a connection that says nothing is dropped."""

WORKING_EVERY_S = 2.0
"""While a transfer or a fold runs, the node tells the waiting app it is alive this often."""


class Node:
    """One site's data plane; `start()` opens both doors, `stop()` closes them and removes the files."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.paths = NodePaths.of(cfg.site, cfg.runtime_dir)
        credentials = Credentials.load(cfg.certs, cfg.site) if cfg.certs else None
        if credentials is not None:
            credentials.check(SERVER if cfg.serve else CLIENT)
        self.holdings = Holdings(cfg.site, cfg.serve)
        self.peers = Peers(cfg, credentials, self.holdings)
        self._stop = threading.Event()
        self._apps = threading.BoundedSemaphore(MAX_APPS)
        self._token = ""
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        """Where peer nodes reach this node ("" when it serves none)."""
        return self.peers.address

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self.paths.make_private()
        self._refuse_second_node()
        if self.cfg.serve:
            self._threads.append(self.peers.listen(self._stop))
        self._token = self.paths.write_token()
        self.paths.socket.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.paths.socket))
        os.chmod(self.paths.socket, 0o600)
        sock.listen(MAX_APPS)
        sock.settimeout(ACCEPT_POLL_S)
        self._sock = sock
        t = threading.Thread(target=self._accept_apps, daemon=True, name="node-apps")
        t.start()
        self._threads.append(t)
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
        self.peers.close()

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
                _refuse(conn, f"this node already serves {MAX_APPS} apps")
                continue
            threading.Thread(target=self._app, args=(conn,), daemon=True, name="node-app").start()

    def _app(self, conn: socket.socket) -> None:
        try:
            if self._admit(conn):
                lock = threading.Lock()
                while True:
                    msg, fds = unix.recv(conn, None)  # an attached app may idle as long as it lives
                    for fd in fds:  # an app hands the node nothing
                        os.close(fd)
                    self._answer(conn, lock, msg)
        except (PeerLost, OSError):
            pass
        except ProtocolError as exc:
            _refuse(conn, str(exc))
        finally:
            conn.close()
            self._apps.release()

    def _admit(self, conn: socket.socket) -> bool:
        caller = unix.peer_credentials(conn)
        if caller.uid not in (os.geteuid(), 0):
            _refuse(conn, f"uid {caller.uid} is not this site's user (uid {os.geteuid()}): run the app as "
                          "the user that runs `fedrdma node`")
            return False
        try:
            msg, _ = unix.recv(conn, ATTACH_TIMEOUT_S)
        except TimeoutError:
            _refuse(conn, f"attach within {ATTACH_TIMEOUT_S:.0f} s of connecting")
            return False
        if not isinstance(msg, m.Attach):
            _refuse(conn, f"attach first, not {msg.type}")
            return False
        if not same_token(msg.token, self._token):
            _refuse(conn, f"wrong token: read it from {self.paths.token} (a restarted node writes a new one)")
            return False
        if msg.site != self.cfg.site:
            _refuse(conn, f"this node serves site {self.cfg.site!r}, not {msg.site!r}: an app attaches to its "
                          "own site's node")
            return False
        unix.send(conn, m.Attached(site=self.cfg.site, address=self.address))
        return True

    def _answer(self, conn: socket.socket, lock: threading.Lock, msg: wire.Message) -> None:
        h = self.holdings
        fds: list[int] = []
        handed: list[SharedPool] = []
        reply: wire.Message
        try:
            if isinstance(msg, m.OpenPool):
                pool = h.open_pool(msg.name, Layout.from_json(msg.layout))
                reply, fds = m.PoolOpened(name=pool.name, layout_id=pool.layout.layout_id,
                                          nbytes=pool.layout.nbytes), [pool.fd]
            elif isinstance(msg, m.Take):
                layout, taken = h.take(msg.round)
                reply = m.Taken(layout_id=layout.layout_id,
                                deliveries=[m.Delivery(site=site, nbytes=p.layout.nbytes) for site, p in taken])
                handed = [p for _, p in taken]
                fds = [p.fd for p in handed]
            elif isinstance(msg, m.Publish):
                layout = h.publish(msg.pool, msg.round, msg.token)
                reply = self._done(msg.round, layout.layout_id, msg.token)
            elif isinstance(msg, m.Collect):
                h.collect(msg.round, msg.layout_id, msg.token, msg.sites)
                reply = self._done(msg.round, msg.layout_id, msg.token)
            elif isinstance(msg, (m.Fetch, m.Deliver)):
                with self._working(conn, lock):
                    reply = self.peers.move(msg)
            elif isinstance(msg, m.Aggregate):
                with self._working(conn, lock):
                    result = h.aggregate(msg.round, msg.glob, msg.into, msg.weights, msg.min_sites, mean=msg.mean)
                reply = m.Aggregated(accepted=list(result.accepted), rejected=result.rejected,
                                     weights=result.weights, capped=result.capped)
            else:
                raise NodeError(f"an app may not send {msg.type}")
        except (FedRDMAError, ValueError) as exc:
            reply, fds = m.Failed(reason=str(exc)), []
        try:
            with lock:
                unix.send(conn, reply, fds)
        finally:
            for p in handed:  # handed over: the app's mappings hold the pages now
                p.close()

    def _done(self, rnd: int, layout_id: str, token: str) -> m.Done:
        return m.Done(descriptor=m.Descriptor(address=self.address, round=rnd, layout_id=layout_id, token=token,
                                              mode=self.peers.mode.value))

    @contextmanager
    def _working(self, conn: socket.socket, lock: threading.Lock) -> Iterator[None]:
        done = threading.Event()

        def beat() -> None:
            while not done.wait(WORKING_EVERY_S):
                try:
                    with lock:
                        unix.send(conn, m.Working())
                except OSError:
                    return  # the app is gone; the work ends on its own

        t = threading.Thread(target=beat, daemon=True, name="node-working")
        t.start()
        try:
            yield
        finally:
            done.set()
            t.join()


def _refuse(conn: socket.socket, reason: str) -> None:
    try:
        unix.send(conn, m.Failed(reason=reason))
    except OSError:
        pass
    conn.close()
