"""Paged attention on the CPU: the compiled kernel (``kvpager._cpu_attention``,
built from ``native/cpu_attention.c`` at install) where it takes the pool,
else the NumPy twin (`kvpager.backends.numpy_backend.paged_attention`).

The twin stays the reference: tests compare the kernel with it, as the GPU
kernels are compared. The kernel reads the pool's blocks where they lie and
runs on several threads; it takes float32, bfloat16, float16 and FP8 pools
whose head_dim is a multiple of 4 (of 16 on the widest build the CPU runs,
of 8 on AVX2, others on the baseline build), C-contiguous at an aligned address (the
other arrays are copied where they are not). Anything else, an install
without a C compiler, or ``KVPAGER_NATIVE=0``, runs the twin.
``KVPAGER_CPU_THREADS`` caps the kernel's threads (default: the CPUs this
process may run on).
"""

from __future__ import annotations

import functools
import os
import sys
from types import ModuleType
from typing import NamedTuple

import numpy as np

from kvpager import env, native
from kvpager.backends.numpy_backend import paged_attention as twin

#: K/V bytes (times the query tokens reading them) a thread is given at least: a thread
#: costs tens of microseconds to start
BYTES_PER_THREAD = 4 << 20


def load() -> ModuleType | None:
    """The compiled kernel, or None (not built, or turned off by KVPAGER_NATIVE=0)."""
    return native.load("_cpu_attention")


#: This process's compiled kernel (None: the twin only).
KERNEL = load()

_LUTS: dict[np.dtype, np.ndarray] = {}


def storage(dtype: np.dtype) -> tuple[int, np.dtype, np.ndarray | None] | None:
    """How the kernel reads a pool of ``dtype``: (kind, the dtype it views the
    pool as, its float32 lookup table or None); None where it cannot."""
    if dtype == np.float32:
        return 0, np.dtype(np.float32), None
    if dtype.name == "bfloat16":
        return 1, np.dtype(np.uint16), None
    if dtype.itemsize not in (1, 2) or dtype.kind not in "fV":  # float16, ml_dtypes' FP8 (kind 'V')
        return None
    if dtype not in _LUTS:
        bits = np.arange(256 ** dtype.itemsize, dtype=np.uint8 if dtype.itemsize == 1 else np.uint16)
        _LUTS[dtype] = np.ascontiguousarray(bits.view(dtype).astype(np.float32))
    view = np.dtype(np.uint8 if dtype.itemsize == 1 else np.uint16)
    return (3 if dtype.itemsize == 1 else 2), view, _LUTS[dtype]


@functools.lru_cache(maxsize=1)
def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpus() -> int:
    """The threads the kernel may use: KVPAGER_CPU_THREADS; else one where torch
    is loaded (its OpenMP threads spin for a while after each op, and a
    second thread of ours, racing them for the cores, made an attention call
    slower when it followed a torch op: `tools/bench_cpu_attention.py`, docs/benchmarks.md);
    else the CPUs this process may run on."""
    cap = env.cpu_threads()
    if cap is not None:
        return cap
    return 1 if "torch" in sys.modules else _affinity()


def fits_int32(tables: np.ndarray) -> bool:
    """Whether integer ``tables`` of another dtype cast to int32 unchanged."""
    info = np.iinfo(np.int32)
    return tables.dtype.kind in "iu" and (not tables.size or info.min <= tables.min() and tables.max() <= info.max)


def _arg(x: object, dtype: type) -> np.ndarray:
    """``x`` as the kernel reads it: C-contiguous ``dtype`` items at aligned addresses
    (`np.ascontiguousarray` keeps an array that lies at an odd address, as
    `np.frombuffer` at an odd offset gives it, and C's loads assume alignment)."""
    return np.require(np.ascontiguousarray(x, dtype), requirements="A")


def attend(
    kv: np.ndarray,
    layer: int,
    q: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    query_lens: np.ndarray,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    kv_scales: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """`paged_attention`'s contract (a block-major pool [blocks, layers, 2,
    kv heads, block_size, head_dim]; the result in q's dtype), on the kernel
    where it takes the call, else on the twin."""
    step = prepare(kv, block_tables, seq_lens, query_lens)
    if step is None:
        return twin(kv, layer, q, block_tables, seq_lens, query_lens, scale, window=window, softcap=softcap,
                    kv_scales=kv_scales, sinks=sinks)
    return attend_prepared(step, layer, q, scale, window=window, softcap=softcap, kv_scales=kv_scales, sinks=sinks)


class Prepared(NamedTuple):
    """A step's arguments as the kernel reads them (`prepare`): the same for every
    layer, so a step plan makes them once."""

    kv: np.ndarray  # the pool viewed as the kernel reads it
    kind: int
    lut: np.ndarray | None
    tables: np.ndarray  # int32
    lens: np.ndarray  # int64
    qlens: np.ndarray  # int64
    threads: int


def prepare(kv: np.ndarray, block_tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
            ) -> Prepared | None:
    """A step over ``block_tables`` as the kernel takes it, or None where the kernel
    cannot take it (the twin runs)."""
    how = None if KERNEL is None else storage(kv.dtype)
    tables = np.asarray(block_tables)
    if (how is None or kv.ndim != 6 or kv.shape[5] % 4 or not (kv.flags.c_contiguous and kv.flags.aligned)
            or tables.ndim != 2 or tables.dtype != np.int32 and not fits_int32(tables)):
        return None
    kind, view, lut = how
    lens = _arg(seq_lens, np.int64)
    qlens = _arg(query_lens, np.int64)
    # K/V bytes read, times the query tokens reading them
    work = int(lens @ qlens) * kv.shape[3] * 2 * kv.shape[5] * kv.dtype.itemsize
    threads = max(1, min(cpus(), work // BYTES_PER_THREAD))
    return Prepared(kv.view(view), kind, lut, _arg(tables, np.int32), lens, qlens, threads)


def attend_prepared(step: Prepared, layer: int, q: np.ndarray, scale: float, *, window: int | None = None,
                    softcap: float | None = None, kv_scales: np.ndarray | None = None,
                    sinks: np.ndarray | None = None) -> np.ndarray:
    """`attend` of a `prepare`d step."""
    q32 = _arg(q, np.float32)
    out = np.empty(q32.shape, np.float32)
    scales = None if kv_scales is None else _arg(kv_scales, np.float32)
    sink = None if sinks is None else _arg(sinks, np.float32).reshape(-1)
    KERNEL.attend(step.kv, step.kind, step.lut, int(layer), q32, step.tables, step.lens, step.qlens,
                  out, float(scale), 0 if window is None else int(window), 0.0 if softcap is None else float(softcap),
                  scales, sink, step.threads)
    return out if q.dtype == np.float32 else out.astype(q.dtype)
