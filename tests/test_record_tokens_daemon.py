"""`record_tokens` through the daemon: the same results and errors as the
embedded `KVPool`, another session's sequences refused as `append` refuses
them, malformed requests refused with typed errors and nothing changed, a
retry (same id, same bytes) recording nothing twice, the worker's table
mirror untouched, and the daemon serving through all of it."""

from __future__ import annotations

import dataclasses
import time

import msgpack
import numpy as np
import pytest
from daemon_helpers import SMALL, Raw, running_server, server_fixture

from kvpager import KVPool
from kvpager.client import Client
from kvpager.errors import (
    KVPagerError,
    LimitExceeded,
    NotOwner,
    RequestTimeout,
    SessionLost,
    UnknownSequence,
)
from kvpager.limits import Limits
from kvpager.protocol import RETRIED_OPS, VERSION, pack

server = server_fixture(SMALL, heartbeat_timeout=30)
BS = SMALL.block_size


def body(rid: int, op: str, args: dict, session: str | None) -> bytes:
    """A request as bytes (NumPy arrays as the protocol's ExtType)."""
    return pack([VERSION, rid, session, op, args])


def pool_state(pool: KVPool):
    """What a request could change in the daemon's pool, read between requests."""
    m = pool.manager
    histories = {s: (h.prompt.tolist(), list(h.tail), list(h.keys)) for s, h in m.history.items()}
    return (pool.stats(), pool.blocks(), pool.sequences(), m.table.known[list(m.rows.values())].tolist(),
            histories, dict(m.pool.cache.key_to_block))


def owed(pool: KVPool, seq_id: int) -> int:
    """Slots of the sequence whose ids the daemon's pool does not know."""
    m = pool.manager
    row = m.rows[seq_id]
    return int(m.table.num_tokens[row] - m.table.known[row])


# -- the same answers as the embedded pool -------------------------------------------------------

def script(pool) -> list:
    """A pipelined decode loop with late ids, lagging commits, a fork, a
    truncate, a swap and refusals; returns what each step saw."""
    seen: list = []

    def attempt(fn, *args):
        try:
            seen.append(("ok", fn(*args)))
        except KVPagerError as e:
            seen.append((type(e).__name__, str(e), getattr(e, "seq_id", None)))

    p1, p2 = list(range(100, 140)), list(range(200, 213))
    a1, a2 = pool.allocate([p1, p2], salt="m")
    s1, s2 = a1.seq_id, a2.seq_id
    seen.append(pool.commit([s1, s2]))
    seen.append([x.tolist() for x in pool.append([s1, s2], 1)])  # step 0's slots
    for t in range(20):  # step t+1's slots, then step t's tokens, then a commit that lags
        seen.append([x.tolist() for x in pool.append([s1, s2], 1)])
        attempt(pool.record_tokens, [s1, s2], [[1000 + t], [2000 + t]])
        seen.append(pool.commit([s1, s2], [None, 13 + t]))
    seen.append([x.tolist() for x in pool.append([s1, s2], [5, 3])])
    attempt(pool.record_tokens, [s1, s2], [[1] * 7, [1]])  # s1 owes 6: refused whole
    attempt(pool.record_tokens, [s1, s2], [[3000, 3001, 3002, 3003, 3004, 3005], [4000, 4001]])
    attempt(pool.record_tokens, s2, [[4002, 4003]])  # owes one more
    attempt(pool.record_tokens, s2, [[4002]])
    seen.append(pool.commit([s1, s2]))
    [[kid]] = pool.fork([s1])
    seen.append([x.tolist() for x in pool.append([s1, kid], 4)])
    attempt(pool.record_tokens, [kid], [[5000, 5001, 5002, 5003]])
    attempt(pool.record_tokens, [s1], [[6000, 6001]])
    seen.append(pool.commit([s1, kid]))
    pool.truncate([s1], [64])
    seen.append([x.tolist() for x in pool.append([s1], 3)])
    attempt(pool.record_tokens, [s1], [[7000, 7001, 7002, 7003]])  # owes 3 past the cut
    attempt(pool.record_tokens, [s1], [np.array([7000, 7001, 7002])])
    for bad in (["a"], [1.5], [2**63], [2**64 - 1], [[1]], [None], "ab", None, [True]):
        attempt(pool.record_tokens, [kid], [bad])
    for ids, lists in (([kid, 12345], [[1], [1]]), ([kid, kid], [[1], [1]]), ([kid], [[1], [2]]),
                       ([kid, s2], [[1]]), ([kid], "abc"), ([kid], None)):
        attempt(pool.record_tokens, ids, lists)
    pool.swap_out([s2])
    attempt(pool.record_tokens, [s2], [[]])
    pool.swap_in([s2])
    seen.append(pool.commit([s1, s2, kid]))
    seen.append(pool.cached_tokens([p1 + [1000 + t for t in range(20)] + [9], p2 + [2000, 2001], p1[:20]],
                                   salt="m"))
    seen.append(dataclasses.asdict(pool.stats()))
    seen.append([dataclasses.replace(s, owner=None, owner_pid=None) for s in pool.sequences()])
    seen.append(pool.blocks())
    pool.check_integrity()
    return seen


