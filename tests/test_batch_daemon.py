"""`batch` through the daemon: a pipelined decode loop whose step is one
batch answers exactly as the embedded `KVPool` making the same calls one by
one (and as its own `KVPool.batch`); the first failing op stops a batch (earlier ops stay done, the worker's
mirror follows them, later ones never run); malformed batches are refused
before anything runs; another session's sequences are refused; a retry runs
nothing twice; a daemon without the op is told apart."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from client_plan_helpers import assert_mirrors_daemon
from daemon_helpers import SMALL, Raw, client_fixture, running_server, server_fixture
from test_record_tokens_daemon import _equal, body, pool_state

from kvpager import KVPool, server_dispatch
from kvpager import protocol as dispatch
from kvpager.client import Client
from kvpager.errors import (
    InvalidArgument,
    LimitExceeded,
    NotOwner,
    UnknownSequence,
    UnsupportedConfiguration,
)
from kvpager.limits import Limits
from kvpager.protocol import BATCH_MAX_OPS, decode_batch, decode_slots

server = server_fixture(SMALL, heartbeat_timeout=30)
client = client_fixture()


def loop(pool, batched: bool) -> list:
    """A pipelined decode loop of three sequences (one ends early and is freed, one
    is forked): each step appends the next pass's slots, records the last pass's
    tokens and commits the pass before; ``batched``: all of a step in one batch."""
    seen: list = []
    allocs = pool.allocate([list(range(100, 140)), list(range(200, 213)), list(range(300, 333))], salt="b")
    ids = [a.seq_id for a in allocs]
    seen.append(pool.commit(ids))
    seen.append(pool.append_flat(ids, 1).tolist())  # pass 0's slots, ids unknown
    [[kid]] = pool.fork([ids[0]])
    live = ids + [kid]
    seen.append(pool.append_flat([kid], 1).tolist())
    for t in range(24):
        done = live
        if t == 9:  # the third sequence ends: freed with the step
            live = [s for s in live if s != ids[2]]
        calls = [("record_tokens", done, [[1000 * (i + 1) + t] for i in range(len(done))]),
                 ("commit", done, {"upto": None})]
        if t == 9:
            calls.append(("free", [ids[2]]))
        calls.append(("append_flat", live, 1))
        if batched:
            out = pool.batch(calls)
        else:
            out = [getattr(pool, c[0])(*[a for a in c[1:] if not isinstance(a, dict)],
                                       **next((a for a in c[1:] if isinstance(a, dict)), {})) for c in calls]
        seen.append([x.tolist() if isinstance(x, np.ndarray) else x for x in out])
    seen.append(pool.commit(live))
    seen.append(pool.cached_tokens([list(range(100, 140)) + [1000 + t for t in range(20)]], salt="b"))
    seen.append(dataclasses.asdict(pool.stats()))
    seen.append([dataclasses.replace(s, owner=None, owner_pid=None) for s in pool.sequences()])
    seen.append(pool.blocks())
    pool.check_integrity()
    return seen


@pytest.mark.parametrize("map_pool", [True, False])
def test_a_batched_loop_answers_as_the_embedded_pool_one_call_at_a_time(server, map_pool, monkeypatch):
    embedded = loop(KVPool(SMALL), batched=False)
    seen_ops: list[str] = []

    def counted(data, limit, *bounds):
        req = dispatch.decode_request(data, limit, *bounds)
        seen_ops.append(req.op)
        return req

    with Client(server.endpoint, map_pool=map_pool) as c:
        monkeypatch.setattr(server_dispatch, "decode_request", counted)
        over_wire = loop(c, batched=True)
        monkeypatch.undo()
        steps = [op for op in seen_ops if op != "heartbeat"]
        # one request a step (`sequences` reads pages until an empty one: two requests)
        assert steps.count("batch") == 24 and len(steps) == 5 + 24 + 7, steps
        ids = [s.seq_id for s in c.sequences()]
        for got, want in zip(c.tables(ids), c._call("tables", {"seq_ids": ids})):  # the mirror follows
            np.testing.assert_array_equal(got, want)
    _equal(embedded, over_wire)


def test_the_embedded_pool_batches_the_same_calls():
    """`KVPool.batch` makes the same calls with the same results as one by one, and
    stops at the first that fails as the daemon does (index, results, nothing after)."""
    _equal(loop(KVPool(SMALL), batched=False), loop(KVPool(SMALL), batched=True))
    pool = KVPool(SMALL)
    a, b = pool.allocate([list(range(20)), list(range(30, 47))])
    ids = [a.seq_id, b.seq_id]
    with pytest.raises(InvalidArgument) as e:
        pool.batch([("append_flat", ids, 2), ("record_tokens", ids, [[1, 2, 3], [4, 5]]), ("commit", ids)])
    assert e.value.index == 1 and len(e.value.results) == 1 and len(e.value.results[0]) == 4
    assert [s.num_tokens for s in pool.sequences()] == [22, 19]
    for bad in ([], [("allocate", [[1]])], [("append_flat",)], [("commit", ids, {"uptoo": 3})], ["append_flat"],
                [("free", ids, ids)]):
        with pytest.raises(InvalidArgument):
            pool.batch(bad)
    assert [s.num_tokens for s in pool.sequences()] == [22, 19]
    pool.check_integrity()


def test_the_first_failing_op_stops_the_batch(server):
    """An append runs, a record_tokens with one id too many is refused whole
    (index 1), the commit after it never runs; the mirror holds the append."""
    with Client(server.endpoint) as c:
        a, b = c.allocate([list(range(20)), list(range(30, 47))])
        ids = [a.seq_id, b.seq_id]
        before = pool_state(server.pool)
        with pytest.raises(InvalidArgument) as e:
            c.batch([("append_flat", ids, 2), ("record_tokens", ids, [[1, 2, 3], [4, 5]]), ("commit", ids)])
        assert e.value.index == 1 and len(e.value.results) == 1 and len(e.value.results[0]) == 4
        ref = KVPool(SMALL)
        ra, rb = ref.allocate([list(range(20)), list(range(30, 47))])
        ref.append_flat([ra.seq_id, rb.seq_id], 2)
        got, want = pool_state(server.pool), pool_state(ref)
        _equal(got[1], want[1])  # blocks: the append alone
        _equal([dataclasses.replace(x, owner=None, owner_pid=None) for x in got[2]], want[2])
        assert got[3:] == want[3:]  # no ids recorded, nothing committed
        assert pool_state(server.pool)[0] != before[0]
        for got, want in zip(c.tables(ids), c._call("tables", {"seq_ids": ids})):
            np.testing.assert_array_equal(got, want)
        assert a.seq_id in c._mirror
        # a freed sequence, then an append of it in the same batch: refused at index 1
        with pytest.raises(UnknownSequence) as e:
            c.batch([("free", [a.seq_id]), ("append_flat", ids, 1)])
        assert e.value.index == 1 and e.value.results == [None]
        assert a.seq_id not in c._mirror and [s.seq_id for s in c.sequences()] == [b.seq_id]
        server.pool.check_integrity()


def test_another_sessions_sequences_are_refused_in_a_batch(server):
    with Client(server.endpoint) as owner, Client(server.endpoint) as thief:
        [a] = owner.allocate([list(range(14))])
        [t] = thief.allocate([[1, 2, 3]])
        before = pool_state(server.pool)
        for calls in ([("append_flat", [a.seq_id], 1)], [("commit", [a.seq_id])], [("free", [a.seq_id])],
                      [("truncate", [a.seq_id], [3])], [("record_tokens", [a.seq_id], [[]])],
                      [("release_before", [a.seq_id], [16])]):
            with pytest.raises(NotOwner) as e:
                thief.batch(calls)
            assert e.value.index == 0
        assert pool_state(server.pool) == before
        with pytest.raises(NotOwner) as e:
            thief.batch([("append_flat", [t.seq_id], 1), ("free", [a.seq_id])])
        assert e.value.index == 1
        assert owner.sequence(a.seq_id).num_tokens == 14 and thief.sequence(t.seq_id).num_tokens == 4


@pytest.mark.parametrize("ops,error", [
    ("append", "invalid_argument"), ([], "invalid_argument"),
    ([["append", {"seq_ids": [1]}]] * (BATCH_MAX_OPS + 1), "invalid_argument"),
    ([["batch", {"ops": []}]], "invalid_argument"), ([["allocate", {"prompts": [[1]]}]], "invalid_argument"),
    ([["attend", {}]], "invalid_argument"), ([["append", {"seq_ids": [1], "tokens": 2}]], "invalid_argument"),
    ([["append", {}]], "invalid_argument"), ([["append"]], "invalid_argument"), ([[1, {}]], "invalid_argument"),
    ([["append", [1]]], "invalid_argument"), ([None], "invalid_argument"),
])
def test_malformed_batches_are_refused_before_anything_runs(server, ops, error):
    with Client(server.endpoint) as c:
        [a] = c.allocate([list(range(20))])
        before = pool_state(server.pool)
        raw = Raw(server.endpoint)
        try:
            # a valid append first: nothing runs when any op of the batch is malformed
            good = [["append", {"seq_ids": [a.seq_id]}]]
            reply = raw.send(body(7, "batch", {"ops": good + ops if isinstance(ops, list) and ops else ops},
                                  c.session))
        finally:
            raw.close()
        assert reply[1] == 1 and reply[2]["code"] == error, reply
        assert pool_state(server.pool) == before
        assert c.sequence(a.seq_id).num_tokens == 20  # the daemon serves on


@pytest.mark.parametrize("calls", [[("free", None)], [("truncate", None, 3)], [("commit", None)]])
def test_a_client_batch_without_ids_is_refused_before_anything_runs(server, calls):
    """seq_ids given as None (a KeyError inside the client before)."""
    with Client(server.endpoint) as c:
        [a] = c.allocate([list(range(20))])
        before = pool_state(server.pool)
        with pytest.raises(InvalidArgument, match="needs seq_ids"):
            c.batch([("append_flat", [a.seq_id], 1), *calls])
        assert pool_state(server.pool) == before


def test_limits_apply_to_every_op_and_token_ids_to_the_whole_batch():
    with running_server(SMALL, limits=Limits(ids=4)) as srv, Client(srv.endpoint) as c:
        allocs = c.allocate([[i, i + 1] for i in range(4)])
        ids = [a.seq_id for a in allocs]
        with pytest.raises(LimitExceeded):
            c.batch([("append_flat", ids, 1), ("append_flat", ids + ids[:1], 1)])
        # sequence ids count for the whole batch too: each op within the limit, together over it
        with pytest.raises(LimitExceeded, match="together"):
            c.batch([("append_flat", ids[:3], 1), ("commit", ids[:2])])
        assert [s.num_tokens for s in c.sequences()] == [2] * 4
        assert len(c.batch([("append_flat", ids[:2], 1), ("commit", ids[2:])])[0]) == 2
    # token ids count for the whole batch: each op within the limit, together over it
    with running_server(SMALL, limits=Limits(tokens=10)) as srv, Client(srv.endpoint) as c:
        allocs = c.allocate([[i, i + 1] for i in range(2)])
        ids = [a.seq_id for a in allocs]
        c.batch([("append_flat", ids, 3)])  # 6 token ids: within
        with pytest.raises(LimitExceeded, match="together"):
            c.batch([("append_flat", ids, 3), ("append_flat", ids, 3)])
        with pytest.raises(LimitExceeded):
            c.batch([("append_flat", ids, 3), ("record_tokens", ids, [[1] * 3, [2] * 3])])
        assert [s.num_tokens for s in c.sequences()] == [5, 5]


def test_a_retried_batch_runs_once(server):
    """The same id and bytes again (a retry after a timeout) get the kept reply."""
    with Client(server.endpoint) as c:
        [a] = c.allocate([list(range(20))])
        raw = Raw(server.endpoint)
        try:
            req = body(41, "batch", {"ops": [["append", {"seq_ids": [a.seq_id], "num_tokens": 3}],
                                             ["commit", {"seq_ids": [a.seq_id]}]]}, c.session)
            first = raw.send(req)
            again = raw.send(req)
        finally:
            raw.close()
        assert first == again and first[1] == 0
        results, error = decode_batch(first[2])
        assert error is None and len(decode_slots(results[0], 1, None)[0]) == 3
        assert c.sequence(a.seq_id).num_tokens == 23


def test_a_daemon_without_batch_is_told_apart(server):
    with Client(server.endpoint) as c:
        assert "batch" in c.ops
        [a] = c.allocate([[1, 2, 3]])
        c.ops = c.ops - {"batch"}
        with pytest.raises(UnsupportedConfiguration, match="batch"):
            c.batch([("append_flat", [a.seq_id], 1)])
        c.ops = c.ops | {"batch"}
        for bad in ([], [("allocate", [[1]])], [("append_flat",)], [("append_flat", [a.seq_id], 1, 2, 3, 4)],
                    [("commit", [a.seq_id], {"uptoo": 3})], ["append_flat"], [("free", {"seq_ids": [a.seq_id],
                                                                                      "x": 1})]):
            with pytest.raises(InvalidArgument):
                c.batch(bad)
        assert c.sequence(a.seq_id).num_tokens == 3


@pytest.mark.parametrize("bad", [
    ("truncate",),  # no lengths: KVPool ran the calls before it, then raised TypeError
    ("record_tokens",),  # no token ids
    ("release_before", None),  # positions None: KVPool refused it at its place, after the append ran
    ("append_flat", None),  # a None count
    ("commit", {"synchronize": "yes"}),  # a flag that is no bool: a Client refused it whole, KVPool at its place
])
def test_a_call_no_pool_could_make_refuses_the_batch_whole_on_both(client, bad):
    pool = KVPool(SMALL)
    for p in (pool, client):
        [a] = p.allocate([list(range(3, 43))])
        method, *rest = bad
        with pytest.raises(InvalidArgument) as e:
            p.batch([("append_flat", [a.seq_id], 1), (method, [a.seq_id], *rest)])
        assert getattr(e.value, "index", None) is None  # (nothing ran: no place to stop at)
        assert p.sequence(a.seq_id).num_tokens == 40
        p.free([a.seq_id])


def test_a_batch_op_that_failed_inside_the_daemon_leaves_the_mirror_asking(client, server, monkeypatch):
    """An op that raised inside the daemon after it applied (``internal``) may have run:
    the mirror kept the sequence's 3 blocks and 41 tokens while the daemon held 1 and 5."""
    from kvpager.errors import InternalError

    [a] = client.allocate([list(range(3, 43))])
    real = server.pool.truncate

    def applied_then_failed(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("a bug after the truncate ran")

    monkeypatch.setattr(server.pool, "truncate", applied_then_failed)
    with pytest.raises(InternalError) as e:
        client.batch([("append_flat", [a.seq_id], 1), ("truncate", [a.seq_id], [5])])
    monkeypatch.undo()
    assert e.value.index == 1
    tables, lens = client.tables([a.seq_id])
    want_tables, want_lens = client._daemon_tables([a.seq_id])
    assert list(lens) == list(want_lens) == [5] and np.array_equal(tables, want_tables)
    client.free([a.seq_id])


@pytest.mark.parametrize("ops", [
    [["append", {"seq_ids": [1], "num_tokens": 10**7}]],  # over the tokens limit
    [["append", {"seq_ids": [1]}]] * 40 + [["commit", {"seq_ids": list(range(1, 40))}]],  # ids together
    [["append", {"seq_ids": [1]}], ["batch", {"ops": []}]],  # malformed
])
def test_a_batch_refused_before_it_ran_is_not_kept_for_a_retry(ops):
    """As a single op refused by its checks is not: kept, its reply took one of the
    session's kept replies and raised its floor, so the session's next request of a
    lower id was refused as a late copy of a retried one."""
    with running_server(SMALL, limits=Limits(ids=64, tokens=1000)) as srv, Client(srv.endpoint) as c:
        before = pool_state(srv.pool)
        raw = Raw(srv.endpoint)
        try:
            req = body(10**6, "batch", {"ops": ops}, c.session)
            first = raw.send(req)
            again = raw.send(req)  # a retry is checked again, as a new request is
        finally:
            raw.close()
        assert first[1] == 1 and first[2]["code"] in ("limit_exceeded", "invalid_argument"), first
        assert again == first
        assert pool_state(srv.pool) == before
        [b] = c.allocate([[4, 5]])  # the session's first kept request, of a lower id than the refused one's
        assert c.sequence(b.seq_id).num_tokens == 2


@pytest.mark.parametrize("bad", [
    pytest.param(lambda s: ("append_flat", [s], np.True_), id="count np.True_"),
    pytest.param(lambda s: ("append_flat", [s], 2.0), id="count float"),
    pytest.param(lambda s: ("append_flat", {s: 1}, 1), id="ids a dict"),
    pytest.param(lambda s: ("free", {s}), id="ids a set"),
    pytest.param(lambda s: ("release_before", [s], 2**64), id="position past 64 bits"),
])
def test_a_later_call_the_client_refuses_stops_the_batch_there_as_the_pool_does(server, bad):
    """The calls before it run and it raises with its index and their results; the
    client refused the whole batch before sending it (nothing ran)."""
    pool = KVPool(SMALL)
    got = []
    with Client(server.endpoint) as c:
        for p in (pool, c):
            [a] = p.allocate([list(range(20))])
            with pytest.raises(InvalidArgument) as e:
                p.batch([("append_flat", [a.seq_id], 2), ("commit", [a.seq_id]), bad(a.seq_id)])
            got.append((e.value.index, [np.asarray(r).tolist() if r is not None else None for r in e.value.results],
                        p.sequence(a.seq_id).num_tokens, p.sequence(a.seq_id).num_committed))
            if p is c:
                assert_mirrors_daemon(c)
    assert got[0] == got[1] and got[0][0] == 2 and got[0][2:] == (22, 22)
