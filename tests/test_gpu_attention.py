"""Attention kernels (decode with and without split-K, multi-token) against the
NumPy reference on copies of the same data, over a sampled grid of dtypes,
head dims, block sizes and GQA groups, and every head dim that is a multiple
of 16 from 32 to 256.

Every output is poisoned (NaN) before the kernel runs, block tables are
shuffled and lengths cross block boundaries. Skips without CuPy or a GPU."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_kernel_helpers import (  # noqa: E402
    BLOCK_SIZES,
    DTYPES,
    GRID,
    GROUPS,
    HEAD_DIMS,
    TOL,
    geometry,
    make_pair,
    random_tables,
    rel_err,
    same_bits,
    seed,
    to_dev,
    to_host,
)

from kvpager.backends.numpy_backend import paged_attention  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,d,bs,group", GRID)
def test_decode_matches_reference(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group))
    seq_lens = np.array([1, bs - 1, bs, bs + 1, 3 * bs + 5, 517, 1200], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((len(seq_lens), hq, d), dtype=np.float32).astype(spec.np_dtype)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    scale = d**-0.5
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale)
    for splits in (None, 1, 3):
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, num_splits=splits)
        assert rel_err(to_host(out, spec), ref) < TOL[dtype], f"num_splits={splits}"
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group", GRID)
def test_multi_token_matches_reference(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "mt"))
    seq_lens = np.array([5, bs + 3, 130, 300, 77, 1], dtype=np.int32)
    qlens = np.array([5, 2, 70, 33, 1, 1], dtype=np.int32)  # whole prompt, chunks, decode mixed in
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
    scale = 0.7 * d**-0.5
    ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, scale)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out)
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("d", range(32, 257, 16))
def test_every_head_dim_matches_reference(d):
    """Every multiple of 16 from 32 to 256 (Phi-2's 80, 112, 160, 192 ...):
    decode with and without split-K and multi-token, the dtype and block size
    rotating."""
    i = d // 16
    dtype, bs, group = DTYPES[i % 3], BLOCK_SIZES[i % 4], GROUPS[i % 5]
    rng = np.random.default_rng(seed(d, "every head dim"))
    seq_lens = np.array([1, bs + 1, 300, 1100], dtype=np.int32)
    qlens = np.array([1, 3, 70, 1], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    for ql, splits in ((np.ones(4, np.int32), None), (np.ones(4, np.int32), 3), (qlens, None)):
        q = rng.standard_normal((int(ql.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
        ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, ql, d**-0.5)
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        gpu.attend(1, to_dev(q, gpu), tables, seq_lens, ql, d**-0.5, out=out, num_splits=splits)
        assert rel_err(to_host(out, spec), ref) < TOL[dtype], (dtype, bs, group, ql.tolist(), splits)
    k = rng.standard_normal((5, 2, d), dtype=np.float32).astype(spec.np_dtype)
    slots = np.array([3, 40, 41, 100, 7], dtype=np.int64)
    gpu.write(0, slots, to_dev(k, gpu), to_dev(k, gpu))
    cpu.write(0, slots, k, k)
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)
    gpu.close()


def test_grid_sample_covers_every_value():
    for axis, values in enumerate((DTYPES, HEAD_DIMS, BLOCK_SIZES, GROUPS)):
        assert {c[axis] for c in GRID} == set(values)
    assert len(set(GRID)) == len(GRID)
    assert len(list(itertools.product(DTYPES, HEAD_DIMS, BLOCK_SIZES, GROUPS))) == 240
