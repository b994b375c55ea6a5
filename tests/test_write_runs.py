"""The NumPy backend writes K/V a run of tokens at a time: padding slots (-1)
and FP8's float32 copies cost a run's memory, not the whole write's (a staged
write of 1 GiB with one padding slot took 2 GB and 7 s in whole-array copies
on the 2-core VM). The runs write what one pass did: each slot's K/V, the
last of a repeated slot's, padding skipped."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from kvpager import KVPool, PoolSpec
from kvpager.backends import numpy_backend

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=16, block_size=8, dtype="float32")


def _reference(pool: KVPool, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple:
    """K and V of ``layer`` after writing token by token, in order (an independent loop)."""
    kc, vc = (np.array(x) for x in pool.kv(layer))
    for s, kt, vt in zip(slots.tolist(), k, v):
        if s >= 0:
            b, o = divmod(s, pool.spec.block_size)
            kc[b, :, o], vc[b, :, o] = kt, vt
    return kc, vc


def _run(monkeypatch, tokens: int, spec: PoolSpec) -> None:
    monkeypatch.setattr(numpy_backend, "WRITE_RUN_BYTES", tokens * spec.num_kv_heads * spec.head_dim * np.dtype(spec.np_dtype).itemsize)


@pytest.mark.parametrize("kv_dtype", [None, "fp8_e4m3"])
@pytest.mark.parametrize("run_tokens", [1, 3, 1000])
def test_a_write_in_runs_is_the_write_token_by_token(monkeypatch, kv_dtype, run_tokens):
    spec = SPEC if kv_dtype is None else SPEC.replace(dtype="float16", kv_dtype=kv_dtype)
    rng = np.random.default_rng(run_tokens)
    n = 40
    slots = rng.integers(spec.block_size, spec.num_blocks * spec.block_size, n)
    slots[[0, 7, 8, 39]] = -1  # padding first, inside a run, across runs, last
    slots[20:23] = slots[19]  # a repeated slot: its last write stays
    k, v = (rng.standard_normal((n, 2, 16)).astype(spec.np_dtype) for _ in range(2))
    pool = KVPool(spec)
    if kv_dtype is None:
        want = _reference(pool, 1, slots, k, v)
    else:  # FP8: as one run of the whole write quantises (a token's bytes depend on it alone)
        whole = KVPool(spec)
        _run(monkeypatch, n, spec)
        whole.write(1, slots, k, v)
        want = [np.asarray(x).view(np.uint8) for x in whole.kv(1)]
    _run(monkeypatch, run_tokens, spec)
    pool.write(1, slots, k, v)
    got = pool.kv(1) if kv_dtype is None else [np.asarray(x).view(np.uint8) for x in pool.kv(1)]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert not np.asarray(pool.kv(0)[0]).view(np.uint8).any()  # another layer untouched


def test_a_padded_write_copies_a_run_at_most():
    """A 64 MiB write (K and V 32 each) with one padding slot: its temporaries
    are a run's (before: K and V gathered whole, 64 MiB more)."""
    spec = PoolSpec(num_layers=1, num_kv_heads=8, head_dim=128, num_blocks=8, block_size=16, dtype="float32")
    pool = KVPool(spec)
    n = (32 << 20) // (8 * 128 * 4)
    slots = np.full(n, 2 * spec.block_size + 3, np.int64)
    slots[0] = -1
    k = np.ones((n, 8, 128), np.float32)
    v = np.full((n, 8, 128), 2, np.float32)
    tracemalloc.start()
    try:
        pool.write(0, slots, k, v)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * numpy_backend.WRITE_RUN_BYTES, peak
    kc, vc = pool.kv(0)
    assert (kc[2, :, 3] == 1).all() and (vc[2, :, 3] == 2).all()
