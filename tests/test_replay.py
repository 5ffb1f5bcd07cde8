"""fl.replay in plain calls: a silo's update streamed again for a retraction, with threads
standing in for the upload session (the process tests in test_inbox.py run it for real)."""

from __future__ import annotations

import torch

from fedrdma.core.errors import PeerLost
from fedrdma.fl.replay import Replay

WAIT_S = 5.0
"""Bounds a hang; every stream here ends in milliseconds."""


class Session:
    """The silo's side as the replay sees it: how often it was asked, and what each resend does."""

    def __init__(self, replay_chunks: list[list[int]], fail_on: frozenset[int] = frozenset()) -> None:
        self.asked = 0
        self.received = 0
        self.replay: Replay | None = None
        self._chunks = replay_chunks
        self._fail_on = fail_on

    def ask(self) -> bool:
        self.asked += 1
        return True

    def receive(self) -> object:
        attempt = self.received
        self.received += 1
        assert self.replay is not None
        for offset in self._chunks[attempt]:
            self.replay.land(offset, torch.full((4,), offset, dtype=torch.uint8))
        if attempt in self._fail_on:
            raise PeerLost("the silo went silent mid-resend")
        return None


def replay_of(session: Session) -> Replay:
    session.replay = Replay("bank", session.ask, session.receive, WAIT_S)
    return session.replay


def test_a_resend_streams_every_chunk_as_landed_and_may_be_asked_again():
    session = Session([[0, 4, 8], [8, 0, 4]])
    replay = replay_of(session)
    first = replay()
    assert first is not None
    assert [(o, d.tolist()) for o, d in first] == [(0, [0] * 4), (4, [4] * 4), (8, [8] * 4)]
    second = replay()  # a rebuild after a reweighing reads a kept silo a second time
    assert second is not None and [o for o, _ in second] == [8, 0, 4]
    assert replay.failed is None and session.asked == 2


def test_after_a_resend_that_failed_the_spent_session_is_not_asked_again():
    session = Session([[0, 4], [0, 4, 8]], fail_on=frozenset({0}))
    replay = replay_of(session)
    stream = replay()
    assert stream is not None
    assert [o for o, _ in stream] == [0, 4], "what landed before the failure still reaches the retraction"
    assert replay.failed is not None and "went silent" in replay.failed
    assert replay() is None, "no bytes can be had from a session that is spent"
    assert session.asked == 1 and session.received == 1


def test_a_silo_that_cannot_be_asked_gives_no_stream_and_no_failure():
    session = Session([[0]])
    replay = Replay("bank", lambda: False, session.receive, WAIT_S)
    assert replay() is None
    assert session.received == 0 and replay.failed is None
