"""The NumPy backend's block copies (copy-on-write, swap out and in), large
blocks one at a time, small ones in runs of bounded bytes: a gather made a
temporary of all it read (a swap of a 3 GiB sequence took 3 GiB more of the
daemon's memory at once). Checked against
the values written, across run boundaries, and by the copies' peak memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import kvpager.backends.numpy_backend as numpy_backend
from kvpager import KVPool, PoolSpec


def _kv(n: int, spec: PoolSpec, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, spec.num_kv_heads, spec.head_dim)).astype(np.float32)


@pytest.mark.parametrize("run_bytes", [1, 3 * 8192, 1 << 30])
@pytest.mark.parametrize("at_a_time", [True, False])
def test_copies_in_runs_keep_every_block(monkeypatch, run_bytes, at_a_time):
    """A run of one block, of three, and of all of them give the same K/V, and
    so do copies a block at a time."""
    monkeypatch.setattr(numpy_backend, "COPY_RUN_BYTES", run_bytes)
    monkeypatch.setattr(numpy_backend, "BLOCK_AT_A_TIME_BYTES", 0 if at_a_time else 1 << 30)
    spec = PoolSpec(2, 2, 16, num_blocks=64, block_size=16, dtype="float32", num_host_blocks=32)
    pool = KVPool(spec)
    [a] = pool.allocate([list(range(200))])
    k, v = _kv(200, spec, 1), _kv(200, spec, 2)
    for layer in range(spec.num_layers):
        pool.write(layer, a.slots, k, v)
    pool.commit(a.seq_id)
    [[b]] = pool.fork(a.seq_id)
    pool.append(b, 1)  # copy-on-write of the last, shared block
    pool.swap_out([a.seq_id])
    pool.swap_in([a.seq_id])
    for s in (a.seq_id, b):
        kk, vv = pool.kv(0)
        table = np.asarray(pool.sequence(s).block_table)  # [blocks, heads, block size, dim] -> tokens
        got_k = np.asarray(kk)[table].transpose(0, 2, 1, 3).reshape(-1, spec.num_kv_heads, spec.head_dim)[:200]
        got_v = np.asarray(vv)[table].transpose(0, 2, 1, 3).reshape(-1, spec.num_kv_heads, spec.head_dim)[:200]
        np.testing.assert_array_equal(got_k, k)
        np.testing.assert_array_equal(got_v, v)
    pool.check_integrity()


def test_a_large_swap_takes_a_bounded_temporary():
    """64 MiB of blocks swapped out and in: at most one run's temporary at a time."""
    spec = PoolSpec(1, 8, 128, num_blocks=520, block_size=64, dtype="float32", num_host_blocks=520)
    pool = KVPool(spec)
    [a] = pool.allocate([list(range(512 * 64))])  # 512 blocks of 256 KiB: 128 MiB of K and V
    tracemalloc.start()
    try:
        pool.swap_out([a.seq_id])
        pool.swap_in([a.seq_id])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    moved = 512 * spec.bytes_per_block
    assert moved >= 128 << 20
    assert peak <= (64 + 8) << 20, peak  # (a gather of all: 128 MiB)
