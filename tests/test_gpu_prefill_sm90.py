"""paged_prefill_sm90.cu (wgmma, sm_90a) against the NumPy twin and against
paged_prefill.cu (mma.sync) on the same step: shuffled block tables, outputs
and every block no table reads (the null block 0 included) poisoned with NaN,
GQA groups 1-16, block sizes 8-64, head dims 64, 128 and 256, float16 / bfloat16,
every tiling knob, ragged query and sequence lengths (query length 1, lengths
off every tile size, a query tile shorter than a block), sliding windows, soft
caps, a cascade's own parts (own_start and partial states) and a long step;
each variant of the kernel (overlap, producer warpgroup, its TMA loads of whole
blocks or its cp.async copies alone, its persistent grid with a few CTAs walking
many items, or a CTA a tile) among them. With TMA the positions past
each sequence's length in its last block are NaN too.
Skips without CuPy, a GPU, or on a GPU other than compute capability 9.0."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_cascade_helpers import poison_tails, poison_unread  # noqa: E402
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

from kvpager import KernelConfig, kernel_build, kernels  # noqa: E402
from kvpager.backends.cupy_prefill import prefill_kernel  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.errors import UnsupportedConfiguration  # noqa: E402
from kvpager.plan import make_plan  # noqa: E402

pytestmark = pytest.mark.gpu
if kernels.compute_capability(0) != (9, 0):
    pytest.skip("the wgmma kernel runs on compute capability 9.0 only", allow_module_level=True)

WGMMA = KernelConfig(prefill_kernel="wgmma", prefill_wgmma_producer=False)  # the variants below add it
MMA = KernelConfig(prefill_kernel="mma")

CASES = [  # (dtype, head dim, block size, GQA group, knobs beyond prefill_kernel="wgmma")
    ("bfloat16", 128, 16, 4, {}),
    ("float16", 128, 8, 1, {}),
    ("bfloat16", 64, 64, 16, {}),
    ("float16", 64, 16, 8, {}),
    ("bfloat16", 128, 32, 2, {"prefill_wgmma_bn": 128}),
    ("bfloat16", 128, 64, 8, {"prefill_wgmma_warpgroups": 1}),
    ("float16", 128, 16, 16, {"prefill_wgmma_warpgroups": 1, "prefill_wgmma_bn": 128}),
    ("bfloat16", 64, 8, 4, {"prefill_wgmma_bn": 64, "prefill_wgmma_stages": 4}),
    ("float16", 128, 16, 4, {"prefill_wgmma_stages": 2}),
    ("bfloat16", 64, 16, 1, {"prefill_wgmma_warpgroups": 1, "prefill_wgmma_stages": 3}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_overlap": True}),
    ("float16", 64, 8, 16, {"prefill_wgmma_overlap": True}),
    ("bfloat16", 128, 64, 1, {"prefill_wgmma_overlap": True, "prefill_wgmma_warpgroups": 1,
                              "prefill_wgmma_bn": 128}),
    ("float16", 128, 32, 8, {"prefill_wgmma_overlap": True, "prefill_wgmma_stages": 4}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True}),
    ("float16", 64, 64, 1, {"prefill_wgmma_producer": True}),
    ("bfloat16", 128, 8, 16, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True}),
    ("float16", 64, 16, 2, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True}),
    ("bfloat16", 128, 32, 8, {"prefill_wgmma_producer": True, "prefill_wgmma_bn": 128, "prefill_wgmma_stages": 3}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True,
                              "prefill_wgmma_bn": 128, "prefill_wgmma_stages": 3}),
    ("float16", 128, 64, 8, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True,
                             "prefill_wgmma_bn": 128, "prefill_wgmma_stages": 3}),
    ("bfloat16", 64, 8, 2, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True,
                            "prefill_wgmma_stages": 4}),
    ("float16", 128, 16, 16, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True,
                              "prefill_wgmma_pingpong": False, "prefill_wgmma_bn": 128}),
    # the producer's loads: TMA where a tile is all visible (the default), or cp.async alone
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_tma": False}),
    ("float16", 128, 8, 8, {"prefill_wgmma_producer": True, "prefill_wgmma_bn": 128, "prefill_wgmma_stages": 3}),
    ("bfloat16", 64, 32, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_tma": False}),
    # the producer's persistent grid (the default with it): few CTAs, so each walks many items
    # (query tiles of both kv heads, windows and all), with TMA and with cp.async alone; and off
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_ctas": 3}),
    ("float16", 64, 8, 16, {"prefill_wgmma_producer": True, "prefill_wgmma_ctas": 1}),
    ("bfloat16", 128, 32, 1, {"prefill_wgmma_producer": True, "prefill_wgmma_ctas": 5, "prefill_wgmma_tma": False}),
    ("float16", 128, 64, 8, {"prefill_wgmma_producer": True, "prefill_wgmma_ctas": 2, "prefill_wgmma_bn": 64}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_persistent": False}),
    ("float16", 64, 16, 2, {"prefill_wgmma_producer": True, "prefill_wgmma_persistent": False,
                            "prefill_wgmma_tma": False}),
    # head dim 256 (64-position tiles, 2 stages, O += P V as four m64n64 products): without and
    # with the producer (TMA, persistent grid of a few CTAs, cp.async alone), one warpgroup
    ("bfloat16", 256, 16, 2, {}),
    ("float16", 256, 8, 8, {"prefill_wgmma_producer": True}),
    ("bfloat16", 256, 32, 1, {"prefill_wgmma_producer": True, "prefill_wgmma_ctas": 3}),
    ("bfloat16", 256, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_tma": False}),
    ("float16", 256, 64, 16, {"prefill_wgmma_warpgroups": 1}),
    ("bfloat16", 256, 16, 2, {"prefill_wgmma_producer": True, "prefill_wgmma_persistent": False}),
    # groups not a power of two: the tile's last rows past its whole query tokens pad
    ("bfloat16", 128, 16, 7, {"prefill_wgmma_producer": True}),
    ("float16", 64, 8, 12, {"prefill_wgmma_warpgroups": 1}),
    ("bfloat16", 128, 32, 3, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True}),
    ("float16", 256, 16, 5, {}),
    ("bfloat16", 128, 64, 14, {"prefill_wgmma_producer": True, "prefill_wgmma_ctas": 3}),
    ("bfloat16", 64, 16, 71, {"prefill_wgmma_producer": True}),
    ("float16", 128, 8, 48, {"prefill_wgmma_overlap": True}),
    # a group in chunks of HCH heads a tile (the default past 16 heads; forced below it), the
    # last chunk short; persistent grid of few CTAs, a CTA a tile, one warpgroup, head dim 256
    ("bfloat16", 128, 16, 20, {"prefill_wgmma_producer": True, "prefill_head_chunk": 6}),
    ("float16", 64, 8, 71, {"prefill_wgmma_warpgroups": 1}),
    ("bfloat16", 64, 16, 7, {"prefill_wgmma_producer": True, "prefill_head_chunk": 3, "prefill_wgmma_ctas": 3}),
    ("bfloat16", 128, 32, 40, {"prefill_wgmma_producer": True, "prefill_wgmma_persistent": False}),
    ("float16", 256, 16, 22, {"prefill_wgmma_producer": True}),
]


def run(plan, gpu, q, layer, **kw):
    out = to_dev(np.full(q.shape, np.nan, dtype=q.dtype), gpu)
    plan.attend(layer, to_dev(q, gpu), out=out, **kw)
    return to_host(out, plan.spec)


def check(dtype, d, bs, group, knobs, seq_lens, qlens, calls, kv_heads=2):
    rng = np.random.default_rng(seed(dtype, d, bs, group, sorted(knobs.items()), seq_lens.tolist(), "sm90"))
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), kv_heads=kv_heads)
    config = WGMMA.replace(**knobs)
    assert prefill_kernel(spec, group, config, (9, 0)).file == "paged_prefill_sm90.cu"
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    poison_unread(gpu, spec, tables)
    tma = bool(prefill_kernel(spec, group, config, (9, 0)).defines.get("TMA"))
    if tma:
        poison_tails(gpu, spec, tables, seq_lens)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
    new = make_plan(gpu, tables, seq_lens, qlens, config=config, cascade=False)
    old = make_plan(gpu, tables, seq_lens, qlens, config=MMA, cascade=False)
    for layer, kw in calls:
        ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, qlens, d**-0.5, **kw)
        got, want = run(new, gpu, q, layer, **kw), run(old, gpu, q, layer, **kw)
        assert rel_err(got, ref) < TOL[dtype], (layer, kw)
        assert rel_err(got, want) < TOL[dtype], (layer, kw)
    if tma:  # the driver encoded the pool's tensor map: the TMA loads ran
        assert [m is not None for m in gpu.tma_maps.values()] == [True]
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group,knobs", CASES)
def test_wgmma_matches_twin_and_mma(dtype, d, bs, group, knobs):
    seq_lens = np.array([5, bs + 3, 130, 300, 77, 1, 1000, 64, 129], dtype=np.int32)
    qlens = np.array([5, 2, 70, 33, 1, 1, 257, 64, 128], dtype=np.int32)  # whole prompts, chunks, decode rows
    calls = [(0, {}), (1, {}), (1, {"softcap": 3.0}), (0, {"window": 37}), (1, {"window": 2 * bs + 5}),
             (0, {"window": 100, "softcap": 5.0})]
    check(dtype, d, bs, group, knobs, seq_lens, qlens, calls)


@pytest.mark.parametrize("dtype,d,bs,group,knobs", [
    ("bfloat16", 128, 16, 4, {}), ("float16", 64, 64, 8, {}), ("bfloat16", 128, 16, 4, {"prefill_wgmma_overlap": True}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_overlap": True}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_ctas": 7}),
    ("bfloat16", 128, 16, 4, {"prefill_wgmma_producer": True, "prefill_wgmma_persistent": False}),
    ("bfloat16", 256, 16, 2, {"prefill_wgmma_producer": True}),
])
def test_wgmma_long_step(dtype, d, bs, group, knobs):
    """Two sequences of 512 new tokens on 1,024 and 1,536 cached, 8 kv heads (the benchmark's shape, smaller)."""
    seq_lens = np.array([1536, 2048], dtype=np.int32)
    qlens = np.array([512, 512], dtype=np.int32)
    check(dtype, d, bs, group, knobs, seq_lens, qlens, [(0, {}), (1, {"window": 700})], kv_heads=8)


@pytest.mark.parametrize("kv_dtype,dtype,d,bs,group", [
    (None, "bfloat16", 128, 16, 4), (None, "float16", 64, 8, 1), (None, "bfloat16", 128, 64, 16),
    (None, "float16", 128, 32, 8), (None, "bfloat16", 256, 16, 2),
])
def test_wgmma_cascade_own_parts(kv_dtype, dtype, d, bs, group):
    """Over shared prefixes the kernel reads each sequence's own positions (own_start) into
    partial states; the shared part and the merge follow: equal to the twin and the mma plan."""
    from gpu_cascade_helpers import layout, spec_for, tables_for
    from gpu_cascade_helpers import make_pair as cascade_pair

    rng = np.random.default_rng(seed(kv_dtype, dtype, d, bs, group, "sm90 cascade"))
    qlens = rng.integers(1, 41, 14).astype(np.int32)
    qlens[[2, 9]] = 1
    groups, seq_lens = layout(rng, bs, qlens, 2)
    spec = spec_for(kv_dtype, dtype, d, bs, seq_lens, rng)
    gpu, cpu = cascade_pair(spec, rng)
    tables = tables_for(rng, spec, groups, seq_lens)
    poison_unread(gpu, spec, tables)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
    old = make_plan(gpu, tables, seq_lens, qlens, cascade=True, num_q_heads=hq, config=MMA)
    configs = [WGMMA, WGMMA.replace(prefill_wgmma_overlap=True),
               WGMMA.replace(prefill_wgmma_producer=True, prefill_wgmma_overlap=True),
               WGMMA.replace(prefill_wgmma_producer=True, prefill_wgmma_ctas=3)]
    if d == 256:  # overlap's 3 stages of 64-position tiles do not fit a CTA's shared memory there
        configs = [c for c in configs if not c.prefill_wgmma_overlap]
    for config in configs:
        new = make_plan(gpu, tables, seq_lens, qlens, cascade=True, num_q_heads=hq, config=config)
        assert new.shared_prefixes is not None and new.shared_prefixes.levels == 2
        for layer, softcap in ((0, None), (1, 3.0)):
            ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, qlens, d**-0.5, softcap=softcap)
            got, want = run(new, gpu, q, layer, softcap=softcap), run(old, gpu, q, layer, softcap=softcap)
            assert rel_err(got, ref) < TOL[dtype], (config, layer, softcap)
            assert rel_err(got, want) < TOL[dtype], (config, layer, softcap)
    gpu.close()


