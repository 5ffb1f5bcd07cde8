"""One NIXL agent per process, and pools registered on it.

The only module that imports NIXL. Everything here is a thin, checked layer over
`nixl_cu12._api`: register once, describe memory by (address, length) integers, post
chunk operations from prepared descriptor lists, and never wait without a deadline.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import uuid
from collections.abc import Sequence

import torch
from nixl_cu12 import _bindings, nixl_agent, nixl_agent_config, nixl_thread_sync_t

from fedrdma.core.chunks import ChunkPlan, Region, registration_slices
from fedrdma.core.errors import TransferError

log = logging.getLogger(__name__)

NIXL_LOG_LEVEL = logging.WARNING
"""NIXL logs every agent creation at INFO on stderr; we report what matters ourselves."""

PROGRESS_THREAD = False
"""NIXL's progress thread polls UCX without pause: a full core per process, even when idle
(README: Measurements behind the defaults). On a host that also trains a model that core is
stolen from training, so our loops drive progress themselves (`progress`, every poll of a
transfer or notification) and nothing spins between transfers."""

def _quiet_nixl() -> None:
    """NIXL configures its logger on import, to stdout; stdout is ours (JSON lines)."""
    logger = logging.getLogger("nixl")
    logger.setLevel(NIXL_LOG_LEVEL)
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


_quiet_nixl()


class Agent:
    """This process's NIXL agent over UCX; UCX_* environment settings pass through untouched."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or f"fedrdma-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.nixl = nixl_agent(
            self.name,
            nixl_agent_config(
                enable_prog_thread=PROGRESS_THREAD,
                backends=["UCX"],
                # One agent serves several sessions on their own threads (the aggregator: two
                # per silo); without a progress thread each of them drives the UCX worker.
                sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT,
            ),
        )
        if "UCX" not in self.nixl.backends:
            raise TransferError("NIXL has no UCX backend here; reinstall nixl-cu12 (make setup)")
        self._lock = threading.Lock()
        self._notes: dict[str, list[bytes]] = {}
        self._pools: list[Pool] = []
        self._stagings: list[Staging] = []
        self._registering = threading.Lock()
        """Held from the overlap check to the registration: sessions register on their own threads."""

    def metadata(self) -> bytes:
        return bytes(self.nixl.get_agent_metadata())

    def partial_metadata(self, pool: Pool | None) -> bytes:
        """Connection info, plus keys to `pool` alone (none at all when `pool` is None)."""
        if pool is None:
            descs = _bindings.nixlRegDList(_bindings.DRAM_SEG, [])
        else:
            descs = pool.reg_descs
        return bytes(self.nixl.get_partial_agent_metadata(descs, True))

    def add_peer(self, metadata: bytes) -> str:
        name = self.nixl.add_remote_agent(metadata)
        return name.decode() if isinstance(name, bytes) else str(name)

    def remove_peer(self, name: str) -> None:
        """Drop a peer's metadata and endpoint: later operations toward it fail fast."""
        try:
            self.nixl.remove_remote_agent(name)
        except Exception as exc:  # already gone is fine: the goal is that it is gone
            log.debug("remove_remote_agent(%s): %s", name, exc)

    def register(self, buffer: torch.Tensor) -> Pool:
        with self._registering:
            self._claim([_region_of(buffer)])
            pool = Pool(self, buffer)
            with self._lock:
                self._pools.append(pool)
        return pool

    def stage(self, tensors: Sequence[torch.Tensor]) -> Staging:
        """Register one buffer per chunk for one transfer (FedRDMA without pools)."""
        with self._registering:
            self._claim([_region_of(t) for t in tensors])
            staging = Staging(self, tensors)
            with self._lock:
                self._stagings.append(staging)
        return staging

    def _claim(self, regions: Sequence[Region]) -> None:
        """Refuse to register bytes this agent holds registered already.

        NIXL takes a second registration of the same memory without a word, and a transfer
        over one of them may then crash the process (a node's push did, after a fetch had
        registered and let go of a pool its sends kept registered: why `node.peers.Registrations`
        shares one). A named error here, before NIXL is called, is what any caller gets
        instead: share the live registration, or close it first.
        """
        with self._lock:
            live = [p.region for p in self._pools if p.registered]
            live += [r for s in self._stagings for r in s.regions()]
        for index, region in enumerate(regions):
            for other in [*live, *regions[:index]]:
                if region.address < other.address + other.length and other.address < region.address + region.length:
                    raise TransferError(
                        f"{region.length} bytes at {region.digest()} overlap {other.length} bytes this agent has "
                        f"registered already ({other.digest()}); one buffer is registered once per agent: "
                        "share the live pool, or close it before registering again"
                    )

    def post(self, op: str, local: object, remote: object, index: int, notif: bytes, place: int | None = None,
             far: int | None = None) -> Operation:
        """Start the one-sided `op` ("WRITE" or "READ") of chunk `index` between prepared lists;
        `place` is the local entry and `far` the remote one when it is not the chunk's own (a
        slot of a bounded inbox: a pull's READ lands in one of ours, a push WRITEs one granted)."""
        return Operation(self, op, local, remote, index, notif, place=place, far=far)

    def post_whole(self, op: str, local: Region, remote: Region, peer: str) -> Operation:
        """One operation over a whole buffer, unchunked: the raw reference the modes are read against.

        One descriptor per registration slice (a descriptor cannot span two registrations), so
        a state above 4 GiB is still a single request."""
        if local.length != remote.length:
            raise TransferError(f"a whole {op} needs equal buffers, not {local.length} and {remote.length} bytes")
        slices = registration_slices(local.length)
        far = self.nixl.get_xfer_descs([(*remote.slice(off, n), 0) for off, n in slices], "DRAM")
        near = self.nixl.get_xfer_descs([(*local.slice(off, n), 0) for off, n in slices], "DRAM")
        return Operation(self, op, None, None, 0, b"", handle=self.nixl.initialize_xfer(op, near, far, peer))

    def remote_dlist(self, peer: str, ranges: Sequence[tuple[int, int]]) -> object:
        """Prepared descriptors of a peer's memory, one per (address, length) range.

        Callers build the ranges through `Region.slice`, so only advertised memory is named.
        """
        return self.nixl.prep_xfer_dlist(peer, [(address, length, 0) for address, length in ranges], "DRAM")

    def progress(self) -> None:
        """Let UCX move bytes and answer peers (READ emulation, wire-up) while we wait."""
        with self._lock:
            self._collect()

    def _collect(self) -> None:
        for name, notes in self.nixl.get_new_notifs().items():
            key = name.decode() if isinstance(name, bytes) else str(name)
            self._notes.setdefault(key, []).extend(notes)

    def notifications(self, peer: str) -> list[bytes]:
        """New notifications from `peer`; those of other peers wait for their own sessions.

        NIXL hands out every peer's notifications at once, and an aggregator runs one
        session per silo on one agent: without this, sessions would steal each other's.
        """
        with self._lock:
            self._collect()
            return self._notes.pop(peer, [])

    def close(self) -> None:
        for pool in list(self._pools):
            pool.close()

    def _forget(self, registration: Pool | Staging) -> None:
        """A closed pool or staging leaves the agent's lists: a long-lived agent that registers
        per transfer (a node's) would otherwise keep every buffer it ever registered alive."""
        with self._lock:
            for kept in (self._pools, self._stagings):
                if registration in kept:
                    kept.remove(registration)  # type: ignore[arg-type]

    @property
    def registered_pools(self) -> int:
        return sum(1 for p in self._pools if p.registered)


