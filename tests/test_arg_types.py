"""Argument types at the edges, on the embedded pool and through the daemon:
a bool among token ids (Python or NumPy, in a list, a tuple, an object
array, a bool array) is refused with InvalidArgument naming the argument and
nothing changed, on every path that takes token ids; a 0-d integer array is
the scalar it holds wherever a scalar is taken (sequence ids, counts,
``upto``, lengths, positions), and any other 0-d array is refused the same
typed way. The daemon answers ``invalid_argument`` and keeps serving."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_helpers import SMALL, running_server, server_fixture
from pool_helpers import make_pool, snapshot

from kvpager import InvalidArgument, KVPool
from kvpager.client import Client
from kvpager.plan import make_plan

server = server_fixture(SMALL, scope="module", heartbeat_timeout=30)
BS = SMALL.block_size


def _setup(p):
    """Two sequences (one with a committed full block), each with 2 slots
    appended without token ids, and a third with every id known."""
    a, b, c = p.allocate([list(range(BS + 4)), list(range(100, 105)), list(range(200, 203))])
    p.commit(a.seq_id)
    p.append([a.seq_id, b.seq_id], 2)
    return {"a": a.seq_id, "b": b.seq_id, "c": c.seq_id}


# -- bools among token ids ---------------------------------------------------------------
_BOOLS = [
    pytest.param(lambda p, s: p.allocate([[1, True]]), r"prompts\[0\]", id="allocate one prompt"),
    pytest.param(lambda p, s: p.allocate([[1, 2], [3, True]]), r"prompts\[1\]", id="allocate batch"),
    pytest.param(lambda p, s: p.allocate([[True, 2]]), r"prompts\[0\]", id="allocate bool first"),
    pytest.param(lambda p, s: p.allocate([[1, np.bool_(True)]]), r"prompts\[0\]", id="allocate np.bool_"),
    pytest.param(lambda p, s: p.allocate([(1, False, 3)]), r"prompts\[0\]", id="allocate tuple"),
    pytest.param(lambda p, s: p.allocate([list(range(BS)) + [False]]), r"prompts\[0\]", id="allocate long"),
    pytest.param(lambda p, s: p.allocate([np.array([1, 0], bool)]), r"prompts\[0\]", id="allocate bool array"),
    pytest.param(lambda p, s: p.allocate([[1, 2], np.array([1, 0], bool)]), r"prompts\[1\]",
                 id="allocate batch bool array"),
    pytest.param(lambda p, s: p.allocate([[1, 2], [3, True]], share_in_batch=True), r"prompts\[1\]",
                 id="allocate share_in_batch"),
    pytest.param(lambda p, s: p.cached_tokens([[1, True]]), r"prompts\[0\]", id="cached_tokens"),
    pytest.param(lambda p, s: p.probe_cache([[1], list(range(BS)) + [True]]), r"prompts\[1\]", id="probe_cache"),
    pytest.param(lambda p, s: p.pin([[1, True]]), r"prompts\[0\]", id="pin"),
    pytest.param(lambda p, s: p.unpin([[1, True]]), r"prompts\[0\]", id="unpin"),
    pytest.param(lambda p, s: p.append(s["c"], 2, token_ids=[[1, True]]), "token_ids", id="append one"),
    pytest.param(lambda p, s: p.append([s["c"], s["a"]], 2, token_ids=[[1, 2], [True, 3]]), "token_ids",
                 id="append batch"),
    pytest.param(lambda p, s: p.append([s["c"], s["a"]], [1, 2], token_ids=[[1], [3, np.bool_(False)]]),
                 "token_ids", id="append counts np.bool_"),
    pytest.param(lambda p, s: p.append(s["c"], 1, token_ids=[[True]]), "token_ids", id="decode one"),
    pytest.param(lambda p, s: p.append([s["c"], s["a"], s["b"]], 1, token_ids=[[1], [2], [True]]), "token_ids",
                 id="decode batch"),
    pytest.param(lambda p, s: p.append([s["c"], s["a"]], 1, token_ids=[[1], [np.bool_(True)]]), "token_ids",
                 id="decode np.bool_"),
    pytest.param(lambda p, s: p.append([s["c"], s["a"]], 1, token_ids=[[1], np.array([True])]), "token_ids",
                 id="decode bool array"),
    pytest.param(lambda p, s: p.record_tokens([s["a"], s["b"]], [[1, True], [2, 3]]), "token_ids",
                 id="record_tokens"),
    pytest.param(lambda p, s: p.record_tokens([s["a"], s["b"]], [[1], [True]]), "token_ids",
                 id="record_tokens one each"),
    pytest.param(lambda p, s: p.record_tokens([s["a"], s["b"]], [[1], [np.bool_(False)]]), "token_ids",
                 id="record_tokens np.bool_"),
]
# Object arrays never cross the wire (the codec refuses them): embedded only.
_OBJECTS = [
    pytest.param(lambda p, s: p.allocate([np.array([1, True], object)]), r"prompts\[0\]", id="allocate object array"),
    pytest.param(lambda p, s: p.append([s["c"], s["a"]], 2, token_ids=[[1, 2], np.array([3, True], object)]),
                 "token_ids", id="append object array"),
    pytest.param(lambda p, s: p.record_tokens([s["a"]], [np.array([3, False], object)]), "token_ids",
                 id="record_tokens object array"),
]

# -- 0-d arrays ---------------------------------------------------------------------------
_ZERO_D_REFUSED = [
    pytest.param(lambda p, s: p.append(s["c"], 1, token_ids=np.array(5)), "token_ids", id="append token_ids"),
    pytest.param(lambda p, s: p.append([s["c"], s["a"]], 1, token_ids=np.array(5)), "token_ids",
                 id="decode token_ids"),
    pytest.param(lambda p, s: p.append(s["c"], 1, token_ids=[np.array(5)]), "token_ids", id="append one 0-d id"),
    pytest.param(lambda p, s: p.commit(s["a"], np.array(99)), "upto", id="commit upto past the end"),
    pytest.param(lambda p, s: p.commit(s["a"], np.array(3.0)), "upto", id="commit upto float"),
    pytest.param(lambda p, s: p.commit(s["a"], np.array(True)), "upto", id="commit upto bool"),
    pytest.param(lambda p, s: p.truncate(s["a"], np.array(999)), "length", id="truncate too long"),
    pytest.param(lambda p, s: p.truncate(s["a"], np.array(1.5)), "lengths", id="truncate float"),
    pytest.param(lambda p, s: p.release_before(s["a"], np.array(-1)), "position", id="release negative"),
    pytest.param(lambda p, s: p.free(np.array(1.0)), "seq_ids", id="free float"),
    pytest.param(lambda p, s: p.free(np.array(True)), "seq_ids", id="free bool"),
    pytest.param(lambda p, s: p.append(s["c"], np.array(1.0)), "count", id="append count float"),
    pytest.param(lambda p, s: p.append(s["c"], np.array(-1)), "count", id="append count negative"),
    pytest.param(lambda p, s: p.allocate([[1]], salt=np.array(3.0)), "salt", id="salt float"),
    pytest.param(lambda p, s: p.attend(0, s["a"], np.ones((1, 2, p.spec.head_dim), np.float32), np.array(1.0)),
                 "query_lens", id="attend query_lens float"),
    pytest.param(lambda p, s: p.allocate([np.array(5)]), r"prompts\[0\]", id="allocate 0-d prompt"),
    pytest.param(lambda p, s: p.allocate([[1], np.array(5)]), r"prompts\[1\]", id="allocate batch 0-d prompt"),
    pytest.param(lambda p, s: p.cached_tokens([np.array(5)]), r"prompts\[0\]", id="cached_tokens 0-d prompt"),
    # bytes iterate as ints: b"y" was taken as a list of one count, 121 (the daemon appended 121 slots)
    pytest.param(lambda p, s: p.append([s["c"]], b"y"), "count", id="append a bytes count"),
    pytest.param(lambda p, s: p.append([s["c"]], "1"), "count", id="append a str count"),
]
# A bool or a float among sequence ids (True == 1 and 2.0 == 2 name live sequences to a
# dict or an equality test) is refused, whatever the op; the decode step's fast checks too.
_SEQ_IDS = [
    pytest.param(lambda p, s: p.append([s["a"], float(s["b"])], 1), "seq_ids", id="decode float id"),
    pytest.param(lambda p, s: p.append_flat([s["c"], s["a"], True], 1), "seq_ids", id="decode bool id"),
    pytest.param(lambda p, s: p.append([s["a"], float(s["b"])], 2), "seq_ids", id="append float id"),
    pytest.param(lambda p, s: p.record_tokens([s["a"], float(s["b"])], [[1], [2]]), "seq_ids",
                 id="record_tokens float id"),
    pytest.param(lambda p, s: p.commit([s["a"], float(s["b"])]), "seq_ids", id="commit float id"),
    pytest.param(lambda p, s: p.free([s["b"], float(s["c"])]), "seq_ids", id="free float id"),
]
_BOOLS += _SEQ_IDS
# append's count: any other scalar than an integer is refused the same typed way.
_COUNTS_REFUSED = [
    pytest.param(lambda p, s: p.append(s["c"], True), "count", id="append count True"),
    pytest.param(lambda p, s: p.append([s["c"], s["a"]], np.bool_(True)), "count", id="append count np.bool_"),
    pytest.param(lambda p, s: p.append(s["c"], 1.5), "count", id="append count float"),
    pytest.param(lambda p, s: p.append(s["c"], None), "count", id="append count None"),
    pytest.param(lambda p, s: p.append_flat([s["c"], s["a"]], 2.0), "count", id="append_flat count float"),
]
# attention's query lengths: a bool among them is not a count (NumPy takes [1, True] as [1, 1])
_COUNTS_REFUSED += [
    pytest.param(lambda p, s: p.attend(0, [s["a"], s["c"]], np.ones((2, 2, p.spec.head_dim), np.float32), [1, True]),
                 "query_lens", id="attend query_lens with a bool"),
]
_ZERO_D_REFUSED += _COUNTS_REFUSED
# Embedded only: a 0-d str array cannot cross the wire (the codec refuses its dtype).
def _grad_tokens():
    """Float token ids in a torch tensor that requires grad: NumPy's read of it raises RuntimeError."""
    return pytest.importorskip("torch").arange(5.0, requires_grad=True)


