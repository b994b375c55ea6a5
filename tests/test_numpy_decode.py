"""The CPU backend's batched decode (`kvpager.backends.numpy_decode`) against the
NumPy twin of the kernels (`paged_attention`, a sequence at a time): random
pools whose unread blocks are NaN, shuffled tables whose entries past each
sequence's blocks hold other blocks, -1 or ids past the pool, ragged lengths,
GQA 1-8, block sizes 8-64, soft caps, attention sinks, FP8 scales, and groups
split by the gather budget. Then the dispatch: which steps take it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager import KVPool, PoolSpec
from kvpager.backends import numpy_decode
from kvpager.backends.numpy_backend import paged_attention


def case(rng: np.random.Generator, lens: list[int], heads: int, group: int, block_size: int, head_dim: int,
         dtype: str = "float32"):
    """A poisoned pool [blocks, layers, 2, heads, block, dim], tables of shuffled
    distinct blocks (garbage past each sequence's own), q [B, heads * group, dim]."""
    need = [-(-n // block_size) for n in lens]
    width = max(need) + 2
    num_blocks = sum(need) + 3
    kv = np.full((num_blocks, 2, 2, heads, block_size, head_dim), np.nan, dtype=np.float32)
    ids = rng.permutation(num_blocks)
    tables = np.empty((len(lens), width), dtype=np.int32)
    start = 0
    for b, k in enumerate(need):
        own = ids[start : start + k]
        start += k
        tables[b, :k] = own
        tables[b, k:] = rng.choice([-1, num_blocks + 7, int(ids[-1])], size=width - k)  # anything
        for j, blk in enumerate(own):  # only the positions before the length are written
            filled = min(block_size, lens[b] - j * block_size)
            kv[blk, :, :, :, :filled] = rng.standard_normal((2, 2, heads, filled, head_dim))
    q = rng.standard_normal((len(lens), heads * group, head_dim)).astype(np.float32)
    return kv.astype(dtype), tables, np.asarray(lens, dtype=np.int32), q


def twin(kv, q, tables, lens, scale, **kw):
    """The twin over tables cut to each sequence's own blocks (it reads no further)."""
    return paged_attention(kv, 1, q, tables, lens, np.ones(len(lens), np.int32), scale, **kw)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 12), heads=st.sampled_from([1, 2, 4]),
       group=st.sampled_from([1, 2, 4, 8]), block_size=st.sampled_from([8, 16, 32, 64]),
       head_dim=st.sampled_from([8, 32]), softcap=st.sampled_from([None, 5.0]), sinks=st.booleans(),
       budget=st.sampled_from([None, 1]))
def test_decode_matches_the_twin(seed, n, heads, group, block_size, head_dim, softcap, sinks, budget):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 5 * block_size + 3, size=n).tolist()
    kv, tables, lens, q = case(rng, lens, heads, group, block_size, head_dim)
    scale = float(head_dim) ** -0.5
    kw = dict(softcap=softcap, sinks=rng.standard_normal(heads * group).astype(np.float32) if sinks else None)
    # budget 1: every sequence a group of its own
    got = numpy_decode.decode(kv, 1, q, tables, lens, scale, group_bytes=budget or numpy_decode.GROUP_BYTES, **kw)
    want = twin(kv, q, tables, lens, scale, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_decode_matches_the_twin_on_stored_dtypes_and_fp8_scales(dtype):
    rng = np.random.default_rng(3)
    kv, tables, lens, q = case(rng, [1, 17, 40, 5, 33], 2, 4, 16, 32, dtype)
    q = q.astype(dtype)
    scales = rng.uniform(0.5, 2.0, size=(2, 2, 2)).astype(np.float32)  # [layers, K/V, heads]
    for kw in ({}, {"kv_scales": scales}):
        got = numpy_decode.decode(kv, 1, q, tables, lens, 0.2, **kw)
        want = twin(kv, q, tables, lens, 0.2, **kw)
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_steps_that_are_not_plain_decode_go_to_the_twin(monkeypatch):
    """`attend` takes the batched decode for a step of one token a sequence and no
    window, of two or more sequences; multi-token steps, windows and single
    sequences go to the twin (spied on), with the same results either way."""
    rng = np.random.default_rng(5)
    kv, tables, lens, q = case(rng, [9, 30, 2], 2, 2, 8, 16)
    calls = []
    real = numpy_decode.decode
    monkeypatch.setattr(numpy_decode, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    ones = np.ones(3, np.int32)
    numpy_decode.attend(kv, 1, q, tables, lens, ones, 0.25)
    assert calls == [1]
    numpy_decode.attend(kv, 1, q, tables, lens, ones, 0.25, window=4)
    numpy_decode.attend(kv, 1, q[:1], tables[:1], lens[:1], ones[:1], 0.25)
    q3 = rng.standard_normal((4, 4, 16)).astype(np.float32)
    numpy_decode.attend(kv, 1, q3, tables, lens, np.array([1, 2, 1], np.int32), 0.25)
    assert calls == [1]


def test_a_pool_plans_decode_steps_through_it(monkeypatch):
    """A `KVPool`'s step plan and its one-call attend both reach the batched
    decode on the CPU, with the twin's result."""
    spec = PoolSpec(2, 2, 16, num_blocks=32, block_size=8, dtype="float32")
    pool = KVPool(spec)
    rng = np.random.default_rng(9)
    allocs = pool.allocate([list(range(n)) for n in (3, 20, 9)])
    ids = [a.seq_id for a in allocs]
    for a in allocs:
        n = len(a.slots)
        for layer in range(2):
            pool.write(layer, a.slots, *rng.standard_normal((2, n, 2, 16)).astype(np.float32))
    calls = []
    real = numpy_decode.decode
    monkeypatch.setattr(numpy_decode, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    slots = pool.append_flat(ids, 1)
    plan = pool.plan(ids, [1, 1, 1], slots)
    plan.write(1, *rng.standard_normal((2, 3, 2, 16)).astype(np.float32))
    q = rng.standard_normal((3, 4, 16)).astype(np.float32)
    got = plan.attend(1, q, 0.25)
    tables, lens = pool.tables(ids)
    want = paged_attention(pool.backend.kv, 1, q, tables, lens, np.ones(3, np.int32), 0.25)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    assert calls == [1]
