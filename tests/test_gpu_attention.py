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

from kvpager import KernelConfig  # noqa: E402
from kvpager.backends.cupy_backend import CupyBackend  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.errors import UnsupportedConfiguration  # noqa: E402

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


# GQA groups that are not powers of two (Llama-3.2-3B's 3, Qwen2.5's 5, 6 and 7, StarCoder2's 9
# and 12): the decode kernels' M tile rows past the group, the multi-token tiles' rows past their
# whole query tokens, and the CUDA-core decode's equal subgroups.
ODD_GROUPS = [  # (dtype, head dim, block size, group, kv heads)
    ("bfloat16", 128, 16, 7, 2), ("float16", 64, 8, 3, 4), ("float32", 128, 16, 7, 2),
    ("float32", 256, 32, 6, 2), ("bfloat16", 256, 64, 12, 2), ("float16", 96, 16, 5, 8),
    ("bfloat16", 64, 32, 14, 2), ("float16", 128, 16, 9, 8), ("float32", 64, 8, 10, 2),
    # past 16 (decode in chunks of 16 heads sharing each staged tile in one CTA): Falcon-7B's 71
    # over one kv head, Falcon-180B's 29, StarCoder's 48, 128 (8 chunks of 2 warps); heads wider
    # than 256: a CTA a chunk
    ("bfloat16", 64, 16, 71, 1), ("float16", 64, 8, 29, 2), ("bfloat16", 128, 32, 48, 1),
    ("float32", 64, 16, 71, 1), ("float16", 256, 16, 20, 2), ("bfloat16", 96, 64, 33, 1),
    ("bfloat16", 128, 16, 128, 1), ("bfloat16", 512, 16, 20, 1),
]


@pytest.mark.parametrize("dtype,d,bs,group,kv_heads", ODD_GROUPS)
def test_groups_not_a_power_of_two_match_reference(dtype, d, bs, group, kv_heads):
    rng = np.random.default_rng(seed(dtype, d, bs, group, kv_heads, "odd group"))
    seq_lens = np.array([1, bs + 1, 3 * bs + 5, 300, 1200, 77], dtype=np.int32)
    qlens = np.array([1, 3, 2 * bs, 70, 1, 19], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), kv_heads=kv_heads)
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = kv_heads * group
    ones = np.ones(len(seq_lens), np.int32)
    calls = [(ones, None, {}), (ones, 3, {}), (ones, None, {"window": 2 * bs + 3, "softcap": 20.0}),
             (qlens, None, {}), (qlens, None, {"window": 37, "softcap": 15.0})]
    for ql, splits, kw in calls:
        q = rng.standard_normal((int(ql.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
        ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, ql, d**-0.5, **kw)
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        gpu.attend(1, to_dev(q, gpu), tables, seq_lens, ql, d**-0.5, out=out, num_splits=splits, **kw)
        assert rel_err(to_host(out, spec), ref) < TOL[dtype], (ql.tolist(), splits, kw)
    gpu.close()


@pytest.mark.parametrize("hpc,wph,group", [(4, 1, 7), (2, 1, 3), (8, 1, 5), (2, 4, 12), (4, 1, 29), (1, 2, 40),
                                           (1, 4, 40), (1, 1, 71), (1, 4, 71)])
def test_odd_groups_in_every_decode_layout(hpc, wph, group):
    """Several kv heads a CTA (short contexts): their output rows follow each other by the group."""
    rng = np.random.default_rng(seed(hpc, wph, group, "odd layouts"))
    seq_lens = np.array([1, 17, 300, 1700, 2049], dtype=np.int32)
    spec = geometry("bfloat16", 128, 16, int((-(-seq_lens // 16)).sum() * 16), kv_heads=8)
    gpu, cpu = make_pair(spec, rng, KernelConfig(decode_heads_per_cta=hpc, decode_warps_per_head=wph))
    ones = np.ones(5, np.int32)
    q = rng.standard_normal((5, 8 * group, 128), dtype=np.float32).astype(spec.np_dtype)
    ref = paged_attention(cpu.kv, 0, q, tables := random_tables(rng, spec, seq_lens), seq_lens, ones, 128**-0.5)
    for splits in (None, 1, 3):
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        gpu.attend(0, to_dev(q, gpu), tables, seq_lens, ones, 128**-0.5, out=out, num_splits=splits)
        assert rel_err(to_host(out, spec), ref) < TOL["bfloat16"], splits
    gpu.close()


# Multi-token tiles of a chunk of a group's heads (HCH): the default past 16 heads, forced below
# it; a last chunk with fewer heads; both multi-token kernels (mma.sync named, and the
# device's choice), windows and soft caps.
HEAD_CHUNKS = [  # (dtype, head dim, block size, group, kv heads, chunk or None: the planner's)
    ("bfloat16", 128, 16, 20, 2, 6), ("float16", 64, 8, 7, 2, 3), ("bfloat16", 256, 16, 71, 1, None),
    ("float16", 96, 16, 33, 1, None), ("bfloat16", 64, 32, 71, 1, None), ("float16", 128, 64, 48, 2, 5),
]


@pytest.mark.parametrize("dtype,d,bs,group,kv_heads,chunk", HEAD_CHUNKS)
def test_multi_token_head_chunks_match_reference(dtype, d, bs, group, kv_heads, chunk):
    rng = np.random.default_rng(seed(dtype, d, bs, group, kv_heads, chunk, "head chunks"))
    seq_lens = np.array([9, bs + 1, 3 * bs + 5, 300, 700, 77], dtype=np.int32)
    qlens = np.array([9, 3, 2 * bs, 70, 40, 19], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), kv_heads=kv_heads)
    tables = random_tables(rng, spec, seq_lens)
    hq = kv_heads * group
    q = rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
    for kernel in ("mma", "auto"):
        gpu, cpu = make_pair(spec, np.random.default_rng(seed(dtype, d, bs, group, "pool")),
                             KernelConfig(prefill_kernel=kernel, prefill_head_chunk=chunk))
        for kw in ({}, {"window": 37, "softcap": 15.0}):
            ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5, **kw)
            out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
            gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, d**-0.5, out=out, **kw)
            assert rel_err(to_host(out, spec), ref) < TOL[dtype], (kernel, kw)
        gpu.close()


def test_groups_past_128_are_refused_by_name():
    spec = geometry("bfloat16", 128, 16, 256)
    gpu = CupyBackend(spec, 0)
    q = to_dev(np.zeros((1, 2 * 129, 128), dtype=spec.np_dtype), gpu)
    with pytest.raises(UnsupportedConfiguration, match="1 to 128 query heads per kv head"):
        gpu.attend(0, q, np.array([[1]], np.int32), np.array([3], np.int32), np.ones(1, np.int32), 0.1)
    gpu.close()
