"""The attention planners on the CPU: the launches they choose for a device of 132 SMs
with an H200's limits, and `KernelConfig`'s knobs and errors.

`kernel_plan_pins.json` holds the choices of the planners as they were before
the kernel knobs became a `KernelConfig` (commit c3af6b9: kvpager.kernels'
module globals and the formulas inside cupy_launches.attention_launches /
CascadeLaunch), recorded by running that code for each case: kernel file and
name, defines, grid, threads, dynamic shared memory and split count of the
decode launch; tiling, defines, shared memory and query tiles (their count
and a SHA-256 of the int32 array) of the multi-token launch; tiling, shared
memory and chunks of the cascade launch. The production `KernelConfig` must
choose the same. Each case's ``regs`` stands for the compiled kernel's
registers per thread, which set the resident CTAs (and so the splits).
One deliberate change since: FP8 pools' decode takes up to 6 stages for
contexts of 2,048 positions or more and the most splits that fit one wave of resident CTAs
(`cupy_decode.decode_stages`, `plan_splits(fill=False)`, measured on an
H200); their FP8 cases were recorded again after it, the others are c3af6b9's.
Its ``prefill_kernel`` cases (recorded when paged_prefill_sm90.cu came) pin
the multi-token kernel chosen by compute capability, pool and knobs; its
``cascade_kernel`` cases (recorded when cascade_prefix_sm90.cu came) the
shared-prefix kernel, its tiling, member rows per CTA and chunks. The
``cascade`` cases (cascade_prefix.cu's tiling) are c3af6b9's, unchanged.
One deliberate change to the ``prefill_kernel`` cases since: the producer's
plain loop runs a persistent grid (PERSIST=1, `KernelConfig.prefill_wgmma_persistent`,
measured on an H200), so those cases' defines gained it; and 16-bit pools of head dim
256 on compute capability 9.0 run the wgmma kernels (measured on an H200), so that
case of ``prefill_kernel`` and of ``cascade_kernel`` (its ``regs``: the wgmma kernel's
168) were recorded again.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from kernel_plan_helpers import H200, NSM, PINS, spec_of

from kvpager import InvalidArgument, KernelConfig, KVPool, PoolSpec, UnsupportedConfiguration
from kvpager.backends.cupy_cascade import cascade_chunks, cascade_tiling
from kvpager.backends.cupy_decode import decode_shape, merge_defines, plan_splits
from kvpager.backends.cupy_prefill import prefill_tiling
from kvpager.backends.prefill_work import prefill_tiles
from kvpager.block_moves import COPY_THREADS, copy_grid
from kvpager.kernel_config import DEFAULT, check_config
from kvpager.kernel_smem import check_fits, resident


def decode(dtype, kv_dtype, d, bs, hkv, group, items, max_len, regs, num_splits=None, config=DEFAULT):
    """What the decode launch is for these arguments: (shape, splits)."""
    spec = spec_of(dtype, kv_dtype, d, bs, hkv)
    shape = decode_shape(spec, group, items, max_len, NSM, config)
    res = resident(H200, regs, 0, shape.threads, shape.smem) if shape.tc else 0
    return spec, shape, int(num_splits or plan_splits(shape.ctas, max_len, NSM, res, fill=not spec.is_fp8))


@pytest.mark.parametrize("case", PINS["decode"], ids=lambda c: "-".join(map(str, c["args"])))
def test_decode_launches_are_the_pinned_ones(case):
    spec, shape, splits = decode(*case["args"])
    assert (shape.file, shape.kernel) == (case["file"], case["kernel"])
    assert shape.defines == case["defines"]
    assert [shape.ctas, splits] == case["grid"]
    assert (shape.threads, shape.smem, splits) == (case["threads"], case["smem"], case["splits"])
    check_fits(shape.smem, H200, "decode")  # the production config's layouts fit an H200's CTA
    # merge_splits.cu takes only the defines it reads (the output dtype and head dim)
    assert merge_defines(spec) == {k: case["merge_defines"][k] for k in ("KV_DTYPE", "HEAD_DIM")}


@pytest.mark.parametrize("case", PINS["prefill"], ids=lambda c: "-".join(map(str, c["args"][:6])))
def test_multi_token_launches_are_the_pinned_ones(case):
    dtype, kv_dtype, d, bs, hkv, group, ql, sl = case["args"]
    spec = spec_of(dtype, kv_dtype, d, bs, hkv)
    t, defs, smem = prefill_tiling(spec, group, DEFAULT)
    tiles = prefill_tiles(np.asarray(ql, np.int32), np.asarray(sl, np.int32), t.bm // group)
    assert defs == case["defines"]
    assert smem == case["smem"]
    assert [len(tiles), hkv] == case["grid"] and len(tiles) == case["num_tiles"]
    assert hashlib.sha256(tiles.tobytes()).hexdigest()[:16] == case["tiles_sha256"]


@pytest.mark.parametrize("case", PINS["cascade"], ids=lambda c: "-".join(map(str, c["args"][:5])))
def test_cascade_launches_are_the_pinned_ones(case):
    dtype, d, bs, hkv, group, members, lengths, regs = case["args"]
    t, smem, per_tile = cascade_tiling(spec_of(dtype, None, d, bs, hkv), group, DEFAULT)
    assert (t.mt, t.bn, t.stages, smem, per_tile) == (case["mt"], case["bn"], case["stages"], case["smem"],
                                                     case["per_tile"])
    tiles = int(sum(-(-m // per_tile) for m in members))
    chunks = cascade_chunks(min(lengths), tiles * hkv, NSM * resident(H200, regs, 0, 128, smem))
    assert chunks == case["chunks"] and tiles * chunks == case["tiles"]


def test_the_pins_cover_every_kernel_and_layout():
    """The recorded cases reach both decode kernels, both CTA layouts, FP8, splits and
    no splits, each multi-token tiling and several cascade chunk counts."""
    dec = PINS["decode"]
    assert {c["kernel"] for c in dec} == {"paged_decode_tc", "paged_decode"}
    assert {(c["defines"].get("HPC"), c["defines"].get("WPH")) for c in dec} >= {(1, 4), (4, 1), (2, 1)}
    assert any("KV_FP8" in c["defines"] for c in dec)
    assert {c["splits"] > 1 for c in dec} == {True, False}
    assert {c["defines"]["MT"] for c in PINS["prefill"]} == {1, 2}
    assert len({c["chunks"] for c in PINS["cascade"]}) >= 3
    pk = PINS["prefill_kernel"]
    assert {c["file"] for c in pk} == {"paged_prefill.cu", "paged_prefill_sm90.cu"}
    ck = PINS["cascade_kernel"]
    assert {c["file"] for c in ck} == {"cascade_prefix.cu", "cascade_prefix_sm90.cu"}
    assert {(c["defines"].get("OVERLAP", 0), c["defines"].get("WS", 0)) for c in ck if c["arch"]} == {
        (0, 0), (1, 0), (0, 1), (1, 1)}
    assert len({c["chunks"] for c in ck}) >= 3 and {c["defines"].get("WG", 2) for c in ck} == {1, 2}
    sm90 = [c["defines"] for c in pk if c["arch"] == "sm_90a"]
    assert {(d["WG"], d["BN"], d["HEAD_DIM"], d["KV_DTYPE"]) for d in sm90} >= {
        (2, 64, 128, 1), (2, 128, 64, 0), (1, 64, 128, 1), (1, 128, 128, 0)}
    assert {d["GROUP"] for d in sm90} == {1, 2, 4, 8, 16} and {d["BLOCK_SIZE"] for d in sm90} >= {8, 16, 64}
    assert {(d.get("OVERLAP", 0), d.get("WS", 0)) for d in sm90} == {(0, 0), (1, 0), (0, 1), (1, 1)}


# -- the knobs ----------------------------------------------------------------------------
def test_knobs_reach_the_launches():
    args = ("bfloat16", None, 128, 16, 8, 4, 64, 4096, 168)
    _, base, _ = decode(*args)
    assert (base.defines["STAGES"], base.defines["HPC"], base.defines["WPH"]) == (3, 1, 4)
    _, s, _ = decode(*args, config=KernelConfig(decode_stages=2))
    assert s.defines["STAGES"] == 2 and s.smem < base.smem
    _, s, _ = decode(*args, config=KernelConfig(decode_l2_prefetch=0))
    assert "CP_L2_PREFETCH" not in s.defines and s.defines["CP_EVICT_FIRST"] == 1
    _, s, _ = decode(*args, config=KernelConfig(decode_l2_evict_first=False))
    assert "CP_EVICT_FIRST" not in s.defines and s.defines["CP_L2_PREFETCH"] == 128
    _, s, _ = decode(*args, config=KernelConfig(decode_heads_per_cta=8, decode_warps_per_head=1))
    assert (s.defines["HPC"], s.defines["WPH"], s.ctas, s.threads) == (8, 1, 64, 256)
    _, s, _ = decode(*args, config=KernelConfig(decode_heads_per_cta=3))  # cut to a divisor of 8 kv heads
    assert s.defines["HPC"] == 1
    _, s, _ = decode("bfloat16", None, 128, 16, 8, 4, 64, 256, 168)  # short contexts: 4 heads x 1 warp
    assert (s.defines["HPC"], s.defines["WPH"]) == (4, 1)
    _, s, _ = decode("bfloat16", None, 128, 16, 8, 4, 64, 256, 168, config=KernelConfig(decode_short_context=128))
    assert (s.defines["HPC"], s.defines["WPH"]) == (1, 4)
    _, s, _ = decode("float32", None, 128, 16, 8, 4, 64, 4096, 0, config=KernelConfig(decode_rows=2))
    assert s.kernel == "paged_decode" and s.defines["CH"] == 2
    spec = spec_of("float16", None, 128, 16, 8)
    t, defs, smem = prefill_tiling(spec, 4, KernelConfig(prefill_mt=1))
    assert (t.mt, t.bm, t.bn, t.stages, defs["MT"]) == (1, 64, 64, 2, 1)
    assert smem == (64 + 2 * 2 * 64) * (128 + 8) * 2  # paged_prefill.cu's header formula
    assert cascade_tiling(spec, 4, KernelConfig(prefill_mt=1))[0] == t  # the cascade runs the same tiling
    with pytest.raises(UnsupportedConfiguration, match="prefill_mt=2"):
        prefill_tiling(spec_of("float16", None, 256, 16, 8), 4, KernelConfig(prefill_mt=2))


def test_shared_memory_a_config_asks_for_must_fit():
    _, s, _ = decode("bfloat16", None, 256, 16, 8, 4, 64, 4096, 168, config=KernelConfig(decode_stages=8))
    assert s.smem == 4 * 8 * 2 * 16 * 256 * 2 + 128  # paged_decode_tc.cu's header formula (swizzled rows)
    with pytest.raises(UnsupportedConfiguration, match="shared memory"):
        check_fits(s.smem, H200, "paged_decode_tc.cu")
    _, s, _ = decode("bfloat16", None, 256, 16, 8, 4, 64, 4096, 168, config=KernelConfig(decode_stages=3))
    check_fits(s.smem, H200, "paged_decode_tc.cu")
    # rows that are not whole 128-byte lines keep their padding: 16-bit head dim 96,
    # FP8 head dim 64 (to an odd number of 16-byte chunks); FP8 head dim 128 swizzles
    _, s, _ = decode("bfloat16", None, 96, 16, 8, 4, 64, 4096, 168, config=KernelConfig(decode_stages=3))
    assert s.smem == 4 * 3 * 2 * 16 * (96 + 8) * 2
    _, s, _ = decode("bfloat16", "float8_e4m3", 64, 16, 8, 4, 64, 4096, 168, config=KernelConfig(decode_stages=3))
    assert s.smem == 4 * 3 * 2 * 16 * (64 + 16)
    _, s, _ = decode("bfloat16", "float8_e4m3", 128, 16, 8, 4, 64, 4096, 168, config=KernelConfig(decode_stages=3))
    assert s.smem == 4 * 3 * 2 * 16 * 128 + 128


def test_fp8_pools_decode_on_tensor_cores_only():
    for kv in ("float8_e4m3", "float8_e5m2"):
        for config in (DEFAULT, KernelConfig(decode_heads_per_cta=4, decode_rows=8)):
            _, s, _ = decode("float16", kv, 128, 16, 8, 4, 16, 2048, 168, config=config)
            assert s.kernel == "paged_decode_tc" and s.tc


@pytest.mark.parametrize("base", [1, 7, 8, 100, 128, 200, 237, 264, 512, 5000])
@pytest.mark.parametrize("resident", [1, 2, 3])
def test_fp8_splits_are_the_most_that_fit_one_wave(base, resident):
    """FP8 decode (``fill=False``): the most splits whose CTAs all fit in one wave of
    resident CTAs, each split at least 512 positions long; one when even that does not fit."""
    slots = NSM * resident
    for max_len in (512, 4096, 131072):
        s = plan_splits(base, max_len, NSM, resident, fill=False)
        hi = max(1, min(max_len // 512, 1024))
        assert 1 <= s <= hi
        assert s == 1 or base * s <= slots  # never a second, part wave of splits
        if s < hi:
            assert base * (s + 1) > slots  # one more would not fit


def test_copy_grid_is_one_cta_per_chunk():
    block = 32 * 2 * 8 * 16 * 128 * 2  # a llama-3-8b block: 2 MiB
    assert copy_grid(1000, block) == 1000 * (block // 16) // (COPY_THREADS * 16)
    assert copy_grid(1000, block, KernelConfig(copy_unroll=4)) == 4 * copy_grid(1000, block)
    assert copy_grid(3, 16 * 1000) == 3  # a partial chunk is a chunk


@pytest.mark.parametrize("knob,value", [
    ("decode_rows", 3), ("decode_rows", 0), ("decode_stages", 1), ("decode_stages", 9),
    ("decode_stages", 2.0), ("decode_l2_prefetch", 64), ("decode_l2_prefetch", None),
    ("decode_heads_per_cta", 0), ("decode_heads_per_cta", 17), ("decode_warps_per_head", True),
    ("decode_short_context", -1), ("prefill_mt", 3), ("prefill_mt", 0), ("copy_unroll", 12),
    ("copy_unroll", "16"), ("prefill_kernel", "wmma"), ("prefill_kernel", None), ("prefill_kernel", 1),
    ("merge_warp_max_parts", -1), ("merge_warp_max_parts", 1025), ("merge_warp_min_rows", "256"),
    ("prefill_wgmma_warpgroups", 3), ("prefill_wgmma_warpgroups", 0), ("prefill_wgmma_bn", 32),
    ("prefill_wgmma_bn", 96), ("prefill_wgmma_stages", 1), ("prefill_wgmma_stages", 5),
    ("prefill_wgmma_stages", 2.0), ("prefill_wgmma_overlap", 1), ("prefill_wgmma_overlap", None),
    ("prefill_wgmma_producer", "yes"), ("prefill_wgmma_producer", 0), ("decode_cascade_fork", 1),
    ("decode_cascade_fork", None), ("decode_l2_evict_first", 1), ("decode_l2_evict_first", None),
    ("decode_merge_pdl", 1), ("decode_merge_pdl", None), ("decode_merge_fused_splits", -1),
    ("decode_merge_fused_splits", 1025), ("decode_merge_fused_splits", True),
])
def test_bad_knobs_are_refused_by_name(knob, value):
    with pytest.raises(InvalidArgument, match=f"KernelConfig.{knob}"):
        KernelConfig(**{knob: value})
    with pytest.raises(InvalidArgument, match=f"KernelConfig.{knob}"):
        DEFAULT.replace(**{knob: value})


def test_config_is_frozen_and_replaced_by_name():
    c = DEFAULT.replace(decode_stages=4, prefill_mt=1)
    assert (c.decode_stages, c.prefill_mt, c.copy_unroll) == (4, 1, 16)
    assert KernelConfig() == DEFAULT and DEFAULT.decode_stages is None  # the original is untouched
    with pytest.raises(AttributeError):
        c.decode_stages = 2  # type: ignore[misc]
    with pytest.raises(InvalidArgument, match="decode_stage"):
        DEFAULT.replace(decode_stage=2)
    assert check_config(None) is DEFAULT and check_config(c) is c
    with pytest.raises(InvalidArgument, match="KernelConfig"):
        check_config({"decode_stages": 2})


def test_a_plan_takes_a_config_and_refuses_anything_else():
    pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=2, head_dim=32, num_blocks=8, block_size=8))
    a = pool.allocate([[1, 2, 3]])[0]
    plan = pool.plan([a.seq_id], None, None, config=KernelConfig(decode_stages=2))
    assert plan.num_tokens == 1
    with pytest.raises(InvalidArgument, match="KernelConfig"):
        pool.plan([a.seq_id], None, None, config={"decode_stages": 2})


@pytest.mark.parametrize("dtype, d, group, subgroup, rows", [
    ("float32", 512, 2, 2, 1),  # four vectors a lane: one row in flight
    ("float32", 272, 4, 2, 1),  # three vectors a lane: one row
    ("float32", 256, 4, 4, 4),  # float32 at the tensor-core kernels' widths: as before
    # groups not a power of two: the largest equal subgroup that fits (paged_decode.cu's subgroups
    # split the group evenly)
    ("float32", 256, 6, 3, 4), ("float32", 256, 7, 1, 4), ("float32", 128, 7, 7, 4),
    ("float32", 128, 12, 6, 4), ("float32", 512, 3, 1, 1),
])
def test_float32_pools_decode_on_cuda_cores(dtype, d, group, subgroup, rows):
    """float32 pools attend on paged_decode.cu, a work item per query token, with its
    K/V row buffers kept within 64 registers a lane, and never cascade (the cascade's
    kernels are the tensor-core ones)."""
    from kvpager.backends.cupy_cascade import cascade_applies
    from kvpager.kernels import cuda_core_steps, wide_heads

    _, shape, _ = decode(dtype, None, d, 16, 2, group, 64, 4096, 128)
    assert (shape.file, shape.kernel, shape.tc) == ("paged_decode.cu", "paged_decode", False)
    assert (shape.defines["SUBGROUP"], shape.defines["CH"]) == (subgroup, rows)
    assert shape.ctas == 64 * 2 * (group // subgroup) and shape.threads == 128
    spec = spec_of(dtype, None, d, 16, 2)
    assert wide_heads(spec) and cuda_core_steps(spec)

    class Plan:  # what cascade_applies reads of a plan: a decode step, one item a row
        decode, rows, items = True, 64, 64

    assert not cascade_applies(Plan(), spec, 64)
    _, tc, _ = decode("bfloat16", None, 256, 16, 2, group, 64, 4096, 128)
    assert tc.file == "paged_decode_tc.cu" and cascade_applies(Plan(), spec_of("bfloat16", None, 256, 16, 2), 64)


@pytest.mark.parametrize("dtype, d, group, items, max_len, layout, stages, smem", [
    # Gemma-4's full layers: a kv head's tiles taken by 2 pairs of warps (4 warps), two 16-row stages of
    # the half rows (256 values: 512 bytes, swizzled, + 128 to align), and the partial scores (2 KiB a warp)
    ("bfloat16", 512, 2, 64, 4096, (1, 2), 2, 4 * 2 * 2 * 16 * 512 + 128 + 4 * 2048),
    ("float16", 512, 16, 16, 16384, (1, 2), 2, 4 * 2 * 2 * 16 * 512 + 128 + 4 * 2048),
    # 272: parts of 144 values (rows padded by 16 bytes: 304 bytes, unswizzled)
    ("bfloat16", 272, 4, 64, 4096, (1, 2), 2, 4 * 2 * 2 * 16 * 304 + 4 * 2048),
    # short contexts: 4 heads a CTA would not fit; 2 heads, one pair each
    ("bfloat16", 512, 4, 256, 256, (2, 1), 2, 4 * 2 * 2 * 16 * 512 + 128 + 4 * 2048),
])
def test_heads_wider_than_256_decode_on_tensor_cores_two_warps_a_tile(dtype, d, group, items, max_len, layout,
                                                                        stages, smem):
    """16-bit pools of heads wider than 256 decode on paged_decode_tc.cu, each layout
    warp two warps (8 at most a CTA here), each with stages of half of every row; the
    shared memory is what the kernel lays out, and fits an H200's CTA; no cascade."""
    from kvpager.backends.cupy_cascade import cascade_applies
    from kvpager.kernels import cuda_core_steps

    _, shape, splits = decode(dtype, None, d, 16, 2, group, items, max_len, 255)
    assert (shape.file, shape.kernel, shape.tc) == ("paged_decode_tc.cu", "paged_decode_tc", True)
    hpc, wph = layout
    assert (shape.defines["HPC"], shape.defines["WPH"], shape.defines["STAGES"]) == (hpc, wph, stages)
    assert shape.defines["GROUP"] == group and "SUBGROUP" not in shape.defines
    assert shape.threads == 32 * hpc * wph * 2 and shape.ctas == items * 2 // hpc
    assert shape.smem == smem
    check_fits(shape.smem, H200, "paged_decode_tc.cu")
    spec = spec_of(dtype, None, d, 16, 2)
    assert not cuda_core_steps(spec)

    class Plan:
        decode, rows, items = True, 64, 64

    assert not cascade_applies(Plan(), spec, 64)


