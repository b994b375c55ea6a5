"""KV events of blocks restored from the remote tier: they enter this pool's
prefix cache, so a router must learn of them (against a real redis-server)."""

from __future__ import annotations

import pytest
from redis_helpers import need_redis, redis_server

need_redis()
pytest.importorskip("redis")

from vllm_events import hashes  # noqa: E402

from kvpager import EventSink, KVPool, PoolSpec  # noqa: E402
from kvpager.events import to_dicts  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=48, block_size=16, dtype="float32")
BS = SPEC.block_size


def test_restored_blocks_are_reported_stored_with_their_chain():
    with redis_server() as store:
        a = KVPool(SPEC, remote=RemoteTier(store.url, retry_after=0.2))
        b = KVPool(SPEC, remote=RemoteTier(store.url, retry_after=0.2))
        sink = EventSink()
        b.set_event_sink(sink)
        prompt = list(range(500, 500 + 5 * BS + 3))  # 5 full blocks and a tail
        [x] = a.allocate([prompt], salt="m")
        a.commit(x.seq_id)
        assert a.remote.flush(20.0) and a.remote_stats().written_blocks == 5
        want = hashes(prompt, BS, b"m")
        [y] = b.allocate([prompt[: 2 * BS + 1]], salt="m")  # b holds the first 2 blocks itself...
        b.commit(y.seq_id)
        assert to_dicts(sink.take(), BS)[0]["block_hashes"] == want[:2]
        [z] = b.allocate([prompt], salt="m")  # ...and restores the other 3
        assert (z.num_cached_tokens, z.num_remote_tokens) == (5 * BS, 3 * BS)
        [e] = to_dicts(sink.take(), BS)
        assert e["type"] == "BlockStored" and e["block_hashes"] == want[2:5]
        assert e["parent_block_hash"] == want[1] and e["token_ids"] == prompt[2 * BS : 5 * BS]
        b.check_integrity()
        a.close(), b.close()
