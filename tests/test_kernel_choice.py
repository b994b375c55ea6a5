"""Which multi-token and shared-prefix kernel the planners choose, on the CPU: the
wgmma kernels (paged_prefill_sm90.cu, cascade_prefix_sm90.cu) on compute
capability 9.0 for 16-bit pools of head dim 64 / 128, the mma kernels elsewhere,
the wgmma knobs as they reach a launch, and the fall-back where NVRTC cannot
build sm_90a. The ``prefill_kernel`` and ``cascade_kernel`` cases of
kernel_plan_pins.json pin the choices (see test_kernel_plans.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from kernel_plan_helpers import H200, NSM, PINS, spec_of

from kvpager import InvalidArgument, KernelConfig, UnsupportedConfiguration
from kvpager.backends.cupy_cascade import cascade_chunks, cascade_kernel, cascade_tiling
from kvpager.backends.cupy_prefill import prefill_function, prefill_kernel
from kvpager.backends.prefill_work import prefill_tiles
from kvpager.kernel_config import DEFAULT
from kvpager.kernel_smem import check_fits, prefill_sm90_smem, resident

WG = KernelConfig(prefill_kernel="wgmma", prefill_wgmma_producer=False)  # the knobs' base: no producer
AUTO, MMA = (KernelConfig(prefill_kernel=k) for k in ("auto", "mma"))


@pytest.mark.parametrize("case", PINS["prefill_kernel"], ids=lambda c: "-".join(map(str, c["args"][:7])))
def test_multi_token_kernel_choices_are_the_pinned_ones(case):
    dtype, kv_dtype, d, bs, hkv, group, cc, knobs = case["args"]
    k = prefill_kernel(spec_of(dtype, kv_dtype, d, bs, hkv), group, KernelConfig(**knobs), tuple(cc))
    assert (k.file, k.func, k.arch, k.defines) == (case["file"], case["kernel"], case["arch"], case["defines"])
    assert (k.tiling.bm, k.tiling.bn, k.tiling.stages, k.smem, k.threads) == (
        case["bm"], case["bn"], case["stages"], case["smem"], case["threads"])
    check_fits(k.smem, H200, k.file)


@pytest.mark.parametrize("case", PINS["cascade_kernel"], ids=lambda c: "-".join(map(str, c["args"][:8])))
def test_cascade_kernel_choices_are_the_pinned_ones(case):
    dtype, kv_dtype, d, bs, hkv, group, cc, knobs, members, lengths, regs = case["args"]
    k = cascade_kernel(spec_of(dtype, kv_dtype, d, bs, hkv), group, KernelConfig(**knobs), tuple(cc))
    assert (k.file, k.func, k.arch, k.defines) == (case["file"], case["kernel"], case["arch"], case["defines"])
    assert (k.tiling.bm, k.tiling.bn, k.tiling.stages, k.smem, k.threads) == (
        case["bm"], case["bn"], case["stages"], case["smem"], case["threads"])
    per_tile = max(1, k.tiling.bm // group)
    tiles = int(sum(-(-m // per_tile) for m in members))
    chunks = cascade_chunks(min(lengths), tiles * hkv, NSM * resident(H200, regs, 0, k.threads, k.smem))
    assert (per_tile, chunks, tiles * chunks) == (case["per_tile"], case["chunks"], case["tiles"])
    check_fits(k.smem, H200, k.file)


def test_the_cascade_runs_the_multi_token_kernels_twin():
    """cascade_prefix_sm90.cu exactly where the multi-token kernel is paged_prefill_sm90.cu, with
    its knobs, tiling, defines (TMA among them; not the persistent grid), shared memory and threads; else cascade_prefix.cu on the tiling
    it had (`cascade_tiling`), 128 threads; "wgmma" where it cannot run: the same typed error."""
    for dtype, kv_dtype, d in [("bfloat16", None, 128), ("float16", None, 64), ("bfloat16", "float8_e4m3", 128),
                               ("float16", None, 256), ("bfloat16", None, 96)]:
        spec = spec_of(dtype, kv_dtype, d, 16, 8)
        for config in (DEFAULT, MMA, WG, WG.replace(prefill_wgmma_overlap=True), AUTO.replace(prefill_mt=1),
                       DEFAULT.replace(prefill_wgmma_warpgroups=1, prefill_wgmma_bn=128)):
            for cc in ((9, 0), (8, 0)):
                try:
                    p = prefill_kernel(spec, 4, config, cc)
                except UnsupportedConfiguration as exc:
                    with pytest.raises(UnsupportedConfiguration, match=re.escape(str(exc))):
                        cascade_kernel(spec, 4, config, cc)
                    continue
                c = cascade_kernel(spec, 4, config, cc)
                if p.file == "paged_prefill_sm90.cu":
                    assert (c.file, c.func) == ("cascade_prefix_sm90.cu", "cascade_prefix_sm90")
                    own = {name: v for name, v in p.defines.items() if name != "PERSIST"}  # a CTA a tile
                    assert (c.arch, c.tiling, c.defines, c.smem, c.threads) == (
                        p.arch, p.tiling, own, p.smem, p.threads)
                else:
                    t, smem, _ = cascade_tiling(spec, 4, config)
                    assert (c.file, c.func, c.arch, c.tiling, c.smem, c.threads) == (
                        "cascade_prefix.cu", "cascade_prefix", None, t, smem, 128)
                    assert c.defines == {**p.defines}  # the mma kernels' defines are the same set


def test_the_cascade_falls_back_to_mma_when_sm90a_cannot_be_built():
    spec = spec_of("bfloat16", None, 128, 16, 8)

    def build(k):
        if k.arch is not None:
            raise UnsupportedConfiguration("NVRTC 11.8 cannot build for sm_90a")
        return k.func

    k, fn = prefill_function(spec, 4, AUTO, (9, 0), build, choose=cascade_kernel)
    assert (k.file, fn, k.threads) == ("cascade_prefix.cu", "cascade_prefix", 128)
    with pytest.raises(UnsupportedConfiguration, match="sm_90a"):
        prefill_function(spec, 4, WG, (9, 0), build, choose=cascade_kernel)
    k, fn = prefill_function(spec, 4, AUTO, (9, 0), lambda k: k.func, choose=cascade_kernel)
    assert (k.file, fn, k.threads) == ("cascade_prefix_sm90.cu", "cascade_prefix_sm90", 384)


WG = KernelConfig(prefill_kernel="wgmma", prefill_wgmma_producer=False)  # the knobs' base: no producer
AUTO, MMA = (KernelConfig(prefill_kernel=k) for k in ("auto", "mma"))


def test_the_default_is_wgmma_with_a_producer_on_hopper_and_mma_elsewhere():
    spec = spec_of("bfloat16", None, 128, 16, 8)
    assert DEFAULT.prefill_kernel == "auto"
    k = prefill_kernel(spec, 4, DEFAULT, (9, 0))
    assert (k.file, k.defines.get("WS"), k.threads) == ("paged_prefill_sm90.cu", 1, 384)
    assert prefill_kernel(spec, 4, AUTO, (9, 0)) == k
    assert prefill_kernel(spec, 4, MMA, (9, 0)) == prefill_kernel(spec, 4, DEFAULT, (8, 0))
    assert prefill_kernel(spec, 4, DEFAULT, (8, 0)).file == "paged_prefill.cu"
    # one MMA warpgroup or overlap: no producer unless asked for
    assert "WS" not in prefill_kernel(spec, 4, DEFAULT.replace(prefill_wgmma_warpgroups=1), (9, 0)).defines
    assert "WS" not in prefill_kernel(spec, 4, DEFAULT.replace(prefill_wgmma_overlap=True), (9, 0)).defines


def test_head_dim_256_on_wgmma():
    """Head dim 256 on Hopper: 64-position tiles in 2 stages (3 exceed a CTA's shared memory),
    O += P V as four m64n64 products (VN 64), the producer, TMA and the persistent grid as at
    128; overlap is refused there (a typed error)."""
    spec = spec_of("bfloat16", None, 256, 16, 8)
    k = prefill_kernel(spec, 4, DEFAULT, (9, 0))
    assert (k.file, k.tiling.bn, k.tiling.stages, k.threads) == ("paged_prefill_sm90.cu", 64, 2, 384)
    assert {n: k.defines[n] for n in ("VN", "WS", "TMA", "PERSIST")} == {"VN": 64, "WS": 1, "TMA": 1, "PERSIST": 1}
    check_fits(k.smem, H200, k.file)
    assert prefill_kernel(spec, 4, WG, (9, 0)).tiling.stages == 2
    for knobs in ({}, {"prefill_wgmma_warpgroups": 1}, {"prefill_wgmma_producer": True}):
        with pytest.raises(UnsupportedConfiguration, match="overlap is not run at head dim 256"):
            prefill_kernel(spec, 4, WG.replace(prefill_wgmma_overlap=True, **knobs), (9, 0))
    assert prefill_kernel(spec, 4, WG.replace(prefill_wgmma_warpgroups=1), (9, 0)).tiling.bm == 64
    assert prefill_kernel(spec_of("bfloat16", None, 128, 16, 8), 4, DEFAULT, (9, 0)).defines.get("VN") is None


def test_the_producers_plain_loop_runs_a_persistent_grid(monkeypatch):
    """PERSIST with the producer and no overlap (the default on Hopper), not with overlap, not
    asked for, or without the producer; the grid: one CTA an SM, or the knob's count, never
    more than the step's (query tile, kv head) items."""
    from kvpager import kernels
    from kvpager.backends.cupy_prefill import persistent_ctas

    spec = spec_of("bfloat16", None, 128, 16, 8)
    assert prefill_kernel(spec, 4, DEFAULT, (9, 0)).defines["PERSIST"] == 1
    for config in (DEFAULT.replace(prefill_wgmma_persistent=False), DEFAULT.replace(prefill_wgmma_overlap=True),
                   WG.replace(prefill_wgmma_overlap=True, prefill_wgmma_producer=True), WG):
        assert "PERSIST" not in prefill_kernel(spec, 4, config, (9, 0)).defines
    monkeypatch.setattr(kernels, "num_sms", lambda device: 132)
    assert [persistent_ctas(w, DEFAULT, 0) for w in (1, 131, 132, 133, 2048)] == [1, 131, 132, 132, 132]
    assert [persistent_ctas(w, DEFAULT.replace(prefill_wgmma_ctas=3), 0) for w in (1, 3, 2048)] == [1, 3, 3]
    assert persistent_ctas(2048, DEFAULT.replace(prefill_wgmma_ctas=500), 0) == 132  # never a second wave
    assert persistent_ctas(0, DEFAULT, 0) == 1  # an empty step's grid is still a grid
    with pytest.raises(InvalidArgument, match="prefill_wgmma_ctas"):
        DEFAULT.replace(prefill_wgmma_ctas=0)
    with pytest.raises(InvalidArgument, match="prefill_wgmma_persistent"):
        DEFAULT.replace(prefill_wgmma_persistent=1)


@pytest.mark.parametrize("heads", [1, 2, 8])
def test_persistent_items_keep_each_kv_stream_together(heads):
    """`prefill_items`: every (query tile, kv head) once; the items of a sequence's kv head side
    by side, in `prefill_tiles`' order (longest first); sequences in the order of their first
    (longest) tile, kv heads in turn within a sequence."""
    from kvpager.backends.prefill_work import prefill_items

    rng = np.random.default_rng(heads)
    for _ in range(20):
        n = int(rng.integers(1, 12))
        ql = rng.integers(1, 300, n).astype(np.int32)
        sl = (ql + rng.integers(0, 2000, n)).astype(np.int32)
        own = rng.integers(0, 50, n).astype(np.int32) if rng.random() < 0.3 else None
        tiles = prefill_tiles(ql, sl, 32, own)
        items = prefill_items(ql, sl, 32, heads, own)
        assert items.dtype == np.int32 and items.shape == (len(tiles) * heads, 3)
        want = sorted((int(b), int(j), h) for b, j in tiles for h in range(heads))
        assert sorted(map(tuple, items.tolist())) == want
        streams = [(int(b), int(h)) for b, _, h in items]
        runs = [streams[0]] + [x for x, y in zip(streams[1:], streams[:-1]) if x != y]
        assert len(runs) == len(set(runs))  # each stream's items contiguous
        seqs = list(dict.fromkeys(b for b, _ in runs))
        assert seqs == list(dict.fromkeys(int(b) for b in tiles[:, 0]))
        assert runs == [(b, h) for b in seqs for h in range(heads)]
        for b, h in runs:
            mine = [int(j) for bb, j, hh in items if (bb, hh) == (b, h)]
            assert mine == [int(j) for bb, j in tiles if bb == b]
    assert prefill_items(np.zeros(0, np.int32), np.zeros(0, np.int32), 32, heads).shape == (0, 3)


@pytest.mark.parametrize("dtype,kv_dtype,d,cc,why", [
    ("bfloat16", None, 128, (8, 0), "compute capability 9.0"),
    ("float16", None, 64, (8, 9), "compute capability 9.0"),
    ("bfloat16", None, 128, (10, 0), "compute capability 9.0"),
    ("bfloat16", "float8_e4m3", 128, (9, 0), "FP8"),
    ("float16", "float8_e5m2", 64, (9, 0), "FP8"),
    ("bfloat16", None, 96, (9, 0), "head_dim 96"),
    ("float16", None, 80, (9, 0), "head_dim 80"),
    ("float32", None, 128, (9, 0), "float32"),
])
def test_wgmma_where_it_does_not_apply(dtype, kv_dtype, d, cc, why):
    """Asked for: a typed error naming the reason; "auto": the mma kernel, as "mma" chooses it."""
    spec = spec_of(dtype, kv_dtype, d, 16, 8)
    with pytest.raises(UnsupportedConfiguration, match=f"prefill_kernel='wgmma'.*{why}"):
        prefill_kernel(spec, 4, WG, cc)
    assert prefill_kernel(spec, 4, AUTO, cc) == prefill_kernel(spec, 4, MMA, cc)
    assert prefill_kernel(spec, 4, AUTO, cc).arch is None


def test_wgmma_knobs_reach_the_launch():
    spec = spec_of("float16", None, 128, 16, 8)
    base = prefill_kernel(spec, 4, WG, (9, 0))
    assert (base.defines["WG"], base.defines["BN"], base.defines["STAGES"], base.threads) == (2, 64, 3, 256)
    assert base.smem == (128 + 2 * 3 * 64) * 128 * 2 + 1024  # paged_prefill_sm90.cu's header formula
    assert base.tiling.bm == 128 and base.arch == "sm_90a"
    k = prefill_kernel(spec, 4, WG.replace(prefill_wgmma_warpgroups=1, prefill_wgmma_bn=128), (9, 0))
    assert (k.defines["WG"], k.defines["BN"], k.defines["STAGES"], k.threads, k.tiling.bm) == (1, 128, 2, 128, 64)
    assert k.smem == prefill_sm90_smem(128, 1, 128, 2) == (64 + 2 * 2 * 128) * 128 * 2 + 1024
    k = prefill_kernel(spec_of("bfloat16", None, 64, 8, 8), 16, WG, (9, 0))
    assert (k.defines["BN"], k.defines["STAGES"]) == (128, 2)  # head dim 64: longer K/V tiles
    # the query tiles hold bm / group tokens, as for the mma kernel (the most K/V first)
    tiles = prefill_tiles(np.array([300, 5], np.int32), np.array([300, 900], np.int32), base.tiling.bm // 4)
    assert tiles.tolist() == [[1, 0], *([0, j] for j in range(288, -1, -32))]
    k = prefill_kernel(spec, 4, WG.replace(prefill_wgmma_overlap=True, prefill_wgmma_bn=128), (9, 0))
    assert (k.defines["OVERLAP"], k.defines["STAGES"]) == (1, 3)  # two tiles resident: 3 stages
    assert "OVERLAP" not in base.defines
    with pytest.raises(UnsupportedConfiguration, match="overlap needs 3 or more stages"):
        prefill_kernel(spec, 4, WG.replace(prefill_wgmma_overlap=True, prefill_wgmma_stages=2), (9, 0))
    k = prefill_kernel(spec, 4, WG.replace(prefill_wgmma_producer=True, prefill_wgmma_overlap=True), (9, 0))
    assert (k.defines["WS"], k.defines["OVERLAP"], k.threads, k.tiling.bm) == (1, 1, 384, 128)
    assert k.smem == base.smem  # the mbarriers are static shared memory
    with pytest.raises(UnsupportedConfiguration, match="two MMA warpgroups"):
        prefill_kernel(spec, 4, WG.replace(prefill_wgmma_producer=True, prefill_wgmma_warpgroups=1), (9, 0))
    # with the producer, overlap is FlashAttention-3's loop, ping-pong unless turned off
    k = prefill_kernel(spec, 4, WG.replace(prefill_wgmma_producer=True, prefill_wgmma_overlap=True,
                                           prefill_wgmma_bn=128), (9, 0))
    assert (k.defines["BN"], k.defines["STAGES"], "PINGPONG" in k.defines) == (128, 3, False)
    with pytest.raises(UnsupportedConfiguration, match="overlap needs 3 or more stages"):
        prefill_kernel(spec, 4, WG.replace(prefill_wgmma_producer=True, prefill_wgmma_overlap=True,
                                           prefill_wgmma_stages=2), (9, 0))
    k = prefill_kernel(spec, 4, WG.replace(prefill_wgmma_producer=True, prefill_wgmma_overlap=True,
                                           prefill_wgmma_pingpong=False), (9, 0))
    assert k.defines["PINGPONG"] == 0
    k = prefill_kernel(spec_of("bfloat16", None, 64, 16, 8), 4,
                       WG.replace(prefill_wgmma_producer=True, prefill_wgmma_overlap=True), (9, 0))
    assert (k.defines["BN"], k.defines["STAGES"], k.threads) == (128, 3, 384)
    # too much shared memory for a CTA: refused by name before any compile
    with pytest.raises(UnsupportedConfiguration, match="shared memory"):
        prefill_kernel(spec, 4, WG.replace(prefill_wgmma_bn=128, prefill_wgmma_stages=4), (9, 0))


def test_auto_falls_back_to_mma_when_sm90a_cannot_be_built(caplog):
    """An NVRTC without sm_90a: "auto" builds paged_prefill.cu (logged once); "wgmma" raises."""
    from kvpager import kernel_build

    spec = spec_of("bfloat16", None, 128, 16, 8)
    built = []

    def build(k):
        if k.arch is not None:
            raise UnsupportedConfiguration("NVRTC 11.8 cannot build for sm_90a")
        built.append(k.file)
        return "fn"

    kernel_build._warned.discard("paged_prefill_sm90.cu")
    with caplog.at_level("WARNING", logger="kvpager.kernels"):
        for _ in range(3):
            k, fn = prefill_function(spec, 4, AUTO, (9, 0), build)
            assert (k.file, fn) == ("paged_prefill.cu", "fn")
    assert built == ["paged_prefill.cu"] * 3
    assert sum("sm_90a" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(UnsupportedConfiguration, match="sm_90a"):
        prefill_function(spec, 4, WG, (9, 0), build)
    k, fn = prefill_function(spec, 4, AUTO, (9, 0), lambda k: k.func)
    assert (k.file, fn) == ("paged_prefill_sm90.cu", "paged_prefill_sm90")


@pytest.mark.parametrize("dtype,kv_dtype,d,bs,bn,why", [
    ("bfloat16", None, 128, 16, 128, None),
    ("float16", None, 64, 8, 128, None),
    ("bfloat16", None, 128, 64, 64, None),
    ("bfloat16", None, 128, 128, 64, None),  # a tile is half a block: 64-row boxes
    ("bfloat16", "float8_e4m3", 128, 16, 128, "16-bit pools"),
    ("float32", None, 128, 16, 128, "16-bit pools"),
])
def test_tma_loads_where_the_pool_allows_them(dtype, kv_dtype, d, bs, bn, why):
    """The producer's TMA boxes are a block or the part of one a tile holds; the default with
    the producer uses them (TMA=1) for 16-bit pools, the cascade's shared part too (the same
    defines), the knob turns them off, and the kernel without a producer has none."""
    from kvpager.backends.cupy_tma import box_rows, pool_rows, tma_unsupported

    spec = spec_of(dtype, kv_dtype, d, bs, 8)
    got = tma_unsupported(spec, bn)
    assert (got is None) if why is None else (why in got), got
    assert box_rows(bs, bn) == min(bs, bn)
    if why is None:
        assert pool_rows(spec) * d * 2 == spec.device_bytes
        k = prefill_kernel(spec, 4, DEFAULT.replace(prefill_wgmma_bn=bn), (9, 0))
        assert (k.defines["WS"], k.defines["TMA"]) == (1, 1)
        assert "TMA" not in prefill_kernel(spec, 4, DEFAULT.replace(prefill_wgmma_tma=False), (9, 0)).defines
        assert cascade_kernel(spec, 4, DEFAULT.replace(prefill_wgmma_bn=bn), (9, 0)).defines["TMA"] == 1
        assert "TMA" not in prefill_kernel(spec, 4, WG, (9, 0)).defines  # no producer: no TMA
    else:
        assert "TMA" not in prefill_kernel(spec, 4, DEFAULT, (9, 0)).defines  # the mma kernel


@pytest.mark.parametrize("bs,bn,why", [(4, 128, "8-row atoms"), (24, 128, "whole 24-row boxes"),
                                       (48, 128, "whole 48-row boxes"), (512, 128, None), (16, 64, None)])
def test_tma_boxes_must_be_whole_atoms_that_tile_the_tiles(bs, bn, why):
    """The arithmetic alone, for block sizes a PoolSpec refuses today (8-128, powers of two)."""
    from types import SimpleNamespace

    from kvpager.backends.cupy_tma import tma_unsupported

    spec = SimpleNamespace(dtype="bfloat16", is_fp8=False, kv_dtype=None, block_size=bs, num_blocks=100,
                           num_layers=2, num_kv_heads=8)
    got = tma_unsupported(spec, bn)
    assert (got is None) if why is None else (why in got), got


def test_a_pool_whose_rows_overflow_int32_gets_no_tma():
    from kvpager.backends.cupy_tma import tma_unsupported

    spec = spec_of("bfloat16", None, 128, 16, 8)
    big = spec.replace(num_blocks=(1 << 31) // (spec.num_layers * 2 * 8 * 16))  # 2**31 rows
    assert "int32" in tma_unsupported(big, 128)
    assert tma_unsupported(big.replace(num_blocks=big.num_blocks - 1), 128) is None


def test_a_tensor_map_the_driver_refuses_is_none_logged_once(monkeypatch, caplog):
    """`pool_map` where the driver refuses the encoding (or has none): None, kept for the
    pool (not asked again), one warning; the launch then builds its kernel without TMA."""
    from types import SimpleNamespace

    from kvpager import kernel_build
    from kvpager.backends import cupy_tma

    calls = []

    def refuse(*args):
        calls.append(args)
        return 1  # CUDA_ERROR_INVALID_VALUE

    monkeypatch.setattr(cupy_tma, "_encode", refuse)
    kernel_build._warned.discard(cupy_tma.WHAT)
    spec = spec_of("bfloat16", None, 128, 16, 8)
    backend = SimpleNamespace(spec=spec, tma_maps={}, index=0, kv=SimpleNamespace(data=SimpleNamespace(ptr=1 << 20)))
    with caplog.at_level("WARNING", logger="kvpager.kernels"):
        for _ in range(3):
            assert cupy_tma.pool_map(backend, 16) is None
    assert backend.tma_maps == {16: None} and len(calls) == 1
    assert sum("CUresult 1" in r.getMessage() for r in caplog.records) == 1
    # what the driver was asked for: rows of head-dim values, 16-row x 64-value boxes, 128-byte swizzle
    _, dtype, rank, base, dims, strides, boxes, steps, interleave, swizzle, _, oob = calls[0]
    assert (dtype, rank, base.value, interleave, swizzle, oob) == (1, 2, 1 << 20, 0, 3, 0)
    assert (list(dims), list(strides), list(boxes), list(steps)) == (
        [128, cupy_tma.pool_rows(spec)], [256], [64, 16], [1, 1])


@pytest.mark.parametrize("encoded", [True, False])
def test_a_launch_gets_the_tma_kernel_with_its_map_or_the_cp_async_one(monkeypatch, encoded):
    """`plan_function` (the multi-token launch's and the cascade's): the TMA kernel and
    the pool's map where the driver encoded one; where it could not, the same choice
    built without TMA, and no map."""
    from types import SimpleNamespace

    from kvpager.backends import cupy_prefill

    spec = spec_of("bfloat16", None, 128, 16, 8)
    asked = []

    def pool_map(backend, box):
        asked.append(box)
        return "the map" if encoded else None

    monkeypatch.setattr(cupy_prefill.kernels, "compute_capability", lambda dev: (9, 0))
    monkeypatch.setattr(cupy_prefill, "kernel_builder", lambda dev: lambda k: (k.func, dict(k.defines)))
    monkeypatch.setattr(cupy_prefill, "pool_map", pool_map)
    plan = SimpleNamespace(spec=spec, device=0, backend=object())
    for choose, func in ((None, "paged_prefill_sm90"), (cascade_kernel, "cascade_prefix_sm90")):
        k, (name, built), kv_map = cupy_prefill.plan_function(plan, 4, DEFAULT, choose)
        assert name == func and k.defines == built and k.defines["WS"] == 1
        assert (k.defines.get("TMA"), kv_map) == ((1, "the map") if encoded else (None, None))
        k, _, kv_map = cupy_prefill.plan_function(plan, 4, DEFAULT.replace(prefill_wgmma_tma=False), choose)
        assert "TMA" not in k.defines and kv_map is None
    assert asked == [16, 16]  # 16-row boxes (a block), asked only where the kernel loads by TMA
