"""The grant rules of a push into a bounded inbox (`core.grants`), with plain calls."""

from __future__ import annotations

import pytest

from fedrdma.core.errors import ProtocolError
from fedrdma.core.grants import Grants


def test_every_free_slot_is_granted_once_and_again_only_after_its_chunk_was_copied_out():
    grants = Grants(3)
    assert grants.grant() == [0, 1, 2]
    assert grants.grant() == []
    assert grants.claim(0, 1) is True
    assert (grants.held, grants.granted) == (1, 2)
    assert grants.grant() == []  # held: its chunk is still in it
    grants.release(1)
    assert grants.grant() == [1]


@pytest.mark.parametrize("slot,why", [
    (3, "outside the 3"),  # past the area
    (1, "not granted to it now \\(held\\)"),  # written twice
])
def test_a_peer_naming_a_slot_it_does_not_hold_a_grant_for_is_refused(slot, why):
    grants = Grants(3)
    grants.grant()
    grants.claim(0, 1)
    with pytest.raises(ProtocolError, match=why):
        grants.claim(0, slot)


def test_a_slot_never_granted_is_refused():
    grants = Grants(2)
    with pytest.raises(ProtocolError, match="not granted to it now \\(free\\)"):
        grants.claim(0, 0)


def test_a_reconnect_voids_the_old_connections_grants_but_not_the_chunks_being_copied():
    grants = Grants(3)
    grants.grant()
    grants.claim(0, 2)
    grants.reconnected(1)
    assert (grants.held, grants.granted) == (1, 0)
    assert grants.claim(0, 0) is False  # a late notice of the old connection: left alone
    with pytest.raises(ProtocolError, match="not granted"):
        grants.claim(1, 0)  # the new connection has not been granted it yet
    assert grants.grant() == [0, 1]
    grants.release(2)
    assert grants.grant() == [2]
    assert grants.claim(1, 2) is True


def test_a_notice_of_a_connection_not_yet_resumed_is_refused():
    grants = Grants(2)
    grants.grant()
    with pytest.raises(ProtocolError, match="names connection 1; this side is at 0"):
        grants.claim(1, 0)


def test_an_older_reconnect_changes_nothing_and_only_a_held_slot_can_be_released():
    grants = Grants(2, generation=4)
    grants.grant()
    grants.reconnected(3)
    assert grants.granted == 2
    with pytest.raises(ValueError, match="granted, not held"):
        grants.release(0)
    with pytest.raises(ValueError, match="at least one landing slot"):
        Grants(0)
