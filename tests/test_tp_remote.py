"""The remote tier between tensor-parallel pools, against a real redis-server:
a block's value is its ranks' bytes back to back, restored byte for byte into
another pool of as many ranks; a pool of another rank count looks under other
keys and never reads them."""

from __future__ import annotations

import numpy as np
import pytest
from redis_helpers import need_redis, redis_server

need_redis()
pytest.importorskip("redis")

from kvpager import KVPool, PoolSpec  # noqa: E402
from kvpager.remote_format import key_prefix  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=32, block_size=8, dtype="float32")
BS = SPEC.block_size
WAIT = 20.0


def pool(url: str, ranks: int) -> KVPool:
    return KVPool(SPEC, remote=RemoteTier(url, retry_after=0.2), devices=["cpu"] * ranks if ranks > 1 else None)


def test_ranked_blocks_restore_byte_for_byte_and_only_for_as_many_ranks():
    import redis

    with redis_server() as store:
        a, b, one, four = pool(store.url, 2), pool(store.url, 2), pool(store.url, 1), pool(store.url, 4)
        prompt = list(range(900, 900 + 3 * BS + 2))
        [x] = a.allocate([prompt], salt="m")
        rng = np.random.default_rng(0)
        for layer in range(SPEC.num_layers):
            for r in range(2):
                k, v = (rng.standard_normal((len(x.slots), 2, 16)).astype(np.float32) for _ in "kv")
                a.rank(r).write(layer, x.slots, k, v)
        a.commit(x.seq_id)
        assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == 3
        keys = [k.decode() for k in redis.Redis(port=store.port).keys("*")]
        assert len(keys) == 3 and all(k.startswith(key_prefix(SPEC, 2)) for k in keys)
        assert key_prefix(SPEC, 2) != key_prefix(SPEC)
        [y] = b.allocate([prompt], salt="m")
        assert (y.num_cached_tokens, y.num_remote_tokens) == (3 * BS, 3 * BS)
        for r in range(2):
            mine, theirs = b.backend.ranks[r].kv, a.backend.ranks[r].kv
            assert np.array_equal(mine[list(y.block_table[:3])], theirs[list(x.block_table[:3])])
        b.check_integrity()
        for other in (one, four):  # same geometry, other rank count: other keys, nothing read
            [z] = other.allocate([prompt], salt="m")
            assert z.num_cached_tokens == 0 and z.num_remote_tokens == 0
            st = other.remote_stats()
            assert st.hit_blocks == 0 and st.corrupt_blocks == 0
        for p in (a, b, one, four):
            p.close()


def test_a_two_rank_daemon_keys_its_blocks_by_its_rank_count():
    from daemon_helpers import running_server

    from kvpager import Client

    with redis_server() as store, running_server(SPEC, devices=["cpu", "cpu"],
                                                 remote=RemoteTier(store.url, retry_after=0.2)) as server:
        assert server.pool.remote.key(b"\0" * 16, b"\1" * 16).startswith(key_prefix(SPEC, 2))
        with Client(server.endpoint, rank=0) as r0, Client(server.endpoint, rank=1, driver=r0) as r1:
            [a] = r0.allocate([list(range(2 * BS))], salt="m")
            for c in (r0, r1):
                for layer in range(SPEC.num_layers):
                    k = np.full((len(a.slots), 2, 16), c.rank + 1, np.float32)
                    c.write(layer, a.slots, k, k)
            r0.commit(a.seq_id)
            assert server.pool.remote.flush(WAIT) and server.pool.remote_stats().written_blocks == 2
        import redis

        keys = [k.decode() for k in redis.Redis(port=store.port).keys("*")]
        assert len(keys) == 2 and all(k.startswith(key_prefix(SPEC, 2)) for k in keys)
        # the value: rank 0's bytes (all 1.0), then rank 1's (all 2.0)
        value = np.frombuffer(redis.Redis(port=store.port).get(keys[0])[80:], np.float32)
        half = len(value) // 2
        assert (value[:half] == 1).all() and (value[half:] == 2).all()