def _equal(x, y, path="") -> None:
    if isinstance(x, np.ndarray):
        np.testing.assert_array_equal(x, y, err_msg=path)
    elif isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), path
        for i, (a, b) in enumerate(zip(x, y)):
            _equal(a, b, f"{path}[{i}]")
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for k in x:
            _equal(x[k], y[k], f"{path}.{k}")
    else:
        assert x == y, path


@pytest.mark.parametrize("map_pool", [True, False])
def test_the_client_answers_as_the_embedded_pool(server, map_pool):
    embedded = script(KVPool(SMALL))
    with Client(server.endpoint, map_pool=map_pool) as c:
        over_wire = script(c)
    _equal(embedded, over_wire)
    errors = [s for s in embedded if isinstance(s, tuple) and s[0] != "ok"]
    assert len(errors) == 19 and {e[0] for e in errors} == {"InvalidArgument", "UnknownSequence", "SequenceSwapped"}


def test_the_mirror_is_left_as_it_is(server):
    """record_tokens moves no block: the worker's mirror answers as the
    daemon, before and after, and keeps every sequence (no round trip)."""
    with Client(server.endpoint) as c:
        a, b = c.allocate([list(range(20)), list(range(30, 47))])
        ids = [a.seq_id, b.seq_id]
        c.append(ids, [13, 2])
        mirror = c.tables(ids)
        c.record_tokens(ids, [list(range(20, 33)), [47, 48]])
        assert a.seq_id in c._mirror and b.seq_id in c._mirror
        for got, want in zip(c.tables(ids), c._call("tables", {"seq_ids": ids})):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(c.tables(ids), mirror):
            np.testing.assert_array_equal(got, want)
        assert c.commit(ids) == [2, 1]
        with Client(server.endpoint) as other:
            assert other.cached_tokens([list(range(34)), list(range(30, 50))]) == [32, 16]


# -- sessions: another's sequences, no session -----------------------------------------------------

def test_another_sessions_sequences_are_refused_as_append_refuses_them(server):
    with Client(server.endpoint) as owner, Client(server.endpoint) as thief:
        [a] = owner.allocate([list(range(14))])
        owner.append(a.seq_id, 4)
        [t] = thief.allocate([[1, 2, 3]])
        thief.append(t.seq_id, 2)
        gone = thief.allocate([[4]])[0].seq_id
        thief.free(gone)
        before = pool_state(server.pool)
        for ids in ([a.seq_id], [t.seq_id, a.seq_id], [a.seq_id, t.seq_id]):
            with pytest.raises(NotOwner) as by_append:
                thief.append(ids, 1)
            with pytest.raises(NotOwner) as by_record:
                thief.record_tokens(ids, [[7]] * len(ids))
            assert str(by_record.value) == str(by_append.value)
            assert pool_state(server.pool) == before
        for ids in ([12345], [t.seq_id, gone]):
            with pytest.raises(UnknownSequence) as by_append:
                thief.append(ids, 1)
            with pytest.raises(UnknownSequence) as by_record:
                thief.record_tokens(ids, [[7]] * len(ids))
            assert by_record.value.seq_id == by_append.value.seq_id and str(by_record.value) == str(by_append.value)
            assert pool_state(server.pool) == before
        raw = Raw(server.endpoint)
        try:
            for rid, session in ((1, None), (2, "not-a-session"), (3, thief.session_name)):
                replies = [raw.send(body(rid, op, args, session)) for op, args in (
                    ("append", {"seq_ids": [t.seq_id]}),
                    ("record_tokens", {"seq_ids": [t.seq_id], "token_ids": [[7]]}))]
                assert replies[0][1] == replies[1][1] == 1
                assert replies[0][2]["code"] == replies[1][2]["code"] == "session_lost"
        finally:
            raw.close()
        assert pool_state(server.pool) == before
        owner.record_tokens(a.seq_id, [[14, 15, 16, 17]])
        thief.record_tokens(t.seq_id, [[3, 4]])
        assert owner.commit(a.seq_id) == [1]
        owner.check_integrity()
    with pytest.raises(SessionLost):
        thief.record_tokens(t.seq_id, [[5]])  # a closed client


