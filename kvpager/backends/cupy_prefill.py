"""Multi-token attention (prefill, chunked prefill): the planner and the launch.

`prefill_kernel` chooses the kernel: paged_prefill.cu (mma.sync, every GPU;
two warps a query row, each half the head dim, for heads wider than 256)
or, on compute capability 9.0 for 16-bit pools of head dim 64, 128 or 256,
paged_prefill_sm90.cu (wgmma, built for sm_90a) as `KernelConfig.prefill_kernel`
says. `prefill_tiling` picks paged_prefill.cu's tiling (query rows per warp,
the K/V tile, pipeline stages, shared memory) from the head dim and a
`KernelConfig`; the cascade's shared part runs on the chosen kernel's twin
and tiling (`kvpager.backends.cupy_cascade.cascade_kernel`); what each launch's
CTAs work on is `kvpager.backends.prefill_work`'s. All are pure arithmetic (tested on
the CPU); `prefill_launch` uploads the tiles and packs the launch (falling
back to paged_prefill.cu, logged once, where "auto" meets an NVRTC without sm_90a).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvpager import kernel_build, kernels
from kvpager.backends.cupy_tma import box_rows, pool_map, tma_unsupported
from kvpager.backends.prefill_work import head_chunk, prefill_items, prefill_tiles
from kvpager.errors import UnsupportedConfiguration
from kvpager.kernel_config import KernelConfig
from kvpager.kernel_smem import check_fits, head_split, prefill_sm90_smem, prefill_smem
from kvpager.launch import Launch, current_stream, i32, ptr

#: head dims paged_prefill_sm90.cu is built for (others: paged_prefill.cu)
WGMMA_HEAD_DIMS = (64, 128, 256)


@dataclass(frozen=True)
class Tiling:
    """paged_prefill.cu's (and cascade_prefix.cu's) tensor-core tiling."""

    mt: int      # 16-row m-tiles per warp (MT): a CTA's 4 warps own bm = 64 * mt rows
    bm: int
    bn: int      # K/V positions per tile
    stages: int  # cp.async stages of K/V tiles


def tiling(head_dim: int, config: KernelConfig) -> Tiling:
    """Two m-tiles per warp up to head dim 128 (registers), else one (``config.prefill_mt``
    overrides); 32-position K/V tiles with two m-tiles or past head dim 128, else 64; 3
    stages with two m-tiles, else 2 (the kernels' own rules: BN, STAGES)."""
    mt = config.prefill_mt or (2 if head_dim <= 128 else 1)
    if mt == 2 and head_dim > 128:
        raise UnsupportedConfiguration(f"prefill_mt=2 takes head dims up to 128 (registers), not {head_dim}")
    return Tiling(mt, 64 * mt, 32 if mt == 2 or head_dim > 128 else 64, 3 if mt == 2 else 2)


def prefill_tiling(spec: Any, group: int, config: KernelConfig) -> tuple[Tiling, dict[str, int], int]:
    """(tiling, defines, dynamic shared memory) of paged_prefill.cu for the pool ``spec``."""
    t = tiling(spec.head_dim, config)
    defs = {**kernels.storage_defines(spec), "HEAD_DIM": spec.head_dim, "BLOCK_SIZE": spec.block_size,
            "GROUP": group, "MT": t.mt, **chunk_define(group, t.bm, config)}
    return t, defs, prefill_smem(spec.head_dim, t.mt, t.bn, t.stages, spec.is_fp8)


def chunk_define(group: int, rows: int, config: KernelConfig) -> dict[str, int]:
    """{"HCH": heads} where a tile of ``rows`` rows holds a chunk of the ``group``'s query heads
    (`prefill_work.head_chunk`), else nothing (the whole group)."""
    h = head_chunk(group, rows, config.prefill_head_chunk)
    return {"HCH": h} if h != group else {}


@dataclass(frozen=True)
class PrefillKernel:
    """The multi-token kernel of a step: source, function, target, tiling, defines,
    dynamic shared memory and threads per CTA."""

    file: str
    func: str
    arch: str | None  # "sm_90a" (wgmma) or None: the device's own target
    tiling: Tiling
    defines: dict[str, int]
    smem: int
    threads: int

    def head_chunk(self, group: int) -> int:
        """The query heads of a ``group`` a tile holds (HCH: the whole group unless defined)."""
        return self.defines.get("HCH", group)


def wgmma_unsupported(spec: Any, cc: tuple[int, int]) -> str | None:
    """Why paged_prefill_sm90.cu cannot run the pool ``spec`` on a device of compute
    capability ``cc``; None when it can."""
    if cc != (9, 0):
        return f"wgmma kernels are built for compute capability 9.0 (sm_90a), not {cc[0]}.{cc[1]}"
    if spec.is_fp8:
        return f"FP8 pools ({spec.kv_dtype}) use paged_prefill.cu"
    if spec.dtype not in ("float16", "bfloat16"):
        return f"{spec.dtype} pools use the CUDA-core kernels"
    if spec.head_dim not in WGMMA_HEAD_DIMS:
        return f"head_dim {spec.head_dim} is not one of {WGMMA_HEAD_DIMS}"
    return None


def producer(config: KernelConfig) -> bool:
    """Whether paged_prefill_sm90.cu runs with its producer warpgroup (WS):
    ``config.prefill_wgmma_producer``, or by default with 2 MMA warpgroups and no overlap."""
    if config.prefill_wgmma_producer is not None:
        return config.prefill_wgmma_producer
    return (config.prefill_wgmma_warpgroups or 2) == 2 and not config.prefill_wgmma_overlap


def wgmma_tiling(head_dim: int, config: KernelConfig) -> Tiling:
    """paged_prefill_sm90.cu's tiling: 2 warpgroups (128 rows; each warp its 16 rows, mt 1),
    128-position K/V tiles in 2 stages at head dim 64 and with the producer at 128 in 3,
    64-position tiles in 2 stages at 256 (no overlap there), else 64-position tiles in 3
    stages (3 with overlap, which keeps two tiles resident); each knob overrides.
    The producer warpgroup (WS; by default with 2 MMA warpgroups and no overlap: `producer`)
    needs 2 MMA warpgroups; with it, overlap is FlashAttention-3's loop (S of a tile issued
    with P V of the one before)."""
    wg = config.prefill_wgmma_warpgroups or 2
    ws = producer(config)
    # with the producer at head dim 128: 128-position tiles, 3 stages (8 x 1,024 on 4,096 on an
    # H200: 373 TFLOP/s against 345 with 64-position tiles, 272 with 2 stages)
    wide = ws and head_dim == 128 and not config.prefill_wgmma_overlap
    bn = config.prefill_wgmma_bn or (128 if head_dim == 64 or wide else 64)
    # head dim 256: 2 stages of 64-position tiles (3 exceed a CTA's shared memory)
    stages = config.prefill_wgmma_stages or (
        2 if not config.prefill_wgmma_overlap and (head_dim == 256 or bn == 128 and not wide) else 3)
    if config.prefill_wgmma_overlap and head_dim == 256:
        # its 3 stages of 64-position tiles fit only one MMA warpgroup's CTA, with S twice and O of
        # 256 values a row in registers: not a variant this kernel is tested in
        raise UnsupportedConfiguration("prefill_wgmma_overlap is not run at head dim 256")
    if config.prefill_wgmma_overlap and stages < 3:
        # two tiles resident; and a producer signals a tile once the next is under way
        raise UnsupportedConfiguration(f"prefill_wgmma_overlap needs 3 or more stages, not {stages}")
    if ws and wg != 2:
        raise UnsupportedConfiguration("prefill_wgmma_producer runs two MMA warpgroups, not 1")
    return Tiling(1, 64 * wg, bn, stages)


def prefill_kernel(spec: Any, group: int, config: KernelConfig, cc: tuple[int, int]) -> PrefillKernel:
    """The multi-token kernel for the pool ``spec`` and GQA ``group`` on a device of
    compute capability ``cc``: wgmma where ``config.prefill_kernel`` is "wgmma" (else
    UnsupportedConfiguration, and where its shared memory exceeds an H200's CTA) or
    "auto" and it applies; paged_prefill.cu otherwise."""
    choice = config.prefill_kernel
    why = wgmma_unsupported(spec, cc) if choice != "mma" else "not asked for"
    if choice == "wgmma" and why:
        raise UnsupportedConfiguration(f"prefill_kernel='wgmma': {why}")
    if why:
        t, defs, smem = prefill_tiling(spec, group, config)
        return PrefillKernel("paged_prefill.cu", "paged_prefill", None, t, defs, smem,
                             128 * head_split(spec.head_dim))
    t = wgmma_tiling(spec.head_dim, config)
    smem = prefill_sm90_smem(spec.head_dim, t.bm // 64, t.bn, t.stages)
    check_fits(smem, {}, f"paged_prefill_sm90.cu ({t.bm} rows, {t.bn}-position tiles, {t.stages} stages)")
    defs = {**kernels.storage_defines(spec), "HEAD_DIM": spec.head_dim, "BLOCK_SIZE": spec.block_size,
            "GROUP": group, "WG": t.bm // 64, "BN": t.bn, "STAGES": t.stages, **chunk_define(group, t.bm, config)}
    if spec.head_dim == 256:
        defs["VN"] = 64  # O += P V as four m64n64 products a k-step (no m64n256 form is built)
    if config.prefill_wgmma_overlap:
        defs["OVERLAP"] = 1
    ws = producer(config)
    if ws:
        defs["WS"] = 1
        if config.prefill_wgmma_overlap and not config.prefill_wgmma_pingpong:
            defs["PINGPONG"] = 0
        if config.prefill_wgmma_tma and tma_unsupported(spec, t.bn) is None:
            defs["TMA"] = 1
        if config.prefill_wgmma_persistent and not config.prefill_wgmma_overlap:
            defs["PERSIST"] = 1
    threads = 2 * t.bm + (128 if ws else 0)
    return PrefillKernel("paged_prefill_sm90.cu", "paged_prefill_sm90", "sm_90a", t, defs, smem, threads)


def prefill_function(spec: Any, group: int, config: KernelConfig, cc: tuple[int, int],
                     build: Callable[[PrefillKernel], Any],
                     choose: Callable[..., PrefillKernel] | None = None) -> tuple[PrefillKernel, Any]:
    """(the kernel, ``build(kernel)``): `prefill_kernel`'s choice (or ``choose``'s, which
    takes the same arguments: the cascade's `cupy_cascade.cascade_kernel`), or the mma
    kernel where "auto" chose wgmma and building it failed (an NVRTC without sm_90a:
    logged once)."""
    choose = choose or prefill_kernel
    k = choose(spec, group, config, cc)
    try:
        return k, build(k)
    except UnsupportedConfiguration as exc:
        if k.arch is None or config.prefill_kernel == "wgmma":
            raise
        kernel_build.warn_once(k.file, exc)
        k = choose(spec, group, config.replace(prefill_kernel="mma"), cc)
        return k, build(k)


def plan_function(plan: Any, group: int, config: KernelConfig,
                  choose: Callable[..., PrefillKernel] | None = None) -> tuple[PrefillKernel, Any, Any]:
    """`prefill_function` on ``plan``'s device, with the pool's TMA tensor map (`cupy_tma.pool_map`)
    where the kernel loads by TMA, else None; where the driver cannot encode the map (logged
    once), the same choice without TMA: the cp.async producer."""
    spec, dev = plan.spec, plan.device
    cc, build = kernels.compute_capability(dev), kernel_builder(dev)
    k, fn = prefill_function(spec, group, config, cc, build, choose)
    if not k.defines.get("TMA"):
        return k, fn, None
    kv_map = pool_map(plan.backend, box_rows(spec.block_size, k.tiling.bn))
    if kv_map is None:
        k, fn = prefill_function(spec, group, config.replace(prefill_wgmma_tma=False), cc, build, choose)
    return k, fn, kv_map


def kernel_builder(device: int) -> Callable[[PrefillKernel], Any]:
    """``build`` for `prefill_function` on ``device``: the shared memory checked against
    the device's CTA limit, then the compiled function (`kernels.get_kernel`)."""

    def build(k: PrefillKernel) -> Any:
        check_fits(k.smem, kernels.device_attributes(device), k.file)
        return kernels.get_kernel(k.file, k.func, k.defines, device, k.arch)

    return build


def prefill_launch(plan: Any, group: int, cells: dict[str, Any], config: KernelConfig, *, own: Any = None,
                   own_start: Any = None, part_o: Any = None, part_lse: Any = None, parts: int = 0
                   ) -> tuple[Launch, list[Any]]:
    """(the launch, buffers to keep alive) of ``plan``'s multi-token attention; ``cells``
    as in `kvpager.backends.cupy_decode.decode_launch`. In a cascade: ``own`` (host) and
    ``own_start`` (device) each sequence's first own position, and the kernel writes
    float32 partial states into slot 0 of ``parts`` (``part_o``, ``part_lse``)."""
    import cupy
    from cupy.cuda import runtime

    spec, dev = plan.spec, plan.device
    k, fn, kv_map = plan_function(plan, group, config)
    smem = k.smem
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    hch = k.head_chunk(group)
    rows = k.tiling.bm // hch  # query tokens a tile
    heads = spec.num_kv_heads * -(-group // hch)  # (kv head, head chunk) pairs: a grid row or an item's
    persist = bool(k.defines.get("PERSIST"))
    tiles = (prefill_items(plan.query_lens, plan.seq_lens, rows, heads, own) if persist
             else prefill_tiles(plan.query_lens, plan.seq_lens, rows, own))
    tiles_dev = cupy.empty(tiles.shape, dtype=cupy.int32)
    runtime.memcpyAsync(tiles_dev.data.ptr, tiles.ctypes.data, tiles.nbytes, runtime.memcpyHostToDevice,
                        current_stream(dev))
    c, p = cells, plan.ptrs
    args = [c["q"], c["pool"], c["tables"], ptr(p["seq_lens"]), ptr(p["query_lens"]), ptr(p["q_start"]),
            ptr(tiles_dev.data.ptr), c["out"], *c["common"], i32(plan.width),
            ptr(0) if own_start is None else own_start, ptr(0) if part_o is None else part_o,
            ptr(0) if part_lse is None else part_lse, i32(parts), c["scales"],
            ptr(0 if kv_map is None else kv_map.data.ptr), c["window"], c["softcap"], c["scale"]]
    grid = (len(tiles), heads)
    keep = [tiles_dev, tiles]  # the host copy stays alive until the upload has run
    if k.arch is not None:  # paged_prefill_sm90.cu: its work items and their counter, for the persistent grid
        counter = cupy.zeros(2, dtype=cupy.int32) if persist else None  # 0 between launches: the kernel resets it
        # before window, soft cap and scale (the plan's cells, last)
        args[-3:-3] = [i32(len(tiles)), ptr(0 if counter is None else counter.data.ptr)]
        if persist:
            grid = (persistent_ctas(len(tiles), config, dev), 1)
            keep.append(counter)
    return Launch(fn, grid, k.threads, smem, args, dev), keep


def persistent_ctas(work: int, config: KernelConfig, device: int) -> int:
    """CTAs of paged_prefill_sm90.cu's persistent grid for ``work`` items: one an SM (its
    shared memory fits one), or fewer where ``config.prefill_wgmma_ctas`` says (more could
    not run at once: a second wave would start only once the first had walked all its
    items); never more than the items."""
    sms = kernels.num_sms(device)
    return max(1, min(work, sms, config.prefill_wgmma_ctas or sms))