def test_wgmma_refuses_what_it_does_not_run():
    """prefill_kernel="wgmma" on an FP8 pool or another head dim is a typed error; "auto" runs mma there."""
    rng = np.random.default_rng(seed("sm90 refusals"))
    spec = geometry("bfloat16", 96, 16, 256)
    gpu, _ = make_pair(spec, rng)
    tables = random_tables(rng, spec, np.array([40], np.int32))
    step = (tables, np.array([40], np.int32), np.array([8], np.int32))
    with pytest.raises(UnsupportedConfiguration, match="head_dim 96"):
        make_plan(gpu, *step, config=WGMMA, num_q_heads=8)
    plan = make_plan(gpu, *step, config=KernelConfig(prefill_kernel="auto"), num_q_heads=8)
    assert plan.num_tokens == 8
    gpu.close()


def test_the_sm90a_cubin_is_built_by_nvrtc_once_then_read_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernel_build.supports("sm_90a")
    src = kernels.source("paged_prefill_sm90.cu")
    opts = (*kernels.NVRTC_OPTIONS, "-DHEAD_DIM=64", "-DGROUP=2")
    path = kernel_build.compile_cubin(src, "paged_prefill_sm90.cu", opts, "sm_90a")
    assert path.startswith(str(tmp_path))
    monkeypatch.setattr(kernel_build, "_nvrtc_cubin", lambda *a: pytest.fail("compiled a second time"))
    assert kernel_build.compile_cubin(src, "paged_prefill_sm90.cu", opts, "sm_90a") == path
    fn = cupy.RawModule(path=path).get_function("paged_prefill_sm90")
    assert 0 < fn.num_regs <= 255 and fn.local_size_bytes == 0  # no spills