# -- malformed requests ------------------------------------------------------------------------------

MALFORMED = [
    {},
    {"seq_ids": "S"},
    {"token_ids": [[1]]},
    {"seq_ids": "S", "token_ids": [[1]], "num_tokens": 1},
    {"seq_ids": "S", "token_ids": [[1]], "x": None},
    {"seq_ids": "x", "token_ids": [[1]]},
    {"seq_ids": 1.5, "token_ids": [[1]]},
    {"seq_ids": True, "token_ids": [[1]]},
    {"seq_ids": [True], "token_ids": [[1]]},
    {"seq_ids": None, "token_ids": [[1]]},
    {"seq_ids": {"a": 1}, "token_ids": [[1]]},
    {"seq_ids": "S as a float array", "token_ids": [[1]]},
    {"seq_ids": np.array([["S"]]), "token_ids": [[1]]},
    {"seq_ids": "S", "token_ids": "abc"},
    {"seq_ids": "S", "token_ids": b"abc"},
    {"seq_ids": "S", "token_ids": None},
    {"seq_ids": "S", "token_ids": 5},
    {"seq_ids": "S", "token_ids": 1.5},
    {"seq_ids": "S", "token_ids": {"a": [1]}},
    {"seq_ids": "S", "token_ids": [1]},
    {"seq_ids": "S", "token_ids": [1, 2]},
    {"seq_ids": "S", "token_ids": []},
    {"seq_ids": "S", "token_ids": [[1], [2]]},
    {"seq_ids": "S", "token_ids": [[1.5]]},
    {"seq_ids": "S", "token_ids": [[float("nan")]]},
    {"seq_ids": "S", "token_ids": [["a"]]},
    {"seq_ids": "S", "token_ids": [[b"a"]]},
    {"seq_ids": "S", "token_ids": [[[1]]]},
    {"seq_ids": "S", "token_ids": [[1, [2]]]},
    {"seq_ids": "S", "token_ids": [[None]]},
    {"seq_ids": "S", "token_ids": [None]},
    {"seq_ids": "S", "token_ids": [{}]},
    {"seq_ids": "S", "token_ids": [[True]]},
    {"seq_ids": "S", "token_ids": [[2**63]]},
    {"seq_ids": "S", "token_ids": [[2**64 - 1]]},
    {"seq_ids": "S", "token_ids": [[1, 2, 3, 4, 5, 6]]},  # owes 5
    {"seq_ids": "S", "token_ids": [np.array([1.0])]},
    {"seq_ids": "S", "token_ids": [np.array([2**63], np.uint64)]},
    {"seq_ids": "S", "token_ids": np.array([[1.0]])},
    {"seq_ids": "S", "token_ids": np.array(3)},
    {"seq_ids": ["S", "S"], "token_ids": [[1], [2]]},
    {"seq_ids": ["S", "T"], "token_ids": [[1], ["x"]]},  # the first would be fine: nothing recorded
    {"seq_ids": ["S", "T"], "token_ids": [[1], [1, 2, 3]]},
    {"seq_ids": ["S", 12345], "token_ids": [[1], [1]]},
]


