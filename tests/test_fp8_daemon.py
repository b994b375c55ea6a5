"""A daemon serving an FP8 CPU pool: the spec (scales included) reaches the
client in hello; a worker writes through the mapped pool and the daemon's
write op, attends locally, remotely and through a step plan, and every answer
equals an embedded pool fed the same K/V (the bytes too)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from daemon_helpers import server_fixture

from kvpager import KVPool, PoolSpec
from kvpager.client import Client
from kvpager.errors import InvalidArgument

torch = pytest.importorskip("torch")

BF16 = np.dtype(ml_dtypes.bfloat16)
WAIT = 30
SCALES = np.random.default_rng(9).uniform(0.01, 0.05, (2, 2, 2)).astype(np.float32)
SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=8, dtype="bfloat16",
                num_host_blocks=8, kv_dtype="float8_e5m2", kv_scales=SCALES)


server = server_fixture(SPEC, scope="module", heartbeat_timeout=60)


def test_worker_writes_and_attends_as_the_embedded_pool(server):
    rng = np.random.default_rng(0)
    prompts = [list(range(13)), list(range(50, 70))]
    ref = KVPool(SPEC)
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as mapped, \
            Client(server.endpoint, timeout=WAIT, heartbeat=False, map_pool=False) as remote:
        assert mapped.spec == SPEC and mapped.spec.kv_scales == SPEC.kv_scales
        assert mapped.map_pool and not remote.map_pool
        tk, _ = mapped.torch_kv(1)  # the stored bytes as torch's float8
        assert str(tk.dtype) == "torch.float8_e5m2" and tk.shape == (48, 2, 8, 16)
        a = mapped.allocate(prompts)
        r = ref.allocate(prompts)
        assert [x.slots.tolist() for x in a] == [x.slots.tolist() for x in r]
        for layer in range(2):
            for i, (x, y) in enumerate(zip(a, r)):
                k = rng.standard_normal((len(x.slots), 2, 16)).astype(BF16)
                v = (rng.standard_normal((len(x.slots), 2, 16)) * 0.3).astype(BF16)
                # the first prompt through the mapped pool, the second through the daemon's write op
                (mapped.write if i == 0 else mapped.remote_write)(layer, x.slots, k, v)
                ref.write(layer, y.slots, k, v)
        mapped.commit([x.seq_id for x in a])
        np.testing.assert_array_equal(mapped.device_array().view(np.uint8), ref.backend.kv.view(np.uint8))
        np.testing.assert_array_equal(tk.view(torch.uint8).numpy(), ref.backend.kv[:, 1, 0].view(np.uint8))
        ids, rids = [x.seq_id for x in a], [x.seq_id for x in r]
        q = rng.standard_normal((5, 4, 16)).astype(BF16)
        for layer in range(2):
            want = ref.attend(layer, rids, q, [2, 3])
            for got in (mapped.attend(layer, ids, q, [2, 3]), mapped.remote_attend(layer, ids, q, [2, 3])):
                assert got.dtype == BF16
                np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
            plan = mapped.plan(ids, [2, 3])
            np.testing.assert_array_equal(plan.attend(layer, q).view(np.uint16), want.view(np.uint16))
        # a prefix hit from another worker reads the same FP8 bytes
        b = remote.allocate([prompts[1][:16] + [7]])[0]
        assert b.num_cached_tokens == 16
        with pytest.raises(InvalidArgument, match="dtype"):  # (its last block: not full, not published)
            mapped.write(0, a[0].slots[8:], np.ones((5, 2, 16), np.float32), np.ones((5, 2, 16), np.float32))
        np.testing.assert_array_equal(mapped.device_array().view(np.uint8), ref.backend.kv.view(np.uint8))
        mapped.swap_out(ids[0])
        mapped.swap_in(ids[0])
        got = mapped.attend(0, ids[0], q[:2], 2)
        np.testing.assert_array_equal(got.view(np.uint16), ref.attend(0, rids[0], q[:2], 2).view(np.uint16))


def test_serve_stores_fp8_with_the_scales_file(tmp_path):
    """`kvpager serve --kv-dtype fp8 --kv-scales FILE` in its own process: the pool
    holds twice the blocks of bfloat16 in the same memory and hello carries the scales;
    a scales file of the wrong shape stops the daemon with a message naming it."""
    import json
    import shutil
    import subprocess
    import sys

    from daemon_helpers import daemon_process, ipc_endpoint, subprocess_env

    scales = np.random.default_rng(1).uniform(0.01, 0.1, (2, 2, 2)).round(4)
    path = tmp_path / "scales.json"
    path.write_text(json.dumps(scales.tolist()))
    base = ["--device", "cpu", "--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "bfloat16",
            "--memory", "64K"]
    endpoint, tmp = ipc_endpoint()
    tmp_dirs = [tmp]
    with daemon_process([*base, "--kv-dtype", "fp8", "--kv-scales", str(path)], endpoint), \
            Client(endpoint, timeout=WAIT, heartbeat=False) as c:
        plain = PoolSpec(2, 2, 16, 2, 16, "bfloat16")
        assert c.spec.kv_dtype == "float8_e4m3" and c.spec.num_blocks == (64 << 10) // (plain.bytes_per_block // 2)
        np.testing.assert_array_equal(c.spec.scales, scales.astype(np.float32))
        a = c.allocate([list(range(20))])[0]
        k = np.full((20, 2, 16), 0.5, BF16)
        c.write(0, a.slots, k, k)
        out = c.attend(0, a.seq_id, np.ones((1, 2, 16), BF16))
        want = (np.float32(0.5) / scales[0, 1].astype(np.float32)).astype(ml_dtypes.float8_e4m3fn)
        np.testing.assert_allclose(out[0].astype(np.float32),
                                   (want.astype(np.float32) * scales[0, 1].astype(np.float32))[:, None]
                                   * np.ones((1, 16)), rtol=1e-2)
    path.write_text(json.dumps([[1.0, 1.0]]))
    endpoint, tmp = ipc_endpoint()
    tmp_dirs.append(tmp)
    proc = subprocess.run([sys.executable, "-m", "kvpager", "serve", *base, "--kv-dtype", "fp8", "--kv-scales",
                           str(path), "--endpoint", endpoint], env=subprocess_env(), capture_output=True,
                          text=True, timeout=60)
    for d in tmp_dirs:
        shutil.rmtree(d, ignore_errors=True)
    assert proc.returncode != 0 and "kv_scales" in proc.stderr
