"""Attention sinks in the CUDA kernels against the NumPy twin: decode on
tensor cores and CUDA cores, unsplit (the merge then runs over one partial
slot) and split; multi-token (the Hopper and the portable kernels); decode
and multi-token cascades over shared prefixes; the warp and the CTA merge;
with windows and soft caps; a captured step replayed. Outputs are poisoned
(NaN) before each launch. Skips without CuPy or a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_cascade_helpers import layout, run, spec_for, tables_for  # noqa: E402
from gpu_cascade_helpers import make_pair as cascade_pair  # noqa: E402
from gpu_kernel_helpers import (  # noqa: E402
    TOL,
    geometry,
    make_pair,
    random_tables,
    rel_err,
    seed,
    to_dev,
    to_host,
)
from test_gpu_cascade import decode_case  # noqa: E402

from kvpager import InvalidArgument, KernelConfig, kernels  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.plan import make_plan  # noqa: E402

pytestmark = pytest.mark.gpu

CASES = [
    ("bfloat16", 128, 16, 4),
    ("float16", 64, 8, 8),
    ("bfloat16", 64, 32, 16),
    ("float16", 256, 16, 2),
    ("float32", 128, 16, 4),
    ("float32", 96, 64, 1),
]


def sinks_for(hq: int) -> np.ndarray:
    """From far below the scores to far above them (the last heads' sinks take most of each softmax)."""
    return np.linspace(-4.0, 8.0, hq).astype(np.float32)


def nan_out(shape, spec, be):
    return to_dev(np.full(shape, np.nan, dtype=spec.np_dtype), be)


@pytest.mark.parametrize("dtype,d,bs,group", CASES)
def test_decode_sinks_match_numpy(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "sinks"))
    seq_lens = np.array([1, bs - 1, bs + 1, 3 * bs + 5, 517, 2100], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    hq = spec.num_kv_heads * group
    sinks = sinks_for(hq)
    q = (2 * rng.standard_normal((len(seq_lens), hq, d), dtype=np.float32)).astype(spec.np_dtype)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    scale = d**-0.5
    for config in (None, KernelConfig(merge_warp_max_parts=0, merge_warp_min_rows=0),
                   KernelConfig(merge_warp_max_parts=1024, merge_warp_min_rows=0)):
        gpu, cpu = make_pair(spec, rng, config)
        tables = random_tables(rng, spec, seq_lens)
        plain = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale)
        for window, softcap in ((None, None), (40, None), (None, 2.0)):
            ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap,
                                  sinks=sinks)
            assert rel_err(ref, plain) > 10 * TOL[dtype]  # the sinks change the result
            for splits in (None, 1, 3):
                out = nan_out(q.shape, spec, gpu)
                gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, num_splits=splits,
                           window=window, softcap=softcap, sinks=cupy.asarray(sinks))
                err = rel_err(to_host(out, spec), ref)
                assert err < TOL[dtype], f"{config} window={window} softcap={softcap} num_splits={splits}: {err}"
            # the same plan without sinks afterwards: none are left behind in the merge
            out = nan_out(q.shape, spec, gpu)
            gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, num_splits=3, window=window,
                       softcap=softcap)
            want = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap)
            assert rel_err(to_host(out, spec), want) < TOL[dtype]
        gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group", CASES)
def test_multi_token_sinks_match_numpy(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "sinks-mt"))
    seq_lens = np.array([5, bs + 3, 300, 700, 77, 1], dtype=np.int32)
    qlens = np.array([5, 2, 170, 33, 1, 1], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    sinks = sinks_for(hq)
    q = (2 * rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32)).astype(spec.np_dtype)
    scale = d**-0.5
    plan = gpu.plan(tables, seq_lens, qlens, None)
    for window, softcap in ((None, None), (64, None), (None, 2.0), (None, None)):
        ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap,
                              sinks=sinks)
        out = nan_out(q.shape, spec, gpu)
        plan.attend(0, to_dev(q, gpu), scale, out, window=window, softcap=softcap, sinks=cupy.asarray(sinks))
        assert rel_err(to_host(out, spec), ref) < TOL[dtype], (window, softcap)
        out = nan_out(q.shape, spec, gpu)  # and the plain launches of the same plan after it
        plan.attend(0, to_dev(q, gpu), scale, out, window=window, softcap=softcap)
        want = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap)
        assert rel_err(to_host(out, spec), want) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group", [("bfloat16", 128, 16, 4), ("float16", 64, 16, 8)])
def test_cascade_sinks_match_numpy(dtype, d, bs, group):
    """A decode cascade (two levels of sharing) and a multi-token one, with sinks."""
    pool, ids, tables, lens, kv, hq, q = decode_case(dtype, d, bs, group, "sinks-cascade")
    spec, sinks = pool.spec, sinks_for(hq)
    ones = np.ones(len(ids), np.int32)
    for splits in (None, 3):
        plan = pool.plan(ids, cascade=True, num_splits=splits, num_q_heads=hq)
        assert plan.shared_prefixes is not None
        for layer, window in ((0, None), (1, 3 * bs)):
            ref = paged_attention(kv, layer, q, tables, lens, ones, d**-0.5, window=window, sinks=sinks)
            got = nan_out(q.shape, spec, pool.backend)
            plan.attend(layer, to_dev(q, pool.backend), out=got, window=window, sinks=cupy.asarray(sinks))
            assert rel_err(to_host(got, spec), ref) < TOL[dtype], (splits, layer, window)
    pool.close()


