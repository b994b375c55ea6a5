"""Chunked attention through a step plan (Llama-4's ``attention_chunk_size``):
`kvpager.attend_options.chunk_step` gives each query exactly the positions of its chunk
up to itself, and a plan's `chunked` view attends as a dense softmax over those
positions does. CPU, NumPy backend (the GPU plans: test_gpu_chunked.py)."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_helpers import running_server
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager import Client, KVPool
from kvpager.attend_options import chunk_step
from kvpager.errors import InvalidArgument, StalePlan
from kvpager.spec import PoolSpec


def seen(tables, lens, qlens, block_size: int) -> list[list[tuple[int, int]]]:
    """(block, offset) of each position each query token of a step attends to, in
    the step's query order (causal: a row's queries are its last ``qlens``)."""
    out = []
    for table, n, q in zip(tables, lens, qlens):
        for p in range(n - q, n):
            out.append([(int(table[j // block_size]), j % block_size) for j in range(p + 1)])
    return out


@st.composite
def steps(draw):
    block_size = draw(st.sampled_from([8, 16]))
    chunk = block_size * draw(st.integers(1, 4))
    lens = draw(st.lists(st.integers(1, 150), min_size=1, max_size=5))
    qlens = [draw(st.integers(1, n)) for n in lens]
    width = max(-(-n // block_size) for n in lens) + draw(st.integers(0, 2))
    ids = np.random.default_rng(draw(st.integers(0, 2**16))).permutation(len(lens) * width) + 1
    tables = ids.reshape(len(lens), width).astype(np.int32)
    return tables, np.array(lens, np.int32), np.array(qlens, np.int32), chunk, block_size


@settings(max_examples=200, deadline=None)
@given(steps())
def test_each_query_sees_its_chunk_up_to_itself(step):
    tables, lens, qlens, chunk, bs = step
    t, n, q = chunk_step(tables, lens, qlens, chunk, bs)
    assert t.shape[1] == tables.shape[1] and t.dtype == n.dtype == q.dtype == np.int32
    assert q.sum() == qlens.sum() and (q >= 1).all() and (q <= n).all() and (n <= chunk).all()
    want = [[(int(table[j // bs]), j % bs) for j in range(p - p % chunk, p + 1)]
            for table, length, ql in zip(tables, lens, qlens) for p in range(length - ql, length)]
    assert seen(t, n, q, bs) == want


def test_a_step_in_its_first_chunk_is_its_own_view():
    tables = np.arange(1, 9, dtype=np.int32).reshape(2, 4)
    lens, qlens = np.array([32, 17], np.int32), np.array([5, 17], np.int32)
    assert all(a is b for a, b in zip(chunk_step(tables, lens, qlens, 32, 8), (tables, lens, qlens)))


def test_a_chunk_start_inside_a_block_is_refused():
    tables = np.arange(1, 9, dtype=np.int32).reshape(2, 4)
    qlens = np.array([1, 1], np.int32)
    lens = np.array([20, 24], np.int32)  # every query in the first chunk of 24: nothing to cut
    assert chunk_step(tables, lens, qlens, 24, 16)[1] is lens
    with pytest.raises(InvalidArgument, match=r"sequence 0 .* chunk start \(24\) inside a block of 16"):
        chunk_step(tables, np.array([30, 20], np.int32), qlens, 24, 16)


def make_pool(block_size: int = 8) -> KVPool:
    return KVPool(PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=128, block_size=block_size,
                           dtype="float32"))


def dense_chunked(kv: np.ndarray, layer: int, q: np.ndarray, tables, lens, qlens, chunk: int) -> np.ndarray:
    """Softmax attention in float64 over each query's chunk, K/V read from the pool's
    ``kv`` ([blocks, layers, 2, kv heads, block size, head dim]) by table."""
    bs, hkv, d = kv.shape[4], kv.shape[3], kv.shape[5]
    group = q.shape[1] // hkv
    out, row = np.empty(q.shape, np.float64), 0
    for table, n, ql in zip(tables, lens, qlens):
        for p in range(n - ql, n):
            pos = np.arange(p - p % chunk, p + 1)
            k = kv[table[pos // bs], layer, 0, :, pos % bs].astype(np.float64)  # [T, kv heads, D]
            v = kv[table[pos // bs], layer, 1, :, pos % bs].astype(np.float64)
            for h in range(q.shape[1]):
                s = k[:, h // group] @ q[row, h].astype(np.float64) * d**-0.5
                w = np.exp(s - s.max())
                out[row, h] = w @ v[:, h // group] / w.sum()
            row += 1
    return out


def test_a_chunked_view_attends_as_a_dense_softmax_over_each_chunk():
    rng = np.random.default_rng(3)
    pool = make_pool()
    lens = [70, 9, 33, 48]
    allocs = pool.allocate([[int(t) for t in rng.integers(3, 100, n)] for n in lens])
    ids = [a.seq_id for a in allocs]
    hkv, d = pool.spec.num_kv_heads, pool.spec.head_dim
    plan = pool.plan(ids, lens, np.concatenate([a.slots for a in allocs]))
    total = sum(lens)
    for layer in range(2):
        plan.write(layer, rng.standard_normal((total, hkv, d), np.float32),
                   rng.standard_normal((total, hkv, d), np.float32))
    tables, _ = pool.tables(ids)
    q = rng.standard_normal((total, 4, d), np.float32)
    for chunk in (16, 24, 64):
        view = plan.chunked(chunk)
        assert view is not plan and plan.chunked(chunk) is view  # built once
        out = view.attend(1, q)
        ref = dense_chunked(pool.backend.kv, 1, q, tables, lens, lens, chunk)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert plan.chunked(128) is plan  # no sequence past its first chunk
    # a decode step of the same sequences, through write_attend with the chunk
    pool.commit(ids)
    slots = np.asarray(pool.append_flat(ids, 1, [[5]] * len(ids)), np.int64)
    step = pool.plan(ids, None, slots)
    k, v = (rng.standard_normal((1, hkv, len(ids), d), np.float32) for _ in range(2))
    qd = rng.standard_normal((1, 4, len(ids), d), np.float32)
    out = step.write_attend(0, qd, k, v, chunk=16)[0]
    ref = dense_chunked(pool.backend.kv, 0, qd[0].swapaxes(0, 1), pool.tables(ids)[0], [n + 1 for n in lens], [1] * 4, 16)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, -16, True, 16.0, "16"])
def test_a_bad_chunk_is_refused_and_writes_nothing(chunk):
    pool = make_pool()
    (alloc,) = pool.allocate([list(range(3, 43))])
    plan = pool.plan([alloc.seq_id], [40], alloc.slots)
    k = np.ones((1, 2, 40, 16), np.float32)
    before = pool.backend.kv.copy()
    with pytest.raises(InvalidArgument, match="chunk must be a positive int"):
        plan.write_attend(0, np.ones((1, 4, 40, 16), np.float32), k, k, chunk=chunk)
    assert (pool.backend.kv == before).all()


def test_a_chunk_inside_a_block_is_refused_by_write_attend_before_writing():
    pool = make_pool(block_size=16)
    (alloc,) = pool.allocate([list(range(3, 43))])
    plan = pool.plan([alloc.seq_id], [40], alloc.slots)
    k = np.ones((1, 2, 40, 16), np.float32)
    before = pool.backend.kv.copy()
    with pytest.raises(InvalidArgument, match="block size that divides the chunk size"):
        plan.write_attend(0, np.ones((1, 4, 40, 16), np.float32), k, k, chunk=24)
    assert (pool.backend.kv == before).all()


def test_pool_attend_takes_a_chunk_too():
    """`KVPool.attend(..., chunk=)`: the one-shot attention answers as the plan's view,
    and a chunk starting inside a block is refused."""
    rng = np.random.default_rng(4)
    pool = make_pool()
    lens = [45, 12, 30]
    allocs = pool.allocate([[int(t) for t in rng.integers(3, 100, n)] for n in lens])
    ids = [a.seq_id for a in allocs]
    slots = np.concatenate([a.slots for a in allocs])
    shape = (len(slots), pool.spec.num_kv_heads, pool.spec.head_dim)
    pool.write(0, slots, rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
    qlens = [20, 1, 30]
    q = rng.standard_normal((sum(qlens), 4, pool.spec.head_dim), np.float32)
    out = pool.attend(0, ids, q, qlens, chunk=16)
    ref = dense_chunked(pool.backend.kv, 0, q, pool.tables(ids)[0], lens, qlens, 16)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidArgument, match="inside a block of 8"):
        pool.attend(0, ids, q, qlens, chunk=12)
    with pytest.raises(InvalidArgument, match="chunk must be a positive int"):
        pool.attend(0, ids, q, qlens, chunk=0)


def test_a_window_or_chunk_past_every_position_cuts_nothing():
    """Capped at the longest sequence a pool can hold (int32 lengths): as long as no
    window or chunk at all, and no overflow on the way (a chunk of 2**63 raised
    OverflowError, not a typed error, before the cap)."""
    from kvpager.attend_options import POSITIONS, check_chunk, check_window

    assert check_window((1 << 64) - 1) == check_chunk(1 << 70) == POSITIONS == (1 << 31) - 1
    rng = np.random.default_rng(8)
    pool = make_pool()
    (alloc,) = pool.allocate([[int(t) for t in rng.integers(3, 100, 50)]])
    shape = (50, pool.spec.num_kv_heads, pool.spec.head_dim)
    pool.write(0, alloc.slots, rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32))
    q = rng.standard_normal((50, 4, pool.spec.head_dim), np.float32)
    full = pool.attend(0, [alloc.seq_id], q, 50)
    for big in (1 << 63, (1 << 64) + 5):
        np.testing.assert_array_equal(pool.attend(0, [alloc.seq_id], q, 50, chunk=big), full)
        np.testing.assert_array_equal(pool.attend(0, [alloc.seq_id], q, 50, window=big), full)



def test_a_chunked_view_follows_what_its_plan_is_tied_to_since():
    """A view kept the count its plan followed when the view was made; a plan tied
    again to another count (a client's plan refilled over other sessions'
    sequences follows the daemon's releases, not only its own changes) left its
    views on the old one: their attends never rechecked when the new count moved,
    reading blocks other sequences hold since. The views follow it now."""
    from kvpager.errors import StalePlan
    from kvpager.plan_guard import Moves

    rng = np.random.default_rng(4)
    pool = make_pool()
    [a] = pool.allocate([[int(t) for t in rng.integers(3, 100, 40)]])
    plan = pool.plan([a.seq_id], [40])
    view = plan.chunked(16)
    assert view is not plan
    q = rng.standard_normal((40, 4, pool.spec.head_dim), np.float32)
    view.attend(0, q)
    other, calls = Moves(), []

    def refused(_plan):
        calls.append(1)
        raise StalePlan("its sequences changed")

    plan.guard_with(refused, other)  # tied again, to a count of its own
    view.attend(0, q)  # nothing moved since: no recheck
    assert not calls
    other.bump()
    with pytest.raises(StalePlan):
        view.attend(0, q)
    assert calls


STALE_SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=64, block_size=8, dtype="float32")
BS8, CHUNK, N = 8, 16, 40  # the planned sequence's tokens: queries in three chunks


def _tokens(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 1000, n)]


def _kv8(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((n, 2, 16)).astype(np.float32) for _ in range(2))


def test_a_chunked_view_made_after_its_plan_went_stale_refuses_as_its_plan_does():
    """`StepPlan.chunked` tied a new view from the count then, not from the count
    its plan last checked at: a plan whose sequences changed since it last looked
    (its own recheck pending) got a view that never rechecked, whose attends read
    the blocks the plan's sequence gave back (another sequence's K/V now) where
    the plan itself raises StalePlan. (The same for a client's plan tied from the
    count read before its tables: a release during the round trip.)"""
    pool = KVPool(STALE_SPEC)
    [a] = pool.allocate([_tokens(1, N)])
    plan = pool.plan([a.seq_id], [N])  # every position a query: the view is a plan of its own
    pool.free([a.seq_id])
    [b] = pool.allocate([_tokens(2, N)])  # another sequence takes the blocks back
    assert set(np.asarray(b.slots) // BS8) & set(np.asarray(a.slots) // BS8)
    pool.write(0, b.slots, *_kv8(3, N))
    q = np.random.default_rng(4).standard_normal((N, 2, 16)).astype(np.float32)
    with pytest.raises(StalePlan):
        plan.chunked(CHUNK).attend(0, q)  # read b's K/V as a's: no recheck
    with pytest.raises(StalePlan):
        plan.attend(0, q)


def test_a_clients_chunked_view_made_after_a_free_refuses():
    """The same through a daemon client's mapped pool (CPU): a plan of its own
    sequence, the sequence freed and its blocks written by another session; the
    view made then attends over the other session's K/V."""
    with running_server(STALE_SPEC) as server, Client(server.endpoint) as c, Client(server.endpoint) as other:
        [a] = c.allocate([_tokens(1, N)])
        plan = c.plan([a.seq_id], [N])
        c.free(a.seq_id)
        [x] = other.allocate([_tokens(2, N)])
        assert set(np.asarray(x.slots) // BS8) & set(np.asarray(a.slots) // BS8)
        other.write(0, x.slots, *_kv8(3, N))
        q = np.random.default_rng(4).standard_normal((N, 2, 16)).astype(np.float32)
        with pytest.raises(StalePlan):
            plan.chunked(CHUNK).attend(0, q)
