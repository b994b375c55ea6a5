"""The one loader of kvpager's CUDA kernels (`cuda/*.cu`), and their launchers.

Sources are read from disk, compiled with `cupy.RawModule` (NVRTC) on first
use, one module per (device, file, specialisation), and cached. A
specialisation is a set of ``-D`` defines (dtype, head dim, block size, GQA
group), so each kernel is built with compile-time shapes.

Every launcher validates its arguments in Python first (dtypes, shapes, ids in
range), so a bad block id or slot never reaches a kernel.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument, UnsupportedConfiguration
from kvpager.validate import int_array

DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}
#: KV_FP8 codes of the FP8 storage dtypes (kvpager_common.cuh)
FP8_CODES = {"float8_e4m3": 1, "float8_e5m2": 2}
HEAD_DIMS = tuple(range(32, 257, 16))  # every multiple of 16 from 32 to 256
BLOCK_SIZES = (8, 16, 32, 64)
GROUP_SIZES = (1, 2, 4, 8, 16)
NVRTC_OPTIONS = ("-std=c++17", "--use_fast_math")
#: K/V rows per lane group per decode iteration (paged_decode.cu's CH); benchmarks sweep it
DECODE_ROWS = 4
#: float16 / bfloat16 decode on tensor cores (paged_decode_tc.cu); False: the CUDA-core kernel
DECODE_TC = True
#: cp.async stages per warp in paged_decode_tc.cu; None: as many as fit about 110 KiB per CTA
DECODE_STAGES: int | None = None
#: L2 prefetch-size hint (0, 128 or 256 bytes) on paged_decode_tc.cu's cp.async copies
DECODE_L2_PREFETCH = 128
#: kv heads per paged_decode_tc.cu CTA (a divisor of the kv heads is taken); None: chosen per call
DECODE_HEADS_PER_CTA: int | None = None
#: warps per kv head in paged_decode_tc.cu; None: 4 with one head per CTA, else 1
DECODE_WARPS_PER_HEAD: int | None = None
#: contexts up to this long (with CTAs to spare) get 4 kv heads per CTA, one warp each
DECODE_SHORT_CONTEXT = 512
#: query rows per warp in paged_prefill.cu, in 16-row m-tiles (2 up to head dim 128)
PREFILL_MT: int | None = None
#: 16-byte vectors in flight per thread in copy_blocks (block_copy.cu's UNROLL)
COPY_UNROLL = 16
#: copy_blocks CTAs per SM (a persistent grid walking all the chunks); 0: one CTA per chunk
#: (measured the same or faster on an H200: see docs/gpu-notes.md)
COPY_CTAS_PER_SM = 0

_HEADER = re.compile(r'^#include "([\w.]+)"\s*$', re.M)
_lock = threading.Lock()
_modules: dict[tuple, Any] = {}


def cuda_dir() -> Path:
    """Where the .cu sources are: ``cuda/`` beside the package in a checkout,
    else the package's ``_cuda`` folder, where a wheel puts them."""
    here = Path(__file__).resolve().parent
    for d in (here.parent / "cuda", here / "_cuda"):
        if (d / "paged_decode.cu").is_file():
            return d
    raise UnsupportedConfiguration("kvpager's CUDA sources (cuda/*.cu) are not installed")


def source(name: str) -> str:
    """A kernel file's text with its local headers pasted in, so that CuPy's
    on-disk cache (keyed by source text) sees header changes too."""
    d = cuda_dir()
    text = (d / name).read_text()
    return _HEADER.sub(lambda m: (d / m.group(1)).read_text(), text)


def get_kernel(file: str, func: str, defines: dict[str, int], device: int) -> Any:
    """The compiled ``func`` of ``file`` for these defines on ``device`` (cached)."""
    import cupy

    key = (device, file, tuple(sorted(defines.items())))
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            opts = NVRTC_OPTIONS + tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))
            with cupy.cuda.Device(device):
                mod = cupy.RawModule(code=source(file), options=opts)
            _modules[key] = mod
    return mod.get_function(func)


_attrs: dict[int, dict] = {}