@pytest.mark.parametrize("kv_dtype,dtype,d,bs,group", [(None, "bfloat16", 128, 16, 4), (None, "float16", 64, 8, 8),
                                                       ("float8_e4m3", "bfloat16", 128, 16, 4)])
def test_multi_token_cascade_sinks_match_numpy(kv_dtype, dtype, d, bs, group):
    if kv_dtype and kernels.compute_capability(0) < (8, 9):
        pytest.skip("FP8 pools need compute capability 8.9 or later")
    rng = np.random.default_rng(seed(kv_dtype, dtype, d, bs, group, "sinks multi cascade"))
    qlens = rng.integers(1, 41, 14).astype(np.int32)
    qlens[[2, 9]] = 1
    groups, seq_lens = layout(rng, bs, qlens, 2)
    spec = spec_for(kv_dtype, dtype, d, bs, seq_lens, rng)
    gpu, cpu = cascade_pair(spec, rng)
    tables = tables_for(rng, spec, groups, seq_lens)
    hq = spec.num_kv_heads * group
    sinks = sinks_for(hq)
    q = rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
    scales = spec.scales if spec.is_fp8 else None
    plan = make_plan(gpu, tables, seq_lens, qlens, cascade=True, num_q_heads=hq)
    assert plan.shared_prefixes is not None
    for layer, softcap in ((0, None), (1, 3.0)):
        ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, qlens, d**-0.5, softcap=softcap,
                              kv_scales=scales, sinks=sinks)
        assert rel_err(run(plan, gpu, q, layer, softcap=softcap, sinks=cupy.asarray(sinks)), ref) < TOL[dtype]
        # the same launches without sinks next: the merge's sinks are cleared
        ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, qlens, d**-0.5, softcap=softcap, kv_scales=scales)
        assert rel_err(run(plan, gpu, q, layer, softcap=softcap), ref) < TOL[dtype]
    gpu.close()


def test_sinks_of_any_float_kind_and_bad_sinks():
    """float32 CUDA tensors go as they are; torch bfloat16, CPU tensors and NumPy
    arrays are copied; the wrong shape, an integer dtype or another GPU's tensor
    are refused before anything is launched."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    spec = geometry("bfloat16", 64, 16, 64 * 16)
    gpu, cpu = make_pair(spec, rng)
    seq_lens = np.array([40, 300], np.int32)
    qlens = np.ones(2, np.int32)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * 4
    sinks = sinks_for(hq)
    q = rng.standard_normal((2, hq, 64), dtype=np.float32).astype(spec.np_dtype)
    ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, 0.125, sinks=sinks)
    for given in (torch.from_numpy(sinks).cuda(), torch.from_numpy(sinks), sinks, sinks.astype(np.float64)):
        out = nan_out(q.shape, spec, gpu)
        gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, 0.125, out=out, sinks=given)
        assert rel_err(to_host(out, spec), ref) < TOL["bfloat16"], type(given)
    low = torch.from_numpy(sinks).to(torch.bfloat16).cuda()
    out = nan_out(q.shape, spec, gpu)
    gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, 0.125, out=out, sinks=low)
    want = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, 0.125, sinks=low.float().cpu().numpy())
    assert rel_err(to_host(out, spec), want) < TOL["bfloat16"]
    for bad in (sinks[:3], sinks.reshape(-1, 1), sinks.astype(np.int32), "x"):
        out = nan_out(q.shape, spec, gpu)
        with pytest.raises(InvalidArgument, match="sinks"):
            gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, 0.125, out=out, sinks=bad)
        assert np.isnan(to_host(out, spec)).all()  # nothing ran
    gpu.close()


def test_captured_decode_with_sinks_replays():
    """A decode plan's attention with sinks, captured in a CUDA graph and
    replayed after the plan is refilled with longer sequences."""
    torch = pytest.importorskip("torch")
    from kvpager import KVPool
    from kvpager.spec import PoolSpec

    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=64, num_blocks=256, block_size=16, dtype="bfloat16")
    pool = KVPool(spec, device="cuda:0")
    rng = np.random.default_rng(12)
    allocs = pool.allocate([rng.integers(0, 1000, n).tolist() for n in (90, 300, 41)])
    ids = [a.seq_id for a in allocs]
    pool.backend.kv[...] = to_dev(rng.standard_normal(pool.backend.kv.shape, dtype=np.float32)
                                  .astype(spec.np_dtype), pool.backend)
    sinks = torch.from_numpy(sinks_for(8)).cuda()
    q = torch.randn(3, 8, 64, device="cuda").to(torch.bfloat16)
    plan = pool.plan(ids, num_rows=4, width=32, num_q_heads=8)
    out = torch.empty(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    qq = torch.zeros(4, 8, 64, device="cuda", dtype=torch.bfloat16)
    qq[:3] = q
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        plan.attend(0, qq, out=out, sinks=sinks)  # warm-up: launches built
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.attend(0, qq, out=out, sinks=sinks)
    pool.append(ids, 50)
    tables, lens = pool.tables(ids)
    plan.update(tables, lens)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    kv = to_host(pool.backend.kv, spec)
    ref = paged_attention(kv, 0, q.float().cpu().numpy().astype(spec.np_dtype), tables, lens,
                          np.ones(3, np.int32), 0.125, sinks=sinks.cpu().numpy())
    assert rel_err(out[:3].float().cpu().numpy(), ref) < TOL["bfloat16"]
    pool.close()
