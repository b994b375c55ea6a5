"""Issue 11: sessions that cannot be stolen, a loop that cannot be stalled, a
clear error for every bad input. Each test is an attack that once worked
against a CPU daemon; bounded waits, free endpoints."""

from __future__ import annotations

import os

import pytest
from daemon_helpers import SMALL, Raw, req, running_server

from kvpager.client import Client


@pytest.fixture
def server():
    with running_server(SMALL, heartbeat_timeout=30) as s:
        yield s


def test_session_ids_are_never_revealed(server):
    """D1: `sequences` showed each sequence's owner, which was the session id:
    with it another client freed the victim's sequences and ended its session."""
    with Client(server.endpoint) as victim, Client(server.endpoint, heartbeat=False) as thief:
        [a] = victim.allocate([[1, 2, 3]])
        [info] = thief.sequences()
        assert info.owner == victim.session_name and info.owner_pid == os.getpid()
        assert victim.session not in (info.owner, victim.session_name)
        raw = Raw(server.endpoint)
        try:
            for rid, op, args in ((1, "sequences", {}), (2, "stats", {}), (3, "tables", {"seq_ids": [a.seq_id]}),
                                  (4, "hello", {})):
                assert victim.session.encode() not in raw.recv_raw(req(rid, op, args))
            for rid, op in ((5, "free"), (6, "bye")):
                reply = raw.send(req(rid, op, {"seq_ids": [a.seq_id]} if op == "free" else {}, session=info.owner))
                assert reply[2]["code"] == "session_lost"
                assert info.owner not in reply[2]["message"]
        finally:
            raw.close()
        assert victim.sequence(a.seq_id).num_tokens == 3
        victim.heartbeat()  # still open

