"""The control plane in one process: a real hub on loopback under mutual TLS, real links and
real strangers dialing it, each attack made from the attacker's side of a real connection."""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
import time

import pytest

from fedrdma.control import messages as m
from fedrdma.control.certs import init_ca, issue
from fedrdma.control.hub import AUTH_TIMEOUT_S, MAX_STRANGERS_PER_PEER, Hub
from fedrdma.control.link import AggregatorLink, JoinRefused
from fedrdma.core.errors import PeerLost
from fedrdma.core.modes import Mode, Wire
from fedrdma.transport import wire
from fedrdma.transport.channel import REFUSAL_REPEATS, HandshakeRefused, dial
from fedrdma.transport.tls import CLIENT, SERVER, Credentials

LAYOUT, NBYTES = "layout-a", 4096


def welcome(silo: str, generation: int) -> m.Welcome:
    return m.Welcome(silo=silo, generation=generation, broadcast_mode=Mode.RDMA_E, upload_mode=Mode.RDMA_E_PULL,
                     chunk_size=1024, window=2, heartbeat_s=0.5)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    fed = tmp_path_factory.mktemp("fed")
    init_ca(fed)
    issue(fed, "aggregator", SERVER)
    for silo in ("hospital", "bank", "stranger"):
        issue(fed, silo, CLIENT)
    issue(fed, "lapsed", CLIENT, days=1, now=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3))
    other = tmp_path_factory.mktemp("other")
    init_ca(other)
    issue(other, "hospital", CLIENT)
    (other / "fed-ca.pem").write_bytes((fed / "ca.pem").read_bytes())
    return fed, other


def creds(directory, name) -> Credentials:
    return Credentials.load(directory, name)


@pytest.fixture
def hub(certs):
    events: list[dict] = []
    h = Hub("127.0.0.1:0", ["hospital", "bank"], LAYOUT, NBYTES, welcome, events.append,
            credentials=creds(certs[0], "aggregator"))
    h.events = events
    yield h
    h.close()


def join(hub, certs, name="hospital", layout=LAYOUT) -> AggregatorLink:
    return AggregatorLink(hub.address, name, layout, NBYTES, creds(certs[0], name))


def test_a_joined_silo_with_both_streams_attached_is_ready_under_the_name_in_its_certificate(hub, certs):
    link = join(hub, certs)
    try:
        assert link.welcome.broadcast_mode is Mode.RDMA_E and link.welcome.upload_mode is Mode.RDMA_E_PULL
        link.attach("broadcast")
        link.attach("upload")
        (ready,) = hub.wait_for(1, timeout=5)
        assert ready.silo == "hospital" and ready.generation == 1 and set(ready.data) == {"broadcast", "upload"}
        assert ready.control.identity == "hospital"
    finally:
        link.close()


def test_a_silo_the_federation_does_not_list_is_refused_without_naming_the_others(hub, certs):
    with pytest.raises(JoinRefused, match="silo 'stranger' is not part of this federation"):
        join(hub, certs, "stranger")
    (refusal,) = [e["reason"] for e in hub.events if e["event"] == "refused"]
    assert "hospital" not in refusal and "bank" not in refusal


def test_a_certificate_cannot_join_as_another_silo(hub, certs):
    channel = dial(hub.address, 5, creds(certs[0], "hospital"))
    channel.send(m.Join(silo="bank", layout_id=LAYOUT, nbytes=NBYTES))
    reply = channel.recv(5)
    channel.close()
    assert isinstance(reply, wire.Refuse)
    assert "this stream's certificate names 'hospital', not 'bank'" in reply.reason
    assert hub.links == {}


def test_a_join_with_another_layout_is_refused_with_both_layouts_named(hub, certs):
    with pytest.raises(JoinRefused, match="layout mismatch: the silo holds layout other.*the aggregator holds layout-a"):
        join(hub, certs, layout="other")


def test_a_second_join_while_the_silo_lives_is_refused_for_now_and_the_live_link_is_kept(hub, certs):
    first = join(hub, certs)
    try:
        with pytest.raises(PeerLost, match="already joined and its link is alive"):
            join(hub, certs)  # also what a replayed join would meet
        assert hub.links["hospital"].control is not None and hub.links["hospital"].alive()
        assert hub.links["hospital"].generation == first.welcome.generation == 1
        stale = first.attach("broadcast")
        assert stale.wait(0.5) is None, "the first link's attach still counts"
    finally:
        first.close()


def test_an_attach_of_an_older_join_is_refused(hub, certs):
    first = join(hub, certs)
    first.close()
    deadline = time.monotonic() + 10
    while hub.links.get("hospital") is not None and hub.links["hospital"].alive():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    second = join(hub, certs)
    try:
        reply = first.attach("broadcast").recv(5)
        assert isinstance(reply, wire.Refuse) and "no current join of generation 1" in reply.reason
        assert second.welcome.generation == 2
    finally:
        second.close()


def test_a_delta_stream_is_refused_in_an_fp32_federation_and_a_silo_is_ready_only_with_every_stream(hub, certs):
    link = join(hub, certs)
    try:
        reply = link.attach("delta").recv(5)
        assert isinstance(reply, wire.Refuse) and "wire format is fp32: it has no delta stream" in reply.reason
        link.attach("broadcast")
        assert hub.ready_links() == []  # the upload stream is still missing
        link.attach("upload")
        deadline = time.monotonic() + 5
        while not hub.ready_links():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [r.silo for r in hub.ready_links()] == ["hospital"]
    finally:
        link.close()


