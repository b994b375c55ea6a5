"""Sliding-window and soft-capped paged attention (NumPy backend, step plans)
against the dense float64 reference with the same mask. The GPU kernels'
windows and soft caps: tests/test_gpu_window.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import TOLERANCE, attention, rel_err

from kvpager import InvalidArgument, KVPool, PoolSpec
from kvpager.backends.numpy_backend import paged_attention
from kvpager.plan import table_floor


def filled_pool(spec: PoolSpec, lengths: list[int], rng: np.random.Generator):
    """A pool holding sequences of ``lengths`` tokens of random K/V, and a dense
    copy of each: ({seq_id: [(k, v) per layer]}, seq_ids)."""
    pool = KVPool(spec)
    allocs = pool.allocate([list(range(n)) for n in lengths])
    dense = {}
    for a, n in zip(allocs, lengths):
        shape = (spec.num_layers, n, spec.num_kv_heads, spec.head_dim)
        k = rng.standard_normal(shape).astype(spec.np_dtype)
        v = rng.standard_normal(shape).astype(spec.np_dtype)
        for layer in range(spec.num_layers):
            pool.write(layer, a.slots, k[layer], v[layer])
        dense[a.seq_id] = list(zip(k, v))
    return pool, dense, [a.seq_id for a in allocs]


def reference(dense, seq_ids, layer, q, qlens, scale, window, softcap):
    refs, start = [], 0
    for s, ql in zip(seq_ids, qlens):
        k, v = dense[s][layer]
        refs.append(attention(q[start : start + ql], k, v, scale, window, softcap))
        start += ql
    return np.concatenate(refs)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("block_size", [8, 16])
def test_windows_and_softcap_match_reference(dtype, block_size):
    rng = np.random.default_rng([block_size, len(dtype)])
    spec = PoolSpec(2, 2, 32, num_blocks=128, block_size=block_size, dtype=dtype)
    bs = block_size
    lengths = [1, bs - 1, bs, bs + 1, 3 * bs + 5, 5 * bs + 2]
    pool, dense, seqs = filled_pool(spec, lengths, rng)
    scale = 1 / math.sqrt(spec.head_dim)
    tol = TOLERANCE[dtype]
    # windows shorter than a block, at and around block sizes, and longer than any sequence
    windows = [None, 1, 3, bs - 1, bs, bs + 1, 2 * bs + 3, 1000]
    qlen_sets = [[1] * len(seqs), [1, 3, bs, 2, bs + 4, 2 * bs + 1]]
    for qlens in qlen_sets:
        plan = pool.plan(seqs, qlens)
        q = rng.standard_normal((sum(qlens), 8, spec.head_dim)).astype(spec.np_dtype)
        for window in windows:
            for softcap in (None, 2.0):
                for layer in range(2):
                    ref = reference(dense, seqs, layer, q, qlens, scale, window, softcap)
                    out = plan.attend(layer, q, window=window, softcap=softcap)
                    assert rel_err(out, ref) < tol, (qlens, window, softcap, layer)
                    direct = pool.attend(layer, seqs, q, qlens, window=window, softcap=softcap)
                    assert np.array_equal(direct, out)


def test_window_and_softcap_change_the_result():
    rng = np.random.default_rng(5)
    spec = PoolSpec(1, 1, 32, num_blocks=32, block_size=8, dtype="float32")
    pool, dense, seqs = filled_pool(spec, [40], rng)
    q = (3 * rng.standard_normal((1, 2, 32))).astype(np.float32)
    plan = pool.plan(seqs)
    full = plan.attend(0, q)
    assert rel_err(plan.attend(0, q, window=40), full) == 0  # covers the whole sequence
    assert rel_err(plan.attend(0, q, window=39), full) > 1e-3
    assert rel_err(plan.attend(0, q, softcap=1.0), full) > 1e-3
    k, v = dense[seqs[0]][0]
    assert rel_err(plan.attend(0, q, window=1), attention(q, k[-1:], v[-1:], 1 / math.sqrt(32))) < 1e-5


@pytest.mark.parametrize("block_size", [8, 16])
def test_blocks_before_the_window_are_not_read(block_size):
    """Whole blocks before every query's window are poisoned with NaN: the
    result is still the reference's (a block read and masked would give NaN)."""
    rng = np.random.default_rng(block_size)
    spec = PoolSpec(1, 2, 32, num_blocks=64, block_size=block_size, dtype="float32")
    n, window, ql = 6 * block_size + 3, block_size + 2, 3
    pool, dense, seqs = filled_pool(spec, [n], rng)
    table = pool.sequence(seqs[0]).block_table
    first_seen = n - ql - window + 1  # the earliest position the first query sees
    dead = np.asarray(table[: first_seen // block_size])
    assert len(dead) >= 3
    kv = pool.backend.kv
    kv[dead] = np.nan
    q = rng.standard_normal((ql, 4, 32)).astype(np.float32)
    out = pool.plan(seqs, [ql]).attend(0, q, window=window)
    k, v = dense[seqs[0]][0]
    assert np.isfinite(out).all()
    assert rel_err(out, attention(q, k, v, 1 / math.sqrt(32), window)) < 1e-5
    tables, lens = pool.tables(seqs)
    direct = paged_attention(kv, 0, q, tables, lens, np.array([ql], np.int32), 1 / math.sqrt(32), window=window)
    assert np.isfinite(direct).all()  # the twin skips those blocks too (the plan may run the CPU kernel)
    assert rel_err(out, direct.astype(np.float64)) < 1e-5


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "8"])
def test_bad_window_is_refused(bad):
    pool, _, seqs = filled_pool(PoolSpec(1, 1, 32, num_blocks=8, block_size=8, dtype="float32"), [5], np.random.default_rng(0))
    q = np.zeros((1, 1, 32), np.float32)
    with pytest.raises(InvalidArgument, match="window"):
        pool.plan(seqs).attend(0, q, window=bad)
    with pytest.raises(InvalidArgument, match="window"):
        pool.attend(0, seqs, q, window=bad)


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), float("inf"), True])
def test_bad_softcap_is_refused(bad):
    pool, _, seqs = filled_pool(PoolSpec(1, 1, 32, num_blocks=8, block_size=8, dtype="float32"), [5], np.random.default_rng(0))
    q = np.zeros((1, 1, 32), np.float32)
    with pytest.raises(InvalidArgument, match="softcap"):
        pool.plan(seqs).attend(0, q, softcap=bad)