def device_attributes(device: int) -> dict:
    """The device's attributes (cached: querying them all is slow)."""
    a = _attrs.get(device)
    if a is None:
        import cupy

        a = _attrs[device] = dict(cupy.cuda.Device(device).attributes)
    return a


def num_sms(device: int) -> int:
    return int(device_attributes(device)["MultiProcessorCount"])


def check_geometry(dtype: str, head_dim: int, block_size: int) -> None:
    """Raise UnsupportedConfiguration for a pool the kernels are not built for."""
    if dtype not in DTYPE_CODES:
        raise UnsupportedConfiguration(f"the CUDA kernels support dtypes {sorted(DTYPE_CODES)}, not {dtype!r}")
    if head_dim not in HEAD_DIMS:
        raise UnsupportedConfiguration(f"the CUDA kernels support every head_dim that is a multiple of 16 "
                                       f"from 32 to 256, not {head_dim}")
    if block_size not in BLOCK_SIZES:
        raise UnsupportedConfiguration(f"the CUDA kernels support block_size in {BLOCK_SIZES}, not {block_size}")


def compute_capability(device: int) -> tuple[int, int]:
    """(major, minor) of ``device``."""
    import cupy

    cc = cupy.cuda.Device(device).compute_capability  # e.g. "90"
    return int(cc[:-1]), int(cc[-1])


def check_fp8(spec: Any, device: int) -> None:
    """UnsupportedConfiguration unless the FP8 pool ``spec`` can run on ``device``:
    the FP8 conversions (cvt ... e4m3x2 / e5m2x2) need compute capability 8.9 or later."""
    if not spec.is_fp8:
        return
    cc = compute_capability(device)
    if cc < (8, 9):
        raise UnsupportedConfiguration(
            f"kv_dtype={spec.kv_dtype} needs a GPU of compute capability 8.9 or later (FP8 conversions); "
            f"cuda:{device} is {cc[0]}.{cc[1]}")


def storage_defines(spec: Any) -> dict[str, int]:
    """The -D defines naming a pool's compute and storage types."""
    defs = {"KV_DTYPE": DTYPE_CODES[spec.dtype]}
    if spec.is_fp8:
        defs["KV_FP8"] = FP8_CODES[spec.kv_dtype]
    return defs


def check_group(num_q_heads: int, num_kv_heads: int) -> int:
    if num_q_heads % num_kv_heads or num_q_heads // num_kv_heads not in GROUP_SIZES:
        raise UnsupportedConfiguration(
            f"the CUDA kernels support GQA groups of {GROUP_SIZES} query heads per kv head; "
            f"got {num_q_heads} query heads over {num_kv_heads} kv heads"
        )
    return num_q_heads // num_kv_heads


# -- argument checks --------------------------------------------------------------------
def _in_range(arr: np.ndarray, lo: int, hi: int, name: str) -> None:
    if arr.size:
        bad = (arr < lo) | (arr >= hi)
        if bad.any():
            raise InvalidArgument(f"{name} holds {int(arr[bad][0])}, outside [{lo}, {hi})")


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


def check_pairs(pairs: Any, src_blocks: int, dst_blocks: int, what: str) -> np.ndarray:
    """(src, dst) block pairs as int64 [n, 2], ids in range, destinations distinct."""
    arr = np.asarray(pairs)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    arr = int_array(arr, f"{what} pairs", 2, np.int64)
    if arr.shape[1] != 2:
        raise InvalidArgument(f"{what} pairs must be [n, 2], got {arr.shape}")
    _in_range(arr[:, 0], 0, src_blocks, f"{what} source blocks")
    _in_range(arr[:, 1], 0, dst_blocks, f"{what} destination blocks")
    if len(np.unique(arr[:, 1])) != len(arr):
        raise InvalidArgument(f"{what} destination blocks must be distinct")
    return arr


