"""Edges of the compiled parts (native/decode_step.c, native/cpu_attention.c)
that their own test files do not reach, each found under AddressSanitizer:
what a call the Python wrappers accept does in C."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kvpager import KVPool, PoolSpec, cpu_attention
from kvpager.backends.numpy_backend import paged_attention

needs_kernel = pytest.mark.skipif(cpu_attention.KERNEL is None, reason="kvpager._cpu_attention was not built")

#: (block_size, q heads per kv head, window, tokens, query tokens): sliding-window
#: prefills whose groups of query rows straddle the end of a chunk of keys (256);
#: the fourth as Phi-3's layers (a window of 2047, as many kv heads as q heads)
WINDOWED_PREFILLS = [(32, 1, 2, 694, 694), (16, 1, 3, 600, 600), (64, 1, 5, 900, 641), (16, 1, 2047, 2400, 2400),
                     (8, 2, 5, 530, 530), (64, 3, 7, 900, 641)]


def windowed_prefill(block_size, group, window, n, ql):
    """A pool holding one sequence of ``n`` tokens and its attention over the last
    ``ql`` of them with ``window``: (the pool's result, the twin's)."""
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=-(-n // block_size) + 1,
                    block_size=block_size, dtype="float32")
    pool = KVPool(spec)
    [a] = pool.allocate([list(range(n))])
    rng = np.random.default_rng(n)
    k = rng.standard_normal((n, 1, 16)).astype(np.float32)
    pool.write(0, a.slots, k, rng.standard_normal((n, 1, 16)).astype(np.float32))
    q = rng.standard_normal((ql, group, 16)).astype(np.float32)
    out = pool.attend(0, [a.seq_id], q, [ql], window=window)
    tables, lens = pool.tables([a.seq_id])
    ref = paged_attention(pool.backend.kv, 0, q, tables, lens, np.array([ql], np.int32), 0.25, window=window)
    return out, ref


def malloc_debug() -> str | None:
    """glibc's malloc checking library (glibc 2.34 and later), next to this process's libc; None elsewhere."""
    try:
        with open("/proc/self/maps") as f:
            libc = next((line.split()[-1] for line in f if "/libc.so.6" in line), None)
    except OSError:
        return None
    path = None if libc is None else os.path.join(os.path.dirname(libc), "libc_malloc_debug.so.0")
    return path if path and os.path.exists(path) else None


@needs_kernel
@pytest.mark.parametrize("case", WINDOWED_PREFILLS, ids=lambda c: "bs{}-g{}-w{}-n{}-q{}".format(*c))
def test_a_windowed_prefill_past_a_chunk_is_the_twin(case):
    out, ref = windowed_prefill(*case)
    assert np.abs(out - ref).max() < 1e-5


@needs_kernel
def test_a_windowed_prefill_writes_only_inside_the_kernels_scratch():
    """A query row whose window starts past the chunk of keys being scored (a
    prefill's group of rows straddling the chunk's end, in a sliding-window
    layer with one q head per kv head) had its scores zeroed up to its
    window's start: up to 2 floats past the thread's score buffer, a heap
    overflow (AddressSanitizer: heap-buffer-overflow in rows_chunk) that
    glibc's malloc hid in its padding and another allocator need not. glibc's
    checking malloc catches it where the buffer is freed, so the cases run in a
    process of their own under it."""
    debug = malloc_debug()
    if debug is None:
        pytest.skip("glibc's malloc checking (libc_malloc_debug.so.0) is not on this system")
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("under AddressSanitizer (which checks this itself)")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "from test_native_edges import WINDOWED_PREFILLS, windowed_prefill\n"
            "for case in WINDOWED_PREFILLS:\n"
            "    windowed_prefill(*case)\n"
            "print('done')\n")
    env = {**os.environ, "LD_PRELOAD": debug, "MALLOC_CHECK_": "3", "KVPAGER_CPU_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stdout.split() == ["done"], (res.returncode, res.stderr[-2000:])


def at_odd_address(a: np.ndarray) -> np.ndarray:
    """A copy of ``a`` one byte past an aligned address (as `np.frombuffer` at an odd offset gives)."""
    raw = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(raw.data, a.dtype, a.size, 1).reshape(a.shape)
    out[...] = a
    return out


@needs_kernel
def test_arrays_at_odd_addresses_reach_the_kernel_aligned(monkeypatch):
    """The kernel's C loads an int64 length or a float query at its type's
    alignment (UndefinedBehaviorSanitizer: "load of misaligned address" for a
    q, tables or lengths that `np.frombuffer` put at an odd offset, which
    `np.ascontiguousarray` passed on as they were): every array reaches it
    aligned, a pool at an odd address runs on the twin, and the results are the
    aligned arrays' results."""
    rng = np.random.default_rng(4)
    kv = rng.standard_normal((9, 1, 2, 2, 16, 32)).astype(np.float32)
    tables = np.array([[3, 5, 7, 1], [2, 4, 6, 8]], np.int32)
    q = rng.standard_normal((3, 4, 32)).astype(np.float32)
    lens, qlens = np.array([60, 33], np.int64), np.array([2, 1], np.int64)
    sinks, scales = rng.standard_normal(4).astype(np.float32), np.ones((1, 2, 2), np.float32)
    want = cpu_attention.attend(kv, 0, q, tables, lens, qlens, 0.2, kv_scales=scales, sinks=sinks)
    seen = []
    kernel = cpu_attention.KERNEL

    class Watched:
        @staticmethod
        def attend(*args):
            seen.append([a.ctypes.data % a.itemsize for a in args if isinstance(a, np.ndarray)])
            return kernel.attend(*args)

    monkeypatch.setattr(cpu_attention, "KERNEL", Watched)
    odd = [at_odd_address(a) for a in (q, tables, lens, qlens, sinks, scales)]
    assert not any(a.flags.aligned for a in odd)
    out = cpu_attention.attend(kv, 0, odd[0], odd[1], odd[2], odd[3], 0.2, kv_scales=odd[5], sinks=odd[4])
    assert seen and not any(seen[0]), seen
    assert np.array_equal(out, want)
    out = cpu_attention.attend(at_odd_address(kv), 0, q, tables, lens, qlens, 0.2, kv_scales=scales, sinks=sinks)
    assert len(seen) == 1  # the twin's
    assert np.abs(out - want).max() < 1e-5
