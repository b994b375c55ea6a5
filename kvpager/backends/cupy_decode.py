"""Decode (one query token per item): the planner and the launches.

The planner is pure arithmetic over the pool's geometry, the step's shape,
the device's SM count and a `KernelConfig`, so it is tested on the CPU:
`decode_shape` picks the kernel (paged_decode_tc.cu on tensor cores for
16-bit and FP8 pools, two warps a tile for heads wider than 256;
paged_decode.cu on CUDA cores for float32), its CTA
layout, pipeline stages, defines, grid and shared memory; `plan_splits` the
split-K count once the compiled kernel's occupancy is known. `decode_launch`
and `merge_launch` pack the launches (`kvpager.launch.Launch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvpager import kernels
from kvpager.kernel_config import KernelConfig
from kvpager.kernel_smem import check_fits, decode_row_bytes, decode_tc_smem, head_split
from kvpager.launch import Launch, i32, ptr

#: shared memory the decode planner sizes its stages and layouts to, per SM (an H100 / H200 has 227 KiB)
SMEM_BUDGET = 220 * 1024
#: a host-bound decode step (`CupyPlan.host_bound`) runs unsplit only while its layer reads at most this
#: much K/V (64 MiB: 14 us at 4.8 TB/s, well inside the 30-70 us of Python a model's eager layer takes);
#: a longer read could outlast the host, and is split as any other step
HOST_BOUND_UNSPLIT_BYTES = 64 << 20


@dataclass(frozen=True)
class DecodeShape:
    """A decode launch before its split count: kernel, defines, CTAs, threads, shared memory."""

    file: str
    kernel: str
    defines: dict[str, int]
    ctas: int
    threads: int
    smem: int
    tc: bool  # tensor cores: scores are raw q . k products (else log2 units)


def decode_subgroup(dtype: str, head_dim: int, group: int) -> int:
    """Query heads per CUDA-core decode CTA: the whole group while q and the
    accumulator of the lane's dims fit in 64 registers, else the largest part of it that
    divides it (paged_decode.cu cuts the group into equal subgroups)."""
    itemsize = 4 if dtype == "float32" else 2
    nv = head_dim * itemsize // 16
    lpr = 4 if nv <= 4 else 8 if nv <= 8 else 16 if nv <= 16 else 32
    per_head = -(-nv // lpr) * (16 // itemsize)
    cap = max(1, 32 // per_head)
    return max(d for d in range(1, min(group, cap) + 1) if group % d == 0)


def cuda_core_rows(spec: Any, config: KernelConfig) -> int:
    """K/V rows per lane group and iteration of paged_decode.cu (its CH; float32 pools):
    the config's, for heads wider than 256 as many as keep the four K/V row buffers
    (two in flight, two in use) within 64 registers a lane."""
    if spec.head_dim <= kernels.TC_HEAD_DIM:
        return int(config.decode_rows)
    nv = spec.head_dim * spec.itemsize // 16
    per_row = 4 * -(-nv // 32) * 4  # 4 buffers x vectors a lane x 4 registers
    return int(max(1, min(config.decode_rows, 64 // per_row)))


def decode_layout(num_kv_heads: int, head_dim: int, itemsize: int, items: int, max_len: int,
                  num_sms: int, config: KernelConfig, group: int = 1) -> tuple[int, int]:
    """(kv heads per CTA, warps per head) for paged_decode_tc.cu. By default one head per CTA
    and 4 warps sharing its tiles; for short contexts (``config.decode_short_context``) whose
    one-head CTAs would fill every SM twice, 4 heads per CTA with one warp each (the same warps
    in a quarter of the CTAs, each with 4x the tiles: 64 x 256 tokens measured 0.025 ms against
    0.027 on an H200, three runs). The config's ``decode_heads_per_cta`` /
    ``decode_warps_per_head`` override; the heads per CTA are cut to a divisor of the kv heads
    whose two stages fit the shared-memory budget. Heads wider than 256 (`head_split`):
    each of these warps is two, each reading half of every row, so by default 2 warps
    (pairs) per head (the same 4 warps a CTA). A ``group`` of more than 16 query heads runs
    in chunks of 16 (`kernels.TC_GROUP`), one kv head a CTA: its chunks' warps in one CTA
    (`group_chunks`), WPH each (4 by default), as many as `group_warps` allows in all (at
    head dim 64: 4, 3, 2 a chunk for groups of 17-64, 65-80, 81-128 heads)."""
    split = head_split(head_dim)
    shared, _ = group_chunks(group, head_dim)
    if shared > 1:  # the chunks' warps share each tile, as many in the CTA as `group_warps` allows
        return 1, max(1, min(int(config.decode_warps_per_head or 4), group_warps(head_dim) // shared))
    hpc = 1 if group > kernels.TC_GROUP else config.decode_heads_per_cta
    if hpc is None:
        short = max_len <= config.decode_short_context and items * num_kv_heads >= 2 * num_sms
        hpc = 4 if short else 1
    hpc = math.gcd(int(hpc), num_kv_heads)
    wph = int(config.decode_warps_per_head or ((4 if hpc == 1 else 1) if split == 1 else (2 if hpc == 1 else 1)))
    per_warp = 2 * 16 * decode_row_bytes(head_dim, itemsize) * split
    while hpc > 1 and (hpc * wph * split > 16 or hpc * wph * 2 * per_warp > SMEM_BUDGET):
        hpc //= 2
    return hpc, wph


def group_chunks(group: int, head_dim: int) -> tuple[int, int]:
    """(chunks of 16 query heads in one CTA, CTAs a kv head) of paged_decode_tc.cu for a GQA
    ``group``: a group past 16 heads runs its chunks in one CTA, whose warps share each staged
    K/V tile (the K/V read once for the whole group: 71 heads of 64 at 256 x 1,024 on an H200
    took 0.091 ms as five CTAs each reading it), except for heads wider than 256 (two warps a
    tile already), which take a CTA a chunk; (1, 1) up to 16 heads."""
    chunks = -(-group // kernels.TC_GROUP)
    if chunks == 1:
        return 1, 1
    return (chunks, 1) if head_split(head_dim) == 1 else (1, chunks)


def group_warps(head_dim: int) -> int:
    """Most warps of a paged_decode_tc.cu CTA whose group's chunks share their tiles (GS): as
    many as the registers a lane of its head dim takes allow without spills (sm_90, ptxas:
    116-124 a lane up to head dim 96, 16 warps; 162-166 at 112-128, 12; 248-252 at 256, 8;
    more warps cap each lane's registers lower and spilled)."""
    return 16 if head_dim <= 96 else 12 if head_dim <= 128 else 8


#: FP8 pools: contexts this long get up to 6 cp.async stages (see `decode_stages`)
FP8_DEEP_CONTEXT = 2048


def decode_stages(head_dim: int, itemsize: int, warps: int, config: KernelConfig, max_len: int = 0) -> int:
    """cp.async stages per warp for paged_decode_tc.cu: ``config.decode_stages``, else as
    many as fit in the CTA's share of the budget (8 warps per SM), 2 to 4; up to 6 for an
    FP8 pool's contexts of ``FP8_DEEP_CONTEXT`` positions or more, whose stages carry half
    the bytes (six of them keep as many bytes in flight as three 16-bit ones: 64 x 4,096 on
    an H200 0.145 ms against 0.157 with four; shorter contexts lose to the longer prologue,
    256 x 1,024 0.169 against 0.147)."""
    if config.decode_stages:
        return int(config.decode_stages)
    per_stage = warps * 2 * 16 * decode_row_bytes(head_dim, itemsize)
    budget = SMEM_BUDGET // max(1, 8 // warps)
    most = 6 if itemsize == 1 and max_len >= FP8_DEEP_CONTEXT else 4
    return int(max(2, min(most, budget // per_stage)))


def decode_shape(spec: Any, group: int, items: int, max_len: int, num_sms: int,
                 config: KernelConfig) -> DecodeShape:
    """The decode kernel of ``items`` work items of at most ``max_len`` positions (GQA
    ``group`` query heads per kv head) over the pool ``spec`` on ``num_sms`` SMs."""
    base = {**kernels.storage_defines(spec), "HEAD_DIM": spec.head_dim, "BLOCK_SIZE": spec.block_size}
    if kernels.cuda_core_steps(spec):
        gs = decode_subgroup(spec.dtype, spec.head_dim, group)
        defs = {**base, "SUBGROUP": gs, "CH": cuda_core_rows(spec, config)}
        return DecodeShape("paged_decode.cu", "paged_decode", defs, items * spec.num_kv_heads * (group // gs),
                           128, 0, False)
    hpc, wph = decode_layout(spec.num_kv_heads, spec.head_dim, spec.itemsize, items, max_len, num_sms, config,
                             group)
    shared, chunks = group_chunks(group, spec.head_dim)  # (chunks in a CTA, CTAs a kv head)
    split = head_split(spec.head_dim)
    # (the chunks of a CTA share their stages: a stage set per place among WPH)
    stages = decode_stages(spec.head_dim, spec.itemsize, hpc * wph * split, config, max_len)
    defs = {**base, "GROUP": group, "STAGES": stages, "HPC": hpc, "WPH": wph}
    if config.decode_l2_prefetch:
        defs["CP_L2_PREFETCH"] = config.decode_l2_prefetch
    if config.decode_l2_evict_first:
        defs["CP_EVICT_FIRST"] = 1
    smem = decode_tc_smem(spec.head_dim, spec.itemsize, shared * hpc * wph, stages, min(group, kernels.TC_GROUP),
                          sets=hpc * wph)
    return DecodeShape("paged_decode_tc.cu", "paged_decode_tc", defs, items * (spec.num_kv_heads // hpc) * chunks,
                       32 * shared * hpc * wph * split, smem, True)


def plan_splits(base_ctas: int, max_len: int, num_sms: int, resident: int = 0, fill: bool = True) -> int:
    """Split-K count for decode, each split at least 512 tokens long (shorter
    splits cost more in partial writes and the merge launch than they gain).

    With ``resident`` (CTAs that fit on one SM at once) known: no split when
    the CTAs already fill the SMs once; else the fewest splits that do, choosing
    among up to twice that many the count whose last wave is fullest (every
    split adds a partial write and a latency-bound merge launch, measured at
    ~8 us for 2,048 rows on an H200), and none when they fill the SMs four
    times over (FP8 256 x 1,024 on an H200: 0.147 ms unsplit, 0.176 in two).
    Without it (the CUDA-core kernel): about eight CTAs per SM. ``fill`` False (FP8
    pools, bound by the bytes each warp keeps in flight rather than by the last wave):
    the most splits whose CTAs all fit in one wave of resident CTAs (H200, 264 slots:
    64 x 4,096 0.145 ms unsplit against 0.164 in the two that fill the last wave
    best; 16 x 16,384 0.144 ms in two against 0.165 in three, 1.45 waves; 1 x
    131,072 0.080 ms in 33 against 0.083 in 30)."""
    hi = int(max(1, min(max_len // 512, 1024)))
    base = max(base_ctas, 1)
    if resident <= 0:
        return int(min(max(1, -(-num_sms * 8 // base)), hi))
    slots = num_sms * resident
    if base >= 4 * slots:  # the last wave's tail is under a quarter of the launch: splits cost more
        return 1
    if not fill:
        return int(min(max(1, slots // base), hi))
    lo = min(max(1, -(-slots // base)), hi)
    best, best_fill = lo, 0.0
    for s in range(lo, min(2 * lo, hi) + 1):
        waves = base * s / slots
        fill = waves / math.ceil(waves)
        if fill > best_fill + 0.02:
            best, best_fill = s, fill
    return int(best)


def merge_defines(spec: Any) -> dict[str, int]:
    """merge_splits.cu's defines: the output dtype and head dim (the partials are float32)."""
    return {"KV_DTYPE": kernels.DTYPE_CODES[spec.dtype], "HEAD_DIM": spec.head_dim}


# -- launches -----------------------------------------------------------------------------
def decode_kernel(plan: Any, group: int, max_len: int, config: KernelConfig) -> tuple[DecodeShape, Any, int]:
    """(shape, compiled kernel, split count) of ``plan``'s decode; ``plan.num_splits`` overrides."""
    dev = plan.device
    nsm = kernels.num_sms(dev)
    shape = decode_shape(plan.spec, group, plan.items, max_len, nsm, config)
    if shape.tc:
        check_fits(shape.smem, kernels.device_attributes(dev),
                   "paged_decode_tc.cu with these decode_stages / decode_heads_per_cta / decode_warps_per_head")
    fn = kernels.get_kernel(shape.file, shape.kernel, shape.defines, dev)
    resident = 0
    if shape.tc:
        if fn.max_dynamic_shared_size_bytes < shape.smem:
            fn.max_dynamic_shared_size_bytes = shape.smem
        resident = kernels.resident_ctas(fn, shape.threads, shape.smem, dev)
    if plan.num_splits:
        splits = plan.num_splits
    elif (plan.host_bound and shape.ctas >= nsm
          and plan.items * max_len * plan.spec.bytes_per_token <= HOST_BOUND_UNSPLIT_BYTES * plan.spec.num_layers):
        # A step its host paces: the unsplit kernel already has a CTA for every SM, and
        # no split spares the host a merge launch a layer (the device's extra time hides).
        splits = 1
    else:
        splits = plan_splits(shape.ctas, max_len, nsm, resident, fill=not plan.spec.is_fp8)
    return shape, fn, int(splits)


def decode_launch(plan: Any, shape: DecodeShape, fn: Any, splits: int, group: int, cells: dict[str, Any],
                  part_o: Any, part_lse: Any, own_start: Any, parts: int, merge_ctr: Any = None) -> Launch:
    """The decode launch; ``cells``: q, pool, tables, item_seq, item_len, out, common
    (layer, layers, kv heads), scales, window, softcap, scale (`attention_launches`);
    ``merge_ctr``: a split decode that merges its own partials (paged_decode_tc.cu): one
    int32 per CTA column, zero between launches."""
    c = cells
    args = [c["q"], c["pool"], c["tables"], c["item_seq"], c["item_len"], c["out"], part_o, part_lse,
            *c["common"]]
    if not shape.tc:
        args.append(i32(group))
    args += [i32(plan.width), i32(splits), own_start, i32(parts)]
    if shape.tc:
        args += [c["scales"], merge_ctr if merge_ctr is not None else ptr(0)]
    args += [c["window"], c["softcap"], c["scale"]]
    return Launch(fn, (shape.ctas, splits), shape.threads, shape.smem, args, plan.device)


def merge_launch(plan: Any, rows: int, part_o: Any, part_lse: Any, out: Any, parts: int, num_q_heads: int,
                 sinks: Any, level_mask: int = 0, own_parts: int | None = None, chunks: int = 1,
                 programmatic: bool = False) -> Launch:
    """merge_splits over ``parts`` partial slots of each of ``rows`` rows (item *
    ``num_q_heads`` + head) into ``out``; ``sinks``: the cell of the attention sinks'
    pointer (float32 per query head, 0: none), set per call. With a ``level_mask`` (a
    decode cascade's, per item), slot ``own_parts + level * chunks + c`` counts only for
    the members of a segment of that level. Many rows of few slots merge a warp per row
    (merge_splits_warp: `KernelConfig.merge_warp_max_parts`). ``programmatic``: launched to
    start under the kernel before it in the stream (`kvpager.launch.Launch`), which must be the
    one writing the partials (compute capability 9.0 and later)."""
    config = plan.config
    args = [part_o, part_lse, out, i32(parts), ptr(level_mask), i32(parts if own_parts is None else own_parts),
            i32(chunks), i32(num_q_heads)]
    if parts <= config.merge_warp_max_parts and rows >= config.merge_warp_min_rows and plan.spec.head_dim % 32 == 0:
        fn = kernels.get_kernel("merge_splits.cu", "merge_splits_warp", merge_defines(plan.spec), plan.device)
        return Launch(fn, (-(-rows // 8),), 256, 0, [*args, i32(rows), sinks], plan.device, programmatic)
    fn = kernels.get_kernel("merge_splits.cu", "merge_splits", merge_defines(plan.spec), plan.device)
    return Launch(fn, (rows,), 256, 0, [*args, sinks], plan.device, programmatic)