# -- launchers --------------------------------------------------------------------------
def write(pool: Any, spec: Any, layer: int, slots: Any, k: Any, v: Any, device: int,
          dtype: Any = None, scales: Any = None) -> None:
    """pool[slot // bs, layer, 0|1, :, slot % bs] = k|v for every slot != -1. An FP8
    pool: k / v in ``dtype`` (the compute dtype), quantised with ``scales`` (float32
    [layers, 2, kv heads] on the device)."""
    import cupy

    slots = int_array(slots, "slots", 1, np.int64)
    _in_range(slots, -1, spec.num_blocks * spec.block_size, "slots")
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
    args = [k, v, cupy.asarray(slots), pool, np.int32(t), np.int32(layer), np.int32(spec.num_layers),
            np.int32(spec.num_kv_heads), np.int32(spec.block_size), np.int32(row_vecs)]
    if spec.is_fp8:
        args.append(scales)
    fn((min(t, 65536),), (128,), tuple(args))


def write_kernel(spec: Any) -> tuple[str, dict[str, int]]:
    """(kernel name, defines) of kv_write.cu for the pool: a byte move, or FP8 quantisation."""
    if spec.is_fp8:
        return "kv_write_fp8", storage_defines(spec)
    return "kv_write", {}


def copy_blocks(pool: Any, spec: Any, pairs: Any, device: int) -> None:
    """Whole-block copies inside the pool, all pairs in one launch."""
    import cupy

    pairs = check_pairs(pairs, spec.num_blocks, spec.num_blocks, "copy")
    if not len(pairs):
        return
    if np.isin(pairs[:, 1], pairs[:, 0]).any():
        raise InvalidArgument("copy destination blocks must not also be sources")
    launch_copy(pool, cupy.asarray(pairs), spec.bytes_per_block, device)


