"""The remote prefix tier between embedded pools, against a real redis-server:
two pools stand for two hosts. K/V restored on the second is compared byte
for byte with what was written on the first. (A store that fails, hangs or
refuses: `test_remote_tier_faults.py`.)"""

from __future__ import annotations

import numpy as np
import pytest
from redis_helpers import need_redis, redis_server

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import BS, SPEC, WAIT, expected_k, kv_of, pool, prefill, written  # noqa: E402

from kvpager import InvalidArgument, KVPool, OutOfBlocks, PoolSpec  # noqa: E402
from kvpager.remote_format import HEADER_BYTES, key_prefix  # noqa: E402


def test_second_host_restores_byte_identical_kv():
    with redis_server() as store:
        a, b = pool(store.url), pool(store.url)
        prompt = list(range(1000, 1000 + 5 * BS + 3))  # 5 full blocks and a tail
        _, kv_a = prefill(a, prompt, seed=1)
        assert written(a, 5)
        [x] = b.allocate([prompt], salt="m")
        assert (x.num_cached_tokens, x.num_remote_tokens) == (5 * BS, 5 * BS)
        assert len(x.slots) == 3  # only the tail is left to compute
        assert np.array_equal(kv_of(b, x.block_table, 5 * BS), kv_a[:, :, : 5 * BS])
        b.check_integrity()
        st = b.remote_stats()
        assert (st.lookups, st.hit_blocks, st.restored_blocks, st.errors) == (1, 5, 5, 0)
        assert st.restored_bytes == 5 * SPEC.bytes_per_block
        # restored blocks are ordinary cached blocks now: the next allocate hits locally
        [y] = b.allocate([prompt], salt="m")
        assert (y.num_cached_tokens, y.num_remote_tokens) == (5 * BS, 0)
        assert y.block_table[:5] == x.block_table[:5]
        assert b.remote_stats().lookups == 1
        # another salt never matches a block of this one
        [z] = b.allocate([prompt], salt="other")
        assert z.num_cached_tokens == 0 and z.num_remote_tokens == 0
        b.free([x.seq_id, y.seq_id, z.seq_id])
        b.check_integrity()
        assert b.stats().cached_blocks == 5 and b.stats().used_blocks == 0
        a.close(), b.close()


def test_keys_ttl_and_no_rewrite_of_restored_blocks():
    with redis_server() as store:
        a, b = pool(store.url, ttl=600), pool(store.url, ttl=600)
        prompt = list(range(3 * BS + 1))
        prefill(a, prompt, seed=2)
        assert written(a, 3)
        client = redis.Redis(port=store.port)
        keys = sorted(k.decode() for k in client.keys("*"))
        assert len(keys) == 3 and all(k.startswith(key_prefix(SPEC)) for k in keys)
        assert all(0 < client.ttl(k) <= 600 for k in keys)
        assert all(client.strlen(k) == HEADER_BYTES + SPEC.bytes_per_block for k in keys)
        [x] = b.allocate([prompt], salt="m")
        assert x.num_remote_tokens == 3 * BS
        b.commit(x.seq_id)  # restored blocks were published at restore: nothing new to write
        assert b.remote.flush(WAIT) and b.remote_stats().written_blocks == 0
        a.close(), b.close()


def test_partial_chains_and_one_restore_per_batch():
    with redis_server() as store:
        a, b = pool(store.url), pool(store.url)
        system = list(range(500, 500 + 4 * BS))
        _, kv_a = prefill(a, system + [1], seed=3)
        assert written(a, 4)
        # b restores block 0 for a prompt of one full block: it is local from then on
        [first] = b.allocate([system[:BS] + [9]], salt="m")
        assert (first.num_cached_tokens, first.num_remote_tokens) == (BS, BS)
        longer = system + list(range(7000, 7000 + 2 * BS))  # 4 stored blocks, then 2 nobody has
        x, y = b.allocate([longer, system + [5]], salt="m")
        # each: block 0 local, blocks 1-3 from the store (restored once, shared), the rest computed
        assert (x.num_cached_tokens, x.num_remote_tokens) == (4 * BS, 3 * BS)
        assert (y.num_cached_tokens, y.num_remote_tokens) == (4 * BS, 3 * BS)
        assert x.block_table[:4] == y.block_table[:4] and x.block_table[0] == first.block_table[0]
        st = b.remote_stats()
        assert (st.lookups, st.restored_blocks) == (2, 4)
        assert st.lookup_blocks == 1 + 4  # block 0 alone, then 1-4 (of 6 full blocks, the last holds the last token)
        assert np.array_equal(kv_of(b, x.block_table, 4 * BS), kv_a[:, :, : 4 * BS])
        b.check_integrity()
        a.close(), b.close()


