"""Cascade attention on the GPU for multi-token steps and FP8 pools, against the
NumPy twin and the same step planned without the cascade: random block tables
with two levels of sharing (a prefix shared by most sequences, a second one by a
few of them, another group, sequences sharing nothing), ragged own parts and
query lengths 1-40 (decode rows among them), GQA 1-16, block sizes 8-64, head
dims 64 / 128 / 256, float16 / bfloat16 and FP8 (e4m3, e5m2) pools, soft caps,
a windowed call (which runs without the cascade), and a long one-level prefix
cut into chunks. Outputs are poisoned (NaN) first. Then the automatic choice.
Skips without CuPy or a GPU (FP8 cases: compute capability 8.9+)."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_cascade_helpers import layout, make_pair, run, spec_for, tables_for  # noqa: E402
from gpu_kernel_helpers import TOL, rel_err, seed  # noqa: E402

from kvpager import kernels  # noqa: E402
from kvpager.backends.cupy_backend import CupyBackend  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.plan import make_plan  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu
FP8_OK = kernels.compute_capability(0) >= (8, 9)

CASES = [  # (kv dtype or None, compute dtype, head dim, block size, GQA group)
    (None, "bfloat16", 128, 16, 4),
    (None, "float16", 64, 8, 1),
    (None, "bfloat16", 256, 32, 16),
    (None, "float16", 128, 64, 8),
    (None, "bfloat16", 64, 16, 2),
    ("float8_e4m3", "bfloat16", 128, 16, 4),
    ("float8_e5m2", "float16", 64, 8, 16),
    ("float8_e4m3", "float16", 256, 64, 1),
    ("float8_e5m2", "bfloat16", 128, 32, 8),
    ("float8_e4m3", "float16", 128, 16, 7),  # groups not a power of two
    (None, "bfloat16", 64, 16, 12),
    (None, "float16", 64, 8, 71),  # Falcon-7B's group: own parts in chunks of 8 heads, shared a member a tile
    (None, "bfloat16", 128, 16, 48),  # StarCoder's: own parts in chunks of 16 heads
]


def check_case(kv_dtype, dtype, d, bs, group, qlens, levels, rng):
    groups, seq_lens = layout(rng, bs, qlens, levels)
    spec = spec_for(kv_dtype, dtype, d, bs, seq_lens, rng)
    gpu, cpu = make_pair(spec, rng)
    tables = tables_for(rng, spec, groups, seq_lens)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
    scales = spec.scales if spec.is_fp8 else None
    plan = make_plan(gpu, tables, seq_lens, qlens, cascade=True, num_q_heads=hq)
    shared = plan.shared_prefixes
    assert shared is not None and shared.levels == levels
    plain = make_plan(gpu, tables, seq_lens, qlens, cascade=False)
    for layer, softcap in ((0, None), (1, None), (1, 3.0)):
        ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, qlens, d**-0.5, softcap=softcap,
                              kv_scales=scales)
        got = run(plan, gpu, q, layer, softcap=softcap)
        want = run(plain, gpu, q, layer, softcap=softcap)
        assert rel_err(got, ref) < TOL[dtype], (layer, softcap)
        assert rel_err(got, want) < TOL[dtype], (layer, softcap)
    # a sliding window is not cascaded: the plan runs its plain launches, then the cascade again
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5, window=3 * bs, kv_scales=scales)
    assert rel_err(run(plan, gpu, q, 1, window=3 * bs), ref) < TOL[dtype]
    ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, d**-0.5, kv_scales=scales)
    assert rel_err(run(plan, gpu, q, 0), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("kv_dtype,dtype,d,bs,group", CASES)
def test_multi_token_cascade_matches_twin_and_plain_plan(kv_dtype, dtype, d, bs, group):
    if kv_dtype and not FP8_OK:
        pytest.skip("FP8 pools need compute capability 8.9 or later")
    rng = np.random.default_rng(seed(kv_dtype, dtype, d, bs, group, "multi cascade"))
    qlens = rng.integers(1, 41, 14).astype(np.int32)
    qlens[[2, 9]] = 1  # decode rows in a multi-token step
    check_case(kv_dtype, dtype, d, bs, group, qlens, 2, rng)


@pytest.mark.parametrize("kv_dtype,dtype,d,bs,group", CASES[:2] + CASES[5:7])
def test_long_prefix_in_chunks(kv_dtype, dtype, d, bs, group):
    """One level of 2,048 shared positions: the segment is cut into chunks (slots of their own)."""
    if kv_dtype and not FP8_OK:
        pytest.skip("FP8 pools need compute capability 8.9 or later")
    rng = np.random.default_rng(seed(kv_dtype, dtype, d, bs, group, "chunks"))
    check_case(kv_dtype, dtype, d, bs, group, rng.integers(1, 9, 6).astype(np.int32), 1, rng)


@pytest.mark.parametrize("kv_dtype,dtype,d,bs,group", CASES[5:])
def test_fp8_decode_cascade_matches_twin(kv_dtype, dtype, d, bs, group):
    """FP8 pools cascade in decode steps too (split-K of the own parts)."""
    if kv_dtype is None:
        pytest.skip("a 16-bit pool's decode cascade: test_gpu_cascade.py")
    if not FP8_OK:
        pytest.skip("FP8 pools need compute capability 8.9 or later")
    rng = np.random.default_rng(seed(kv_dtype, dtype, d, bs, group, "fp8 decode cascade"))
    qlens = np.ones(12, np.int32)
    groups, seq_lens = layout(rng, bs, qlens)
    spec = spec_for(kv_dtype, dtype, d, bs, seq_lens, rng)
    gpu, cpu = make_pair(spec, rng)
    tables = tables_for(rng, spec, groups, seq_lens)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((12, hq, d), dtype=np.float32).astype(spec.np_dtype)
    for splits in (None, 3):
        plan = make_plan(gpu, tables, seq_lens, qlens, cascade=True, num_q_heads=hq, num_splits=splits)
        assert plan.shared_prefixes is not None and plan.shared_prefixes.levels == 2
        for layer, softcap in ((0, None), (1, 3.0)):
            ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, qlens, d**-0.5, softcap=softcap,
                                  kv_scales=spec.scales)
            assert rel_err(run(plan, gpu, q, layer, softcap=softcap), ref) < TOL[dtype], (splits, layer)
    gpu.close()


def shared_step(nseq, prefix, own, qlen, bs=16):
    """Tables of ``nseq`` sequences sharing ``prefix`` positions, ``own`` more each and ``qlen`` queries."""
    shared_blocks = np.arange(1, prefix // bs + 1, dtype=np.int32)
    own_blocks = -(-(own + qlen) // bs)
    fresh = 1 + prefix // bs + np.arange(nseq * own_blocks, dtype=np.int32).reshape(nseq, own_blocks)
    tables = np.concatenate([np.tile(shared_blocks, (nseq, 1)), fresh], axis=1)
    return tables, np.full(nseq, prefix + own + qlen, np.int32), np.full(nseq, qlen, np.int32)


@pytest.mark.parametrize("kv_dtype", [None, "float8_e4m3"])
def test_the_cascade_is_chosen_when_it_pays(kv_dtype):
    """Multi-token: 64 sequences x 8 query tokens on an 8k shared prefix cascade
    (tiles of 8 used tokens each rereading 8k positions); 8 x 1,024 new tokens on
    a 4k prefix (full tiles either way) and a small step do not. FP8 decode:
    64 sequences on a 2,048-position prefix cascade (264 MB spared a layer at 8
    kv heads x 128 x 1 byte), unless forced off."""
    if kv_dtype and not FP8_OK:
        pytest.skip("FP8 pools need compute capability 8.9 or later")
    spec = PoolSpec(num_layers=1, num_kv_heads=8, head_dim=128, num_blocks=8192 // 16 + 64 * 17 + 16,
                    block_size=16, dtype="bfloat16", kv_dtype=kv_dtype)
    gpu = CupyBackend(spec, 0)
    assert make_plan(gpu, *shared_step(64, 8192, 256, 8), num_q_heads=32).shared_prefixes is not None
    assert make_plan(gpu, *shared_step(8, 4096, 0, 1024), num_q_heads=32).shared_prefixes is None
    assert make_plan(gpu, *shared_step(8, 4096, 0, 1024), num_q_heads=32, cascade=True).shared_prefixes is not None
    assert make_plan(gpu, *shared_step(4, 256, 16, 4), num_q_heads=32).shared_prefixes is None
    if kv_dtype:
        step = shared_step(64, 2048, 100, 1)
        assert make_plan(gpu, *step, num_q_heads=32).shared_prefixes is not None
        assert make_plan(gpu, *step, num_q_heads=32, cascade=False).shared_prefixes is None
    gpu.close()
