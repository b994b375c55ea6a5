"""Multi-token attention (prefill, chunked prefill): the planner and the launch.

`prefill_tiling` picks paged_prefill.cu's tiling (query rows per warp, the
K/V tile, pipeline stages, shared memory) from the head dim and a
`KernelConfig`; cascade_prefix.cu runs on the same tiling
(`kvpager.backends.cupy_launches.cascade_tiling`). `prefill_tiles` lists a
step's query tiles, longest K/V first. Both are pure arithmetic (tested on
the CPU); `prefill_launch` uploads the tiles and packs the launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kvpager import kernels
from kvpager.errors import UnsupportedConfiguration
from kvpager.kernel_config import KernelConfig
from kvpager.kernel_smem import prefill_smem
from kvpager.launch import Launch, current_stream, i32, ptr


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
            "GROUP": group, "MT": t.mt}
    return t, defs, prefill_smem(spec.head_dim, t.mt, t.bn, t.stages, spec.is_fp8)


def prefill_tiles(query_lens: np.ndarray, seq_lens: np.ndarray, rows: int, own: Any = None) -> np.ndarray:
    """int32 [tiles, 2]: (sequence, first query) of every tile of ``rows`` queries, the
    tiles that see the most K/V first (so the long ones do not trail the launch);
    ``own``: each sequence's first position read (a cascade's own parts), else 0."""
    ql, sl = query_lens, seq_lens
    counts = -(-ql // rows)
    seq = np.repeat(np.arange(len(ql), dtype=np.int32), counts)
    first = np.cumsum(counts) - counts
    j0 = ((np.arange(len(seq)) - np.repeat(first, counts)) * rows).astype(np.int32)
    start = own[seq] if own is not None else 0
    order = np.argsort(-(sl[seq] - start - ql[seq] + j0), kind="stable")
    return np.ascontiguousarray(np.stack([seq[order], j0[order]], axis=1), dtype=np.int32)


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
    t, defs, smem = prefill_tiling(spec, group, config)
    tiles = prefill_tiles(plan.query_lens, plan.seq_lens, t.bm // group, own)
    tiles_dev = cupy.empty(tiles.shape, dtype=cupy.int32)
    runtime.memcpyAsync(tiles_dev.data.ptr, tiles.ctypes.data, tiles.nbytes, runtime.memcpyHostToDevice,
                        current_stream(dev))
    fn = kernels.get_kernel("paged_prefill.cu", "paged_prefill", defs, dev)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    c, p = cells, plan.ptrs
    args = [c["q"], c["pool"], c["tables"], ptr(p["seq_lens"]), ptr(p["query_lens"]), ptr(p["q_start"]),
            ptr(tiles_dev.data.ptr), c["out"], *c["common"], i32(plan.width),
            ptr(0) if own_start is None else own_start, ptr(0) if part_o is None else part_o,
            ptr(0) if part_lse is None else part_lse, i32(parts), c["scales"], c["window"], c["softcap"], c["scale"]]
    # the host copy stays alive until the upload has run
    return Launch(fn, (len(tiles), spec.num_kv_heads), 128, smem, args, dev), [tiles_dev, tiles]