_ZERO_D_REFUSED_EMBEDDED = [
    # a RuntimeError from NumPy's read of the tensor before
    pytest.param(lambda p, s: p.allocate([_grad_tokens()]), "prompts", id="allocate grad tensor"),
    pytest.param(lambda p, s: p.cached_tokens([_grad_tokens()]), "prompts", id="cached_tokens grad tensor"),
    pytest.param(lambda p, s: p.allocate([[1]], salt=np.array("m")), "salt", id="salt str"),
    pytest.param(lambda p, s: p.release_before(s["a"], np.array("x")), "positions", id="release str"),
    # ints past int64 (the daemon's own checks catch them first): OverflowError before
    pytest.param(lambda p, s: p.append_flat([s["c"]], 1 << 63), "past any pool's size", id="append 2**63"),
    pytest.param(lambda p, s: p.append([s["b"], s["c"]], [1, (1 << 64) + 3]), "past any pool's size",
                 id="append list 2**64"),
    pytest.param(lambda p, s: p.commit([s["a"], s["b"]], upto=[1, 1 << 63]), "upto for sequence", id="commit 2**63"),
    # containers of the wrong kind: KeyError, TypeError or ValueError from inside before
    pytest.param(lambda p, s: p.allocate({"a": 1}), "prompts", id="allocate a dict"),
    pytest.param(lambda p, s: p.cached_tokens({"a": 1}), "prompts", id="cached_tokens a dict"),
    pytest.param(lambda p, s: p.pin({"a": 1}), "prompts", id="pin a dict"),
    pytest.param(lambda p, s: p.fork([s["a"]], np.array([], np.int64)), "fork: n", id="fork n empty array"),
    pytest.param(lambda p, s: p.sequences([]), "owner", id="sequences of a list owner"),
    pytest.param(lambda p, s: p.check_owner([s["a"]], np.array([1.0, 2.0])), "owner", id="check_owner an array"),
    pytest.param(lambda p, s: p.write(0, {"a": 1}, np.zeros((1, 2, p.spec.head_dim), np.float32),
                                      np.zeros((1, 2, p.spec.head_dim), np.float32)), "slots", id="write dict slots"),
    pytest.param(lambda p, s: p.plan([s["a"]], 1, {"a": 1}), "slots", id="plan dict slots"),
    # ints past a plan's int32 fields were cast, and wrapped: block 2**32 + 5 read block 5
    pytest.param(lambda p, s: p.plan([s["a"]], [(1 << 32) + 1]), "past int32", id="plan query_lens 2**32 + 1"),
    pytest.param(lambda p, s: make_plan(p.backend, [[(1 << 32) + 5]], [3]), "past int32",
                 id="make_plan block 2**32 + 5"),
    pytest.param(lambda p, s: p.plan([s["a"], s["b"]], [[1, 2], [3]]), "query_lens", id="plan ragged query_lens"),
    # an out of another shape: NumPy's broadcast ValueError before
    pytest.param(lambda p, s: p.plan([s["a"]], 1).attend(0, np.ones((1, 2, p.spec.head_dim), np.float32),
                                                         out=np.zeros((1, 2, p.spec.head_dim // 2), np.float32)),
                 "out must have q's shape", id="plan attend out of another shape"),
    # past a block's int32 reference count: ValueError (2**63) or a 128 GiB allocation (2**31) before
    pytest.param(lambda p, s: p.fork([s["a"]], 1 << 31), "reference count", id="fork 2**31"),
    pytest.param(lambda p, s: p.fork([s["a"], s["b"]], 1 << 63), "reference count", id="fork 2**63"),
]

# A 0-d integer array is the scalar it holds: the same call with the int does the same.
_ZERO_D_TAKEN = [
    pytest.param(lambda p, s, z: p.commit(s["a"], z(BS)), id="commit upto"),
    pytest.param(lambda p, s, z: p.commit([s["a"], s["b"]], z(3)), id="commit upto batch"),
    pytest.param(lambda p, s, z: p.truncate(s["a"], z(2)), id="truncate"),
    pytest.param(lambda p, s, z: p.truncate([s["a"], s["c"]], z(1)), id="truncate batch"),
    pytest.param(lambda p, s, z: p.release_before(s["a"], z(BS + 2)), id="release_before"),
    pytest.param(lambda p, s, z: p.free(z(s["b"])), id="free"),
    pytest.param(lambda p, s, z: p.swap_out(z(s["c"])), id="swap_out"),
    pytest.param(lambda p, s, z: [x.tolist() for x in p.append(z(s["c"]), z(3))], id="append"),
    pytest.param(lambda p, s, z: [x.tolist() for x in p.append([s["c"], s["b"]], z(BS))], id="append batch"),
    pytest.param(lambda p, s, z: [x.tolist() for x in p.append([s["c"], s["b"]], z(1), [[7], [8]])], id="decode"),
    pytest.param(lambda p, s, z: p.append_flat(z(s["c"]), z(2)).tolist(), id="append_flat"),
    pytest.param(lambda p, s, z: p.fork(z(s["a"])) and None, id="fork"),
    pytest.param(lambda p, s, z: p.fork([s["a"]], z(2)), id="fork n"),
    pytest.param(lambda p, s, z: p.tables(z(s["a"]))[0].tolist(), id="tables"),
    pytest.param(lambda p, s, z: np.asarray(p.attend(0, [s["a"], s["c"]], np.ones((4, 2, p.spec.head_dim), np.float32),
                                                     z(2))).tolist(), id="attend query_lens"),
]


def _refused(pool, call, needle, state, check):
    s = _setup(pool)
    before = state()
    with pytest.raises(InvalidArgument, match=needle):
        call(pool, s)
    assert state() == before
    check()
    return s


@pytest.mark.parametrize("call, needle", _BOOLS + _OBJECTS + _ZERO_D_REFUSED + _ZERO_D_REFUSED_EMBEDDED)
def test_embedded_refuses_and_changes_nothing(call, needle):
    pool = make_pool()
    _refused(pool, call, needle, lambda: snapshot(pool), pool.check_integrity)


def _zero_d(v):
    return np.array(v)


@pytest.mark.parametrize("call", _ZERO_D_TAKEN)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_embedded_takes_a_0d_integer_array_as_its_scalar(call, dtype):
    results = []
    for z in (int, lambda v: np.array(v, dtype)):
        pool = make_pool()
        results.append((call(pool, _setup(pool), z), snapshot(pool)))
        pool.check_integrity()
    assert results[0] == results[1]


def test_integer_forms_of_token_ids_are_still_taken():
    """Only token ids were tightened: a list of plain ints still takes the fast
    paths, and the same ids in any integer form give the same tables and keys."""
    pool = make_pool()
    prompt = list(range(BS * 2 + 3))
    [a] = pool.allocate([prompt])
    pool.commit(a.seq_id)
    for form in (prompt, tuple(prompt), np.array(prompt, np.int32), [np.int64(t) for t in prompt]):
        assert pool.cached_tokens([form]) == [2 * BS]


# -- through the daemon -------------------------------------------------------------------
def _daemon_refused(server, call, needle):
    with Client(server.endpoint, timeout=10) as c:
        _refused(c, call, needle, lambda: snapshot(server.pool), server.pool.check_integrity)
        c.check_integrity()
        # the daemon keeps serving this session: a decode step with good ids
        [x] = c.allocate([[1, 2, 3]])
        assert c.append(x.seq_id, 1, token_ids=[[4]])[0].tolist() == [x.slots[0] + 3]


@pytest.mark.parametrize("call, needle", _BOOLS + _ZERO_D_REFUSED)
def test_daemon_refuses_with_invalid_argument_and_keeps_serving(server, call, needle):
    _daemon_refused(server, call, needle)
    server.pool.check_integrity()


@pytest.mark.parametrize("call", _ZERO_D_TAKEN)
def test_daemon_takes_a_0d_integer_array_as_its_scalar(call):
    """A Client given 0-d arrays (they cross the wire as arrays) does what the
    embedded pool does with the ints, and its table mirror follows."""
    pool = KVPool(SMALL)
    want = call(pool, _setup(pool), int)
    with running_server(SMALL) as srv, Client(srv.endpoint, timeout=10) as c:
        got = call(c, _setup(c), _zero_d)
        assert got == want
        assert snapshot(srv.pool) == snapshot(pool)
        live = [i.seq_id for i in pool.sequences() if not i.swapped]
        for mine, theirs in zip(c.tables(live), pool.tables(live)):  # the mirror's, as the pool's
            assert mine.tolist() == theirs.tolist()
        c.check_integrity()


def test_an_empty_decode_step_with_token_ids_does_nothing(server):
    """No sequences, token ids given (an empty list): an empty result, nothing changed,
    on the embedded pool and through the daemon (the decode step's fast checks once took
    min() of nothing and raised ValueError)."""
    pool = make_pool()
    _setup(pool)
    before = snapshot(pool)
    assert pool.append([], 1, token_ids=[]) == [] and pool.append_flat([], 1, token_ids=[]).size == 0
    pool.record_tokens([], [])
    assert snapshot(pool) == before
    with Client(server.endpoint) as c:
        before = snapshot(server.pool)
        assert c.append_flat([], 1, token_ids=[]).size == 0
        c.record_tokens([], [])
        assert snapshot(server.pool) == before
        c.check_integrity()


def test_a_plan_refuses_an_out_it_could_not_write_in_place():
    """A non-contiguous torch ``out`` on the CPU pool: the result went into a
    contiguous copy of it and the caller's tensor kept its old values."""
    torch = pytest.importorskip("torch")
    pool = make_pool()
    s = _setup(pool)
    plan = pool.plan([s["a"]], 1)
    q = torch.ones(1, 2, pool.spec.head_dim)
    out = torch.zeros(1, pool.spec.head_dim, 2).transpose(1, 2)
    with pytest.raises(InvalidArgument, match="contiguous"):
        plan.attend(0, q, out=out)
    good = torch.full((1, 2, pool.spec.head_dim), float("nan"))
    assert plan.attend(0, q, out=good) is good and not good.isnan().any()



@pytest.mark.parametrize("timeout", ["x", True, [1], float("nan"), -1.0, 0])
def test_a_client_refuses_a_timeout_that_is_no_number_of_seconds(timeout):
    """Checked before any connection (a str was a ValueError from float())."""
    with pytest.raises(InvalidArgument, match="timeout must be"):
        Client("ipc:///nonexistent/kvpager.sock", timeout=timeout)


# -- torch tensors: the arrays they hold, on both sides -----------------------------------
_TENSOR_LISTS = [
    pytest.param(lambda p, s, t: p.free(t([s["a"], s["b"]])), id="free"),
    pytest.param(lambda p, s, t: p.truncate([s["a"], s["c"]], t([2, 1])), id="truncate lengths"),
    pytest.param(lambda p, s, t: p.commit([s["a"], s["b"]], t([BS, 3])), id="commit upto"),
    pytest.param(lambda p, s, t: [x.tolist() for x in p.append([s["c"], s["b"]], t([1, 2]))], id="append counts"),
    pytest.param(lambda p, s, t: [(a.seq_id, a.slots.tolist()) for a in p.allocate(t([[1, 2, 3], [4, 5, 6]]))],
                 id="allocate rows"),
    pytest.param(lambda p, s, t: p.cached_tokens(t([list(range(BS + 4)), list(range(7, 11 + BS))])),
                 id="cached_tokens rows"),
]


@pytest.mark.parametrize("call", _ZERO_D_TAKEN + _TENSOR_LISTS)
def test_a_tensor_is_taken_as_the_array_it_holds_embedded_and_through_a_client(call):
    """An integer torch tensor where ints or lists of them go: a `Client` sent the
    array it holds, which the daemon took, while `KVPool` refused the tensor
    (``truncate(ids, torch.tensor(1))``, ``fork(ids, n=torch.tensor(2))``); a 2-D
    tensor of prompts went the other way. Now both take it as that array."""
    torch = pytest.importorskip("torch")

    def plain(v):
        return v

    pool = KVPool(SMALL)
    want = call(pool, _setup(pool), plain)
    pool = KVPool(SMALL)
    assert call(pool, _setup(pool), torch.tensor) == want
    pool.check_integrity()
    with running_server(SMALL) as srv, Client(srv.endpoint, timeout=10) as c:
        assert call(c, _setup(c), torch.tensor) == want
        assert snapshot(srv.pool) == snapshot(pool)
        c.check_integrity()


@pytest.mark.parametrize("bad", [bytearray(b"\x01"), memoryview(b"\x01")], ids=["bytearray", "memoryview"])
def test_bytes_like_values_are_no_ids_counts_or_tokens(bad):
    """A bytearray or memoryview iterates as ints, as bytes does (refused already):
    ``free(bytearray(b"\\x01"))`` freed sequence 1, ``append(ids, bytearray(b"y"))``
    appended 121 slots, ``allocate([bytearray(b"hi")])`` took tokens [104, 105]."""
    pool = make_pool()
    s = _setup(pool)
    before = snapshot(pool)
    for call in (lambda: pool.free(bad), lambda: pool.append([s["b"]], bad), lambda: pool.allocate([bad]),
                 lambda: pool.commit([s["a"]], bad)):
        with pytest.raises(InvalidArgument):
            call()
        assert snapshot(pool) == before
    pool.check_integrity()