def _region_of(buffer: torch.Tensor) -> Region:
    """The bytes a tensor's registration would cover."""
    return Region(int(buffer.data_ptr()), int(buffer.numel() * buffer.element_size()))


class Pool:
    """A contiguous buffer registered with NIXL for as long as a session may use it.

    Registration is the expensive step (pinning, keys); a pool is registered once and every
    transfer reuses it. `close` deregisters: call it only after the peer said it is done or
    was declared dead, since one-sided peers get no other signal.
    """

    def __init__(self, agent: Agent, buffer: torch.Tensor) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise TransferError("a pool must be a contiguous 1-D uint8 tensor")
        self.agent = agent
        self.buffer = buffer
        self.region = Region(int(buffer.data_ptr()), int(buffer.numel()))
        # In the slices chunk plans respect (core.chunks.REGISTRATION_SLICE): no chunk spans two.
        slices = [(self.region.address + off, length, 0, "") for off, length in registration_slices(self.region.length)]
        self.reg_descs = agent.nixl.register_memory(slices, "DRAM")
        self.registered = True
        self._local: dict[int, object] = {}
        self._slot_lists: dict[tuple[int, ...], object] = {}

    def local_dlist(self, plan: ChunkPlan) -> object:
        """Prepared descriptors of this pool, one per chunk, cached per chunk size."""
        handle = self._local.get(plan.chunk_size)
        if handle is None:
            descs = [(self.region.address + c.offset, c.length, 0) for c in plan.chunks]
            handle = self.agent.nixl.prep_xfer_dlist("NIXL_INIT_AGENT", descs, "DRAM")
            self._local[plan.chunk_size] = handle
        return handle

    def slot_dlist(self, size: int, lengths: Sequence[int]) -> object:
        """Prepared descriptors of this pool cut into `size`-byte slots, cached per shape:
        entry `k * count + j` is the first `lengths[k]` bytes of slot j (a chunk's landing place
        must be exactly the chunk's length, and a plan's last chunk may be shorter)."""
        key = (size, *lengths)
        handle = self._slot_lists.get(key)
        if handle is None:
            count = self.region.length // size
            if not lengths or not all(0 < n <= size for n in lengths):
                raise TransferError(f"slot descriptors need lengths within the {size}-byte slots, not {list(lengths)}")
            descs = [(self.region.address + j * size, n, 0) for n in lengths for j in range(count)]
            handle = self.agent.nixl.prep_xfer_dlist("NIXL_INIT_AGENT", descs, "DRAM")
            self._slot_lists[key] = handle
        return handle

    def close(self) -> None:
        if not self.registered:
            return
        for handle in [*self._local.values(), *self._slot_lists.values()]:
            handle.release()  # type: ignore[attr-defined]
        self._local.clear()
        self._slot_lists.clear()
        self.agent.nixl.deregister_memory(self.reg_descs)
        self.registered = False
        self.agent._forget(self)


