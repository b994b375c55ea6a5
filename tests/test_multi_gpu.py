"""Tensor parallelism on two GPUs: an embedded `KVPool(devices=["cuda:0",
"cuda:1"])` and a `kvpager serve --devices cuda:0,cuda:1` daemon with one
worker process per GPU, each against a one-rank NumPy pool of all heads (the
twin): rank r's storage is the twin's heads [r*H/2, (r+1)*H/2) byte for byte,
and the ranks' attention side by side is the twin's. Skips without two GPUs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()
if cupy.cuda.runtime.getDeviceCount() < 2:
    pytest.skip("needs two CUDA devices", allow_module_level=True)

from daemon_helpers import daemon_process, ipc_endpoint  # noqa: E402
from reference import TOLERANCE  # noqa: E402
from tp_helpers import run_scenario  # noqa: E402

from kvpager import Client, InvalidArgument, KVPool, PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu

SPEC = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=64, num_blocks=64, block_size=16, dtype="float16",
                num_host_blocks=16)
SERVE = ["--devices", "cuda:0,cuda:1", "--layers", "2", "--kv-heads", "4", "--head-dim", "64",
         "--block-size", "16", "--dtype", "float16", "--blocks", "64", "--host-blocks", "16",
         "--heartbeat-timeout", "120"]
TOL = TOLERANCE[SPEC.dtype]
BS = SPEC.block_size


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def test_embedded_two_gpu_pool_matches_the_numpy_twin():
    rng = np.random.default_rng(7)
    twin, tp = KVPool(SPEC), KVPool(SPEC, devices=["cuda:0", "cuda:1"])
    assert tp.ranks == 2 and [tp.rank(r).device for r in (0, 1)] == ["cuda:0", "cuda:1"]
    per, hq = SPEC.num_kv_heads // 2, 4  # 8 query heads, 4 per rank

    def write(slots):
        for layer in range(SPEC.num_layers):
            k, v = (rng.standard_normal((len(slots), 4, 64)).astype(np.float16) for _ in "kv")
            twin.write(layer, slots, k, v)
            for r in (0, 1):
                with cupy.cuda.Device(r):
                    tp.rank(r).write(layer, slots, cupy.asarray(k[:, r * per : (r + 1) * per]),
                                     cupy.asarray(v[:, r * per : (r + 1) * per]))

    def check(ids, qlens):
        tp.synchronize()
        for r in (0, 1):
            got = _host(tp.backend.ranks[r].device_array())
            assert got.view(np.uint8).tobytes() == np.ascontiguousarray(
                twin.backend.device_array()[:, :, :, r * per : (r + 1) * per]).view(np.uint8).tobytes()
        q = rng.standard_normal((sum(qlens), 8, 64)).astype(np.float16)
        for layer in range(SPEC.num_layers):
            want = twin.attend(layer, ids, q, qlens).astype(np.float32)
            parts, planned = [], []
            for r in (0, 1):
                with cupy.cuda.Device(r):
                    qr = cupy.asarray(q[:, r * hq : (r + 1) * hq])
                    parts.append(_host(tp.rank(r).attend(layer, ids, qr, qlens)))
                    planned.append(_host(tp.rank(r).plan(ids, qlens).attend(layer, qr)))
            for got in (parts, planned):
                np.testing.assert_allclose(np.concatenate(got, axis=1).astype(np.float32), want, rtol=TOL,
                                           atol=2 * TOL)

    system = list(range(2 * BS + 5))
    [x], [_] = tp.allocate([system]), twin.allocate([system])
    write(x.slots)
    tp.commit(x.seq_id), twin.commit(x.seq_id)
    [y], [_] = tp.allocate([system[: 2 * BS] + [1, 2, 3]]), twin.allocate([system[: 2 * BS] + [1, 2, 3]])
    assert y.num_cached_tokens == 2 * BS
    write(y.slots)
    [[c]], _ = tp.fork(x.seq_id), twin.fork(x.seq_id)
    [s], _ = tp.append(c, 1), twin.append(c, 1)  # copy-on-write on both GPUs
    assert tp.counters().cow_blocks == 1
    write(s)
    check([x.seq_id, y.seq_id, c], [2, 3, 1])
    for op in ("swap_out", "swap_in"):
        getattr(tp, op)(y.seq_id), getattr(twin, op)(y.seq_id)
    check([y.seq_id, c], [3, 1])
    # the remote tier's block copies: a block is rank 0's bytes, then rank 1's
    blocks = np.asarray(y.block_table, np.int64)
    out = np.zeros((len(blocks), SPEC.bytes_per_block), np.uint8)
    tp.backend.read_blocks(blocks, out)
    half = SPEC.bytes_per_block // 2
    for r in (0, 1):
        rows = np.ascontiguousarray(twin.backend.device_array()[blocks][:, :, :, r * per : (r + 1) * per])
        assert np.array_equal(out[:, r * half : (r + 1) * half], rows.reshape(len(blocks), -1).view(np.uint8))
    other = KVPool(SPEC, devices=["cuda:1", "cuda:0"])
    other.backend.write_blocks(blocks, [bytes(row) for row in out])
    for r in (0, 1):
        assert np.array_equal(_host(other.backend.ranks[r].device_array())[blocks],
                              _host(tp.backend.ranks[r].device_array())[blocks])
    # a tensor on the other GPU is refused, naming both
    with cupy.cuda.Device(0):
        k0 = cupy.zeros((len(s), per, 64), cupy.float16)
    with pytest.raises(InvalidArgument, match="cuda:1.*cuda:0"):
        tp.rank(1).write(0, s, k0, k0)
    tp.check_integrity()
    tp.close(), other.close()


def test_daemon_with_one_worker_per_gpu_matches_the_numpy_twin():
    endpoint, tmp = ipc_endpoint()
    try:
        with daemon_process(SERVE, endpoint, timeout=120) as proc:
            out = run_scenario(endpoint, SPEC, ["cuda:0", "cuda:1"], num_q_heads=8, rtol=TOL, atol=2 * TOL)
            hellos = out["hellos"]
            assert [h["kind"] for h in hellos] == ["cuda_ipc", "cuda_ipc"]
            assert [h["device"] for h in hellos] == ["cuda:0", "cuda:1"]
            assert any("tensor-parallel: 2 ranks on cuda:0, cuda:1" in line for line in proc.log)
            with Client(endpoint, rank=0) as c0, Client(endpoint, rank=1) as c1:
                assert c1.gpu and c1.memory["size"] >= c1.spec.device_bytes == SPEC.device_bytes // 2
                assert c0.memory["device_uuid"] != c1.memory["device_uuid"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
