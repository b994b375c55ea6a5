"""The kernel tests' shared helpers: tolerances, the sampled grid of dtypes,
head dims, block sizes and GQA groups, seeds, host <-> device copies, a GPU
and a CPU backend holding the same random pool, shuffled block tables.

Import it after `gpu_helpers.cupy_or_skip()` (it needs CuPy)."""

from __future__ import annotations

import zlib

import cupy
import numpy as np

from kvpager import KernelConfig
from kvpager.backends.cupy_backend import CupyBackend
from kvpager.backends.numpy_backend import NumpyBackend
from kvpager.spec import PoolSpec

TOL = {"bfloat16": 1e-2, "float16": 1e-3, "float32": 1e-5}
DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (64, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32, 64)
GROUPS = (1, 2, 4, 8, 16)


def _grid_sample() -> list[tuple[str, int, int, int]]:
    """Every dtype with every head dim, block sizes and groups rotated so each
    value of each axis appears several times (24 of the 240 combinations)."""
    cases = []
    for i, dtype in enumerate(DTYPES):
        for j, d in enumerate(HEAD_DIMS):
            cases.append((dtype, d, BLOCK_SIZES[(i + j) % 4], GROUPS[(2 * i + j) % 5]))
            cases.append((dtype, d, BLOCK_SIZES[(i + j + 2) % 4], GROUPS[(2 * i + j + 3) % 5]))
    return cases


GRID = _grid_sample()


def seed(*key: object) -> int:
    return zlib.crc32(repr(key).encode())


def to_dev(a: np.ndarray, be: CupyBackend):
    """A NumPy array in the pool dtype -> CuPy, in the backend's storage dtype."""
    return cupy.asarray(np.ascontiguousarray(a).view(be.dtype))


def to_host(a, spec: PoolSpec) -> np.ndarray:
    return cupy.asnumpy(a).view(spec.np_dtype)


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert np.isfinite(out).all(), "non-finite output (unwritten or broken)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def make_pair(spec: PoolSpec, rng: np.random.Generator, config: KernelConfig | None = None
              ) -> tuple[CupyBackend, NumpyBackend]:
    """A GPU (its kernels tuned by ``config``) and a CPU backend holding the same random pool."""
    gpu, cpu = CupyBackend(spec, 0, config), NumpyBackend(spec)
    cpu.kv[...] = rng.standard_normal(cpu.kv.shape, dtype=np.float32).astype(spec.np_dtype)
    gpu.kv[...] = to_dev(cpu.kv, gpu)
    return gpu, cpu


def random_tables(rng, spec: PoolSpec, seq_lens: np.ndarray) -> np.ndarray:
    """Disjoint, shuffled blocks (never block 0) per sequence, padded with block 0."""
    need = -(-seq_lens // spec.block_size)
    ids = rng.permutation(np.arange(1, spec.num_blocks))
    assert need.sum() <= len(ids)
    tables = np.zeros((len(seq_lens), int(need.max()) + int(rng.integers(0, 3))), dtype=np.int32)
    start = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[start : start + n]
        start += n
    return tables


def geometry(dtype: str, d: int, bs: int, max_tokens: int, layers: int = 2, kv_heads: int = 2):
    blocks = max_tokens // bs + 16
    return PoolSpec(num_layers=layers, num_kv_heads=kv_heads, head_dim=d, num_blocks=blocks,
                    block_size=bs, dtype=dtype, num_host_blocks=8)


def storage_ok(dtype: str) -> bool:
    """Whether CuPy here holds ``dtype`` natively (bfloat16 needs a recent CuPy)."""
    try:
        cupy.empty(1, dtype=PoolSpec(1, 1, 64, 2, dtype=dtype).np_dtype)
        return True
    except Exception:
        return False
