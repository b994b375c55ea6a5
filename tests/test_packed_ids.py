"""Packed batches: sequence ids as one int64 array and a decode step's token ids
as one ``[n, k]`` integer array, as a `Client` sends a batch of 16 or more
(docs/protocol.md). The embedded pool and the daemon give exactly what the
list forms give, refuse what they refuse (typed errors, nothing changed), and
the last batch's rows, found by comparing the ids' bytes, never let a session
reach another's sequences or a stale row."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_helpers import SMALL, Raw, server_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpager import KVPool, PoolSpec
from kvpager.client import Client
from kvpager.client_ids import PACK_AT, packed, packed_rows
from kvpager.errors import InvalidArgument, NotOwner, UnknownSequence
from kvpager.protocol import VERSION, decode_reply, pack

SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=400, block_size=8, dtype="float32")
server = server_fixture(SMALL, heartbeat_timeout=30)


def state(pool: KVPool):
    """Everything an op could change, read back."""
    m = pool.manager
    hist = {s: (h.prompt.tolist(), list(h.tail), list(h.keys)) for s, h in m.history.items()}
    return pool.stats(), pool.blocks(), pool.sequences(), hist, dict(m.pool.cache.key_to_block)


# -- the embedded pool: packed forms give what lists give ----------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_packed_steps_equal_list_steps(data):
    """Property: a random decode loop (shared prompts, forks, pipelined ids,
    lagging commits, truncates, frees) made with packed ids and token rows on
    one pool, and with lists on another, returns the same slots and leaves the
    same state at every step."""
    n = data.draw(st.integers(1, 12), label="sequences")
    pools = [KVPool(SPEC), KVPool(SPEC)]
    prompts = [[7] * data.draw(st.integers(1, 9)) + [k] for k in range(n)]
    ids = [[a.seq_id for a in p.allocate(prompts)] for p in pools]
    assert ids[0] == ids[1]
    live = ids[0]
    for _ in range(data.draw(st.integers(1, 25), label="steps")):
        op = data.draw(st.sampled_from(["append", "append_ids", "record", "commit", "truncate", "free", "fork"]))
        sub = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True), label="batch") if live else []
        if not sub:
            break
        tok = data.draw(st.lists(st.integers(0, 50), min_size=len(sub), max_size=len(sub)))
        forms = [(np.array(sub, np.int64), np.array(tok, np.int64).reshape(-1, 1)), (sub, [[t] for t in tok])]
        outs = []
        for pool, (ids_f, rows_f) in zip(pools, forms):
            try:
                if op == "append":
                    outs.append(pool.append_flat(ids_f).tolist())
                elif op == "append_ids":
                    outs.append(pool.append_flat(ids_f, 1, rows_f).tolist())
                elif op == "record":
                    pool.record_tokens(ids_f, rows_f)
                    outs.append(None)
                elif op == "commit":
                    outs.append(pool.commit(ids_f))
                elif op == "truncate":
                    pool.truncate(sub, [max(1, pool.sequence(s).num_tokens - 3) for s in sub])
                    outs.append(None)
                elif op == "free":
                    pool.free(sub)
                    outs.append(None)
                else:
                    outs.append(pool.fork(sub))
            except InvalidArgument as e:  # record_tokens past the slots owed: both refuse
                outs.append(("refused", type(e).__name__))
        assert outs[0] == outs[1], op
        assert state(pools[0]) == state(pools[1]), op
        if op == "free":
            live = [s for s in live if s not in sub]
        elif op == "fork" and outs[0] and outs[0][0] != "refused":
            live += [c for kids in outs[0] for c in kids]
    for p in pools:
        p.check_integrity()


def test_a_batch_found_by_its_bytes_follows_rows_that_moved():
    """The last batch's rows are kept under the ids' bytes; a free moves rows,
    and the same bytes after it are looked up again (not the old rows)."""
    pool = KVPool(SPEC)
    seqs = [a.seq_id for a in pool.allocate([[1, 2, 3]] * 40)]
    keep = np.array(seqs[20:], np.int64)
    first = pool.append_flat(keep)
    pool.free(seqs[:20])  # rows move
    again = pool.append_flat(keep)
    assert (again == first + 1).all()
    assert [pool.sequence(s).num_tokens for s in seqs[20:]] == [5] * 20
    pool.check_integrity()


@pytest.mark.parametrize("bad, error", [
    (np.ones((3, 1), np.float32), "must hold integers"),
    (np.ones((2, 1), np.int64), "has 2 rows for 3 sequences"),
    (np.full((3, 1), 1 << 63, np.uint64), "out of int64 range"),
    (np.ones((3, 2), np.int64), "2 token ids for 1 slot"),
    (np.ones((3, 1), bool), "must hold integers"),
])
def test_bad_token_rows_are_refused_and_change_nothing(bad, error):
    pool = KVPool(SPEC)
    seqs = [a.seq_id for a in pool.allocate([[1, 2, 3]] * 3)]
    before = state(pool)
    with pytest.raises(InvalidArgument, match=error):
        pool.append_flat(np.array(seqs, np.int64), 1, bad)
    assert state(pool) == before
    pool.append_flat(seqs)
    if bad.shape[1] == 1:
        before = state(pool)
        with pytest.raises(InvalidArgument, match=error):
            pool.record_tokens(np.array(seqs, np.int64), bad)
        assert state(pool) == before
    pool.check_integrity()


def test_an_unknown_packed_id_is_named_as_an_int():
    pool = KVPool(SPEC)
    seqs = [a.seq_id for a in pool.allocate([[1, 2]] * 3)]
    before = state(pool)
    with pytest.raises(UnknownSequence) as e:
        pool.append_flat(np.array(seqs + [99_999], np.int64))
    assert e.value.seq_id == 99_999 and type(e.value.seq_id) is int
    assert state(pool) == before


# -- the client's packing --------------------------------------------------------------------------

def test_the_client_packs_only_large_batches_of_plain_ints():
    big = list(range(100, 100 + PACK_AT))
    assert packed(big).dtype == np.int64 and packed(big).tolist() == big
    assert packed(big[:-1]) is not None and type(packed(big[:-1])) is list  # small: a list
    for odd in (big[:-1] + [1.0], big[:-1] + [True], big[:-1] + [1 << 64], big[:-1] + ["1"]):
        assert packed(odd) is odd  # the daemon refuses these: sent as given
    rows = [[t] for t in big]
    assert packed_rows(rows).shape == (PACK_AT, 1) and packed_rows(rows)[:, 0].tolist() == big
    for odd in (rows[:-1], rows[:-1] + [[1, 2]], rows[:-1] + [[1.5]], rows[:-1] + [None], rows[:-1] + [[1 << 64]]):
        assert packed_rows(odd) is odd


# -- the daemon -------------------------------------------------------------------------------------

def call(raw: Raw, rid: int, session: str | None, op: str, args: dict):
    """(result, None) or (None, error code)."""
    reply = decode_reply(raw.recv_raw(pack([VERSION, rid, session, op, args])))
    return reply.result, reply.error and reply.error.code


def test_packed_ids_of_another_session_are_refused_even_as_the_last_batch(server):
    """Session A's decode step leaves its rows as the daemon's last batch; the
    same packed bytes from session B are refused (NotOwner) for append,
    record_tokens and commit, and change nothing."""
    a, b = Raw(server.endpoint), Raw(server.endpoint)
    try:
        sa = call(a, 1, None, "hello", {"client": "a", "pid": 1})[0]["session"]
        sb = call(b, 1, None, "hello", {"client": "b", "pid": 2})[0]["session"]
        seqs = [x[0] for x in call(a, 2, sa, "allocate", {"prompts": [[1, 2, 3]] * 20})[0]]
        ids = np.array(seqs, np.int64)
        result, err = call(a, 3, sa, "append", {"seq_ids": ids})
        assert err is None
        before = state(server.pool)
        for rid, (op, args) in enumerate([
            ("append", {"seq_ids": ids}),
            ("record_tokens", {"seq_ids": ids, "token_ids": np.ones((20, 1), np.int64)}),
            ("commit", {"seq_ids": ids}),
        ], start=10):
            _, err = call(b, rid, sb, op, args)
            assert err == NotOwner.code, (op, err)
            assert state(server.pool) == before
        # session A's own step still finds its rows
        result, err = call(a, 20, sa, "batch", {"ops": [
            ["record_tokens", {"seq_ids": ids, "token_ids": np.full((20, 1), 5, np.int64)}],
            ["commit", {"seq_ids": ids}]]})
        assert err is None
        server.pool.check_integrity()
    finally:
        a.close()
        b.close()


def test_a_client_decode_loop_with_packed_batches_equals_the_embedded_pool(server):
    """A pipelined loop of 24 sequences through a `Client` (its batches go
    packed) gives the embedded pool's slots and published blocks."""
    pool = KVPool(SMALL)
    sent = []
    handle = server._handlers["batch"]

    def spy(session, args):
        sent.append([(type(a["seq_ids"]), type(a.get("token_ids"))) for _, a in args["ops"]])
        return handle(session, args)

    server._handlers["batch"] = spy
    with Client(server.endpoint, timeout=10, heartbeat=False) as c:
        got = []
        for p in (c, pool):
            seqs = [a.seq_id for a in p.allocate([[3, 1, 4, 1, 5]] * 24)]
            seen = []
            for step in range(40):
                slots = p.batch([("append_flat", seqs, 1), ("record_tokens", seqs, [[step % 7]] * 24),
                                 ("commit", seqs)])
                seen.append((slots[0].tolist(), slots[2]))
            got.append((seen, [p.sequence(s).num_tokens for s in seqs]))
            p.free(seqs)
        assert got[0] == got[1]
        assert sent and all(ops == [(np.ndarray, type(None)), (np.ndarray, np.ndarray), (np.ndarray, type(None))]
                            for ops in sent)
        assert any(sum(published) for _, published in got[0][0])
        c.check_integrity()


