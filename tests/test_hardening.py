"""Issue 11: sessions that cannot be stolen, a loop that cannot be stalled, a
clear error for every bad input. Each test is an attack that once worked
against a CPU daemon; bounded waits, free endpoints."""

from __future__ import annotations

import os

import numpy as np
import pytest
from daemon_helpers import SMALL, Raw, req, running_server

from kvpager.client import Client
from kvpager.errors import InvalidArgument, NotOwner


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



def _kv(n: int, value: float) -> tuple[np.ndarray, np.ndarray]:
    shape = (n, SMALL.num_kv_heads, SMALL.head_dim)
    return np.full(shape, value, np.float32), np.full(shape, -value, np.float32)


def test_write_needs_ownership_and_published_blocks_are_immutable(server):
    """D2: a session overwrote another session's committed, published block;
    a third client then got that K/V through the prefix cache."""
    prompt = list(range(40))
    with Client(server.endpoint) as victim, Client(server.endpoint, map_pool=False) as thief:
        [a] = victim.allocate([prompt])
        for layer in range(SMALL.num_layers):
            victim.write(layer, a.slots, *_kv(len(a.slots), 1.0))
        victim.commit(a.seq_id)
        [own] = thief.allocate([[7] * 20])
        with pytest.raises(NotOwner, match="not held"):
            thief.remote_write(0, a.slots, *_kv(len(a.slots), 666.0))  # the victim's slots
        with pytest.raises(NotOwner, match="not held"):  # one foreign slot among its own spoils the batch
            thief.remote_write(0, np.concatenate([own.slots, a.slots[-1:]]), *_kv(len(own.slots) + 1, 666.0))
        [hit] = thief.allocate([prompt])  # shares the published blocks, in its own table
        assert hit.num_cached_tokens == 32
        with pytest.raises(NotOwner, match="immutable"):
            thief.remote_write(0, np.arange(hit.block_table[0] * 16, hit.block_table[0] * 16 + 4),
                               *_kv(4, 666.0))
        thief.remote_write(0, own.slots, *_kv(len(own.slots), 2.0))  # its own, unpublished: fine
        thief.remote_write(0, hit.slots, *_kv(len(hit.slots), 2.0))  # the uncached tail: its own
        with Client(server.endpoint) as reader:
            [b] = reader.allocate([prompt])
            k, v = reader.kv(0)
            assert b.block_table[:2] == a.block_table[:2]
            assert (k[list(b.block_table[:2])] == 1.0).all() and (v[list(b.block_table[:2])] == -1.0).all()
        victim.check_integrity()


def test_token_ids_out_of_range_change_nothing(server):
    """D3: a token id >= 2**63 passed append; a later commit of two sequences
    failed halfway, after publishing the first one's blocks, and the second
    could never commit again."""
    with Client(server.endpoint) as c:
        a, b = c.allocate([list(range(15)), list(range(100, 115))])
        for bad in ([[1], [2**63]], [[1], [2**64 - 1]], [[1], np.array([2**63], np.uint64)]):
            with pytest.raises(InvalidArgument, match="2\\*\\*63"):
                c.append([a.seq_id, b.seq_id], 1, bad)
        with pytest.raises(InvalidArgument, match="2\\*\\*63"):
            c.append([a.seq_id, b.seq_id], [2, 1], [[1, 2], [2**63]])  # the general path
        assert [c.sequence(s).num_tokens for s in (a.seq_id, b.seq_id)] == [15, 15]
        c.append([a.seq_id, b.seq_id], 1, [[15], [115]])
        assert c.commit([a.seq_id, b.seq_id]) == [1, 1]
        with Client(server.endpoint) as d:
            assert d.cached_tokens([list(range(17)), list(range(100, 117))]) == [16, 16]
        c.check_integrity()