def test_persistent_grid_with_most_sms_held_takes_what_is_left_and_resets_its_counter():
    """The persistent grid takes each next item from a counter: with all but two SMs held
    by another stream's kernel when it starts (`tools/bench_busy.py`'s holder), its
    late CTAs take what is left; the counter is back at 0 after every launch, so the
    same plan called again and again, held and free in turns, always equals the twin."""
    import importlib.util
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    sys.path.insert(0, str(tools))  # bench_busy imports attention_common beside it
    try:
        mod_spec = importlib.util.spec_from_file_location("kvpager_tools_bench_busy", tools / "bench_busy.py")
        tool = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(tool)
    finally:
        sys.path.remove(str(tools))
    hold, _ = tool.holder()
    rng = np.random.default_rng(seed("sm90 held"))
    seq_lens = np.array([1536, 2048, 700, 129], dtype=np.int32)
    qlens = np.array([512, 512, 300, 129], dtype=np.int32)
    spec = geometry("bfloat16", 128, 16, int((-(-seq_lens // 16)).sum() * 16), kv_heads=8)
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    poison_unread(gpu, spec, tables)
    poison_tails(gpu, spec, tables, seq_lens)
    config = KernelConfig(prefill_kernel="wgmma")
    assert prefill_kernel(spec, 4, config, (9, 0)).defines.get("PERSIST") == 1
    q = rng.standard_normal((int(qlens.sum()), 32, 128), dtype=np.float32).astype(spec.np_dtype)
    plan = make_plan(gpu, tables, seq_lens, qlens, config=config, cascade=False)
    held = kernels.num_sms(0) - 2
    for call in range(6):
        layer, kw = call % 2, ({"window": 300} if call == 3 else {})
        hold(held if call % 2 == 0 else 0, 2000.0)
        ref = paged_attention(cpu.kv, layer, q, tables, seq_lens, qlens, 128**-0.5, **kw)
        assert rel_err(run(plan, gpu, q, layer, **kw), ref) < TOL["bfloat16"], call
    gpu.close()
