"""An app's side of its site's node: attach, map pools, and have them moved.

`NodeClient.attach(site)` finds the node by the site's name in the runtime directory,
presents the token only this user can read, and from then on every pool it opens is a
FlatState over shared memory the node maps too. Nothing the app holds is copied to the node:
a fetch lands in the app's own mapping, a delivery reads from it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TypeVar

from fedrdma.core.errors import FedRDMAError, PeerLost, ProtocolError
from fedrdma.core.layout import FlatState, Layout
from fedrdma.node import messages as m
from fedrdma.node import unix
from fedrdma.node.paths import NodePaths, NodeUnavailable
from fedrdma.node.shm import SharedPool
from fedrdma.transport import wire

T = TypeVar("T", bound=wire.Message)

NODE_SILENCE_S = 30.0
"""Longest the node may say nothing while it works for this app: it reports every 2 s."""


class NodeRefused(FedRDMAError):
    """The node refused or could not do what the app asked; the node's reason follows."""


class NodeClient:
    """One app's attachment to its site's node: one Unix connection, the pools it mapped."""

    def __init__(self, sock: socket.socket, paths: NodePaths, attached: m.Attached) -> None:
        self._sock = sock
        self.paths = paths
        self.site = attached.site
        self.address = attached.address
        """Where peer nodes reach this node ("" when it serves none)."""
        self.pools: dict[str, SharedPool] = {}

    @classmethod
    def attach(cls, site: str, runtime_dir: Path | None = None) -> NodeClient:
        paths = NodePaths.of(site, runtime_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(paths.socket))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise NodeUnavailable(paths.not_running()) from None
        except PermissionError:
            sock.close()
            raise NodeUnavailable(f"the node's socket {paths.socket} is not this user's to reach: run the app as "
                                  "the user that runs `fedrdma node`") from None
        try:
            unix.send(sock, m.Attach(site=site, token=paths.read_token()))
            reply = _expect(sock, m.Attached, NODE_SILENCE_S)
        except BaseException:
            sock.close()
            raise
        return cls(sock, paths, reply)

    def close(self) -> None:
        self._sock.close()
        for pool in self.pools.values():
            pool.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pools ----------------------------------------------------------------------------
    def pool(self, name: str, layout: Layout) -> FlatState:
        """The node's pool `name` for this layout, mapped here; made (zeroed) if the node had none."""
        if name in self.pools:
            return self.pools[name].state
        reply, fds = self._ask(m.OpenPool(name=name, layout=layout.to_json()), m.PoolOpened)
        if len(fds) != 1 or reply.layout_id != layout.layout_id:
            _close(fds)
            raise ProtocolError(f"the node answered pool {name!r} with {len(fds)} descriptors and layout "
                                f"{reply.layout_id}, not one of {layout.layout_id}")
        self.pools[name] = SharedPool(fds[0], layout, name)
        return self.pools[name].state

    # -- serving side ---------------------------------------------------------------------
    def publish(self, pool: str, rnd: int, token: str) -> m.Descriptor:
        """Let peer nodes holding `token` fetch pool `pool` for round `rnd`: what to hand them."""
        reply, _ = self._ask(m.Publish(pool=pool, round=rnd, token=token), m.Done)
        assert reply.descriptor is not None
        return reply.descriptor

    def collect(self, rnd: int, layout_id: str, token: str, sites: int) -> m.Descriptor:
        reply, _ = self._ask(m.Collect(round=rnd, layout_id=layout_id, token=token, sites=sites), m.Done)
        assert reply.descriptor is not None
        return reply.descriptor

    def take(self, rnd: int, layout: Layout) -> dict[str, FlatState]:
        """The round's deliveries that landed whole, by site, each mapped here; the node lets go of them."""
        reply, fds = self._ask(m.Take(round=rnd), m.Taken)
        if len(fds) != len(reply.deliveries) or reply.layout_id != layout.layout_id:
            _close(fds)
            raise ProtocolError(f"the node handed {len(fds)} descriptors for {len(reply.deliveries)} deliveries "
                                f"of layout {reply.layout_id} (expected {layout.layout_id})")
        return {d.site: SharedPool(fd, layout, f"inbox-{rnd}-{d.site}").state for d, fd in zip(reply.deliveries, fds)}

    def aggregate(self, rnd: int, glob: str, into: str, weights: dict[str, int], min_sites: int = 1,
                  mean: m.Mean = "sum-then-divide") -> m.Aggregated:
        """FedAvg of the round's deliveries, checked as the aggregator checks them, into pool `into`.

        Closes the round's collection; the deliveries' memory is the node's again after.
        """
        return self._ask(m.Aggregate(round=rnd, glob=glob, into=into, weights=weights, min_sites=min_sites,
                                     mean=mean), m.Aggregated)[0]

    # -- dialing side ---------------------------------------------------------------------
    def fetch(self, pool: str, descriptor: m.Descriptor) -> m.Done:
        """Fill pool `pool` from the node the descriptor names; returns once every chunk is verified."""
        return self._ask(m.Fetch(pool=pool, descriptor=descriptor), m.Done)[0]

    def deliver(self, pool: str, descriptor: m.Descriptor) -> m.Done:
        return self._ask(m.Deliver(pool=pool, descriptor=descriptor), m.Done)[0]

    # -- the wire -------------------------------------------------------------------------
    def _ask(self, msg: wire.Message, kind: type[T]) -> tuple[T, list[int]]:
        try:
            unix.send(self._sock, msg)
        except OSError as exc:
            raise NodeUnavailable(f"the node at {self.paths.socket} went away ({exc}): {self.paths.not_running()}") \
                from None
        return _expect_fds(self._sock, kind, NODE_SILENCE_S, self.paths)


def _expect(sock: socket.socket, kind: type[T], silence: float) -> T:
    reply, fds = _expect_fds(sock, kind, silence, None)
    _close(fds)
    return reply


def _expect_fds(sock: socket.socket, kind: type[T], silence: float,
                                 paths: NodePaths | None) -> tuple[T, list[int]]:
    while True:
        try:
            reply, fds = unix.recv(sock, silence)
        except PeerLost:
            raise NodeUnavailable("the node closed the connection" + (f": {paths.not_running()}" if paths else "")) \
                from None
        except TimeoutError:
            raise NodeUnavailable(f"the node said nothing for {silence:.0f} s") from None
        if isinstance(reply, m.Working):
            continue
        if isinstance(reply, m.Failed):
            _close(fds)
            raise NodeRefused(reply.reason)
        if not isinstance(reply, kind):
            _close(fds)
            raise ProtocolError(f"the node answered {reply.type}, expected {kind.__name__}")
        return reply, fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
