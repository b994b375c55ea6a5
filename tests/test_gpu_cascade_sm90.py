"""The cascade's shared part on wgmma (cascade_prefix_sm90.cu, sm_90a) against the
NumPy twin and against the same step cascaded on mma.sync (cascade_prefix.cu):
multi-token steps (ragged query lengths 1-40, decode rows among them) and decode
steps (split-K of the own parts), two levels of sharing whose second segment
starts off every K/V tile boundary, one long level cut into chunks, GQA 1-16,
block sizes 8-64, head dims 64 / 128, float16 / bfloat16, every variant of the
kernel (producer warpgroup, overlap, one warpgroup, 128-position tiles), soft
caps; outputs and every block no table reads (the null block 0 included)
poisoned with NaN, and the positions past each sequence's end in its last block
too (the producer's TMA loads, the default, fetch whole blocks inside a
segment). Then which kernel the planner runs (wgmma by default on 16-bit pools
of head dim 64 / 128; FP8 pools and other head dims: cascade_prefix.cu).
Skips without CuPy, a GPU, or on a GPU other than compute capability 9.0."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_cascade_helpers import (  # noqa: E402
    layout,
    make_pair,
    poison_tails,
    poison_unread,
    run,
    spec_for,
    tables_for,
)
from gpu_kernel_helpers import TOL, rel_err, seed  # noqa: E402

from kvpager import KernelConfig, kernels  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.plan import make_plan  # noqa: E402

pytestmark = pytest.mark.gpu
if kernels.compute_capability(0) != (9, 0):
    pytest.skip("the wgmma kernels run on compute capability 9.0 only", allow_module_level=True)

MMA = KernelConfig(prefill_kernel="mma")
SM90, OLD = "cascade_prefix_sm90.cu", "cascade_prefix.cu"

CASES = [  # (dtype, head dim, block size, GQA group, knobs beyond prefill_kernel="wgmma")
    ("bfloat16", 128, 16, 4, {}),  # the production variant: a producer warpgroup
    ("float16", 64, 8, 1, {}),
    ("bfloat16", 128, 64, 16, {}),
    ("float16", 128, 32, 8, {"prefill_wgmma_producer": False}),
    ("bfloat16", 64, 16, 2, {"prefill_wgmma_overlap": True}),
    ("float16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True,
                              "prefill_wgmma_bn": 128, "prefill_wgmma_stages": 3}),
    ("bfloat16", 128, 8, 8, {"prefill_wgmma_warpgroups": 1}),
    ("float16", 64, 64, 16, {"prefill_wgmma_warpgroups": 1, "prefill_wgmma_bn": 64, "prefill_wgmma_stages": 4}),
    ("bfloat16", 128, 16, 1, {"prefill_wgmma_bn": 128}),
    # head dim 256: 64-position tiles in 2 stages, O += P V as four m64n64 products
    ("bfloat16", 256, 16, 2, {}),
    ("float16", 256, 32, 8, {"prefill_wgmma_producer": False}),
    # groups not a power of two: the tile's last rows past its whole members pad
    ("bfloat16", 128, 16, 7, {}),
    ("float16", 64, 16, 12, {"prefill_wgmma_warpgroups": 1}),
    ("bfloat16", 128, 32, 6, {"prefill_wgmma_producer": False, "prefill_wgmma_overlap": True}),
    ("float16", 64, 16, 71, {}),
]


def files(plan) -> set[str]:
    """The shared-prefix kernels ``plan``'s launches run (after its first attend)."""
    return {c.kernel.file for c in plan._cascades}


