"""`fedrdma node`: real node processes, real Unix sockets and shared memory, real tcp-e between nodes.

The test process is the app: it attaches over the node's socket as a Flower app would, maps
the pools and asks for transfers. Attacks are made from the attacker's side: another user's
process, a raw socket that lies about its site, a peer whose certificate names another site.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedrdma.control.certs import init_ca, issue
from fedrdma.core import folds
from fedrdma.core.errors import LayoutError, NotEnoughSilos
from fedrdma.core.layout import FlatState, Layout
from fedrdma.core.modes import Role
from fedrdma.metrics import shared_rss_bytes
from fedrdma.node import holdings, process, unix
from fedrdma.node import messages as m
from fedrdma.node.client import NodeClient, NodeRefused
from fedrdma.node.paths import NodePaths, NodeUnavailable
from fedrdma.node.peers import Registrations
from fedrdma.node.process import NodeProcess
from fedrdma.node.shm import SharedPool
from fedrdma.transport import wire
from fedrdma.transport.agent import Agent
from fedrdma.transport.channel import dial
from fedrdma.transport.tls import CLIENT, SERVER, Credentials
from tests.conftest import needs_root

CHUNK = 1 << 20
LAYOUT = Layout.from_shapes([("wte", torch.float32, (512, 1024)), ("ln.bias", torch.float32, (1000,)),
                             ("head", torch.bfloat16, (700, 513))])
"""About 2.8 MB: several 1 MiB chunks, odd tensor sizes, two dtypes."""

OTHER = Layout.from_shapes([("wte", torch.float32, (512, 1000))])

SITES = ("agg", "hospital", "bank")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    init_ca(directory)
    issue(directory, "agg", SERVER, hosts=["127.0.0.1"])
    for site in SITES[1:]:
        issue(directory, site, CLIENT)
    return directory


def start_node(site: str, runtime: Path, certs: Path | None, serve: bool = False) -> NodeProcess:
    return process.start_node(site, runtime, certs, serve, extra=["--chunk-size", str(CHUNK)])


@pytest.fixture(scope="module")
def nodes(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    made = {site: start_node(site, tmp_path_factory.mktemp(site), certs, serve=site == "agg") for site in SITES}
    yield made
    for node in made.values():
        node.stop()


def filled(state: FlatState, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    state.buffer.copy_(torch.randint(0, 256, (state.nbytes,), dtype=torch.uint8, generator=g))
    return bytes(state.memoryview())


def token() -> str:
    return secrets.token_hex(16)


def test_a_published_pool_is_fetched_and_deliveries_land_byte_for_byte(nodes: dict[str, NodeProcess]) -> None:
    rnd, t = 1, token()
    with NodeClient.attach("agg", nodes["agg"].runtime_dir) as server, \
            NodeClient.attach("hospital", nodes["hospital"].runtime_dir) as hospital, \
            NodeClient.attach("bank", nodes["bank"].runtime_dir) as bank:
        sent = filled(server.pool("global", LAYOUT), seed=1)
        offer = server.publish("global", rnd, t)
        assert (offer.address, offer.round, offer.layout_id) == (nodes["agg"].address, rnd, LAYOUT.layout_id)
        upload = server.collect(rnd, LAYOUT.layout_id, t, sites=2)
        updates = {}
        for seed, (name, app) in enumerate((("hospital", hospital), ("bank", bank)), start=2):
            local = app.pool("global", LAYOUT)
            done = app.fetch("global", offer)
            assert done.nbytes == LAYOUT.nbytes
            assert bytes(local.memoryview()) == sent, f"{name} mapped other bytes than the global"
            # The app writes its update in its own mapping; the node delivers those very pages.
            updates[name] = filled(local, seed)
            assert app.deliver("global", upload).nbytes == LAYOUT.nbytes
        taken = server.take(rnd, LAYOUT)
        assert sorted(taken) == ["bank", "hospital"]
        for name, state in taken.items():
            assert bytes(state.memoryview()) == updates[name], f"{name}'s delivery landed other bytes"
        with pytest.raises(NodeRefused, match=f"round {rnd} is not being collected"):
            server.take(rnd, LAYOUT)


def test_stale_tokens_other_rounds_layouts_and_second_deliveries_are_refused_by_name(
        nodes: dict[str, NodeProcess]) -> None:
    old, new = token(), token()
    with NodeClient.attach("agg", nodes["agg"].runtime_dir) as server, \
            NodeClient.attach("hospital", nodes["hospital"].runtime_dir) as hospital:
        sent = filled(server.pool("global", LAYOUT), seed=7)
        first = server.publish("global", 5, old)
        second = server.publish("global", 6, new)  # replaces round 5's offer
        local = hospital.pool("global", LAYOUT)
        local.buffer.zero_()
        with pytest.raises(NodeRefused, match="round 5 of layout .* is not offered here .offered rounds: 6"):
            hospital.fetch("global", first)
        with pytest.raises(NodeRefused, match="round 6: the token does not match"):
            hospital.fetch("global", second.model_copy(update={"token": old}))
        hospital.pool("other", OTHER)
        with pytest.raises(NodeRefused, match=f"the descriptor is for layout {LAYOUT.layout_id}"):
            hospital.fetch("other", second)
        with pytest.raises(NodeRefused, match="is not offered here"):
            hospital.fetch("other", second.model_copy(update={"layout_id": OTHER.layout_id}))
        assert not any(local.memoryview()), "a refused fetch wrote into the pool"
        hospital.fetch("global", second)
        assert bytes(local.memoryview()) == sent

        upload = server.collect(6, LAYOUT.layout_id, new, sites=1)
        with pytest.raises(NodeRefused, match="round 6: the token does not match"):
            hospital.deliver("global", upload.model_copy(update={"token": old}))
        with pytest.raises(NodeRefused, match="round 7 takes no deliveries here .collecting: 6"):
            hospital.deliver("global", upload.model_copy(update={"round": 7}))
        hospital.deliver("global", upload)
        with pytest.raises(NodeRefused, match="site 'hospital' delivered round 6 already"):
            hospital.deliver("global", upload)
        assert sorted(server.take(6, LAYOUT)) == ["hospital"]


def test_a_pool_name_holds_one_layout(nodes: dict[str, NodeProcess]) -> None:
    with NodeClient.attach("bank", nodes["bank"].runtime_dir) as bank:
        bank.pool("model", LAYOUT)
    with NodeClient.attach("bank", nodes["bank"].runtime_dir) as bank:  # another app, the same pool
        with pytest.raises(NodeRefused, match=f"pool 'model' holds layout {LAYOUT.layout_id}"):
            bank.pool("model", OTHER)
        with pytest.raises(NodeRefused, match="this node serves no peers: start it with .* --serve"):
            bank.publish("model", 1, token())


def test_a_node_that_is_not_running_is_named_with_its_socket(tmp_path: Path) -> None:
    with pytest.raises(NodeUnavailable) as err:
        NodeClient.attach("hospital", tmp_path)
    text = str(err.value)
    assert "fedrdma node --site hospital" in text and str(tmp_path / "hospital.sock") in text


def _raw_attach(paths: NodePaths, site: str, given: str) -> wire.Message:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(paths.socket))
    try:
        unix.send(sock, m.Attach(site=site, token=given))
        return unix.recv(sock, 10.0)[0]
    finally:
        sock.close()


def test_an_app_that_attaches_as_another_site_or_without_the_token_is_refused(nodes: dict[str, NodeProcess]) -> None:
    paths = NodePaths.of("hospital", nodes["hospital"].runtime_dir)
    reply = _raw_attach(paths, "bank", paths.read_token())  # hospital's own token, claiming to be bank
    assert isinstance(reply, m.Failed) and "serves site 'hospital', not 'bank'" in reply.reason
    reply = _raw_attach(paths, "hospital", "0" * 64)
    assert isinstance(reply, m.Failed) and "wrong token" in reply.reason


def test_an_oversized_frame_is_refused_without_being_read(nodes: dict[str, NodeProcess]) -> None:
    paths = NodePaths.of("bank", nodes["bank"].runtime_dir)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(paths.socket))
    try:
        unix.send(sock, m.Attach(site="bank", token=paths.read_token()))
        assert isinstance(unix.recv(sock, 10.0)[0], m.Attached)
        sock.sendall(b"\xff\xff\xff\xf0")  # announces a 4 GiB message
        reply = unix.recv(sock, 10.0)[0]
        assert isinstance(reply, m.Failed) and f"at most {unix.MAX_FRAME_BYTES}" in reply.reason
    finally:
        sock.close()
    with NodeClient.attach("bank", nodes["bank"].runtime_dir) as bank:  # the node is still there
        assert bank.site == "bank"


OTHER_USER = 65534
"""nobody: a user of this host that is not the site's."""

