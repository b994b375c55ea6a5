"""The remote tier on a GPU pool (marker gpu): `CupyBackend.read_blocks` /
`write_blocks` against the NumPy twin (scattered blocks, more than one
staging chunk, every dtype), and prefix blocks moving GPU pool -> store ->
CPU pool -> store -> GPU pool byte for byte through a real redis-server.
Skips without CuPy and a CUDA device (and the store part without redis-server)."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from kvpager import KVPool  # noqa: E402
from kvpager.backends import cupy_staging  # noqa: E402
from kvpager.backends.cupy_backend import CupyBackend  # noqa: E402
from kvpager.backends.numpy_backend import NumpyBackend  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu


def bits(x) -> np.ndarray:
    """A pool's bytes on the host, whatever its dtype or array module."""
    x = cupy.asnumpy(x) if isinstance(x, cupy.ndarray) else x
    return np.ascontiguousarray(x).view(np.uint8)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_block_copies_match_the_numpy_twin(dtype, monkeypatch):
    spec = PoolSpec(num_layers=3, num_kv_heads=2, head_dim=64, num_blocks=40, block_size=16, dtype=dtype)
    # a staging buffer of 3 blocks: 7 blocks go in 3 chunks
    monkeypatch.setattr(cupy_staging, "_STAGE_BYTES", 3 * spec.bytes_per_block)
    gpu, cpu = CupyBackend(spec, 0), NumpyBackend(spec)
    raw = np.random.default_rng(0).integers(0, 255, (spec.num_blocks, spec.bytes_per_block), dtype=np.uint8)
    gpu.kv.view(cupy.uint8).reshape(spec.num_blocks, -1)[...] = cupy.asarray(raw)
    cpu.kv.reshape(spec.num_blocks, -1).view(np.uint8)[...] = raw
    blocks = np.array([33, 2, 17, 5, 39, 1, 20], dtype=np.int64)

    out_gpu = np.zeros((len(blocks), spec.bytes_per_block + 80), np.uint8)[:, 80:]  # strided rows
    out_cpu = np.zeros((len(blocks), spec.bytes_per_block), np.uint8)
    gpu.read_blocks(blocks, out_gpu)
    cpu.read_blocks(blocks, out_cpu)
    assert np.array_equal(out_gpu, out_cpu) and np.array_equal(out_cpu, raw[blocks])

    payloads = [np.random.default_rng(i).bytes(spec.bytes_per_block) for i in range(len(blocks))]
    dst = np.array([4, 9, 38, 12, 3, 30, 7], dtype=np.int64)
    gpu.write_blocks(dst, [memoryview(p) for p in payloads])
    cpu.write_blocks(dst, payloads)
    assert np.array_equal(bits(gpu.kv), bits(cpu.kv))  # the rest untouched on both
    assert np.array_equal(bits(cpu.kv).reshape(spec.num_blocks, -1)[dst],
                          np.frombuffer(b"".join(payloads), np.uint8).reshape(len(dst), -1))
    gpu.close()


def test_gpu_and_cpu_pools_share_prefixes_through_the_store():
    from redis_helpers import need_redis, redis_server

    need_redis()
    from kvpager.remote_tier import RemoteTier

    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=64, block_size=16, dtype="float16")
    with redis_server() as store:
        gpu = KVPool(spec, device="cuda:0", remote=RemoteTier(store.url))
        cpu = KVPool(spec, remote=RemoteTier(store.url))
        prompt = list(range(5 * 16 + 1))
        [g] = gpu.allocate([prompt], salt="s")
        rng = np.random.default_rng(1)
        for layer in range(spec.num_layers):
            k = cupy.asarray(rng.standard_normal((len(g.slots), 2, 64)).astype(np.float16))
            gpu.write(layer, g.slots, k, k * 2)
        gpu.synchronize()
        gpu.commit(g.seq_id)
        assert gpu.remote.flush(30) and gpu.remote_stats().written_blocks == 5
        [c] = cpu.allocate([prompt], salt="s")
        assert c.num_remote_tokens == 5 * 16
        want = bits(gpu.backend.kv[cupy.asarray(g.block_table[:5])])
        assert np.array_equal(bits(cpu.backend.kv[list(c.block_table[:5])]), want)

        # and back: a longer prompt computed on the CPU pool restores on a fresh GPU pool
        longer = prompt[:-1] + list(range(900, 900 + 3 * 16 + 1))
        [c2] = cpu.allocate([longer], salt="s")
        assert c2.num_cached_tokens == 5 * 16
        for layer in range(spec.num_layers):
            k = rng.standard_normal((len(c2.slots), 2, 64)).astype(np.float16)
            cpu.write(layer, c2.slots, k, -k)
        cpu.commit(c2.seq_id)
        assert cpu.remote.flush(30) and cpu.remote_stats().written_blocks == 3
        gpu2 = KVPool(spec, device="cuda:0", remote=RemoteTier(store.url))
        [g2] = gpu2.allocate([longer], salt="s")
        assert g2.num_remote_tokens == 8 * 16
        assert np.array_equal(bits(gpu2.backend.kv[cupy.asarray(g2.block_table[:8])]),
                              bits(cpu.backend.kv[list(c2.block_table[:8])]))
        gpu2.check_integrity()
        for p in (gpu, cpu, gpu2):
            p.close()
