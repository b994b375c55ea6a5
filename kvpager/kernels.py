"""The one loader of kvpager's CUDA kernels (`cuda/*.cu`).

Sources are read from disk, compiled with `cupy.RawModule` (NVRTC) on first
use, one module per (device, file, specialisation, target), and cached; a
kernel for an architecture-specific target (``sm_90a``: wgmma) is compiled
by `kvpager.kernel_build` and loaded from its cubin. A
specialisation is a set of ``-D`` defines (dtype, head dim, block size, GQA
group), so each kernel is built with compile-time shapes.

Here too: the device attributes the planners read, and the checks every
launcher runs in Python first (geometry, GQA group, block ids in range), so a
bad block id or slot never reaches a kernel. The launchers are in
`kvpager.block_moves` (write, copy, swap) and `kvpager.backends.cupy_decode` /
`cupy_prefill` / `cupy_launches` (attention, each beside its planner); their
tuning knobs in `kvpager.kernel_config`.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kvpager import kernel_build
from kvpager.errors import InvalidArgument, UnsupportedConfiguration
from kvpager.kernel_smem import resident
from kvpager.validate_arrays import int_array

DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}
#: KV_FP8 codes of the FP8 storage dtypes (kvpager_common.cuh)
FP8_CODES = {"float8_e4m3": 1, "float8_e5m2": 2}
HEAD_DIMS = tuple(range(32, 513, 16))  # every multiple of 16 from 32 to 512
#: the widest head dim one warp of the tensor-core kernels covers; wider heads (Gemma-4's 512) run
#: paged_decode_tc.cu and paged_prefill.cu with two warps a row, each half the head dim, and never
#: cascade (`wide_heads`); FP8 pools of them are refused
TC_HEAD_DIM = 256
BLOCK_SIZES = (8, 16, 32, 64)
#: query heads of one kv head that the decode kernel's tensor-core M tile holds (any count up
#: to it); a larger group decodes in chunks of it, a CTA each
TC_GROUP = 16
#: the largest GQA group the CUDA kernels take: a multi-token tile holds whole query tokens, each
#: with its group's heads, in its 64 or 128 rows (Falcon-7B: 71 query heads over one kv head)
MAX_GROUP = 128
NVRTC_OPTIONS = ("-std=c++17", "--use_fast_math")
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


def get_kernel(file: str, func: str, defines: dict[str, int], device: int, arch: str | None = None) -> Any:
    """The compiled ``func`` of ``file`` for these defines on ``device`` (cached).
    ``arch`` (e.g. ``"sm_90a"``): built for that target by `kvpager.kernel_build`
    (UnsupportedConfiguration where NVRTC cannot), else for the device's own."""
    import cupy

    key = (device, file, tuple(sorted(defines.items())), arch)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            opts = NVRTC_OPTIONS + tuple(f"-D{k}={v}" for k, v in sorted(defines.items()))
            with cupy.cuda.Device(device):
                if arch is None:
                    mod = cupy.RawModule(code=source(file), options=opts)
                else:
                    mod = cupy.RawModule(path=kernel_build.compile_cubin(source(file), file, opts, arch))
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


def check_geometry(dtype: str, head_dim: int, block_size: int, kv_dtype: str | None = None) -> None:
    """Raise UnsupportedConfiguration for a pool the kernels are not built for."""
    if dtype not in DTYPE_CODES:
        raise UnsupportedConfiguration(f"the CUDA kernels support dtypes {sorted(DTYPE_CODES)}, not {dtype!r}")
    if head_dim not in HEAD_DIMS:
        raise UnsupportedConfiguration(f"the CUDA kernels support every head_dim that is a multiple of 16 "
                                       f"from 32 to 512, not {head_dim}")
    if kv_dtype is not None and head_dim > TC_HEAD_DIM:
        raise UnsupportedConfiguration(f"an FP8 pool ({kv_dtype}) attends on the tensor-core kernels, whose head "
                                       f"dims stop at {TC_HEAD_DIM}, not {head_dim}; store this model's K/V in "
                                       "its own dtype")
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


def wide_heads(spec: Any) -> bool:
    """Whether ``spec``'s steps never cascade (the cascade's kernels are the tensor-core
    ones of one warp a row): float32 pools (`cuda_core_steps`), and heads wider than
    `TC_HEAD_DIM`, whose decode and multi-token kernels split the head dim across two warps."""
    return spec.dtype == "float32" or spec.head_dim > TC_HEAD_DIM


def cuda_core_steps(spec: Any) -> bool:
    """Whether every step of ``spec``, multi-token ones too, runs on the CUDA-core
    decode kernel, a work item per query token: float32 pools (the tensor cores
    take 16-bit operands)."""
    return spec.dtype == "float32"


def storage_defines(spec: Any) -> dict[str, int]:
    """The -D defines naming a pool's compute and storage types."""
    defs = {"KV_DTYPE": DTYPE_CODES[spec.dtype]}
    if spec.is_fp8:
        defs["KV_FP8"] = FP8_CODES[spec.kv_dtype]
    return defs


def check_group(num_q_heads: int, num_kv_heads: int) -> int:
    if num_q_heads % num_kv_heads or not 1 <= num_q_heads // num_kv_heads <= MAX_GROUP:
        raise UnsupportedConfiguration(
            f"the CUDA kernels support GQA groups of 1 to {MAX_GROUP} query heads per kv head; "
            f"got {num_q_heads} query heads over {num_kv_heads} kv heads"
        )
    return num_q_heads // num_kv_heads


# -- argument checks --------------------------------------------------------------------
def in_range(arr: np.ndarray, lo: int, hi: int, name: str) -> None:
    if arr.size:
        bad = (arr < lo) | (arr >= hi)
        if bad.any():
            raise InvalidArgument(f"{name} holds {int(arr[bad][0])}, outside [{lo}, {hi})")


def check_pairs(pairs: Any, src_blocks: int, dst_blocks: int, what: str) -> np.ndarray:
    """(src, dst) block pairs as int64 [n, 2], ids in range, destinations distinct."""
    arr = np.asarray(pairs)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    arr = int_array(arr, f"{what} pairs", 2, np.int64)
    if arr.shape[1] != 2:
        raise InvalidArgument(f"{what} pairs must be [n, 2], got {arr.shape}")
    in_range(arr[:, 0], 0, src_blocks, f"{what} source blocks")
    in_range(arr[:, 1], 0, dst_blocks, f"{what} destination blocks")
    if len(np.unique(arr[:, 1])) != len(arr):
        raise InvalidArgument(f"{what} destination blocks must be distinct")
    return arr


def resident_ctas(fn: Any, threads: int, smem: int, device: int) -> int:
    """CTAs of the compiled ``fn`` that fit on one SM of ``device`` at once (`kernel_smem.resident`)."""
    return resident(device_attributes(device), getattr(fn, "num_regs", 0) or 0,
                    getattr(fn, "shared_size_bytes", 0) or 0, threads, smem)
