"""fedrdma inside Flower: a real SuperLink, real SuperNodes, real `flwr run`, real fedrdma nodes.

The same app runs both ways in one federation: its arrays moved by Flower, then by fedrdma
(the `fedrdma` run-config key). Both must end on the same model.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedrdma.bench.flower import run_flower_bench
from fedrdma.bench.records import FlowerResult
from fedrdma.core.layout import Layout
from fedrdma.flower.descriptor import RECORD, Offer
from fedrdma.flower.mod import RUNTIME_KEY, SITE_KEY, fedrdma_mod
from fedrdma.lab.config import PathShape
from fedrdma.metrics import shared_rss_bytes
from fedrdma.node.client import NodeClient
from fedrdma.node.process import NodeProcess, start_node
from tests.conftest import LAB_GROUP, needs_root
from tests.flower_app.flowerapp.client_app import trained

APP = Path(__file__).parent / "flower_app"

LAYOUT = Layout.from_shapes([("w", torch.float32, (64, 100)), ("b", torch.float32, (100,))])
OTHER = Layout.from_shapes([("w", torch.float32, (64, 99))])


KILL_ROUND_TIMEOUT_S = 45.0
"""How long a round waits for the killed site's reply. The live site's took 10-13 s a round in
CI with the other worker's tests beside it, and more than 30 s once while `Federation.wait`
still ran `flwr ls` every second."""


def test_both_ways_end_on_the_same_model_with_a_clientapp_killed_in_the_last_round(tmp_path: Path) -> None:
    """`bench flower`'s own run on the test app, both ways at once (Flower's 3 s polling is most
    of a run), in one federation: it costs minutes, so one run shows both things.

    Site 1's ClientApp dies in round 2's training, after the global reached it: that round is
    the other site's update alone, as Flower's FedAvg has it when a reply does not come. The
    last round, because a SuperNode whose ClientApp was killed takes 10-15 s, and longer under
    load, before it runs the next one: a round after the kill could time out too."""
    result = run_flower_bench(APP, "numpy", 2, tmp_path, parallel=True,
                              extra={"kill-partition": 1, "kill-round": 2, "round-timeout": KILL_ROUND_TIMEOUT_S,
                                     "fedrdma-refill-initial": True})
    for way in (result.flower, result.fedrdma):
        assert [(r.round, r.replies) for r in way.rounds] == [(1, 2), (2, 1)]
        assert all(0 < r.comm_seconds <= r.seconds for r in way.rounds)
        assert {"serverapp", "clientapp", "superlink", "supernode"} <= set(way.peak_rss_mb), way.peak_rss_mb
        assert {"serverapp", "superlink", "supernode", "node-agg"} <= set(way.baseline_rss_mb) and \
            "clientapp" not in way.baseline_rss_mb, way.baseline_rss_mb
        assert all(0 < way.baseline_rss_mb[r] <= way.peak_rss_mb[r] for r in way.baseline_rss_mb), way
    assert all(r.node_seconds is None for r in result.flower.rounds)
    assert all(r.node_seconds is not None and r.node_seconds > 0 for r in result.fedrdma.rounds)
    start = np.random.default_rng(0).standard_normal((512, 600)).astype(np.float32)
    first = ((10 * trained(start, 0).astype(np.float64) + 20 * trained(start, 1)) / 30).astype(np.float32)
    expected = trained(first, 0)
    for label in ("flower", "fedrdma"):
        with np.load(tmp_path / f"final-{label}.npz") as saved:
            assert np.abs(saved["w"] - expected).max() <= 1e-5, label
    assert result.max_abs_diff == 0.0, "the node wrote the mean with FedAvg's own arithmetic: the same bits"
    assert FlowerResult.model_validate_json(result.model_dump_json()) == result
    refilled = {label: json.loads((tmp_path / f"final-{label}.json").read_text())["refilled"]
                for label in ("flower", "fedrdma")}
    assert refilled == {"flower": False, "fedrdma": True}, "refill_initial: the global lived in start's record"


@LAB_GROUP
@needs_root
def test_both_ways_cross_a_lab_path_per_site_under_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench flower --rate --rtt`: the SuperLink, ServerApp and aggregator's node in the lab's
    aggregator namespace, each site's SuperNode, ClientApps and node in its silo's. Nothing in a
    namespace reaches another but through the shaped paths, so a finished round crossed them.

    The out dir is relative, as the CLI's default is: Flower takes no relative certificate path."""
    monkeypatch.chdir(tmp_path)
    result = run_flower_bench(APP.resolve(), "numpy", 1, Path("bench"), parallel=True,
                              shape=PathShape.of("1gbit", "20ms"))
    out = tmp_path / "bench"
    assert result.path == "a lab path each, 1gbit, 20ms RTT, loss 0, MTU 9000"
    for way in (result.flower, result.fedrdma):
        assert [(r.round, r.replies) for r in way.rounds] == [(1, 2)]
    assert result.max_abs_diff == 0.0, "the node wrote the mean with FedAvg's own arithmetic: the same bits"
    start = np.random.default_rng(0).standard_normal((512, 600)).astype(np.float32)
    expected = ((10 * trained(start, 0).astype(np.float64) + 20 * trained(start, 1)) / 30).astype(np.float32)
    with np.load(out / "final-fedrdma.npz") as saved:
        assert np.abs(saved["w"] - expected).max() <= 1e-5
    assert json.loads((out / "final-fedrdma.json").read_text()) == {"refilled": False}  # the default
    for label in ("flower", "fedrdma"):  # Flower warns of --insecure in its log; under TLS it may not
        log = (out / f"flwr-home-{label}" / "superlink.log").read_text()
        assert "insecure" not in log.lower(), log[-2000:]


