"""Careless callers of the client library: a `Client` given what
`KVPool` takes (sequence ids as a generator or a range; counts as a generator;
a 0-d array as a sequence id; prompts as torch tensors) does what the embedded pool
does and its table mirror follows; what the pool refuses (slots past int64,
ragged slots or query lengths) it refuses with the same typed error and
nothing changed (timeouts, hellos and threads: `test_careless_client_wire`).
Each test once failed; bounded waits, free endpoints."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_helpers import SMALL, running_server, server_fixture
from pool_helpers import snapshot

from kvpager import InvalidArgument, KVPool
from kvpager.client import Client

server = server_fixture(SMALL, heartbeat_timeout=30)
BS = SMALL.block_size


def _setup(p):
    """Three sequences (one with a committed full block), two with 2 slots appended."""
    a, b, c = p.allocate([list(range(BS + 4)), list(range(100, 105)), list(range(200, 203))])
    p.commit(a.seq_id)
    p.append([a.seq_id, b.seq_id], 2)
    return {"a": a.seq_id, "b": b.seq_id, "c": c.seq_id}


def _plain(x):
    """A result as plain values (arrays as lists), to compare the pool's with the client's."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _mirror_exact(c, srv):
    """The client's mirror of its live sequences equals the daemon's tables."""
    live = [i.seq_id for i in srv.pool.sequences() if not i.swapped]
    mirrored = c._mirror.gather(live)
    assert mirrored is not None, "a live sequence is missing from the mirror"
    assert _plain(mirrored) == _plain(srv.pool.tables(live))


def _gen(values):
    return (v for v in values)


def _tensor(value):
    """A torch tensor of ``value`` (0-d for an int, as ``ids[i]`` of a tensor of ids gives)."""
    torch = pytest.importorskip("torch")
    return torch.tensor(value)