@pytest.mark.parametrize("who,which,client_says,server_says", [
    ("other", "hospital", "refused this side's certificate", "unable to get local issuer certificate"),
    ("fed", "lapsed", "refused this side's certificate", "certificate has expired"),
    ("fed", "aggregator", "refused this side's certificate", "unsupported certificate purpose"),
])
def test_a_certificate_the_federation_did_not_issue_for_a_silo_gets_no_stream(hub, certs, capfd, who, which,
                                                                              client_says, server_says):
    directory = certs[1] if who == "other" else certs[0]
    bad = Credentials(ca=(certs[0] / "ca.pem").read_bytes(), cert=(directory / f"{which}.pem").read_bytes(),
                      key=(directory / f"{which}.key").read_bytes(), name=which, source=str(directory))
    with pytest.raises(HandshakeRefused, match=client_says):
        dial(hub.address, 5, bad)
    assert server_says in capfd.readouterr().err, "the aggregator's log names why (gRPC's TLS layer)"
    assert hub.links == {}


class Cutter:
    """A TCP relay in front of `target` that cuts its first `cuts` connections as they open,
    as a lossy path or a peer going down cuts a handshake; later ones it relays."""

    def __init__(self, target: str, cuts: int) -> None:
        self.target, self.cuts, self.cut = target, cuts, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            if self.cut < self.cuts:
                self.cut += 1
                conn.close()
                continue
            host, port = self.target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def test_a_handshake_cut_once_is_dialed_again_and_one_cut_every_time_is_named(hub, certs):
    once = Cutter(hub.address, cuts=1)
    try:
        channel = dial(once.address, 15, creds(certs[0], "hospital"))
        channel.close()
        assert once.cut == 1
    finally:
        once.close()
    always = Cutter(hub.address, cuts=1000)
    try:
        with pytest.raises(HandshakeRefused, match="does not speak TLS"):  # what a cut looks like from here
            dial(always.address, 15, creds(certs[0], "hospital"))
        assert always.cut == REFUSAL_REPEATS
    finally:
        always.close()


def test_a_plaintext_client_against_a_tls_aggregator_is_refused_on_both_sides(hub, capfd):
    with pytest.raises(HandshakeRefused, match="runs with certificates; start this side with --certs"):
        dial(hub.address, 5)
    assert "WRONG_VERSION_NUMBER" in capfd.readouterr().err


def test_a_stream_opening_with_a_blob_is_closed_and_a_real_silo_still_joins(hub, certs):
    stranger = dial(hub.address, 5, creds(certs[0], "hospital"))
    stranger.send_blob(b"\x00" * 16)
    reply = stranger.recv(5)
    assert isinstance(reply, wire.Refuse) and "must open with join or attach, not Blob" in reply.reason
    with pytest.raises(PeerLost):
        stranger.recv(AUTH_TIMEOUT_S + 5)  # and the stream is closed behind it
    link = join(hub, certs)
    link.close()


@pytest.mark.parametrize("size,limit", [(1 << 20, "takes at most 65536"), (10 << 20, "")])
def test_a_large_frame_before_joining_is_refused(hub, certs, size, limit):
    stranger = dial(hub.address, 5, creds(certs[0], "hospital"))
    try:
        stranger.send_blob(b"\x00" * size)
    except PeerLost:
        pass  # gRPC itself refused a frame above its message limit
    with pytest.raises(PeerLost):
        stranger.recv(AUTH_TIMEOUT_S + 5)
    deadline = time.monotonic() + AUTH_TIMEOUT_S + 2
    while not any(e["event"] == "refused" for e in hub.events):
        assert time.monotonic() < deadline, "the stream was never refused"
        time.sleep(0.05)
    reasons = [str(e.get("reason", "")) for e in hub.events if e["event"] == "refused"]
    assert all(limit in r for r in reasons), reasons
    assert hub.links == {}


def test_a_hundred_silent_streams_do_not_keep_a_real_silo_out(hub, certs):
    strangers = []
    for _ in range(100):
        try:
            strangers.append(dial(hub.address, 5, creds(certs[0], "bank")))
        except PeerLost:
            pass
    started = time.monotonic()
    try:
        link = join(hub, certs)  # while the strangers hold their streams open, saying nothing
        link.close()
        assert time.monotonic() - started < 10
        closed_at_once = sum(1 for e in hub.events if "have not joined yet" in str(e.get("reason", "")))
        assert closed_at_once >= len(strangers) - MAX_STRANGERS_PER_PEER, hub.events[-3:]
        time.sleep(AUTH_TIMEOUT_S + 1)
        assert sum(1 for e in hub.events if "said nothing within" in str(e.get("reason", ""))) >= 1
    finally:
        for s in strangers:
            s.close()


def test_a_join_in_another_wire_format_is_refused_with_both_formats_named(certs):
    h = Hub("127.0.0.1:0", ["hospital"], LAYOUT, NBYTES, welcome, credentials=creds(certs[0], "aggregator"),
            wire_format=Wire.INT8)
    try:
        with pytest.raises(JoinRefused, match="wire format mismatch: the silo encodes its updates as bf16, the "
                                              "federation moves int8; set wire = \"int8\""):
            AggregatorLink(h.address, "hospital", LAYOUT, NBYTES, creds(certs[0], "hospital"), Wire.BF16)
        assert h.links == {}
        link = AggregatorLink(h.address, "hospital", LAYOUT, NBYTES, creds(certs[0], "hospital"), Wire.INT8)
        assert link.welcome.silo == "hospital"
        link.close()
    finally:
        h.close()
