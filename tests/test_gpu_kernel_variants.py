"""The kernels' tuning knobs (`KernelConfig`) against the NumPy reference: decode
stages, L2 prefetch, CUDA-core rows, heads per CTA and warps per head (and the
planner's choice of them), multi-token m-tiles per warp, the block copy's unroll.

Outputs are poisoned (NaN) before the kernel runs. Skips without CuPy or a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_kernel_helpers import (  # noqa: E402
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
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,knobs,splits", [
    ("bfloat16", {"decode_stages": 2}, 3),
    ("bfloat16", {"decode_stages": 4}, 40),    # more splits than the merge has split lanes
    ("bfloat16", {"decode_l2_prefetch": 0}, 2),
    ("bfloat16", {"decode_l2_prefetch": 256}, None),
    ("bfloat16", {"decode_l2_evict_first": False}, 2),
    ("bfloat16", {"decode_l2_evict_first": False, "decode_l2_prefetch": 0}, None),
    ("float32", {"decode_rows": 1}, 3),        # the CUDA-core kernel's rows per iteration
    ("float32", {"decode_rows": 8}, None),
])
def test_decode_variants_match_reference(dtype, knobs, splits):
    d, bs, group = 128, 16, 8
    rng = np.random.default_rng(seed(dtype, knobs, splits))
    seq_lens = np.array([1, 17, 640, 2500], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)  # the plan's config, not the backend's
    tables = random_tables(rng, spec, seq_lens)
    q = rng.standard_normal((len(seq_lens), 2 * group, d), dtype=np.float32).astype(spec.np_dtype)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, d**-0.5, out=out, num_splits=splits,
               config=KernelConfig(**knobs))
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group,hpc,wph,splits", [
    ("bfloat16", 128, 16, 4, 4, 1, None),  # 4 heads per CTA, one warp each (short contexts)
    ("bfloat16", 128, 16, 4, 8, 1, 5),     # 8 heads per CTA, split
    ("bfloat16", 128, 16, 4, 2, 4, 3),     # 2 heads x 4 warps
    ("float16", 64, 8, 16, 4, 1, 3),       # blocks of 8 tokens, two m rows of heads
    ("float16", 256, 32, 2, 8, 1, 2),      # head dim 256: fewer heads per CTA fit
    ("bfloat16", 96, 64, 1, 4, 2, 1),
])
def test_decode_layouts_match_reference(dtype, d, bs, group, hpc, wph, splits):
    """Heads per CTA and warps per head, over 8 kv heads."""
    rng = np.random.default_rng(seed(dtype, d, bs, group, hpc, wph, splits))
    seq_lens = np.array([1, bs + 1, 300, 1700, 2049], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), kv_heads=8)
    gpu, cpu = make_pair(spec, rng, KernelConfig(decode_heads_per_cta=hpc, decode_warps_per_head=wph))
    tables = random_tables(rng, spec, seq_lens)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    q = rng.standard_normal((len(seq_lens), 8 * group, d), dtype=np.float32).astype(spec.np_dtype)
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, d**-0.5, out=out, num_splits=splits)
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


def test_decode_short_contexts_take_four_heads_per_cta():
    """The planner's layout choice: 4 heads per CTA only for short contexts with CTAs to spare."""
    from kvpager.backends.cupy_decode import decode_layout

    c = KernelConfig()
    assert decode_layout(8, 128, 2, 64, 256, 132, c) == (4, 1)
    assert decode_layout(8, 128, 2, 64, 4096, 132, c) == (1, 4)
    assert decode_layout(8, 128, 2, 8, 256, 132, c) == (1, 4)
    assert decode_layout(2, 128, 2, 512, 100, 132, c) == (2, 1)