class Staging:
    """Buffers registered for one transfer only: what plain FedRDMA pays per transfer."""

    def __init__(self, agent: Agent, tensors: Sequence[torch.Tensor]) -> None:
        self.agent = agent
        self.tensors = list(tensors)
        self._reg = agent.nixl.register_memory(self.tensors)
        self._local: object | None = None

    def regions(self) -> list[Region]:
        return [_region_of(t) for t in self.tensors]

    def partial_metadata(self) -> bytes:
        """Connection info plus keys to these buffers alone, for the peer that WRITEs into them."""
        return bytes(self.agent.nixl.get_partial_agent_metadata(self._reg, True))

    def local_dlist(self) -> object:
        if self._local is None:
            self._local = self.agent.nixl.prep_xfer_dlist("NIXL_INIT_AGENT", self.tensors)
        return self._local

    def close(self) -> None:
        if self._local is not None:
            self._local.release()  # type: ignore[attr-defined]
            self._local = None
        if self._reg is not None:
            self.agent.nixl.deregister_memory(self._reg)
            self._reg = None
        self.agent._forget(self)


class RemotePeer:
    """A peer's agent as this side reaches it: its metadata, the memory it advertised, and
    descriptors of that memory prepared per chunk size.

    `regions` is one region (a pool: chunk i at its own offset) or one per chunk (staging
    buffers). Every remote range is built through `Region.slice`, so nothing outside what
    the peer advertised can be named.
    """

    def __init__(self, agent: Agent, metadata: bytes, regions: Sequence[Region]) -> None:
        self.agent = agent
        self.metadata = metadata
        self.regions = list(regions)
        self.name = agent.add_peer(metadata)
        self._dlists: dict[int, object] = {}
        self._slot_dlists: dict[tuple[int, ...], object] = {}

    def dlist(self, plan: ChunkPlan) -> object:
        """Prepared remote descriptors for `plan`, checked against the advertised regions."""
        handle = self._dlists.get(plan.chunk_size)
        if handle is None:
            if len(self.regions) == 1:
                ranges = [self.regions[0].slice(c.offset, c.length) for c in plan.chunks]
            elif len(self.regions) == len(plan):
                ranges = [r.slice(0, c.length) for r, c in zip(self.regions, plan.chunks, strict=True)]
            else:
                raise TransferError(f"peer advertised {len(self.regions)} regions for a plan of {len(plan)} chunks")
            handle = self.agent.remote_dlist(self.name, ranges)
            self._dlists[plan.chunk_size] = handle
        return handle

    def slot_dlist(self, count: int, lengths: Sequence[int]) -> object:
        """Prepared remote descriptors of the advertised region cut into `count` equal slots, as
        `Pool.slot_dlist` cuts ours: entry `k * count + j` is the first `lengths[k]` bytes of
        slot j. Each range is checked against the region."""
        key = (count, *lengths)
        handle = self._slot_dlists.get(key)
        if handle is None:
            if len(self.regions) != 1:
                raise TransferError(f"landing slots need one advertised region, not {len(self.regions)}")
            size = self.regions[0].length // count
            ranges = [self.regions[0].slice(j * size, n) for n in lengths for j in range(count)]
            handle = self.agent.remote_dlist(self.name, ranges)
            self._slot_dlists[key] = handle
        return handle

    def advertise(self, metadata: bytes, regions: Sequence[Region]) -> None:
        """The peer handed other memory (per-transfer staging): forget the old descriptors."""
        self._release()
        self.metadata = metadata
        self.regions = list(regions)
        self.name = self.agent.add_peer(metadata)

    def reconnect(self) -> None:
        """Drop the endpoint and connect afresh; raises what NIXL raises while the peer is unreachable."""
        self._release()
        self.agent.remove_peer(self.name)
        self.name = self.agent.add_peer(self.metadata)

    def close(self) -> None:
        self._release()
        self.agent.remove_peer(self.name)

    def _release(self) -> None:
        for handle in [*self._dlists.values(), *self._slot_dlists.values()]:
            try:
                handle.release()  # type: ignore[attr-defined]
            except Exception as exc:  # a dlist of a removed peer may already be void
                log.debug("releasing a remote descriptor list: %s", exc)
        self._dlists.clear()
        self._slot_dlists.clear()