# -- the mod against real node processes, refusing from the ClientApp's side ------------------
@pytest.fixture(scope="module")
def site_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, NodeProcess]]:
    root = tmp_path_factory.mktemp("mod")
    nodes = {"agg": start_node("agg", root / "agg", None, serve=True)}
    try:
        nodes["hospital"] = start_node("hospital", root / "hospital", None)
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


def _message(offer: Offer, server_round: int) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1  # what the runtime sets in a ClientApp
    return Message(RecordDict({RECORD: offer.to_record(), "config": ConfigRecord({"server-round": server_round})}),
                   dst_node_id=1, message_type="train")


def _through_mod(msg: Message, site: str, runtime: Path) -> tuple[Message, list[Message]]:
    called: list[Message] = []

    def app(inner: Message, context: Context) -> Message:
        called.append(inner)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=inner)

    context = Context(run_id=1, node_id=1, node_config={SITE_KEY: site, RUNTIME_KEY: str(runtime)},
                      state=RecordDict(), run_config={})
    return fedrdma_mod(msg, context, app), called


def _offer(site_nodes: dict[str, NodeProcess], rnd: int, seq: int, token: str, layout: Layout = LAYOUT) -> Offer:
    with NodeClient.attach("agg", site_nodes["agg"].runtime_dir) as server:
        server.pool("mod-global", LAYOUT).buffer.fill_(7)
        fetch = server.publish("mod-global", seq, token)
    return Offer(round=rnd, arrays_key="arrays", layout=json.dumps(layout.to_json()), fetch=fetch)


def test_the_mod_hands_the_app_the_published_arrays(site_nodes: dict[str, NodeProcess]) -> None:
    reply, called = _through_mod(_message(_offer(site_nodes, 3, 30, secrets.token_hex(16)), 3), "hospital",
                                 site_nodes["hospital"].runtime_dir)
    assert not reply.has_error(), reply.error
    got = called[0].content["arrays"]
    assert sorted(got) == ["b", "w"] and RECORD not in called[0].content
    assert (got["w"].numpy().view(np.uint8) == 7).all() and got["w"].numpy().shape == (64, 100)


@pytest.mark.parametrize("case", ["another round", "stale token", "withdrawn offer", "another layout"])
def test_the_mod_refuses_a_descriptor_by_name_and_the_reply_says_so(site_nodes: dict[str, NodeProcess],
                                                                    case: str) -> None:
    old, new = secrets.token_hex(16), secrets.token_hex(16)
    first = _offer(site_nodes, 4, 40, old)
    current = _offer(site_nodes, 4, 41, new)  # withdraws seq 40
    msg, reason = {
        "another round": (_message(current, 5), "the descriptor is for round 4, the message's config for round 5"),
        "stale token": (_message(current.model_copy(update={"fetch": current.fetch.model_copy(
            update={"token": old})}), 4), "round 41: the token does not match"),
        "withdrawn offer": (_message(first, 4), "round 40 of layout .* is not offered here"),
        "another layout": (_message(current.model_copy(update={"layout": json.dumps(OTHER.to_json())}), 4),
                           f"the offer's layout is {OTHER.layout_id}, its descriptor names {LAYOUT.layout_id}"),
    }[case]
    reply, called = _through_mod(msg, "hospital", site_nodes["hospital"].runtime_dir)
    assert reply.has_error() and not called
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert re.search(reason, reply.error.reason), reply.error.reason