def test_released_blocks_are_freed_and_attention_must_keep_within_the_window():
    """Blocks wholly before every window go back to the pool; attention over
    what is left equals the reference with that window; attention that would
    read a released position is refused and changes nothing."""
    rng = np.random.default_rng(9)
    spec = PoolSpec(1, 2, 32, num_blocks=64, block_size=8, dtype="float32")
    window, n = 12, 70
    pool, dense, seqs = filled_pool(spec, [n, 30], rng)
    free_before = pool.stats().free_blocks
    # the next query sits at n - 1 (a decode step): it sees positions > n - 1 - window
    assert pool.release_before(seqs, [n - window, 3]) == [(n - window) // 8, 0]
    assert pool.stats().free_blocks == free_before + (n - window) // 8
    table = pool.sequence(seqs[0]).block_table
    assert set(table[: (n - window) // 8]) == {0} and 0 not in table[(n - window) // 8 :]
    pool.check_integrity()
    q = rng.standard_normal((2, 4, 32)).astype(np.float32)
    plan = pool.plan(seqs)
    out = plan.attend(0, q, window=window)
    k, v = dense[seqs[0]][0]
    assert rel_err(out[:1], attention(q[:1], k, v, 1 / math.sqrt(32), window)) < 1e-5
    assert np.array_equal(pool.attend(0, seqs, q, window=window), out)
    for bad in (None, window + 8):
        with pytest.raises(InvalidArgument, match="released its blocks before position 56"):
            plan.attend(0, q, window=bad)
        with pytest.raises(InvalidArgument, match="released"):
            pool.attend(0, seqs, q, window=bad)
    tables, _ = pool.tables(seqs)  # the floor is readable from the tables alone (plan.update's source)
    assert np.array_equal(table_floor(tables, 8), [(n - window) // 8 * 8, 0])
    assert table_floor(pool.tables(seqs[1:])[0], 8) is None
    assert pool.release_before(seqs, [n - window, 3]) == [0, 0]  # nothing more to give back
    with pytest.raises(InvalidArgument, match="position"):
        pool.release_before(seqs, [n + 1, 0])
    with pytest.raises(InvalidArgument, match="released"):
        pool.truncate(seqs[0], 50)
    # a fork shares only what is held; freeing everything returns every block
    kid = pool.fork(seqs[0], 1)[0][0]
    pool.check_integrity()
    pool.free([kid, *seqs])
    pool.check_integrity()
    assert pool.stats().free_blocks + pool.stats().evictable_blocks == spec.num_blocks - 1


def test_a_soft_cap_or_scale_past_float32_is_no_nan():
    """Scores are float32: a soft cap past 3.4e38 was infinite there and every output
    NaN; one that large caps nothing and is taken as none, and a scale past float32's
    range is refused by name."""
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=32, block_size=8, dtype="float32")
    pool = KVPool(spec)
    rng = np.random.default_rng(9)
    (a,) = pool.allocate([list(range(20))])
    pool.write(0, a.slots, rng.standard_normal((20, 2, 16), np.float32), rng.standard_normal((20, 2, 16), np.float32))
    q = rng.standard_normal((1, 4, 16), np.float32)
    full = pool.attend(0, [a.seq_id], q)
    for cap in (1e31, 1e39, 1e300):
        np.testing.assert_array_equal(pool.attend(0, [a.seq_id], q, softcap=cap), full)
        plan = pool.plan([a.seq_id], None)
        np.testing.assert_array_equal(plan.attend(0, q, softcap=cap), full)
    assert not np.array_equal(pool.attend(0, [a.seq_id], q, softcap=0.5), full)
    with pytest.raises(InvalidArgument, match="a float32 holds"):
        pool.attend(0, [a.seq_id], q, scale=1e39)