class Operation:
    """One posted chunk operation; `state()` never blocks."""

    def __init__(
        self, agent: Agent, op: str, local: object, remote: object, index: int, notif: bytes, handle: object = None,
        place: int | None = None, far: int | None = None,
    ) -> None:
        self.agent = agent
        self.index = index
        self.place = index if place is None else place
        """The local entry the operation reads from or lands in: until released, that memory is its own."""
        self.handle = handle if handle is not None else agent.nixl.make_prepped_xfer(
            op, local, [self.place], remote, [index if far is None else far], notif
        )
        status = agent.nixl.transfer(self.handle)
        self._done = status == "DONE"
        self._error = status == "ERR"
        self.error = ""

    def state(self) -> str:
        if self._done or self._error:
            return "DONE" if self._done else "ERR"
        try:
            status = self.agent.nixl.check_xfer_state(self.handle)
        except Exception as exc:  # NIXL raises e.g. nixlRemoteDisconnectError for a dead peer
            self.error = f"{type(exc).__name__}: {exc}"
            status = "ERR"
        self._done = status == "DONE"
        self._error = status == "ERR"
        return status

    def release(self) -> bool:
        """Free the handle (cancelling it if still in flight). False if NIXL refused."""
        try:
            self.agent.nixl.release_xfer_handle(self.handle)
            return True
        except Exception as exc:
            log.warning("could not release chunk %d's handle: %s", self.index, exc)
            return False