@pytest.mark.parametrize("dtype,d,bs,group", [("float16", 128, 16, 4), ("bfloat16", 64, 8, 16)])
def test_multi_token_one_mtile_per_warp(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "mt1"))
    seq_lens = np.array([300, 77, 129], dtype=np.int32)
    qlens = np.array([70, 77, 1], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng, KernelConfig(prefill_mt=1))
    tables = random_tables(rng, spec, seq_lens)
    q = rng.standard_normal((int(qlens.sum()), spec.num_kv_heads * group, d),
                            dtype=np.float32).astype(spec.np_dtype)
    ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, d**-0.5)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, d**-0.5, out=out)
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("unroll", [16, 4, 1])
def test_copy_launch_shapes_match_reference(unroll):
    rng = np.random.default_rng(unroll)
    spec = PoolSpec(num_layers=3, num_kv_heads=2, head_dim=128, num_blocks=64, block_size=16,
                    dtype="bfloat16", num_host_blocks=4)  # 3 x 1024 vectors a block: partial chunks
    gpu, cpu = make_pair(spec, rng, KernelConfig(copy_unroll=unroll))
    ids = rng.permutation(np.arange(1, 64))
    pairs = np.stack([ids[:30], ids[30:60]], axis=1).astype(np.int64)
    cpu.copy_blocks(pairs)
    gpu.copy_blocks(pairs)
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group,splits,window", [
    ("bfloat16", 128, 16, 4, 7, None),
    ("bfloat16", 128, 16, 8, 40, None),   # more splits than some items have tiles
    ("float16", 64, 8, 16, 3, None),      # two blocks a tile, a full m tile of heads
    ("bfloat16", 96, 32, 1, 5, 700),      # padded rows, no GQA, a sliding window
    ("float16", 256, 64, 2, 9, None),
])
def test_split_decode_merges_in_its_last_cta(dtype, d, bs, group, splits, window):
    """A split decode that merges its partials in the kernel (`KernelConfig.decode_merge_fused_splits`:
    one launch, no merge kernel) against the NumPy twin on ragged contexts, three calls in a
    row on one plan (each call's count is back at zero after it, else the next call's CTAs
    would never find their last, and its output would stay poisoned); the same plan with the
    merge kernel agrees."""
    from kvpager.plan import make_plan

    rng = np.random.default_rng(seed("fused", dtype, d, bs, group, splits, window))
    seq_lens = np.array([1, 17, 640, 2500, 5003, 48, 4096], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), kv_heads=4)
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    nq = 4 * group
    for fused in (True, False):
        plan = make_plan(gpu, tables, seq_lens, qlens, num_q_heads=nq, num_splits=splits,
                         config=KernelConfig(decode_merge_fused_splits=1024 if fused else 0))
        for _ in range(3):
            q = rng.standard_normal((len(seq_lens), nq, d), dtype=np.float32).astype(spec.np_dtype)
            ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5, window=window)
            out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
            plan.attend(1, to_dev(q, gpu), d**-0.5, out, window=window)
            assert rel_err(to_host(out, spec), ref) < TOL[dtype], fused
        assert len(plan._attn[nq]) == (1 if fused else 2)
        counts = [a for a in plan._keep if isinstance(a, cupy.ndarray) and a.dtype == cupy.int32
                  and a.size == len(seq_lens) * spec.num_kv_heads]
        assert len(counts) == (1 if fused else 0)
        if fused:
            assert not counts[0].any()
    gpu.close()


def test_the_planner_merges_few_splits_in_the_kernel():
    """By default a split decode of up to `KernelConfig.decode_merge_fused_splits` splits is
    one launch, and one of more splits is followed by the merge launch; both match the twin."""
    from kvpager.plan import make_plan

    rng = np.random.default_rng(seed("fused-planner"))
    seq_lens = np.array([3000, 1, 2049], dtype=np.int32)
    spec = geometry("bfloat16", 128, 16, int((-(-seq_lens // 16)).sum() * 16), kv_heads=8)
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    limit = KernelConfig().decode_merge_fused_splits
    for splits, launches in ((limit, 1), (limit + 1, 2)):
        plan = make_plan(gpu, tables, seq_lens, qlens, num_q_heads=32, num_splits=splits)
        q = rng.standard_normal((3, 32, 128), dtype=np.float32).astype(spec.np_dtype)
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        plan.attend(1, to_dev(q, gpu), 128**-0.5, out)
        ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, 128**-0.5)
        assert rel_err(to_host(out, spec), ref) < TOL["bfloat16"]
        assert plan.splits == splits and len(plan._attn[32]) == launches
    gpu.close()


@pytest.mark.parametrize("pdl", [True, False])
def test_split_decode_merge_launched_programmatically(pdl):
    """A split decode's merge launch, programmatic on compute capability 9.0 and later
    (`KernelConfig.decode_merge_pdl`), against the NumPy twin: eager, then captured in a
    CUDA graph and replayed with new queries (the graph keeps the programmatic edge)."""
    torch = pytest.importorskip("torch")
    from kvpager import kernels
    from kvpager.plan import make_plan

    rng = np.random.default_rng(seed("pdl", pdl))
    seq_lens = np.array([3000, 1, 2049], dtype=np.int32)
    spec = geometry("bfloat16", 128, 16, int((-(-seq_lens // 16)).sum() * 16), kv_heads=8)
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    plan = make_plan(gpu, tables, seq_lens, qlens, num_q_heads=32, num_splits=7,
                     config=KernelConfig(decode_merge_pdl=pdl, decode_merge_fused_splits=0))
    q = torch.zeros(3, 32, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.full_like(q, float("nan"))

    def check():
        ref = paged_attention(cpu.kv, 1, q.float().cpu().numpy().astype(spec.np_dtype), tables, seq_lens,
                              qlens, 128**-0.5)
        assert rel_err(out.float().cpu().numpy(), ref) < TOL["bfloat16"]

    q.copy_(torch.randn(3, 32, 128, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        plan.attend(1, q, out=out)  # eager (and the launches built)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    check()
    merge = plan._attn[32][-1]
    assert merge.programmatic == (pdl and kernels.compute_capability(0) >= (9, 0))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.attend(1, q, out=out)
    for _ in range(3):
        q.copy_(torch.randn(3, 32, 128, device="cuda"))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check()
    gpu.close()