def test_odd_packed_forms_from_the_wire(server):
    """Ids packed big-endian are read as the ids they are; ids as a 2-D array, a
    float array or a bool array are refused (invalid_argument) and change nothing."""
    a = Raw(server.endpoint)
    try:
        s = call(a, 1, None, "hello", {"client": "odd", "pid": 3})[0]["session"]
        seqs = [x[0] for x in call(a, 2, s, "allocate", {"prompts": [[1, 2, 3]] * 20})[0]]
        big = np.array(seqs, np.int64).astype(">i8")
        slots, err = call(a, 3, s, "append", {"seq_ids": big})
        assert err is None
        expect = [server.pool.manager.table.table[server.pool.manager.rows[q], 0] * SMALL.block_size + 3
                  for q in seqs]
        assert np.frombuffer(slots, "<i8").tolist() == expect
        before = state(server.pool)
        for rid, bad in enumerate([np.array([seqs], np.int64), np.array(seqs, np.float64),
                                   np.ones(20, bool)], start=10):
            _, err = call(a, rid, s, "append", {"seq_ids": bad})
            assert err == InvalidArgument.code, (bad.dtype, bad.shape, err)
            assert state(server.pool) == before
        server.pool.check_integrity()
    finally:
        a.close()


def test_packed_forms_are_held_to_the_request_limits():
    """A packed id array over the ids limit, and a 2-D token-id array over the
    tokens limit, are refused (limit_exceeded) before anything changes, for
    append, record_tokens and commit, alone and in a batch."""
    from daemon_helpers import running_server

    from kvpager.errors import LimitExceeded
    from kvpager.limits import Limits

    with running_server(SMALL, limits=Limits(ids=20, tokens=40)) as small:
        a = Raw(small.endpoint)
        try:
            s = call(a, 1, None, "hello", {"client": "lim", "pid": 4})[0]["session"]
            seqs = [x[0] for x in call(a, 2, s, "allocate", {"prompts": [[1]] * 16})[0]]
            over = np.array(seqs + seqs[:5], np.int64)  # 21 ids (duplicates too: the limit comes first)
            ids = np.array(seqs, np.int64)
            before = state(small.pool)
            requests = [
                ("append", {"seq_ids": over}),
                ("commit", {"seq_ids": over}),
                ("record_tokens", {"seq_ids": over, "token_ids": np.ones((21, 1), np.int64)}),
                ("append", {"seq_ids": ids, "token_ids": np.ones((16, 3), np.int64), "num_tokens": 3}),  # 48 tokens
                ("batch", {"ops": [["append", {"seq_ids": ids}], ["commit", {"seq_ids": ids[:5]}]]}),  # 21 ids
            ]
            for rid, (op, args) in enumerate(requests, start=10):
                _, err = call(a, rid, s, op, args)
                assert err == LimitExceeded.code, (op, err)
                assert state(small.pool) == before
            small.pool.check_integrity()
        finally:
            a.close()