def launch_copy(pool: Any, pairs: Any, block_bytes: int, device: int) -> None:
    """The copy_blocks launch alone; ``pairs`` already checked and on the GPU."""
    block_vecs = block_bytes // 16
    fn = get_kernel("block_copy.cu", "copy_blocks", {"UNROLL": COPY_UNROLL}, device)
    items = len(pairs) * -(-block_vecs // (256 * COPY_UNROLL))
    if COPY_CTAS_PER_SM:
        items = min(items, num_sms(device) * COPY_CTAS_PER_SM)
    fn((min(items, 2**31 - 1),), (256,), (pool, pool, pairs, np.int32(len(pairs)), np.int64(block_vecs)))


def swap(src_ptr: int, dst_ptr: int, spec: Any, pairs: Any, src_blocks: int, dst_blocks: int,
         device: int, what: str) -> None:
    """Whole-block copies between the device pool and the mapped host pool."""
    import cupy

    pairs = check_pairs(pairs, src_blocks, dst_blocks, what)
    if not len(pairs):
        return
    launch_swap(src_ptr, dst_ptr, cupy.asarray(pairs), spec.bytes_per_block, device)


def launch_swap(src_ptr: int, dst_ptr: int, pairs: Any, block_bytes: int, device: int) -> None:
    """The swap_blocks launch alone; ``pairs`` already checked and on the GPU."""
    block_vecs = block_bytes // 16
    fn = get_kernel("swap.cu", "swap_blocks", {}, device)
    grid = (min(-(-block_vecs // 2048), 1024), min(len(pairs), 65535))
    fn(grid, (256,), (np.uint64(src_ptr), np.uint64(dst_ptr), pairs, np.int32(len(pairs)),
                      np.int64(block_vecs)))


def decode_subgroup(dtype: str, head_dim: int, group: int) -> int:
    """Query heads per decode CTA: the whole group while q and the accumulator
    of the lane's dims fit in 64 registers, else a power-of-two part of it."""
    itemsize = 4 if dtype == "float32" else 2
    nv = head_dim * itemsize // 16
    lpr = 4 if nv <= 4 else 8 if nv <= 8 else 16 if nv <= 16 else 32
    per_head = -(-nv // lpr) * (16 // itemsize)
    return min(group, max(1, 32 // per_head))


def plan_splits(base_ctas: int, max_len: int, num_sms: int, resident: int = 0) -> int:
    """Split-K count for decode, each split at least 512 tokens long (shorter
    splits cost more in partial writes and the merge launch than they gain).

    With ``resident`` (CTAs that fit on one SM at once) known: no split when
    the CTAs already fill the SMs once; else the fewest splits that do, choosing
    among up to twice that many the count whose last wave is fullest (every
    split adds a partial write and a latency-bound merge launch, measured at
    ~8 us for 2,048 rows on an H200). Without it: about eight CTAs per SM."""
    hi = int(max(1, min(max_len // 512, 1024)))
    base = max(base_ctas, 1)
    if resident <= 0:
        return int(min(max(1, -(-num_sms * 8 // base)), hi))
    slots = num_sms * resident
    lo = min(max(1, -(-slots // base)), hi)
    best, best_fill = lo, 0.0
    for s in range(lo, min(2 * lo, hi) + 1):
        waves = base * s / slots
        fill = waves / math.ceil(waves)
        if fill > best_fill + 0.02:
            best, best_fill = s, fill
    return int(best)


def decode_layout(num_kv_heads: int, head_dim: int, itemsize: int, items: int = 0,
                  max_len: int = 0, num_sms: int = 0) -> tuple[int, int]:
    """(kv heads per CTA, warps per head) for paged_decode_tc.cu. By default one head per CTA
    and 4 warps sharing its tiles; for short contexts whose one-head CTAs would fill every
    SM twice, 4 heads per CTA with one warp each (the same warps in a quarter of the CTAs,
    each with 4x the tiles: 64 x 256 tokens measured 0.025 ms against 0.027 on an H200,
    three runs). The knobs override;
    the heads per CTA are cut to a divisor of the kv heads whose two stages fit 220 KiB."""
    hpc = DECODE_HEADS_PER_CTA
    if hpc is None:
        short = max_len <= DECODE_SHORT_CONTEXT and items * num_kv_heads >= 2 * num_sms
        hpc = 4 if short else 1
    hpc = math.gcd(int(hpc), num_kv_heads)
    wph = int(DECODE_WARPS_PER_HEAD or (4 if hpc == 1 else 1))
    per_warp = 2 * 16 * decode_row_bytes(head_dim, itemsize)
    while hpc > 1 and (hpc * wph > 16 or hpc * wph * 2 * per_warp > 220 * 1024):
        hpc //= 2
    return hpc, wph


def decode_row_bytes(head_dim: int, itemsize: int) -> int:
    """Bytes of a K/V row in paged_decode_tc.cu's shared memory: padded by 16 bytes
    (itemsize 1, FP8: to an odd number of 16-byte chunks), so ldmatrix rows fall
    in different banks."""
    if itemsize == 1:
        return head_dim if (head_dim // 16) % 2 else head_dim + 16
    return (head_dim + 8) * itemsize


def decode_smem(head_dim: int, itemsize: int, warps: int, stages: int, group: int) -> int:
    """Dynamic shared memory of a paged_decode_tc.cu CTA: its warps' stages, and at least
    the float32 rows of the final merge (which reuses them)."""
    return max(warps * stages * 2 * 16 * decode_row_bytes(head_dim, itemsize), warps * group * head_dim * 4)


def decode_stages(head_dim: int, itemsize: int, warps: int = 4) -> int:
    """cp.async stages per warp for paged_decode_tc.cu: as many as fit in the CTA's share
    of about 220 KiB of shared memory per SM (8 warps per SM), 2 to 4."""
    if DECODE_STAGES:
        return int(DECODE_STAGES)
    per_stage = warps * 2 * 16 * decode_row_bytes(head_dim, itemsize)
    budget = 220 * 1024 // max(1, 8 // warps)
    return int(max(2, min(4, budget // per_stage)))


def resident_ctas(fn: Any, threads: int, smem: int, device: int) -> int:
    """CTAs of ``fn`` that fit on one SM at once (registers, shared memory, threads)."""
    attrs = device_attributes(device)
    regs = getattr(fn, "num_regs", 0) or 128
    static = getattr(fn, "shared_size_bytes", 0) or 0
    by_regs = attrs.get("MaxRegistersPerMultiprocessor", 65536) // (threads * (-(-regs // 8) * 8))
    by_smem = attrs.get("MaxSharedMemoryPerMultiprocessor", 233472) // (smem + static + 1024)
    by_threads = attrs.get("MaxThreadsPerMultiProcessor", 2048) // threads
    return int(max(1, min(by_regs, by_smem, by_threads)))
