"""Fuzzing the daemon's request handler: whatever arrives, it answers with a
well-formed reply (a result or a typed error), never raises, and leaves the
allocator consistent."""

from __future__ import annotations

import itertools

import msgpack
import numpy as np
from daemon_helpers import SMALL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpager import KVPool
from kvpager.errors import ERRORS_BY_CODE
from kvpager.protocol import OPS, VERSION, decode_reply, pack
from kvpager.server import Server

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=8), st.binary(max_size=16),
)
values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
# Packed arrays (EXT_NDARRAY, as clients send ids and token rows) of every wire dtype,
# byte order and rank, holding small ids, negatives or values past int32 / int64.
def _array(dtype: str, shape: tuple[int, ...], seed: int, high: int) -> np.ndarray:
    with np.errstate(over="ignore"):  # 2**40 as float16 is inf: that is the point
        return np.random.default_rng(seed).integers(-3, high, size=shape).astype(dtype)


arrays = st.builds(
    _array,
    st.sampled_from(["<i8", ">i8", "<i4", "<u8", "<u4", "<i2", "|u1", "|i1", "|b1", "<f2", "<f4", "<f8"]),
    st.lists(st.integers(0, 4), max_size=3).map(tuple), st.integers(0, 2**32), st.sampled_from([4, 40, 2**40]),
)
# Plausible argument values: small ids, token lists, slots, packed arrays, and junk.
arg_values = st.one_of(
    values, st.integers(-2, 40), st.lists(st.integers(-2, 40), max_size=5),
    st.lists(st.lists(st.integers(0, 50), max_size=40), max_size=3), arrays, st.lists(arrays, max_size=3),
)


def make_server() -> tuple[Server, str]:
    server = Server(KVPool(SMALL), "ipc:///nonexistent/unused.sock", heartbeat_timeout=60)
    reply = decode_reply(server.handle(pack([VERSION, 1, None, "hello", {}])))
    assert reply.error is None
    return server, reply.result["session"]


SERVER, SESSION = make_server()

#: Each request's id: the drawn one above every id sent before (a session's requests come
#: in the order of their ids; one older than its kept replies is refused as a late copy).
_BASE = itertools.count(1 << 32, 1 << 32)


def fresh(rid: int) -> int:
    return next(_BASE) + rid


def check_reply(raw: bytes, rid) -> None:
    reply = decode_reply(raw)  # well-formed, whatever the request was
    if reply.error is not None:
        assert reply.error.code in ERRORS_BY_CODE, reply.error
        assert reply.error.code != "internal", reply.error  # an internal error is a bug
    SERVER.pool.check_integrity()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(sorted(set(OPS) - {"bye", "hello"})),
       args=st.dictionaries(st.sampled_from(["seq_ids", "prompts", "salt", "num_tokens", "token_ids", "upto",
                                             "n", "lengths", "layer", "slots", "k", "v", "q", "out",
                                             "query_lens", "scale", "nbytes", "share_in_batch", "owner", "after",
                                             "limit", "token", "client", "window", "softcap", "sinks", "x"]),
                            arg_values, max_size=5),
       rid=st.integers(0, 2**31))
def test_random_arguments_for_every_op(op, args, rid):
    rid = fresh(rid)
    check_reply(SERVER.handle(pack([VERSION, rid, SESSION, op, args])), rid)


op_args = st.dictionaries(st.sampled_from(["seq_ids", "num_tokens", "token_ids", "upto", "lengths", "positions",
                                           "ops", "x"]), arg_values, max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.one_of(values, st.lists(st.one_of(
    st.tuples(st.sampled_from(["append", "record_tokens", "commit", "free", "truncate", "release", "batch",
                               "allocate", "attend"]), op_args).map(list),
    values), max_size=5)), rid=st.integers(0, 2**31))
def test_random_batches(ops, rid):
    """A batch of random ops: a typed error before anything runs, or an ok reply
    whose stopping error (if any) is typed and not internal."""
    rid = fresh(rid)
    raw = SERVER.handle(pack([VERSION, rid, SESSION, "batch", {"ops": ops}]))
    check_reply(raw, rid)
    reply = decode_reply(raw)
    if reply.error is None:
        err = reply.result["error"]
        assert err is None or (err["code"] in ERRORS_BY_CODE and err["code"] != "internal"), err


@settings(max_examples=200, deadline=None)
@given(msg=values)
def test_random_msgpack_values(msg):
    check_reply(SERVER.handle(msgpack.packb(msg, use_bin_type=True)), None)


@settings(max_examples=200, deadline=None)
@given(code=st.integers(0, 127), payload=st.binary(max_size=48), op=st.sampled_from(["append", "commit", "allocate"]))
def test_random_ext_payloads(code, payload, op):
    """An ext value of any type code and bytes where an argument goes: a typed error, not internal."""
    body = msgpack.packb([VERSION, 9, SESSION, op, {"seq_ids": msgpack.ExtType(code, payload)}], use_bin_type=True)
    check_reply(SERVER.handle(body), 9)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_random_bytes(raw):
    check_reply(SERVER.handle(raw), None)


def _same_state(x, y) -> bool:
    (s1, b1, q1), (s2, b2, q2) = x, y
    return s1 == s2 and np.array_equal(b1.state, b2.state) and np.array_equal(b1.ref_cnt, b2.ref_cnt) and \
        [(i, list(t), n) for i, t, n in q1] == [(i, list(t), n) for i, t, n in q2]


def _seeded() -> tuple[Server, str]:
    """A server whose session holds a few sequences (ids 1-4, one sharing a block)."""
    server, session = make_server()
    for prompts in ([list(range(1, 11))], [list(range(1, 9)) + [11, 12, 13]], [[20] * 17, [21] * 3]):
        assert decode_reply(server.handle(pack([VERSION, 1, session, "allocate", {"prompts": prompts}]))).error is None
    return server, session


SEEDED, SEEDED_SESSION = _seeded()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(sorted(set(OPS) - {"bye", "hello", "batch"})),
       args=st.dictionaries(st.sampled_from(["seq_ids", "prompts", "salt", "num_tokens", "token_ids", "upto",
                                             "n", "lengths", "positions", "layer", "slots", "k", "v", "q", "out",
                                             "query_lens", "scale", "nbytes", "share_in_batch", "window", "softcap",
                                             "sinks", "chunk"]),
                            arg_values, max_size=5),
       rid=st.integers(0, 2**31))
def test_an_error_reply_changes_nothing(op, args, rid):
    """Over a session holding sequences: a request answered with an error leaves
    every sequence, block and count as it was (from pool_helpers.snapshot)."""
    from pool_helpers import snapshot

    before = snapshot(SEEDED.pool)
    reply = decode_reply(SEEDED.handle(pack([VERSION, fresh(rid), SEEDED_SESSION, op, args])))
    if reply.error is not None:
        assert reply.error.code in ERRORS_BY_CODE and reply.error.code != "internal", reply.error
        assert _same_state(before, snapshot(SEEDED.pool)), (op, args, reply.error)
    SEEDED.pool.check_integrity()


def test_the_pool_still_serves_after_fuzzing():
    reply = decode_reply(SERVER.handle(pack([VERSION, fresh(7), SESSION, "allocate", {"prompts": [[1, 2, 3]]}])))
    assert reply.error is None and reply.result[0][2] == 0
    assert np.asarray(reply.result[0][3]).tolist() != []