def test_other_geometry_never_reads_foreign_bytes():
    with redis_server() as store:
        a = pool(store.url)
        b = pool(store.url, SPEC.replace(dtype="float16"))
        prompt = list(range(2 * BS + 1))
        prefill(a, prompt, seed=5)
        assert written(a, 2)
        [x] = b.allocate([prompt], salt="m")
        assert x.num_cached_tokens == 0 and x.num_remote_tokens == 0
        st = b.remote_stats()
        assert st.lookups == 1 and st.hit_blocks == 0 and st.corrupt_blocks == 0
        a.close(), b.close()


def test_corrupt_values_are_refused_counted_and_deleted():
    with redis_server() as store:
        a, b = pool(store.url), pool(store.url)
        prompt = list(range(3 * BS + 1))
        _, kv_a = prefill(a, prompt, seed=6)
        assert written(a, 3)
        client = redis.Redis(port=store.port)
        names = sorted(client.keys("*"))
        # find block 1's key: its name ends with the chain key of the second block
        from kvpager.prefix_cache import chain_keys, root_key

        keys = chain_keys(root_key("m"), np.asarray(prompt, np.int64), BS)
        [second] = [n for n in names if n.decode().endswith(keys[1].hex())]
        value = bytearray(client.get(second))
        value[HEADER_BYTES + 100] ^= 0xFF
        client.set(second, bytes(value))
        [x] = b.allocate([prompt], salt="m")
        # block 0 restored, block 1 refused, block 2 unusable without it
        assert (x.num_cached_tokens, x.num_remote_tokens) == (BS, BS)
        assert np.array_equal(kv_of(b, x.block_table, BS), kv_a[:, :, :BS])
        assert b.remote_stats().corrupt_blocks == 1
        assert b.remote.flush(WAIT) and not client.exists(second)
        b.check_integrity()
        a.close(), b.close()


def test_full_queue_drops_and_counts():
    with redis_server() as store:
        one = HEADER_BYTES + SPEC.bytes_per_block
        a = pool(store.url, queue_bytes=2 * one)
        prefill(a, list(range(6 * BS + 1)), seed=7)
        st = a.remote_stats()
        assert st.dropped_blocks == 4 and a.remote.flush(WAIT)
        assert a.remote_stats().written_blocks == 2
        a.close()


def test_no_room_means_no_restore_and_nothing_changes():
    with redis_server() as store:
        a = pool(store.url)
        small = SPEC.replace(num_blocks=6)  # 5 usable blocks
        b = pool(store.url, small)
        prompt = list(range(4 * BS + 1))  # 5 blocks
        prefill(a, prompt, seed=8)
        assert written(a, 4)
        [hold] = b.allocate([list(range(9000, 9000 + 2 * BS))])  # 2 blocks in use: 3 left
        before = b.blocks()
        with pytest.raises(OutOfBlocks):
            b.allocate([prompt], salt="m")  # needs 5 even with 4 restored (1 + 4 restored)
        assert b.blocks() == before and b.remote_stats().restored_blocks == 0
        b.free(hold.seq_id)
        [x] = b.allocate([prompt], salt="m")
        assert x.num_remote_tokens == 4 * BS
        b.check_integrity()
        a.close(), b.close()