@pytest.mark.parametrize("dtype, d, group, padded", [
    ("bfloat16", 512, 2, 512),  # Gemma-4's full layers
    ("float16", 512, 16, 512),
    ("bfloat16", 272, 4, 288),  # two parts of 144 columns: the row padded to 288
    ("bfloat16", 400, 8, 416),
])
def test_multi_token_steps_of_wide_heads_run_on_tensor_cores(dtype, d, group, padded):
    """A multi-token step of a 16-bit pool of heads wider than 256 runs paged_prefill.cu
    with two warps a query row (8 warps a CTA), not a decode item per query token; its
    shared memory is the query tile and two stages of 32-position K and V tiles in rows
    of the padded head dim plus 8, and each warp's float32 partial scores (16 x 32)."""
    from kvpager.backends.cupy_prefill import prefill_kernel
    from kvpager.kernels import cuda_core_steps

    spec = spec_of(dtype, None, d, 16, 2)
    for cc in ((9, 0), (8, 0)):
        k = prefill_kernel(spec, group, DEFAULT, cc)
        assert (k.file, k.func, k.arch, k.threads) == ("paged_prefill.cu", "paged_prefill", None, 256)
        assert (k.tiling.mt, k.tiling.bm, k.tiling.bn, k.tiling.stages) == (1, 64, 32, 2)
        assert k.defines == {"KV_DTYPE": {"float16": 0, "bfloat16": 1}[dtype], "HEAD_DIM": d,
                             "BLOCK_SIZE": 16, "GROUP": group, "MT": 1}
        assert k.smem == (64 + 2 * 2 * 32) * (padded + 8) * 2 + 8 * 16 * 32 * 4
        check_fits(k.smem, H200, "paged_prefill.cu")
    assert not cuda_core_steps(spec) and cuda_core_steps(spec_of("float32", None, d, 16, 2))
    with pytest.raises(UnsupportedConfiguration, match="head_dim"):
        prefill_kernel(spec, group, KernelConfig(prefill_kernel="wgmma"), (9, 0))


def test_an_fp8_pool_of_wide_heads_is_refused_before_any_gpu_is_asked():
    from kvpager.kernels import check_geometry

    check_geometry("bfloat16", 512, 16)
    with pytest.raises(UnsupportedConfiguration, match="head dims stop at 256"):
        check_geometry("bfloat16", 512, 16, "float8_e4m3")
    with pytest.raises(UnsupportedConfiguration, match="from 32 to 512"):
        check_geometry("bfloat16", 528, 16)
