"""paged_decode_tc.cu with TMA loads (``KernelConfig.decode_tma``) against the NumPy
twin and against the same kernel with cp.async alone, on the same step: shuffled
block tables, every block no table reads (block 0 among them) and every position
past a sequence's length in its last block poisoned with NaN, outputs too; GQA
groups 1-16, block sizes 8-64, head dims 64-256, float16 / bfloat16, ragged
lengths (1, a block +- 1, long ones), sliding windows whose first position falls
inside a tile, soft caps, split-K, every CTA layout and stage count, and a
decode cascade's own parts (each item read from its own start).
Skips without CuPy, a GPU, or on a GPU older than compute capability 9.0."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_cascade_helpers import poison_tails, poison_unread  # noqa: E402
from gpu_kernel_helpers import TOL, geometry, make_pair, random_tables, rel_err, seed, to_dev, to_host  # noqa: E402

from kvpager import KernelConfig, kernels  # noqa: E402
from kvpager.backends.cupy_decode import TILE, decode_tma  # noqa: E402
from kvpager.backends.cupy_tma import box_rows  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.plan import make_plan  # noqa: E402

pytestmark = pytest.mark.gpu
if kernels.compute_capability(0) < (9, 0):
    pytest.skip("TMA loads need compute capability 9.0 or newer", allow_module_level=True)

TMA = KernelConfig(decode_tma=True)
CP_ASYNC = KernelConfig(decode_tma=False)

CASES = [  # (dtype, head dim, block size, GQA group, knobs beyond decode_tma)
    ("bfloat16", 128, 16, 4, {}),
    ("float16", 128, 8, 1, {}),
    ("bfloat16", 64, 64, 16, {}),
    ("float16", 256, 32, 2, {}),
    ("bfloat16", 128, 16, 8, {"decode_heads_per_cta": 2, "decode_warps_per_head": 1}),
    ("float16", 64, 8, 4, {"decode_heads_per_cta": 2, "decode_warps_per_head": 2}),
    ("bfloat16", 64, 16, 4, {"decode_stages": 2}),
    ("float16", 128, 64, 4, {"decode_stages": 4}),
    ("bfloat16", 128, 32, 16, {"decode_warps_per_head": 8}),
    ("bfloat16", 128, 16, 4, {"decode_l2_prefetch": 0}),
]


def run(plan, gpu, q, layer, **kw):
    out = to_dev(np.full(q.shape, np.nan, dtype=q.dtype), gpu)
    plan.attend(layer, to_dev(q, gpu), out=out, **kw)
    return to_host(out, plan.spec)


def poison(gpu, spec, tables, seq_lens):
    poison_unread(gpu, spec, tables)
    poison_tails(gpu, spec, tables, seq_lens)


def assert_map_made(gpu, spec):
    """The driver encoded the pool's tensor map of decode-tile boxes: the TMA loads ran."""
    assert gpu.tma_maps.get(box_rows(spec.block_size, TILE)) is not None


