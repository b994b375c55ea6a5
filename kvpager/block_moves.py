"""Launchers of the block-moving kernels: K/V writes into slots (`cuda/kv_write.cu`),
copy-on-write block copies (`cuda/block_copy.cu`) and swaps between the device
pool and mapped pinned host memory (`cuda/swap.cu`).

Each validates its arguments first (`kvpager.kernels`' checks), so a bad slot
or block id never reaches a kernel; the ``launch_*`` functions are the bare
launches for callers whose pairs are already checked and on the GPU
(benchmarks).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.kernel_config import DEFAULT, KernelConfig
from kvpager.kernels import check_pairs, get_kernel, in_range, storage_defines
from kvpager.validate_arrays import int_array

#: threads per copy_blocks CTA (block_copy.cu's COPY_THREADS)
COPY_THREADS = 256


def _tensor(x: Any, name: str, shape: tuple[int, ...], dtype: Any, device: int) -> Any:
    import cupy

    if not isinstance(x, cupy.ndarray):
        raise InvalidArgument(f"{name} must be a cupy array, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise InvalidArgument(f"{name} must have dtype {dtype}, got {x.dtype}")
    if x.device.id != device:
        raise InvalidArgument(f"{name} is on cuda:{x.device.id}, the pool on cuda:{device}")
    if not x.flags.c_contiguous or x.data.ptr % 16:
        x = x.copy()  # kernels take dense, 16-byte aligned rows
    return x


def write(pool: Any, spec: Any, layer: int, slots: Any, k: Any, v: Any, device: int,
          dtype: Any = None, scales: Any = None) -> None:
    """pool[slot // bs, layer, 0|1, :, slot % bs] = k|v for every slot != -1. An FP8
    pool: k / v in ``dtype`` (the compute dtype), quantised with ``scales`` (float32
    [layers, 2, kv heads] on the device)."""
    import cupy

    slots = int_array(slots, "slots", 1, np.int64)
    in_range(slots, -1, spec.num_blocks * spec.block_size, "slots")
    if not 0 <= layer < spec.num_layers:
        raise InvalidArgument(f"layer {layer} outside [0, {spec.num_layers})")
    t = len(slots)
    shape = (t, spec.num_kv_heads, spec.head_dim)
    k = _tensor(k, "k", shape, pool.dtype if dtype is None else dtype, device)
    v = _tensor(v, "v", shape, pool.dtype if dtype is None else dtype, device)
    if t == 0:
        return
    name, defs = write_kernel(spec)
    fn = get_kernel("kv_write.cu", name, defs, device)
    row_vecs = spec.head_dim * spec.compute_itemsize // 16
    token, head = np.int64(spec.num_kv_heads * row_vecs), np.int64(row_vecs)  # dense rows; no q copied
    args = [k, v, cupy.asarray(slots), pool, np.int32(t), np.int32(layer), np.int32(spec.num_layers),
            np.int32(spec.num_kv_heads), np.int32(spec.block_size), np.int32(row_vecs), token, head, token, head,
            np.uint64(0), np.int64(0), np.int64(0), np.uint64(0), np.int32(0)]
    if spec.is_fp8:
        args.append(scales)
    fn((min(t, 65536),), (128,), tuple(args))


def write_kernel(spec: Any) -> tuple[str, dict[str, int]]:
    """(kernel name, defines) of kv_write.cu for the pool: a byte move, or FP8 quantisation."""
    if spec.is_fp8:
        return "kv_write_fp8", storage_defines(spec)
    return "kv_write", {}


def copy_blocks(pool: Any, spec: Any, pairs: Any, device: int, config: KernelConfig = DEFAULT) -> None:
    """Whole-block copies inside the pool, all pairs in one launch."""
    import cupy

    pairs = check_pairs(pairs, spec.num_blocks, spec.num_blocks, "copy")
    if not len(pairs):
        return
    if np.isin(pairs[:, 1], pairs[:, 0]).any():
        raise InvalidArgument("copy destination blocks must not also be sources")
    launch_copy(pool, cupy.asarray(pairs), spec.bytes_per_block, device, config)


def copy_grid(num_pairs: int, block_bytes: int, config: KernelConfig = DEFAULT) -> int:
    """CTAs of a copy_blocks launch: one per chunk of ``COPY_THREADS * copy_unroll``
    16-byte vectors of every pair's block (distinct destinations inside one pool:
    at most the pool's bytes / 4 KiB, far below the grid's 2**31 - 1)."""
    chunks = -(-(block_bytes // 16) // (COPY_THREADS * config.copy_unroll))
    return num_pairs * chunks


def launch_copy(pool: Any, pairs: Any, block_bytes: int, device: int, config: KernelConfig = DEFAULT) -> None:
    """The copy_blocks launch alone; ``pairs`` already checked and on the GPU."""
    fn = get_kernel("block_copy.cu", "copy_blocks", {"UNROLL": config.copy_unroll}, device)
    fn((copy_grid(len(pairs), block_bytes, config),), (COPY_THREADS,),
       (pool, pool, pairs, np.int32(len(pairs)), np.int64(block_bytes // 16)))


def swap(src_ptr: int, dst_ptr: int, spec: Any, pairs: Any, src_blocks: int, dst_blocks: int,
         device: int, what: str) -> None:
    """Whole-block copies between the device pool and the mapped host pool."""
    import cupy

    pairs = check_pairs(pairs, src_blocks, dst_blocks, what)
    if not len(pairs):
        return
    launch_swap(src_ptr, dst_ptr, cupy.asarray(pairs), spec.bytes_per_block, device)


def swap_grid(num_pairs: int, block_bytes: int) -> tuple[int, int]:
    """(CTAs per block, pairs) of a swap_blocks launch: 2,048 vectors a CTA, at most 1,024 x 65,535."""
    return min(-(-(block_bytes // 16) // 2048), 1024), min(num_pairs, 65535)


def launch_swap(src_ptr: int, dst_ptr: int, pairs: Any, block_bytes: int, device: int) -> None:
    """The swap_blocks launch alone; ``pairs`` already checked and on the GPU."""
    fn = get_kernel("swap.cu", "swap_blocks", {}, device)
    fn(swap_grid(len(pairs), block_bytes), (256,), (np.uint64(src_ptr), np.uint64(dst_ptr), pairs,
                                                    np.int32(len(pairs)), np.int64(block_bytes // 16)))
