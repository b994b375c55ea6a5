"""The CuPy backend's block moves and identity against the NumPy backend: K/V
writes, block copies and swaps byte for byte, bad arguments refused before
any launch, the IPC handle, and the same ops through `KVPool` on cuda:0 and
on the CPU. Skips without CuPy or a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_kernel_helpers import (  # noqa: E402
    GRID,
    TOL,
    geometry,
    make_pair,
    rel_err,
    same_bits,
    seed,
    storage_ok,
    to_dev,
    to_host,
)

from kvpager import KVPool  # noqa: E402
from kvpager.backends.cupy_backend import CupyBackend  # noqa: E402
from kvpager.backends.numpy_backend import NumpyBackend  # noqa: E402
from kvpager.errors import InvalidArgument, UnsupportedConfiguration  # noqa: E402
from kvpager.kernels import MAX_GROUP  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,d,bs", [(t, d, bs) for (t, d, bs, _) in GRID[::2]])
def test_write_matches_reference(dtype, d, bs):
    rng = np.random.default_rng(seed(dtype, d, bs, "w"))
    spec = geometry(dtype, d, bs, 40 * bs, layers=3, kv_heads=4)
    gpu, cpu = CupyBackend(spec, 0), NumpyBackend(spec)
    cpu.kv[...] = np.nan
    gpu.kv[...] = to_dev(cpu.kv, gpu)
    n = 3 * bs + 7
    slots = rng.choice(np.arange(bs, spec.num_blocks * bs), size=n, replace=False).astype(np.int64)
    slots[rng.choice(n, size=5, replace=False)] = -1
    shape = (n, spec.num_kv_heads, d)
    k = rng.standard_normal(shape, dtype=np.float32).astype(spec.np_dtype)
    v = rng.standard_normal(shape, dtype=np.float32).astype(spec.np_dtype)
    cpu.write(2, slots, k, v)
    gpu.write(2, slots, to_dev(k, gpu), to_dev(v, gpu))
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs", [("bfloat16", 128, 16), ("float32", 64, 8), ("float16", 256, 64)])
def test_copy_and_swap_match_reference(dtype, d, bs):
    rng = np.random.default_rng(7)
    spec = PoolSpec(num_layers=3, num_kv_heads=2, head_dim=d, num_blocks=64, block_size=bs,
                    dtype=dtype, num_host_blocks=40)
    gpu, cpu = make_pair(spec, rng)
    ids = rng.permutation(np.arange(1, 64))
    pairs = np.stack([ids[:20], ids[20:40]], axis=1).astype(np.int64)
    cpu.copy_blocks(pairs)
    gpu.copy_blocks(pairs)
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)

    cpu.host_kv[...] = np.nan
    gpu.host_array()[...] = np.nan
    out_pairs = np.stack([rng.permutation(np.arange(1, 64))[:25], rng.permutation(40)[:25]], 1)
    cpu.swap_out(out_pairs)
    gpu.swap_out(out_pairs)
    assert same_bits(gpu.host_array(), cpu.host_kv)

    in_pairs = np.stack([out_pairs[:, 1], rng.permutation(np.arange(1, 64))[:25]], 1)
    cpu.kv[in_pairs[:, 1]] = np.nan
    gpu.kv[...] = to_dev(cpu.kv, gpu)
    cpu.swap_in(in_pairs)
    gpu.swap_in(in_pairs)
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)
    gpu.close()


def test_bad_arguments_never_launch():
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=64, num_blocks=8, block_size=8,
                    dtype="float16", num_host_blocks=4)
    gpu = CupyBackend(spec, 0)
    q = cupy.zeros((1, 4, 64), dtype=cupy.float16)
    one = np.ones(1, dtype=np.int32)
    with pytest.raises(InvalidArgument):
        gpu.attend(0, q, np.array([[8]], dtype=np.int32), one, one, 0.1)
    with pytest.raises(InvalidArgument):
        gpu.attend(0, q, np.array([[1]], dtype=np.int32), np.array([9], dtype=np.int32), one, 0.1)
    with pytest.raises(InvalidArgument):  # 5 query heads over 2 kv heads: no GQA group
        gpu.attend(0, cupy.zeros((1, 5, 64), dtype=cupy.float16), np.array([[1]], dtype=np.int32),
                   one, one, 0.1)
    with pytest.raises(UnsupportedConfiguration):  # a group past the kernels' largest
        gpu.attend(0, cupy.zeros((1, 2 * (MAX_GROUP + 1), 64), dtype=cupy.float16),
                   np.array([[1]], dtype=np.int32), one, one, 0.1)
    kv = cupy.zeros((1, 2, 64), dtype=cupy.float16)
    with pytest.raises(InvalidArgument):
        gpu.write(0, np.array([64], dtype=np.int64), kv, kv)
    with pytest.raises(InvalidArgument):
        gpu.copy_blocks(np.array([[1, 2], [3, 2]], dtype=np.int64))
    with pytest.raises(InvalidArgument):
        gpu.swap_out(np.array([[1, 4]], dtype=np.int64))
    gpu.close()
    for bad in (dict(head_dim=72), dict(head_dim=528), dict(block_size=128)):
        with pytest.raises(UnsupportedConfiguration):
            CupyBackend(spec.replace(**bad), 0)


def test_a_pool_larger_than_the_gpu_or_pinned_memory_is_a_typed_error():
    """A pool of more bytes than the card (or the host's pinned memory) holds was
    CuPy's CUDARuntimeError (cudaErrorMemoryAllocation); it is BackendUnavailable
    naming the bytes, and a device pool made before a host pool that failed is freed."""
    from kvpager import BackendUnavailable

    spec = PoolSpec(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=8, block_size=16, dtype="float16")
    with pytest.raises(BackendUnavailable, match="no room in cuda:0 .* bytes free"):
        CupyBackend(spec.replace(num_blocks=10**7), 0)  # 20 TB
    free = cupy.cuda.runtime.memGetInfo()[0]
    with pytest.raises(BackendUnavailable, match="no room in pinned host memory"):
        CupyBackend(spec.replace(num_blocks=4096, num_host_blocks=10**7), 0)  # 8 GiB, then 20 TB pinned
    cupy.cuda.runtime.deviceSynchronize()
    assert cupy.cuda.runtime.memGetInfo()[0] >= free - (64 << 20)  # its 8 GiB device pool given back
    CupyBackend(spec, 0).close()  # and the card still serves


def test_ipc_handle_and_identity():
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=64, num_blocks=4, block_size=8)
    gpu = CupyBackend(spec, 0)
    assert gpu.device == "cuda:0"
    assert gpu.slab_nbytes == spec.device_bytes
    assert len(gpu.ipc_handle()) == 64
    assert gpu.device_uuid().startswith("GPU-")
    gpu.close()


def test_pool_end_to_end_matches_cpu():
    """The same ops through KVPool on cuda:0 and on the CPU give the same bytes
    (write, copy-on-write, swap round trip) and the same attention."""
    rng = np.random.default_rng(3)
    dtype = "bfloat16" if storage_ok("bfloat16") else "float16"
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=128, num_blocks=96, block_size=16,
                    dtype=dtype, num_host_blocks=64)
    pools = [KVPool(spec, device="cuda:0"), KVPool(spec, device="cpu")]

    def put(i, a):
        return cupy.asarray(a) if i == 0 else a

    prompts = [list(rng.integers(0, 1000, n)) for n in (40, 17, 100)]
    allocs = [p.allocate(prompts) for p in pools]
    assert [a.slots.tolist() for a in allocs[0]] == [a.slots.tolist() for a in allocs[1]]
    for layer in range(spec.num_layers):
        for a in allocs[1]:
            k, v = (rng.standard_normal((len(a.slots), 2, 128), dtype=np.float32).astype(spec.np_dtype)
                    for _ in range(2))
            for i, p in enumerate(pools):
                p.write(layer, a.slots, put(i, k), put(i, v))
    ids = [a.seq_id for a in allocs[1]]
    for p in pools:
        p.commit(ids)
    kids = [p.fork(ids[0], 2)[0] for p in pools]
    assert kids[0] == kids[1]
    new_slots = [p.append(kids[0], 3) for p in pools]  # shared, partly filled last block: CoW
    assert [s.tolist() for s in new_slots[0]] == [s.tolist() for s in new_slots[1]]
    for layer in range(spec.num_layers):
        for s in new_slots[1]:
            k, v = (rng.standard_normal((len(s), 2, 128), dtype=np.float32).astype(spec.np_dtype)
                    for _ in range(2))
            for i, p in enumerate(pools):
                p.write(layer, s, put(i, k), put(i, v))
    pools[0].synchronize()
    assert same_bits(cupy.asnumpy(pools[0].backend.device_array()).view(spec.np_dtype),
                     pools[1].backend.device_array())

    for p in pools:
        p.swap_out([ids[2]])
    assert same_bits(pools[0].backend.host_array(), pools[1].backend.host_array())
    for p in pools:
        p.swap_in([ids[2]])
    pools[0].synchronize()
    after = cupy.asnumpy(pools[0].backend.device_array())
    assert same_bits(after.view(spec.np_dtype), pools[1].backend.device_array())
    group = [ids[0], *kids[0]]  # a parent and its forks: their shared blocks move once
    for p in pools:
        held = {b for s in group for b in p.sequence(s).block_table}
        used = p.stats().used_blocks
        p.swap_out(group)
        assert p.stats().used_blocks == used - len(held)  # none of them left on the device
    assert same_bits(pools[0].backend.host_array(), pools[1].backend.host_array())
    for p in pools:
        p.swap_in(group)
    pools[0].synchronize()
    assert pools[0].sequence(kids[0][0]).block_table[:2] == pools[0].sequence(ids[0]).block_table[:2]
    after = cupy.asnumpy(pools[0].backend.device_array())
    assert same_bits(after.view(spec.np_dtype), pools[1].backend.device_array())

    seqs = ids + kids[0]
    q = rng.standard_normal((len(seqs), 8, 128), dtype=np.float32).astype(spec.np_dtype)
    outs = [p.attend(1, seqs, put(i, q)) for i, p in enumerate(pools)]
    assert rel_err(cupy.asnumpy(outs[0]).view(spec.np_dtype), outs[1]) < TOL[dtype]
    qlens = [7, 17, 30, 3, 1]
    q = rng.standard_normal((sum(qlens), 8, 128), dtype=np.float32).astype(spec.np_dtype)
    outs = [p.attend(0, seqs, put(i, q), query_lens=qlens) for i, p in enumerate(pools)]
    assert rel_err(cupy.asnumpy(outs[0]).view(spec.np_dtype), outs[1]) < TOL[dtype]
    for p in pools:
        p.check_integrity()
        p.close()