@pytest.mark.parametrize("splits", [None, 3])
@pytest.mark.parametrize("dtype,d,bs,group,knobs", CASES)
def test_tma_decode_matches_twin_and_cp_async(dtype, d, bs, group, knobs, splits):
    rng = np.random.default_rng(seed(dtype, d, bs, group, sorted(knobs.items()), splits, "decode tma"))
    seq_lens = np.array([1, 15, 16, 17, bs - 1, bs + 1, 100, 257, 1000, 2049, 33], dtype=np.int32)
    seq_lens = np.maximum(seq_lens, 1)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    config = TMA.replace(**knobs)
    assert decode_tma(spec, config, kernels.compute_capability(0))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    poison(gpu, spec, tables, seq_lens)
    hq = spec.num_kv_heads * group
    ones = np.ones(len(seq_lens), np.int32)
    q = rng.standard_normal((len(seq_lens), hq, d), dtype=np.float32).astype(spec.np_dtype)
    new = make_plan(gpu, tables, seq_lens, ones, config=config, num_splits=splits, cascade=False)
    old = make_plan(gpu, tables, seq_lens, ones, config=CP_ASYNC.replace(**knobs), num_splits=splits,
                    cascade=False)
    calls = [(0, {}), (1, {}), (1, {"softcap": 3.0}), (0, {"window": 37}), (1, {"window": 2 * bs + 5}),
             (0, {"window": 100, "softcap": 5.0}), (1, {"window": 1})]
    for layer, kw in calls:
        ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, ones, d**-0.5, **kw)
        got, want = run(new, gpu, q, layer, **kw), run(old, gpu, q, layer, **kw)
        assert rel_err(got, ref) < TOL[dtype], (layer, kw)
        assert rel_err(got, want) < TOL[dtype], (layer, kw)
    assert_map_made(gpu, spec)
    gpu.close()


def test_tma_decode_of_long_contexts_in_many_splits():
    """8 kv heads, contexts of 4,096-16,400 positions split 1-8 ways (the benchmark's shapes, smaller)."""
    rng = np.random.default_rng(seed("decode tma long"))
    seq_lens = np.array([4096, 16400, 5000, 7777], dtype=np.int32)
    spec = geometry("bfloat16", 128, 16, int((-(-seq_lens // 16)).sum() * 16), kv_heads=8)
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    poison(gpu, spec, tables, seq_lens)
    ones = np.ones(len(seq_lens), np.int32)
    q = rng.standard_normal((len(seq_lens), 32, 128), dtype=np.float32).astype(spec.np_dtype)
    for splits in (None, 1, 8):
        plan = make_plan(gpu, tables, seq_lens, ones, config=TMA, num_splits=splits, cascade=False)
        for layer in (0, 1):
            ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, ones, 128**-0.5)
            assert rel_err(run(plan, gpu, q, layer), ref) < TOL["bfloat16"], (splits, layer)
    assert_map_made(gpu, spec)
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group", [("bfloat16", 128, 16, 4), ("float16", 64, 8, 1),
                                              ("bfloat16", 128, 64, 16), ("float16", 128, 32, 8)])
def test_tma_decode_cascade_own_parts(dtype, d, bs, group):
    """Over shared prefixes the decode kernel reads each item's own positions (own_start):
    with TMA, equal to the twin and to the cp.async plan."""
    from gpu_cascade_helpers import layout, spec_for, tables_for
    from gpu_cascade_helpers import make_pair as cascade_pair

    rng = np.random.default_rng(seed(dtype, d, bs, group, "decode tma cascade"))
    ones = np.ones(24, np.int32)
    groups, seq_lens = layout(rng, bs, ones, 2)
    spec = spec_for(None, dtype, d, bs, seq_lens, rng)
    gpu, cpu = cascade_pair(spec, rng)
    tables = tables_for(rng, spec, groups, seq_lens)
    poison(gpu, spec, tables, seq_lens)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((len(seq_lens), hq, d), dtype=np.float32).astype(spec.np_dtype)
    new = make_plan(gpu, tables, seq_lens, ones, cascade=True, num_q_heads=hq, config=TMA)
    old = make_plan(gpu, tables, seq_lens, ones, cascade=True, num_q_heads=hq, config=CP_ASYNC)
    assert new.shared_prefixes is not None and new.shared_prefixes.levels == 2
    for layer, softcap in ((0, None), (1, 3.0)):
        ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, ones, d**-0.5, softcap=softcap)
        got, want = run(new, gpu, q, layer, softcap=softcap), run(old, gpu, q, layer, softcap=softcap)
        assert rel_err(got, ref) < TOL[dtype], (layer, softcap)
        assert rel_err(got, want) < TOL[dtype], (layer, softcap)
    assert_map_made(gpu, spec)
    gpu.close()