_INTRUDER = textwrap.dedent("""
    import os, socket, sys
    from fedrdma.node import messages as m, unix
    os.setgid({uid}); os.setuid({uid})
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sys.argv[1])
    except OSError as exc:
        print("connect refused:", type(exc).__name__); sys.exit(0)
    try:
        unix.send(sock, m.Attach(site=sys.argv[2], token=sys.argv[3]))
    except BrokenPipeError:  # the node refused our uid before reading a byte; its reply waits for us
        pass
    print("reply:", unix.recv(sock, 10.0)[0].model_dump_json())
""").format(uid=OTHER_USER)


@needs_root
def test_another_user_of_the_host_cannot_reach_the_node(certs: Path) -> None:
    """Even given the token, and with the node's files opened up by mistake, another uid is refused."""
    runtime = Path(tempfile.mkdtemp(prefix="fedrdma-node-test-"))  # in /tmp, which every user may traverse
    node = start_node("bank", runtime, certs)
    try:
        _intrusions(NodePaths.of("bank", runtime))
    finally:
        node.stop()
        shutil.rmtree(runtime, ignore_errors=True)


def _intrusions(paths: NodePaths) -> None:

    def intrude() -> str:
        out = subprocess.run([sys.executable, "-c", _INTRUDER, str(paths.socket), "bank", paths.read_token()],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": "/"})
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert intrude().startswith("connect refused: PermissionError")  # the private directory stops it
    os.chmod(paths.directory, 0o755)
    os.chmod(paths.socket, 0o666)
    try:
        said = intrude()
    finally:
        os.chmod(paths.directory, 0o700)
        os.chmod(paths.socket, 0o600)
    assert said.startswith("reply:") and f"uid {OTHER_USER} is not this site's user" in said, said


def test_a_peer_cannot_deliver_as_another_site(nodes: dict[str, NodeProcess], certs: Path) -> None:
    """bank's own certificate, on a stream of its own, claiming to be hospital."""
    t = token()
    with NodeClient.attach("agg", nodes["agg"].runtime_dir) as server:
        server.pool("global", LAYOUT)
        server.collect(9, LAYOUT.layout_id, t, sites=2)
        channel = dial(nodes["agg"].address, 30.0, Credentials.load(certs, "bank"))
        try:
            channel.send(m.Want(kind="deliver", site="hospital", round=9, layout_id=LAYOUT.layout_id, token=t))
            reply = channel.recv(10.0)
        finally:
            channel.close()
        assert isinstance(reply, wire.Refuse) and "certificate names site 'bank', not 'hospital'" in reply.reason
        assert server.take(9, LAYOUT) == {}


def test_a_second_node_for_a_site_is_refused(nodes: dict[str, NodeProcess], certs: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fedrdma.cli", "node", "--site", "bank", "--certs", str(certs),
                          "--runtime-dir", str(nodes["bank"].runtime_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "a node already serves site 'bank'" in out.stdout + out.stderr


def test_a_runtime_dir_others_may_enter_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    with pytest.raises(NodeUnavailable, match="mode 777; a node's directory must be this user's .* alone"):
        NodePaths.of("bank", tmp_path).make_private()


def test_an_insecure_node_works_on_loopback_and_refuses_other_hosts(tmp_path: Path) -> None:
    server = start_node("agg", tmp_path / "agg", None, serve=True)
    client = start_node("hospital", tmp_path / "hospital", None)
    try:
        with NodeClient.attach("agg", tmp_path / "agg") as s, NodeClient.attach("hospital", tmp_path / "hospital") as c:
            sent = filled(s.pool("global", LAYOUT), seed=3)
            offer = s.publish("global", 1, token())
            c.pool("global", LAYOUT)
            c.fetch("global", offer)
            assert bytes(c.pools["global"].state.memoryview()) == sent
            with pytest.raises(NodeRefused, match="dials loopback only, not 198.18.0.1:7710"):
                c.fetch("global", offer.model_copy(update={"address": "198.18.0.1:7710"}))
    finally:
        server.stop()
        client.stop()


def test_a_node_serving_every_address_is_dialed_at_the_peer_host_and_without_one_refused_by_name(
        nodes: dict[str, NodeProcess], certs: Path, tmp_path: Path) -> None:
    """A serving node on 0.0.0.0 (a lab's aggregator, one address per silo path) announces no host
    anyone can dial: a site names its own with --peer-host, and one that does not is told to."""
    server = process.start_node("agg", tmp_path / "agg", certs, serve=True, listen="0.0.0.0:0")
    told = process.start_node("hospital", tmp_path / "hospital", certs, extra=["--peer-host", "127.0.0.1"])
    try:
        assert server.address.startswith("0.0.0.0:")
        with NodeClient.attach("agg", tmp_path / "agg") as s, \
                NodeClient.attach("hospital", tmp_path / "hospital") as c, \
                NodeClient.attach("bank", nodes["bank"].runtime_dir) as untold:
            sent = filled(s.pool("global", LAYOUT), seed=4)
            offer = s.publish("global", 1, token())
            assert offer.address == server.address
            c.pool("global", LAYOUT)
            c.fetch("global", offer)
            assert bytes(c.pools["global"].state.memoryview()) == sent
            untold.pool("global", LAYOUT).buffer.zero_()
            with pytest.raises(NodeRefused, match=r"announces 0\.0\.0\.0:\d+, every address .* --peer-host HOST"):
                untold.fetch("global", offer)
            assert not any(untold.pools["global"].state.memoryview())
    finally:
        server.stop()
        told.stop()


# -- the layout an app announces (pure) ------------------------------------------------------
def test_an_announced_layout_is_rebuilt_not_trusted() -> None:
    assert Layout.from_json(LAYOUT.to_json()) == LAYOUT
    doc = LAYOUT.to_json()
    doc[1] = {**doc[1], "offset": 0}
    with pytest.raises(LayoutError, match="'ln.bias' is announced at offset 0"):
        Layout.from_json(doc)
    with pytest.raises(LayoutError, match="tensor 0 of the layout needs"):
        Layout.from_json([{"name": "x", "dtype": "complex64", "shape": [2]}])
    with pytest.raises(LayoutError, match="a list of 1 to 2 tensors"):
        Layout.from_json(LAYOUT.to_json(), max_tensors=2)


def test_a_round_is_averaged_in_the_node_with_the_aggregators_checks(nodes: dict[str, NodeProcess]) -> None:
    """Weights as the apps report them; a NaN update is rejected by name, a missing one too, and the
    mean of the rest lands in the target pool; a round that keeps too few leaves the global alone."""
    layout = Layout.from_shapes([("w", torch.float32, (300, 1000)), ("b", torch.float32, (1000,))])
    t = token()
    with NodeClient.attach("agg", nodes["agg"].runtime_dir) as server, \
            NodeClient.attach("hospital", nodes["hospital"].runtime_dir) as hospital, \
            NodeClient.attach("bank", nodes["bank"].runtime_dir) as bank:
        glob, into = server.pool("avg-global", layout), server.pool("avg-next", layout)
        glob.buffer.view(torch.float32).normal_()
        offer = server.publish("avg-global", 11, t)
        upload = server.collect(11, layout.layout_id, t, sites=2)
        updates = {}
        for app, delta in ((hospital, 0.01), (bank, -0.03)):
            local = app.pool("avg", layout)
            app.fetch("avg", offer)
            for view in local.views.values():
                view.add_(delta)
            updates[app.site] = {name: view.clone() for name, view in local.views.items()}
            app.deliver("avg", upload)
        result = server.aggregate(11, "avg-global", "avg-next", {"hospital": 100, "bank": 300, "clinic": 50})
        assert result.accepted == ["bank", "hospital"]
        assert result.rejected == {"clinic": "no delivery of round 11 landed from site 'clinic'"}
        for name, view in into.views.items():
            expected = (100 * updates["hospital"][name] + 300 * updates["bank"][name]) / 400
            assert torch.allclose(view, expected, atol=1e-6), name

        before = bytes(glob.memoryview())
        upload = server.collect(12, layout.layout_id, t, sites=2)
        bank.pools["avg"].state.views["b"][7] = float("nan")
        bank.deliver("avg", upload)
        with pytest.raises(NodeRefused, match="update contains NaN or Inf"):
            server.aggregate(12, "avg-global", "avg-next", {"bank": 300}, min_sites=1)
        assert bytes(glob.memoryview()) == before, "a refused round touched the global"


def test_the_serving_node_folds_a_delivery_a_slice_at_a_time_into_the_same_mean(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, pure logic over real shared memory: the fold's private copy and float room are
    a slice, not the state (two 475 MiB buffers for GPT-2 small), and slices that cut through a
    tensor give the mean the whole fold gave; a NaN in the last slice still rejects its site."""
    slice_bytes = 64 << 10
    monkeypatch.setattr(holdings, "FOLD_SLICE_BYTES", slice_bytes)
    largest = {"copy": 0, "floats": 0}
    copy, floats = folds.Scratch.copy, folds.Scratch.floats

    def spy_copy(self: folds.Scratch, source: torch.Tensor) -> torch.Tensor:
        largest["copy"] = max(largest["copy"], source.numel())
        return copy(self, source)

    def spy_floats(self: folds.Scratch, numel: int) -> torch.Tensor:
        largest["floats"] = max(largest["floats"], numel)
        return floats(self, numel)

    monkeypatch.setattr(folds.Scratch, "copy", spy_copy)
    monkeypatch.setattr(folds.Scratch, "floats", spy_floats)
    layout = Layout.from_shapes([("w", torch.float32, (300, 1000)), ("b", torch.float32, (1000,))])
    held = holdings.Holdings("agg", serve=True)
    glob, into = held.open_pool("g", layout), held.open_pool("n", layout)
    torch.manual_seed(5)
    glob.state.buffer.view(torch.float32).normal_()

    def deliver(rnd: int, t: str, deltas: dict[str, float]) -> dict[str, torch.Tensor]:
        held.collect(rnd, layout.layout_id, t, sites=len(deltas))
        sent = {}
        for site, delta in deltas.items():
            want = m.Want(kind="deliver", site=site, round=rnd, layout_id=layout.layout_id, token=t)
            collection, inbox = held.inbox_for(want)
            for name, view in inbox.state.views.items():
                view.copy_(glob.state.views[name] + delta * torch.randn(view.shape))
            sent[site] = {name: view.clone() for name, view in inbox.state.views.items()}
            held.landed(collection, site, inbox)
        return sent

    t = token()
    sent = deliver(1, t, {"hospital": 0.01, "bank": 0.03})
    result = held.aggregate(1, "g", "n", {"hospital": 100, "bank": 300}, min_sites=2)
    assert list(result.accepted) == ["bank", "hospital"]
    for name, view in into.state.views.items():
        expected = (100 * sent["hospital"][name].double() + 300 * sent["bank"][name].double()) / 400
        assert torch.allclose(view.double(), expected, atol=1e-6), name
    assert layout.nbytes > 10 * slice_bytes
    assert largest == {"copy": slice_bytes, "floats": slice_bytes // 4}

    before = bytes(glob.state.memoryview())
    held.collect(2, layout.layout_id, t, sites=1)
    collection, inbox = held.inbox_for(m.Want(kind="deliver", site="bank", round=2, layout_id=layout.layout_id,
                                              token=t))
    inbox.state.buffer.copy_(glob.state.buffer)
    inbox.state.views["b"][-1] = float("nan")
    held.landed(collection, "bank", inbox)
    with pytest.raises(NotEnoughSilos, match="update contains NaN or Inf"):
        held.aggregate(2, "g", "n", {"bank": 300}, min_sites=1)
    assert bytes(glob.state.memoryview()) == before


def shared_mib(pid: int) -> float:
    return shared_rss_bytes(pid) / 2**20


def test_a_rounds_inbox_is_unmapped_when_the_round_is_averaged(nodes: dict[str, NodeProcess]) -> None:
    """The serving node's resident shared memory after a round is its pools', not theirs plus
    every inbox the rounds landed in (each stayed mapped until the collector ran)."""
    assert_inboxes_unmapped(nodes["agg"], nodes["hospital"])


def assert_inboxes_unmapped(agg: NodeProcess, site: NodeProcess) -> None:
    """Three rounds published, fetched, delivered and averaged, each mean the site's update of
    that round: the serving node's resident shared memory grows by less than half an inbox
    from the first to the last."""
    layout = Layout.from_shapes([("w", torch.float32, (8 << 20,))])
    inbox_mib = layout.nbytes / 2**20
    with NodeClient.attach("agg", agg.runtime_dir) as server, NodeClient.attach(site.site, site.runtime_dir) as hospital:
        glob = server.pool("mem-global", layout).views["w"]
        glob.normal_()
        mean = server.pool("mem-next", layout).views["w"]
        local = hospital.pool("mem", layout)
        seen = []
        for rnd in (31, 32, 33):
            t = token()
            offer, upload = server.publish("mem-global", rnd, t), server.collect(rnd, layout.layout_id, t, sites=1)
            hospital.fetch("mem", offer)
            assert torch.equal(local.views["w"], glob)
            local.views["w"].add_(0.01 * rnd)
            hospital.deliver("mem", upload)
            assert list(server.aggregate(rnd, "mem-global", "mem-next", {site.site: 1}).accepted) == [site.site]
            assert torch.allclose(mean, local.views["w"], rtol=0, atol=1e-5), f"round {rnd}'s mean is not its update"
            seen.append(shared_mib(agg.pid))
    assert seen[2] - seen[0] < inbox_mib / 2, f"resident shared MiB after each round: {seen}"


def test_a_delivery_whose_reply_never_came_is_not_counted(nodes: dict[str, NodeProcess]) -> None:
    """Both sites deliver; only hospital's app replied (bank's was killed after delivering)."""
    layout = Layout.from_shapes([("w", torch.float32, (100, 300))])
    t = token()
    with NodeClient.attach("agg", nodes["agg"].runtime_dir) as server, \
            NodeClient.attach("hospital", nodes["hospital"].runtime_dir) as hospital, \
            NodeClient.attach("bank", nodes["bank"].runtime_dir) as bank:
        server.pool("late-global", layout).views["w"].fill_(1.0)
        into = server.pool("late-next", layout)
        offer, upload = server.publish("late-global", 21, t), server.collect(21, layout.layout_id, t, sites=2)
        for app, value in ((hospital, 2.0), (bank, 50.0)):
            local = app.pool("late", layout)
            app.fetch("late", offer)
            local.views["w"].fill_(value)
            app.deliver("late", upload)
        result = server.aggregate(21, "late-global", "late-next", {"hospital": 10})
        assert result.accepted == ["hospital"] and result.rejected == {}
        assert bool((into.views["w"] == 2.0).all()), "bank's delivery was counted without its reply"


# -- rdma-e between nodes ------------------------------------------------------------------------
RDMA_E = ["--chunk-size", str(CHUNK), "--mode", "rdma-e", "--trusted-fabric"]
"""UCX over TCP here enforces no remote keys: rdma-e needs the operator's word for it."""


def test_nodes_move_pools_as_rdma_e_and_a_node_of_another_mode_is_refused_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real NIXL WRITEs between two node processes (UCX over TCP on loopback), both ways; a tcp-e
    node handed an rdma-e descriptor is told the mode to start with, and fetches nothing."""
    monkeypatch.setenv("UCX_TLS", os.environ.get("UCX_TLS", "tcp"))
    made = {"agg": process.start_node("agg", tmp_path / "agg", None, serve=True, extra=RDMA_E),
            "hospital": process.start_node("hospital", tmp_path / "hospital", None, extra=RDMA_E),
            "bank": start_node("bank", tmp_path / "bank", None)}
    try:
        with NodeClient.attach("agg", tmp_path / "agg") as server, \
                NodeClient.attach("hospital", tmp_path / "hospital") as hospital, \
                NodeClient.attach("bank", tmp_path / "bank") as bank:
            sent = filled(server.pool("global", LAYOUT), seed=7)
            t = token()
            offer = server.publish("global", 1, t)
            upload = server.collect(1, LAYOUT.layout_id, t, sites=1)
            assert (offer.mode, upload.mode) == ("rdma-e", "rdma-e")
            local = hospital.pool("global", LAYOUT)
            assert hospital.fetch("global", offer).nbytes == LAYOUT.nbytes
            assert bytes(local.memoryview()) == sent
            update = filled(local, seed=8)
            assert hospital.deliver("global", upload).nbytes == LAYOUT.nbytes
            assert bytes(server.take(1, LAYOUT)["hospital"].memoryview()) == update
            zeros = bytes(bank.pool("global", LAYOUT).memoryview())
            with pytest.raises(NodeRefused, match="moves its pools as rdma-e and this node as tcp-e: start this "
                                                  "node with --mode rdma-e"):
                bank.fetch("global", offer)
            assert bytes(bank.pools["global"].state.memoryview()) == zeros
        assert_inboxes_unmapped(made["agg"], made["hospital"])  # each transfer's registration is let go too
        # ... but a pool a node only sends from is registered once, however many rounds it sends;
        # one it also receives into is registered again after each receive
        for node, counts in ((made["agg"], {"global": 1, "mem-global": 1}), (made["hospital"], {"global": 1, "mem": 3})):
            said = " ".join("".join(node.output).split())
            assert {name: said.count(f"pool {name!r} registered for sending") for name in counts} == counts, said
    finally:
        for node in made.values():
            node.stop()


def test_a_pool_sent_from_keeps_one_registration_and_is_never_registered_twice() -> None:
    """`peers.Registrations` with a real NIXL agent: sends share the kept registration; a
    receive lets it go first and registers on its own; sending and receiving one pool at
    once is refused both ways; an inbox is left to its session."""
    agent = Agent(f"test-registrations-{os.getpid()}")
    try:
        held = holdings.Holdings("agg", serve=True)
        pool = held.open_pool("g", LAYOUT)
        leases = Registrations(agent, held)
        first, second = leases.lease(pool, Role.SENDER), leases.lease(pool, Role.SENDER)
        assert first is second and first is not None and agent.registered_pools == 1
        with pytest.raises(holdings.NodeError, match="pool 'g' is being sent from: move it again once"):
            leases.lease(pool, Role.RECEIVER)
        leases.end(pool, Role.SENDER)
        leases.end(pool, Role.SENDER)
        assert leases.lease(pool, Role.RECEIVER) is None  # its session registers the pool for itself
        assert not first.registered and agent.registered_pools == 0
        with pytest.raises(holdings.NodeError, match="pool 'g' is being received into"):
            leases.lease(pool, Role.SENDER)
        with pytest.raises(holdings.NodeError, match="pool 'g' is being received into"):
            leases.lease(pool, Role.RECEIVER)
        leases.end(pool, Role.RECEIVER)
        again = leases.lease(pool, Role.SENDER)
        assert again is not None and again is not first and again.registered and agent.registered_pools == 1
        inbox = SharedPool.create("g", LAYOUT)  # an inbox may bear any name: it is not the node's pool
        assert leases.lease(inbox, Role.RECEIVER) is None and leases.lease(inbox, Role.SENDER) is None
        leases.end(inbox, Role.RECEIVER)
        assert leases.senders == {"g": 1} and leases.receiving == set() and agent.registered_pools == 1
        inbox.close()
    finally:
        agent.close()


def test_an_rdma_e_node_over_tcp_without_trusted_fabric_exits_naming_the_setting(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "fedrdma.cli", "node", "--site", "agg", "--runtime-dir",
                          str(tmp_path / "agg"), "--insecure", "--serve", "--mode", "rdma-e"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "UCX_TLS": "tcp"})
    assert run.returncode == 1, run.stdout + run.stderr
    said = " ".join((run.stdout + run.stderr).split())
    assert "mode rdma-e needs a fabric that enforces remote keys" in said and "--trusted-fabric" in said, said
    assert not (tmp_path / "agg" / "agg.sock").exists()
