"""The control plane in one process: a real hub on loopback, real silo links dialing it."""

from __future__ import annotations

import pytest

from fedrdma.config import SiloEntry
from fedrdma.control import messages as m
from fedrdma.control.hub import Hub
from fedrdma.control.link import AggregatorLink, JoinRefused
from fedrdma.core.modes import Mode
from fedrdma.transport import wire

LAYOUT, NBYTES = "layout-a", 4096
TOKEN = "token-of-hospital"


def welcome(silo: str, generation: int) -> m.Welcome:
    return m.Welcome(silo=silo, generation=generation, broadcast_mode=Mode.RDMA_E, upload_mode=Mode.RDMA_E_PULL,
                     chunk_size=1024, window=2, heartbeat_s=0.5)


@pytest.fixture
def hub():
    events: list[dict] = []
    h = Hub("127.0.0.1:0", [SiloEntry(id="hospital", token=TOKEN)], LAYOUT, NBYTES, welcome, events.append)
    h.events = events
    yield h
    h.close()


def test_a_joined_silo_with_both_streams_attached_is_ready_with_the_aggregators_modes(hub):
    link = AggregatorLink(hub.address, "hospital", TOKEN, LAYOUT, NBYTES)
    try:
        assert link.welcome.broadcast_mode is Mode.RDMA_E and link.welcome.upload_mode is Mode.RDMA_E_PULL
        assert hub.ready_links() == []
        link.attach("broadcast")
        link.attach("upload")
        (ready,) = hub.wait_for(1, timeout=5)
        assert ready.silo == "hospital" and ready.generation == link.welcome.generation == 1
        assert set(ready.data) == {"broadcast", "upload"}
    finally:
        link.close()


@pytest.mark.parametrize("silo,token,reason", [
    ("hospital", "not-the-token", "wrong token for silo 'hospital'"),
    ("stranger", TOKEN, "unknown silo id 'stranger'"),
])
def test_a_refused_join_names_the_reason_to_the_silo_and_in_the_event_log(hub, silo, token, reason):
    with pytest.raises(JoinRefused, match=reason):
        AggregatorLink(hub.address, silo, token, LAYOUT, NBYTES)
    assert any(e["event"] == "refused" and reason in e["reason"] for e in hub.events)
    assert hub.ready_links() == []


def test_a_join_with_another_layout_is_refused_with_both_layouts_named(hub):
    with pytest.raises(JoinRefused, match="layout mismatch: the silo holds layout other.*the aggregator holds layout-a"):
        AggregatorLink(hub.address, "hospital", TOKEN, "other", NBYTES)


def test_an_attach_of_an_older_join_is_refused(hub):
    first = AggregatorLink(hub.address, "hospital", TOKEN, LAYOUT, NBYTES)
    second = AggregatorLink(hub.address, "hospital", TOKEN, LAYOUT, NBYTES)
    try:
        stale = first.attach("broadcast")
        reply = stale.recv(5)
        assert isinstance(reply, wire.Refuse) and "no current join of generation 1" in reply.reason
        assert second.welcome.generation == 2
    finally:
        first.close()
        second.close()
