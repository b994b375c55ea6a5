"""A daemon serving an FP8 CPU pool: the spec (scales included) reaches the
client in hello; a worker writes through the mapped pool and the daemon's
write op, attends locally, remotely and through a step plan, and every answer
equals an embedded pool fed the same K/V (the bytes too)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from daemon_helpers import running_server

from kvpager import KVPool, PoolSpec
from kvpager.client import Client
from kvpager.errors import InvalidArgument

BF16 = np.dtype(ml_dtypes.bfloat16)
WAIT = 30
SCALES = np.random.default_rng(9).uniform(0.01, 0.05, (2, 2, 2)).astype(np.float32)
SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=8, dtype="bfloat16",
                num_host_blocks=8, kv_dtype="float8_e5m2", kv_scales=SCALES)


@pytest.fixture(scope="module")
def server():
    with running_server(SPEC, heartbeat_timeout=60) as s:
        yield s


def test_worker_writes_and_attends_as_the_embedded_pool(server):
    rng = np.random.default_rng(0)
    prompts = [list(range(13)), list(range(50, 70))]
    ref = KVPool(SPEC)
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as mapped, \
            Client(server.endpoint, timeout=WAIT, heartbeat=False, map_pool=False) as remote:
        assert mapped.spec == SPEC and mapped.spec.kv_scales == SPEC.kv_scales
        assert mapped.map_pool and not remote.map_pool
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
        with pytest.raises(InvalidArgument, match="dtype"):
            mapped.write(0, a[0].slots, np.ones((13, 2, 16), np.float32), np.ones((13, 2, 16), np.float32))
        np.testing.assert_array_equal(mapped.device_array().view(np.uint8), ref.backend.kv.view(np.uint8))
        mapped.swap_out(ids[0])
        mapped.swap_in(ids[0])
        got = mapped.attend(0, ids[0], q[:2], 2)
        np.testing.assert_array_equal(got.view(np.uint16), ref.attend(0, rids[0], q[:2], 2).view(np.uint16))