# Sequence ids (and append's counts) in any ordered iterable `KVPool` reads: a generator
# can be consumed once. The client refused some ("cannot send a generator over the wire").
_ITERABLES = [
    pytest.param(lambda p, s: p.append(_gen([s["a"], s["b"]]), 1), id="append generator"),
    pytest.param(lambda p, s: p.append([s["a"], s["b"]], _gen([1, 2])), id="append counts generator"),
    pytest.param(lambda p, s: p.append([s["a"], s["b"]], range(1, 3)), id="append counts range"),
    pytest.param(lambda p, s: p.append_flat(range(s["a"], s["a"] + 2), 2), id="append_flat range"),
    pytest.param(lambda p, s: p.record_tokens(_gen([s["a"]]), [[5, 6]]), id="record_tokens generator"),
    pytest.param(lambda p, s: p.commit(_gen([s["a"], s["b"]])), id="commit generator"),
    pytest.param(lambda p, s: p.fork(_gen([s["a"]]), 2), id="fork generator"),
    pytest.param(lambda p, s: p.free(_gen([s["a"], s["c"]])), id="free generator"),
    pytest.param(lambda p, s: p.truncate(_gen([s["a"]]), 3), id="truncate generator"),
    pytest.param(lambda p, s: p.release_before(_gen([s["a"]]), BS + 1), id="release_before generator"),
    pytest.param(lambda p, s: p.swap_out(_gen([s["c"]])), id="swap_out generator"),
    pytest.param(lambda p, s: (p.swap_out([s["c"]]), p.swap_in(_gen([s["c"]]))), id="swap_in generator"),
    pytest.param(lambda p, s: p.tables(_gen([s["a"], s["b"]])), id="tables generator"),
    pytest.param(lambda p, s: p.plan(_gen([s["a"]])).seq_lens, id="plan generator"),
    pytest.param(lambda p, s: p.attend(0, _gen([s["a"]]), np.zeros((1, 2, p.spec.head_dim), np.float32)).shape,
                 id="attend generator"),
    pytest.param(lambda p, s: p.batch([("append_flat", range(s["b"], s["b"] + 1), 1), ("commit", _gen([s["a"]]))]),
                 id="batch range and generator"),
    pytest.param(lambda p, s: p.batch([("append_flat", [s["a"], s["b"]], _gen([2, 1]))]),
                 id="batch counts generator"),
    # no sequences and a list of counts: no arrays (the client once answered [array([])])
    pytest.param(lambda p, s: p.append([], []), id="append nothing"),
    # no sequences and a count past an array's shape: the pool raised a bare ValueError
    pytest.param(lambda p, s: p.append([], 2**63), id="append nothing, a huge count"),
    # prompts as torch tensors of token ids, as the pool takes them ("cannot send a Tensor over the wire")
    pytest.param(lambda p, s: [a.num_cached_tokens for a in p.allocate([_tensor(list(range(BS + 4))),
                                                                        _tensor(list(range(300, 340)))[::2]])],
                 id="allocate torch prompts"),
    pytest.param(lambda p, s: p.cached_tokens([_tensor(list(range(BS + 4)))]), id="cached_tokens torch prompt"),
    # a 0-d integer array is the id it holds (the client sent it inside a list, refused)
    pytest.param(lambda p, s: p.sequence(np.array(s["b"], np.int32)).num_tokens, id="sequence 0-d"),
    # object arrays of ints: the daemon refused the whole request (a protocol error)
    pytest.param(lambda p, s: p.commit(np.array([s["a"]], dtype=object)), id="commit object array"),
    pytest.param(lambda p, s: p.truncate([s["a"]], np.array([3], dtype=object)), id="truncate object lengths"),
    pytest.param(lambda p, s: [x.tolist() for x in p.append([s["b"]], np.array([2], dtype=object))],
                 id="append object counts"),
    # a batch's ids so given: sent as the array (a protocol error, nothing ran)
    pytest.param(lambda p, s: p.batch([("append_flat", np.array([s["a"], s["b"]], dtype=object), 1),
                                       ("commit", np.array([s["a"]], dtype=object))]), id="batch object ids"),
    # token ids so given: the pool refused them ("got dtype object"), the client sent them as ints
    pytest.param(lambda p, s: [a.num_cached_tokens for a in p.allocate([np.array(list(range(BS + 4)), dtype=object)])],
                 id="allocate object prompt"),
    pytest.param(lambda p, s: p.record_tokens([s["a"]], [np.array([5, 6], dtype=object)]),
                 id="record_tokens object tokens"),
    pytest.param(lambda p, s: p.cached_tokens([np.array(list(range(BS + 4)), dtype=object)]),
                 id="cached_tokens object prompt"),
    # query_lens as an object array (the mapped client refused it) or a range (the pool refused it)
    pytest.param(lambda p, s: p.attend(0, [s["a"], s["b"]], np.ones((3, 2, p.spec.head_dim), np.float32),
                                       np.array([2, 1], dtype=object)).tolist(), id="attend object query_lens"),
    pytest.param(lambda p, s: p.attend(0, [s["a"], s["b"]], np.ones((3, 2, p.spec.head_dim), np.float32),
                                       range(2, 0, -1)).tolist(), id="attend range query_lens"),
    # slots as an object array of ints (refused by all three, though ids and counts so given are taken)
    pytest.param(lambda p, s: (p.write(0, np.array([p.sequence(s["b"]).block_table[0] * BS + 6], dtype=object),
                                       np.full((1, 2, p.spec.head_dim), 3, np.float32),
                                       np.full((1, 2, p.spec.head_dim), 5, np.float32)),
                               p.attend(0, [s["b"]], np.ones((1, 2, p.spec.head_dim), np.float32)).tolist()),
                 id="write object slots"),
    # a range of token ids ("cannot send a range over the wire")
    pytest.param(lambda p, s: [a.num_cached_tokens for a in p.allocate([range(BS + 4)])], id="allocate range"),
    pytest.param(lambda p, s: p.record_tokens([s["a"]], [range(5, 7)]), id="record_tokens range"),
    # a NumPy bool flag (the pool refused np.True_ for share_in_batch alone)
    pytest.param(lambda p, s: len(p.allocate([[1, 2], [1, 2]], share_in_batch=np.True_)), id="share_in_batch np"),
    # CPU torch tensors of K/V and queries (a client without the pool mapped refused them)
    pytest.param(lambda p, s: (p.write(0, [p.sequence(s["b"]).block_table[0] * BS], _tensor(np.ones((1, 2, 16), np.float32)),
                                       _tensor(np.ones((1, 2, 16), np.float32))),
                               p.attend(0, [s["b"]], _tensor(np.ones((1, 2, 16), np.float32))).tolist()),
                 id="write and attend torch"),
]


@pytest.mark.parametrize("transport", ["mapped", "remote"])
@pytest.mark.parametrize("call", _ITERABLES)
def test_a_client_takes_what_the_embedded_pool_takes_and_its_mirror_follows(call, transport):
    pool = KVPool(SMALL)
    want = _plain(call(pool, _setup(pool)))
    with running_server(SMALL, heartbeat_timeout=30) as srv, \
            Client(srv.endpoint, timeout=10, map_pool=transport == "mapped") as c:
        got = _plain(call(c, _setup(c)))
        assert got == want
        assert snapshot(srv.pool) == snapshot(pool)
        _mirror_exact(c, srv)
        c.check_integrity()