def test_random_ops_keep_kv_right_and_blocks_accounted():
    rng = np.random.default_rng(2024)
    small = SPEC.replace(num_blocks=24)  # eviction and the capacity rule come into play
    with redis_server() as store:
        hosts = [pool(store.url, small), pool(store.url, small)]
        hosts[0].set_quota("n", 4)  # eviction takes from a tenant over its quota first
        live: list[tuple[KVPool, int]] = []
        full = 0
        prefixes = [rng.integers(0, 1000, int(rng.integers(1, 5)) * BS).tolist() for _ in range(12)]
        middles = [[]] + [rng.integers(0, 1000, int(rng.integers(1, 3)) * BS).tolist() for _ in range(4)]
        for step in range(300):
            p = hosts[int(rng.integers(2))]
            if live and rng.random() < 0.4:
                q, seq = live.pop(int(rng.integers(len(live))))
                q.free(seq)
            else:
                prompt = (prefixes[int(rng.integers(12))] + middles[int(rng.integers(5))]
                          + rng.integers(0, 1000, int(rng.integers(1, 12))).tolist())
                try:
                    [a] = p.allocate([prompt], salt="mn"[step % 2])
                except OutOfBlocks:
                    full += 1
                    continue
                want = expected_k(prompt)
                assert a.num_remote_tokens <= a.num_cached_tokens
                k = p.backend.device_array()[:, :, 0]  # [blocks, layers, heads, bs, dim]
                cached = np.arange(a.num_cached_tokens)
                blocks = np.asarray(a.block_table)[cached // BS]
                got = k[blocks, :, :, cached % BS, 0]  # [tokens, layers, heads]
                assert np.array_equal(got, np.broadcast_to(want[: a.num_cached_tokens, None, None], got.shape)), step
                vals = want[a.num_cached_tokens :, None, None]
                shape = (len(a.slots), SPEC.num_kv_heads, SPEC.head_dim)
                for layer in range(SPEC.num_layers):
                    p.write(layer, a.slots, np.broadcast_to(vals, shape), np.broadcast_to(-vals, shape))
                if rng.random() < 0.8:
                    p.commit(a.seq_id)
                live.append((p, a.seq_id))
            if step % 10 == 0:
                p.remote.flush(WAIT)
            p.check_integrity()
        for q, seq in live:
            q.free(seq)
        for q in hosts:
            q.check_integrity()
            assert q.stats().used_blocks == 0
        assert sum(q.remote_stats().restored_blocks for q in hosts) > 50 and full > 5
        assert all(q.remote_stats().errors == 0 and q.remote_stats().corrupt_blocks == 0 for q in hosts)
        for q in hosts:
            q.close()


def test_bad_input_is_refused_before_the_store_is_asked():
    with redis_server() as store:
        p = pool(store.url)
        before = p.blocks()
        for prompts, salt in (([[1, 2, "x"]], "m"), ([list(range(40)), [2**64]], "m"), ([list(range(40))], 3.5)):
            with pytest.raises(InvalidArgument):
                p.allocate(prompts, salt=salt)
        assert p.blocks() == before and p.remote_stats().lookups == 0
        p.check_integrity()
        p.close()


def test_one_allocate_restores_at_most_max_restore_bytes():
    with redis_server() as store:
        a = pool(store.url)
        b = pool(store.url, max_restore_bytes=2 * (HEADER_BYTES + SPEC.bytes_per_block))
        prompt = list(range(5 * BS + 1))
        _, kv_a = prefill(a, prompt, seed=12)
        assert written(a, 5)
        [x] = b.allocate([prompt], salt="m")
        assert (x.num_cached_tokens, x.num_remote_tokens, len(x.slots)) == (2 * BS, 2 * BS, 3 * BS + 1)
        assert b.remote_stats().lookup_blocks == 2
        assert np.array_equal(kv_of(b, x.block_table, 2 * BS), kv_a[:, :, : 2 * BS])
        [y] = b.allocate([prompt], salt="m")  # the next two come with the next allocate
        assert (y.num_cached_tokens, y.num_remote_tokens) == (4 * BS, 2 * BS)
        b.check_integrity()
        a.close(), b.close()


@pytest.mark.parametrize("store_lacks", ["block 5", "all but block 0"])
def test_a_windowed_hit_is_not_evicted_by_the_restore_of_blocks_it_would_not_read(store_lacks):
    """A windowed allocate with a tier: the restore ran first, for the prefix's
    missing blocks, and took its new blocks by evicting the very cached blocks
    the windowed hit stands on (the allocate hit 80 tokens where the local
    cache alone gave 160, and the probe said 160). A prompt the local cache
    gives a windowed hit restores nothing now, and its hit blocks are held
    through the others' restores; the probe says what the allocate gives."""
    from kvpager.prefix_cache import chain_keys, root_key

    spec = PoolSpec(1, 2, 16, num_blocks=31, block_size=BS, dtype="float32", num_host_blocks=8)
    with redis_server() as store:
        p = pool(store.url, spec, timeout=2.0)
        try:
            prompt = list(range(1000, 1000 + 10 * BS + 3))
            [a] = p.allocate([prompt], window=4 * BS)
            p.commit(a.seq_id)
            assert p.remote.flush(WAIT)
            p.release_before([a.seq_id], [6 * BS])  # blocks 0-5 evictable first
            p.free([a.seq_id])
            free = p.stats().free_blocks
            [filler] = p.allocate([list(range(50000, 50000 + (free + 6) * BS))])  # evicts 0-5, stays live
            p.truncate([filler.seq_id], [(free + 6 - 8) * BS])  # 8 blocks back to the free list
            [u] = p.allocate([list(range(90000, 90000 + 4 * BS + 1))])
            p.commit(u.seq_id)
            p.free([u.seq_id])  # 4 evictable blocks used more recently
            keys = chain_keys(root_key(None), np.asarray(prompt, np.int64), BS)
            gone = [5] if store_lacks == "block 5" else list(range(1, 10))
            redis.Redis(port=store.port).delete(*[p.remote.key(root_key(None), keys[i]) for i in gone])
            w = 4 * BS
            local = p.cached_tokens([prompt], window=w, remote=False)
            [probe] = p.probe_cache([prompt], window=w)
            assert local == [10 * BS] and probe.num_cached_tokens == 10 * BS and probe.num_remote_tokens == 0
            [b] = p.allocate([prompt], window=w)
            assert (b.num_cached_tokens, b.num_remote_tokens) == (10 * BS, 0)
            p.check_integrity()
            p.free([b.seq_id, filler.seq_id])
        finally:
            p.close()


@pytest.mark.parametrize("step", [1, 8])
def test_forks_appended_in_one_batch_each_store_their_own_block(step):
    """Forks of a partly filled block appended in one batch: the last sharer
    writes the block in place, the others copy it; each completed block
    reaches the store with its own sequence's K/V (the bytes are read at
    commit, so a later in-place write changes nothing stored), and a second
    host restores each sequence's prefix byte for byte."""
    with redis_server() as store:
        a, b = pool(store.url), pool(store.url)
        rng = np.random.default_rng(4)
        prompt = list(range(100, 100 + 2 * BS + 8))
        seq, kv = prefill(a, prompt, seed=3)
        seqs = [seq, *a.fork([seq], 2)[0]]
        toks = {s: prompt + rng.integers(0, 999, 8).tolist() for s in seqs}
        new = {s: rng.standard_normal((SPEC.num_layers, 2, 8, SPEC.num_kv_heads, SPEC.head_dim))
               .astype(np.float32) for s in seqs}
        cow = a.counters().cow_blocks
        for t in range(0, 8, step):  # decode steps, or one append of 8
            at = len(prompt) + t
            slots = a.append(seqs, step, token_ids=[toks[s][at : at + step] for s in seqs])
            for s, sl in zip(seqs, slots):
                for layer in range(SPEC.num_layers):
                    a.write(layer, sl, new[s][layer, 0, t : t + step], new[s][layer, 1, t : t + step])
            a.commit(seqs)
        assert a.counters().cow_blocks - cow == 2  # the last sharer wrote in place
        assert written(a, 2 + 3)
        for s in seqs:
            [x] = b.allocate([toks[s] + [1]], salt="m")
            assert x.num_cached_tokens == 3 * BS
            want = np.concatenate([kv[:, :, : len(prompt)], new[s]], axis=2)
            assert np.array_equal(kv_of(b, x.block_table, 3 * BS), want)
        b.check_integrity()
        a.close()
        b.close()