def _fill(value, ids: dict[str, int]):
    if isinstance(value, str) and value in ids:
        return ids[value]
    if value == "S as a float array":
        return np.array([float(ids["S"])])
    if isinstance(value, list):
        return [_fill(v, ids) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.dtype.kind == "U":
        return np.vectorize(lambda v: ids[v])(value).astype(np.int64)
    return value


def test_malformed_requests_are_refused_and_change_nothing(server):
    with Client(server.endpoint) as c:
        s, t = (a.seq_id for a in c.allocate([list(range(12)), list(range(20, 25))]))
        c.append([s, t], [5, 2])
        raw = Raw(server.endpoint)
        try:
            before = pool_state(server.pool)
            for args in MALFORMED:
                rid = next(c._ids)  # (the client's next id: a session's requests come in the order of their ids)
                args = _fill(args, {"S": s, "T": t})
                reply = raw.send(body(rid, "record_tokens", args, c.session))
                assert reply[0] == rid and reply[1] == 1, args
                code = reply[2]["code"]
                seq = args.get("seq_ids")
                want = "unknown_sequence" if isinstance(seq, list) and 12345 in seq else "invalid_argument"
                assert code == want, (args, reply[2])
                assert pool_state(server.pool) == before, args
            assert raw.send(body(1, "check", {}, c.session))[1] == 0
        finally:
            raw.close()
        assert owed(server.pool, s) == 5 and owed(server.pool, t) == 2
        c.record_tokens([s, t], [[12, 13, 14, 15, 16], [25, 26]])
        assert c.commit([s, t]) == [1, 0]
        assert c.cached_tokens([list(range(17))]) == [16]
        c.check_integrity()


def test_requests_over_the_limits_are_refused():
    with running_server(SMALL, limits=Limits(ids=4, tokens=64)) as small, Client(small.endpoint) as c:
        [a] = c.allocate([[1, 2, 3]])
        c.append(a.seq_id, 60)
        before = pool_state(small.pool)
        with pytest.raises(LimitExceeded) as e:
            c.record_tokens(a.seq_id, [list(range(65))])
        assert e.value.limit == "tokens"
        with pytest.raises(LimitExceeded) as e:
            c.record_tokens([a.seq_id] * 5, [[1]] * 5)
        assert e.value.limit == "ids"
        assert pool_state(small.pool) == before
        c.record_tokens(a.seq_id, [list(range(60))])
        assert owed(small.pool, a.seq_id) == 0
        c.check_integrity()


# -- retries -----------------------------------------------------------------------------------------

def test_a_retry_records_nothing_twice(server):
    assert "record_tokens" in RETRIED_OPS
    with Client(server.endpoint) as c:
        [a] = c.allocate([list(range(10))])
        c.append(a.seq_id, 8)
        raw = Raw(server.endpoint)
        try:
            once = body(7, "record_tokens", {"seq_ids": [a.seq_id], "token_ids": [[10, 11]]}, c.session)
            first, again = raw.recv_raw(once), raw.recv_raw(once)
            assert first == again and msgpack.unpackb(first)[1] == 0
            assert owed(server.pool, a.seq_id) == 6  # recorded once
            # the same id with other bytes is a new request
            assert raw.send(body(7, "record_tokens", {"seq_ids": [a.seq_id], "token_ids": [[12, 13]]},
                                 c.session))[1] == 0
            assert owed(server.pool, a.seq_id) == 4
            # a refusal is kept too: its retry is the same refusal
            over = body(8, "record_tokens", {"seq_ids": [a.seq_id], "token_ids": [[1] * 5]}, c.session)
            first, again = raw.recv_raw(over), raw.recv_raw(over)
            assert first == again and msgpack.unpackb(first)[2]["code"] == "invalid_argument"
        finally:
            raw.close()
        c.record_tokens(a.seq_id, [[14, 15, 16, 17]])
        assert c.commit(a.seq_id) == [1]
        assert c.cached_tokens([list(range(18))]) == [16]


def test_a_record_that_timed_out_is_settled_once(server, monkeypatch):
    """The client sends a timed-out record_tokens again before its next
    request; the daemon answers from the kept reply: the ids are recorded
    once, though the sequence owes room for them twice."""
    with Client(server.endpoint) as c:
        [a] = c.allocate([list(range(10))])
        c.append(a.seq_id, 6)
        real = server._handlers["record_tokens"]

        def slow(s, args):
            time.sleep(1.0)
            return real(s, args)

        monkeypatch.setitem(server._handlers, "record_tokens", slow)
        c.timeout = 0.2
        with pytest.raises(RequestTimeout):
            c.record_tokens(a.seq_id, [[10, 11, 12]])
        assert c._unsettled is not None and c._unsettled[2] == "record_tokens"
        c.timeout = 10
        assert c.commit(a.seq_id) == [0]  # settled first (the retry waits for the slow first run)
        monkeypatch.setitem(server._handlers, "record_tokens", real)
        assert c._unsettled is None
        assert owed(server.pool, a.seq_id) == 3
        assert a.seq_id in c._mirror  # no table changed: the mirror kept the sequence
        c.record_tokens(a.seq_id, [[13, 14, 15]])
        assert c.commit(a.seq_id) == [1]
        assert c.cached_tokens([list(range(17))]) == [16]
        c.check_integrity()