def check(dtype, d, bs, group, knobs, qlens, levels, prefix, rng, splits=(None,)):
    groups, seq_lens = layout(rng, bs, qlens, levels, prefix)
    spec = spec_for(None, dtype, d, bs, seq_lens, rng)
    gpu, cpu = make_pair(spec, rng)
    tables = tables_for(rng, spec, groups, seq_lens)
    poison_unread(gpu, spec, tables)
    poison_tails(gpu, spec, tables, seq_lens)  # a block's positions past a sequence's end: never read
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
    config = KernelConfig(prefill_kernel="wgmma", **knobs)
    for sp in splits:
        opts = {} if sp is None else {"num_splits": sp}
        new = make_plan(gpu, tables, seq_lens, qlens, cascade=True, num_q_heads=hq, config=config, **opts)
        old = make_plan(gpu, tables, seq_lens, qlens, cascade=True, num_q_heads=hq, config=MMA, **opts)
        assert new.shared_prefixes is not None and new.shared_prefixes.levels == levels
        for layer, softcap in ((0, None), (1, None), (1, 3.0)):
            ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, qlens, d**-0.5, softcap=softcap)
            got, want = run(new, gpu, q, layer, softcap=softcap), run(old, gpu, q, layer, softcap=softcap)
            assert rel_err(got, ref) < TOL[dtype], (sp, layer, softcap)
            assert rel_err(got, want) < TOL[dtype], (sp, layer, softcap)
        assert (files(new), files(old)) == ({SM90}, {OLD})
        tma = {bool(c.kernel.defines.get("TMA")) for c in new._cascades}
        if not knobs:  # the production variant: a producer warpgroup with its TMA loads
            assert tma == {True}
        if True in tma:  # the driver encoded the pool's tensor map: the shared part's TMA loads ran
            assert all(c.kv_map is not None for c in new._cascades)
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group,knobs", CASES)
def test_multi_token_cascade_on_wgmma(dtype, d, bs, group, knobs):
    """Two levels: 37 blocks shared by most sequences (its end, and the second level's
    start, off every tile boundary), three more by a few, another group, loners."""
    rng = np.random.default_rng(seed(dtype, d, bs, group, sorted(knobs.items()), "sm90 cascade multi"))
    qlens = rng.integers(1, 41, 14).astype(np.int32)
    qlens[[2, 9]] = 1  # decode rows in a multi-token step
    check(dtype, d, bs, group, knobs, qlens, 2, 37 * bs, rng)


@pytest.mark.parametrize("dtype,d,bs,group,knobs", CASES)
def test_decode_cascade_on_wgmma(dtype, d, bs, group, knobs):
    """Decode rows (one member row each), with and without split-K of the own parts."""
    rng = np.random.default_rng(seed(dtype, d, bs, group, sorted(knobs.items()), "sm90 cascade decode"))
    check(dtype, d, bs, group, knobs, np.ones(20, np.int32), 2, 37 * bs, rng, splits=(None, 3))


@pytest.mark.parametrize("dtype,d,bs,group,knobs", [CASES[0], CASES[1], CASES[4], CASES[6], CASES[8], CASES[10]])
def test_long_prefix_in_chunks_on_wgmma(dtype, d, bs, group, knobs):
    """One level of 2,048 + 3 blocks shared positions: chunks (slots of their own), the last one ragged."""
    rng = np.random.default_rng(seed(dtype, d, bs, group, sorted(knobs.items()), "sm90 cascade chunks"))
    check(dtype, d, bs, group, knobs, rng.integers(1, 9, 6).astype(np.int32), 1, 2048 + 3 * bs, rng)


@pytest.mark.parametrize("kv_dtype,d,want", [(None, 128, SM90), (None, 64, SM90), ("float8_e4m3", 128, OLD),
                                             (None, 256, SM90), (None, 96, OLD)])
def test_the_planner_runs_wgmma_where_it_applies(kv_dtype, d, want):
    """The production config on this GPU: cascade_prefix_sm90.cu for 16-bit pools of head
    dim 64 / 128 / 256, cascade_prefix.cu for FP8 pools and other head dims; both right."""
    rng = np.random.default_rng(seed(kv_dtype, d, "sm90 cascade choice"))
    qlens = np.ones(10, np.int32)
    groups, seq_lens = layout(rng, 16, qlens, 2, 37 * 16)
    spec = spec_for(kv_dtype, "bfloat16", d, 16, seq_lens, rng)
    gpu, cpu = make_pair(spec, rng)
    tables = tables_for(rng, spec, groups, seq_lens)
    q = rng.standard_normal((10, 8, d), dtype=np.float32).astype(spec.np_dtype)
    plan = make_plan(gpu, tables, seq_lens, qlens, cascade=True, num_q_heads=8)
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5, kv_scales=spec.scales if kv_dtype else None)
    assert rel_err(run(plan, gpu, q, 1), ref) < TOL["bfloat16"]
    assert files(plan) == {want}
    gpu.close()