# What the pool refuses, a client refuses the same typed way, before anything is sent.
_REFUSED = [
    # the mapped write cast 2**64 - 1 to -1 (padding) and wrote nothing, without a word
    pytest.param(lambda p, s, kv: p.write(0, np.array([2**64 - 1], np.uint64), *kv(1)), "slot", id="write uint64"),
    pytest.param(lambda p, s, kv: p.write(0, [[BS], [BS, BS + 1]], *kv(1)), "slots", id="write ragged slots"),
    # a generator of slots reached the daemon as an object array: ProtocolError
    pytest.param(lambda p, s, kv: p.write(0, _gen([BS * 5]), *kv(1)), "slots", id="write generator slots"),
    # ids in no order: the pool read a dict's keys and a set in its own order, results in
    # that order; the client's mirror did not follow a dict's (its tables went stale)
    pytest.param(lambda p, s, kv: p.append({s["a"]: 1, s["b"]: 1}, 1), "in an order", id="append dict"),
    pytest.param(lambda p, s, kv: p.append({s["c"], s["a"]}, 3), "in an order", id="append set"),
    pytest.param(lambda p, s, kv: p.fork(frozenset([s["b"]])), "in an order", id="fork frozenset"),
    pytest.param(lambda p, s, kv: p.free({s["b"]: None}), "in an order", id="free dict"),
    pytest.param(lambda p, s, kv: p.batch([("append_flat", {s["b"]: 0}, 1)]), "in an order", id="batch dict"),
    # flags a client read as truthy or falsy ('no' synchronized; None, [] and 0 were False)
    pytest.param(lambda p, s, kv: p.allocate([[1, 2]], share_in_batch=0), "share_in_batch", id="share_in_batch 0"),
    pytest.param(lambda p, s, kv: p.allocate([[1, 2]], share_in_batch=None), "share_in_batch",
                 id="share_in_batch None"),
    pytest.param(lambda p, s, kv: p.commit([s["a"]], synchronize="no"), "synchronize", id="commit synchronize"),
    pytest.param(lambda p, s, kv: p.batch([("commit", [s["a"]], {"synchronize": None})]), "synchronize",
                 id="batch commit synchronize"),
    # a None count in a batch (the client left it out: the daemon's default, 1)
    pytest.param(lambda p, s, kv: p.batch([("append_flat", [s["b"]], None)]), "count", id="batch None count"),
    # a bytearray or memoryview salt (the client sent it as bytes)
    pytest.param(lambda p, s, kv: p.allocate([[1, 2]], salt=bytearray(b"t")), "salt", id="allocate bytearray salt"),
    pytest.param(lambda p, s, kv: p.cached_tokens([[1, 2]], salt=[memoryview(b"t")]), "salt",
                 id="cached_tokens memoryview salt"),
    pytest.param(lambda p, s, kv: p.pin([[1, 2]], salt=bytearray(b"t")), "salt", id="pin bytearray salt"),
    # NumPy's ValueError from the mapped attend
    pytest.param(lambda p, s, kv: p.attend(0, [s["a"], s["b"]], kv(2)[0], [[1], [1, 2]]), "query_lens",
                 id="attend ragged query_lens"),
    # query_lens of 0-d arrays (the mapped client took them, the pool and the daemon refused them)
    pytest.param(lambda p, s, kv: p.attend(0, [s["a"], s["b"]], kv(3)[0], [np.array(2), np.array(1)]),
                 "query_lens", id="attend 0-d query_lens entries"),
    # wrong twice, an unknown id among them: the pool named the argument, the daemon the id
    # (UnknownSequence, no InvalidArgument: a handler for the pool's error missed it)
    pytest.param(lambda p, s, kv: p.free([s["a"], 10**6, 10**6]), "duplicate", id="free duplicates unknown"),
    pytest.param(lambda p, s, kv: p.swap_in([10**6, 10**6]), "duplicate", id="swap_in duplicates unknown"),
    pytest.param(lambda p, s, kv: p.record_tokens([10**6, 10**6], [[1], [2]]), "duplicate",
                 id="record_tokens duplicates unknown"),
    pytest.param(lambda p, s, kv: p.fork([10**6], -2), "n must be", id="fork bad n unknown"),
    pytest.param(lambda p, s, kv: p.truncate([s["a"], 10**6], [1]), "lengths", id="truncate lengths unknown"),
]


@pytest.mark.parametrize("call, needle", _REFUSED)
def test_what_the_embedded_pool_refuses_a_client_refuses_the_same_way(server, call, needle):
    def kv(n):
        x = np.ones((n, SMALL.num_kv_heads, SMALL.head_dim), np.float32)
        return x, x.copy()

    pool = KVPool(SMALL)
    s = _setup(pool)
    before = (snapshot(pool), pool.backend.device_array().copy())
    with pytest.raises(InvalidArgument, match=needle):
        call(pool, s, kv)
    assert snapshot(pool) == before[0]
    np.testing.assert_array_equal(pool.backend.device_array(), before[1])
    for map_pool in (True, False):
        with Client(server.endpoint, timeout=10, map_pool=map_pool) as c:
            s = _setup(c)
            before = (snapshot(server.pool), server.pool.backend.device_array().copy())
            with pytest.raises(InvalidArgument, match=needle):
                call(c, s, kv)
            assert snapshot(server.pool) == before[0]
            np.testing.assert_array_equal(server.pool.backend.device_array(), before[1])
            _mirror_exact(c, server)
            c.check_integrity()
