"""TMA tensor maps of a GPU pool, for the wgmma kernels' producer (``TMA=1``).

The wgmma kernels' producer warpgroup (the multi-token kernel's and the
cascade's shared part's) fetches a K/V tile whose every position is in range
as 2-D TMA boxes instead of 16-byte cp.async copies: one box per block (or
the part of a block a tile holds), K or V, and 64-value region of the head
dim. The tensor map that describes them views
the whole pool slab ``[blocks, layers, 2, kv heads, block size, head dim]``
as rows of ``head_dim`` 16-bit values (a row: one position of one kv head of
one layer's K or V), boxes of ``box_rows`` x 64 values, 128-byte swizzle (the
kernels' SW128 shared layout). It is encoded once per pool and box height by
the driver (``cuTensorMapEncodeTiled``) and kept in device memory, where the
kernel reads it by address. `tma_unsupported` says where a pool cannot be
mapped (pure arithmetic, tested on the CPU); `pool_map` returns the map, or
None where the driver cannot encode it (logged once): the caller then builds
the kernel with its cp.async producer alone.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kvpager import kernel_build

#: CUtensorMapDataType UINT16 (the copy is bitwise: float16 and bfloat16 alike),
#: CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
#: CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE
_UINT16, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_256B, _OOB_NONE = 1, 0, 3, 3, 0
_MAP_BYTES = 128  # sizeof(CUtensorMap), 64-byte aligned
#: what a refusal logs (once) as unavailable
WHAT = "TMA tensor maps (the wgmma kernels' producers use cp.async alone)"

_encode: Any = None


def box_rows(block_size: int, bn: int) -> int:
    """Rows of one box: a block, or the part of one a ``bn``-position tile holds."""
    return min(block_size, bn)


def pool_rows(spec: Any) -> int:
    """Rows of ``head_dim`` values in the pool slab (the map's outer dimension)."""
    return spec.num_blocks * spec.num_layers * 2 * spec.num_kv_heads * spec.block_size


def tma_unsupported(spec: Any, bn: int) -> str | None:
    """Why the pool ``spec`` cannot be read by TMA boxes in ``bn``-position tiles; None
    when it can. A box must be whole 8-row atoms of the swizzled layout and at most 256
    rows, tiles must hold whole boxes, and every row's index must fit an int32."""
    bs, rows = spec.block_size, box_rows(spec.block_size, bn)
    if spec.dtype not in ("float16", "bfloat16") or spec.is_fp8:
        return f"TMA loads are for 16-bit pools, not {spec.kv_dtype or spec.dtype}"
    if rows % 8 or rows > 256:
        return f"a TMA box of {rows} rows (block size {bs}) is not whole 8-row atoms of at most 256"
    if bn % rows or bs % rows:
        return f"{bn}-position tiles do not hold whole {rows}-row boxes of {bs}-position blocks"
    if pool_rows(spec) >= 1 << 31:
        return f"the pool's {pool_rows(spec)} rows do not fit the kernel's int32 row index"
    return None


def encode(base: int, head_dim: int, rows: int, box: int) -> bytes:
    """The driver's 128-byte tensor map of ``rows`` x ``head_dim`` 16-bit values at device
    address ``base`` (rows ``head_dim * 2`` bytes apart), boxes of ``box`` rows x 64 values,
    128-byte swizzle. RuntimeError where the driver refuses it."""
    global _encode
    if _encode is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        fn.restype = ctypes.c_int
        _encode = fn
    raw = (ctypes.c_uint8 * (_MAP_BYTES + 64))()
    at = (ctypes.addressof(raw) + 63) & ~63  # CUtensorMap is 64-byte aligned
    dims = (ctypes.c_uint64 * 2)(head_dim, rows)
    strides = (ctypes.c_uint64 * 1)(head_dim * 2)
    boxes = (ctypes.c_uint32 * 2)(64, box)
    steps = (ctypes.c_uint32 * 2)(1, 1)
    err = _encode(at, _UINT16, 2, ctypes.c_void_p(base), dims, strides, boxes, steps, _INTERLEAVE_NONE,
                  _SWIZZLE_128B, _L2_256B, _OOB_NONE)
    if err != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled returned CUresult {err}")
    return ctypes.string_at(at, _MAP_BYTES)


def pool_map(backend: Any, box: int) -> Any:
    """``backend``'s pool as a TMA tensor map of ``box``-row boxes, on its device (a
    cupy uint8 array: pass its address), made once per box height; None where the
    driver cannot encode it (logged once)."""
    maps = backend.tma_maps
    if box not in maps:
        spec = backend.spec
        try:
            raw = encode(backend.kv.data.ptr, spec.head_dim, pool_rows(spec), box)
        except (OSError, AttributeError, RuntimeError) as exc:  # no libcuda, an old driver, a refusal
            kernel_build.warn_once(WHAT, exc)
            maps[box] = None
        else:
            import cupy
            import numpy as np

            with cupy.cuda.Device(backend.index):
                maps[box] = cupy.asarray(np.frombuffer(raw, dtype=np.uint8))
    return maps[box]