def test_a_site_without_a_running_node_is_told_how_to_start_one(site_nodes: dict[str, NodeProcess],
                                                                 tmp_path: Path) -> None:
    reply, called = _through_mod(_message(_offer(site_nodes, 6, 60, secrets.token_hex(16)), 6), "clinic", tmp_path)
    assert reply.has_error() and not called
    assert "fedrdma node --site clinic" in reply.error.reason and str(tmp_path / "clinic.sock") in reply.error.reason


# -- ArrayRecords and pools (pure) -----------------------------------------------------------
def test_arrays_go_into_a_pool_and_come_back_equal() -> None:
    from flwr.app import Array, ArrayRecord

    from fedrdma.core.errors import LayoutError
    from fedrdma.core.layout import FlatState
    from fedrdma.flower import records

    rng = np.random.default_rng(1)
    given = {"w": rng.standard_normal((64, 100)).astype(np.float32), "b": np.asfortranarray(
        rng.standard_normal((100,)).astype(np.float32))}
    record = ArrayRecord({k: Array(v) for k, v in given.items()})
    state = FlatState.allocate(records.layout_of(record))
    records.write(record, state)
    back = records.read(state)
    assert list(back) == ["w", "b"]
    for name, values in given.items():
        assert np.array_equal(back[name].numpy(), values), name
    lying = Array(dtype="float32", shape=(64, 100), stype=record["w"].stype, data=Array(given["w"][:32]).data)
    with pytest.raises(LayoutError, match=r"array 'w' holds shape \(32, 100\), it announced \(64, 100\)"):
        records.write(ArrayRecord({"w": lying, "b": record["b"]}), state)


def test_a_pool_read_into_the_last_record_refills_it_in_place() -> None:
    """The next global goes into the record returned the round before, array by array, in its
    order, as the bytes `np.save` writes; a record of another layout is refused untouched."""
    from flwr.app import Array, ArrayRecord

    from fedrdma.core.errors import LayoutError
    from fedrdma.core.layout import FlatState
    from fedrdma.flower import records

    rng = np.random.default_rng(3)
    shapes = {"wte": (50, 16), "ln.b": (16,), "scale": (), "h.0.w": (16, 4, 2)}
    first = ArrayRecord({k: Array(rng.standard_normal(v).astype(np.float32)) for k, v in shapes.items()})
    state = FlatState.allocate(records.layout_of(first))
    record = records.read(state)  # zeros
    old = dict(record.items())
    nxt = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    records.write(ArrayRecord({k: Array(v) for k, v in nxt.items()}), state)
    assert records.read(state, into=record) is record
    assert list(record) == list(shapes)
    for name, values in nxt.items():
        assert record[name] is not old[name], name
        assert record[name].data == Array(values).data, name  # what np.save writes, header and all
        assert record[name].shape == values.shape and np.array_equal(record[name].numpy(), values), name
    other = ArrayRecord({"wte": Array(np.zeros((50, 16), np.float32))})
    with pytest.raises(LayoutError, match="the record to fill has layout"):
        records.read(state, into=other)
    assert list(other) == ["wte"] and not other["wte"].numpy().any()


def _shared_resident_mib() -> float:
    return shared_rss_bytes() / 2**20


def test_an_app_lets_go_of_a_pools_pages_behind_its_copy() -> None:
    """The pages of a pool an app copied out of, or into, leave its resident set; the bytes stay."""
    from flwr.app import Array, ArrayRecord

    from fedrdma.flower import records
    from fedrdma.node.shm import SharedPool

    rng = np.random.default_rng(2)
    given = {f"w{i}": rng.standard_normal((1024, 2048)).astype(np.float32) for i in range(4)}  # 4 x 8 MiB
    record = ArrayRecord({k: Array(v) for k, v in given.items()})
    pool = SharedPool.create("release-test", records.layout_of(record))
    try:
        before = _shared_resident_mib()
        records.write(record, pool.state)
        assert _shared_resident_mib() - before >= 30  # without release, the 32 MiB written stay resident
        pool.release()
        assert _shared_resident_mib() - before < 1
        back = records.read(pool.state, pool.release)  # each array's pages go once it is copied
        assert _shared_resident_mib() - before < 1
        assert all(np.array_equal(back[k].numpy(), v) for k, v in given.items())
        pool.state.buffer.zero_()
        pool.release()
        records.write(record, pool.state, pool.release)
        assert _shared_resident_mib() - before < 1
        again = records.read(pool.state)  # the bytes written and let go are in the memfd
        assert all(np.array_equal(again[k].numpy(), v) for k, v in given.items())
        assert _shared_resident_mib() - before >= 30
    finally:
        pool.close()


# -- the mean Flower's FedAvg makes, made by the node ---------------------------------------
def test_the_nodes_flower_mean_is_flowers_fedavg_to_the_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process over real shared memory, against Flower's own `aggregate_arrayrecords`: three
    sites in reply order, a float16 tensor beside the float32 ones, slices that cut through a
    tensor. The node's own mean (sum, then one division) differs from it in the last bit."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedrdma.node import holdings
    from fedrdma.node import messages as m

    monkeypatch.setattr(holdings, "FOLD_SLICE_BYTES", 64 << 10)
    layout = Layout.from_shapes([("w", torch.float32, (300, 1000)), ("h", torch.float16, (5000,)),
                                 ("b", torch.float32, (1000,))])
    held = holdings.Holdings("agg", serve=True)
    glob, into = held.open_pool("g", layout), held.open_pool("n", layout)
    rng = np.random.default_rng(3)
    for view in glob.state.views.values():
        view.copy_(torch.from_numpy(rng.standard_normal(view.shape).astype(view.numpy().dtype)))
    weights = {"bank": 30, "clinic": 17, "hospital": 23}  # reply order, not sorted; none capped
    updates = {site: {name: (view.numpy() + 0.01 * rng.standard_normal(view.shape)).astype(view.numpy().dtype)
                      for name, view in glob.state.views.items()} for site in weights}
    replies = [RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in updates[site].items()}),
                           "metrics": MetricRecord({"num-examples": weights[site]})}) for site in weights]
    flowers = aggregate_arrayrecords(replies, "num-examples")

    def average(rnd: int, mean: m.Mean) -> dict[str, np.ndarray]:
        t = secrets.token_hex(16)
        held.collect(rnd, layout.layout_id, t, sites=len(weights))
        for site in weights:
            collection, inbox = held.inbox_for(m.Want(kind="deliver", site=site, round=rnd,
                                                      layout_id=layout.layout_id, token=t))
            for name, view in inbox.state.views.items():
                view.copy_(torch.from_numpy(updates[site][name]))
            held.landed(collection, site, inbox)
        result = held.aggregate(rnd, "g", "n", weights, min_sites=3, mean=mean)
        assert sorted(result.accepted) == sorted(weights) and result.rejected == {} and result.capped == {}
        return {name: view.numpy().copy() for name, view in into.state.views.items()}

    own, flower = average(1, "sum-then-divide"), average(2, "flower")
    for name in flower:
        assert flower[name].dtype == flowers[name].numpy().dtype
        assert np.array_equal(flower[name], flowers[name].numpy()), name
        ulps = 1e-2 if name == "h" else 1e-5  # a few last bits of values near 3, in float16 or float32
        assert np.abs(own[name].astype(np.float64) - flower[name]).max() <= ulps, name
    assert any(not np.array_equal(own[n], flower[n]) for n in own), "the two means agreed to the bit: no test"


def test_a_strategy_that_aggregates_its_own_way_is_refused_by_name() -> None:
    """FedAdam steps a server optimizer in its aggregate_train; the node's mean would drop it."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    from fedrdma.core.errors import AggregationError
    from fedrdma.flower.strategy import FedRDMA

    with pytest.raises(AggregationError, match="FedAdam aggregates its own way.*wrap FedAvg, FedProx"):
        FedRDMA(FedAdam(), site="agg")
    for fine in (FedAvg(), FedProx(proximal_mu=0.1)):
        assert FedRDMA(fine, site="agg").inner is fine


def test_a_record_the_app_changed_in_place_is_published_again(site_nodes: dict[str, NodeProcess]) -> None:
    """The strategy writes the global pool once per record; a record whose Array the app
    replaced between steps (the same record object) is written again, not served stale."""
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAvg

    from fedrdma.flower import records
    from fedrdma.flower.strategy import POOLS, FedRDMA

    rng = np.random.default_rng(5)
    arrays = ArrayRecord({"w": Array(rng.standard_normal((64, 100)).astype(np.float32)),
                          "b": Array(np.zeros(100, np.float32))})
    strategy = FedRDMA(FedAvg(), site="agg", runtime_dir=site_nodes["agg"].runtime_dir)

    def published() -> dict[str, np.ndarray]:
        node = strategy._node
        assert node is not None
        return {k: a.numpy() for k, a in records.read(node.pools[POOLS[0]].state).items()}

    try:
        strategy._offer(1, arrays)
        assert np.array_equal(published()["w"], arrays["w"].numpy())
        strategy._offer(2, arrays)  # unchanged: nothing to write
        assert np.array_equal(published()["w"], arrays["w"].numpy())
        changed = rng.standard_normal((64, 100)).astype(np.float32)
        arrays["w"] = Array(changed)  # the same record, one Array replaced
        strategy._offer(3, arrays)
        assert np.array_equal(published()["w"], changed) and not published()["b"].any()
    finally:
        if strategy._node is not None:
            strategy._node.close()
