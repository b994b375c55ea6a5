"""Windowed allocates with the remote tier, against a real redis-server: a
conversation evicted here and held in the store, allocated again with a
sliding window, restores only the blocks that window reads (its reach
before the first new token), not its whole prefix: counted in device
blocks taken and in values read from the store. Its hit tokens are those
the rule gives over the blocks held here or in the store (a brute-force
reading of it), the probe says the same, and attention with the window over
the new sequence equals attention over a dense copy of the whole K/V."""

from __future__ import annotations

import numpy as np
import pytest
from redis_helpers import need_redis, redis_server
from reference import attention

need_redis()
redis = pytest.importorskip("redis")

from kvpager import KVPool, PoolSpec  # noqa: E402
from kvpager.block_pool import window_reach  # noqa: E402
from kvpager.prefix_cache import chain_keys, root_key  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

BS = 16
SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=40, block_size=BS, dtype="float32")
WINDOW = 3 * BS  # reads the 3 blocks before a prompt's first new token
REACH = window_reach(WINDOW, BS)
FULL = 10  # full blocks of the conversation
WAIT = 20.0


def conversation(store_url: str, keep_first: int = 0) -> tuple[KVPool, list[int], np.ndarray, np.ndarray]:
    """A pool whose conversation of ``FULL`` full blocks and a tail was computed,
    committed, written to the store and then evicted here, all but its first
    ``keep_first`` blocks (used again more recently); the prompt and its dense
    K/V per layer, [layers, tokens, heads, dim] each."""
    p = KVPool(SPEC, remote=RemoteTier(store_url, retry_after=0.2, timeout=2.0))
    prompt = list(range(1000, 1000 + FULL * BS + 3))
    rng = np.random.default_rng(7)
    shape = (SPEC.num_layers, len(prompt) + 5, SPEC.num_kv_heads, SPEC.head_dim)
    k, v = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    [a] = p.allocate([prompt])
    for layer in range(SPEC.num_layers):
        p.write(layer, a.slots, k[layer, : len(prompt)], v[layer, : len(prompt)])
    p.commit(a.seq_id)
    assert p.remote.flush(WAIT) and p.remote_stats().written_blocks == FULL
    p.free([a.seq_id])
    if keep_first:  # its first blocks used again: the last the LRU evicts
        [b] = p.allocate([prompt[: keep_first * BS + 1]])
        p.free([b.seq_id])
    st = p.stats()
    [filler] = p.allocate([list(range(50000, 50000 + (st.free_blocks + FULL - keep_first) * BS))])
    p.free([filler.seq_id])  # (never committed: its blocks go back to the free list)
    assert p.cached_tokens([prompt], remote=False) == [keep_first * BS]
    return p, prompt, k, v


def expected(p: KVPool, prompt: list[int], in_store: set[int]) -> tuple[int, int]:
    """(cached tokens, remote tokens) the windowed rule gives ``prompt`` over
    its blocks held here or (indices ``in_store``) in the store, by brute
    force: every hit point tried, furthest first; the blocks restored are
    those of its reach not held here."""
    cache = p.manager.pool.cache.key_to_block
    usable = (len(prompt) - 1) // BS
    keys = chain_keys(root_key(None), np.asarray(prompt, np.int64), BS)[:usable]
    here = [k in cache for k in keys]
    prefix = next((i for i, h in enumerate(here) if not h), usable)
    for h in range(usable, prefix - 1, -1):
        reach = range(max(0, h - REACH), h)
        if all(here[i] or i in in_store for i in reach):
            return h * BS, sum(not here[i] for i in reach) * BS
    raise AssertionError("unreachable: the local prefix is a hit")


def drop(p: KVPool, store, prompt: list[int], blocks: list[int]) -> None:
    """Delete the conversation's ``blocks`` (indices) from the store."""
    keys = chain_keys(root_key(None), np.asarray(prompt, np.int64), BS)
    if blocks:
        redis.Redis(port=store.port).delete(*[p.remote.key(root_key(None), keys[i]) for i in blocks])


def sent_bytes(store) -> int:
    return int(redis.Redis(port=store.port).info("stats")["total_net_output_bytes"])


def test_a_windowed_allocate_restores_only_the_blocks_its_window_reads():
    """Before, the whole evicted prefix (10 blocks) was read from the store
    and restored, 7 of them then idle; now the reach (3) is read and
    restored, the entries before it left released, and attention with the
    window over the new sequence is the dense conversation's."""
    with redis_server() as store:
        p, prompt, k, v = conversation(store.url)
        try:
            turn = prompt + [1, 2, 3, 4, 5]
            free, sent, before = p.stats().free_blocks, sent_bytes(store), p.remote_stats()
            [a] = p.allocate([turn], window=WINDOW)
            assert (a.num_cached_tokens, a.num_remote_tokens) == (FULL * BS, REACH * BS)
            assert free - p.stats().free_blocks == REACH + 1  # the reach restored, the tail's block fresh
            st = p.remote_stats()
            assert (st.lookup_blocks - before.lookup_blocks, st.hit_blocks - before.hit_blocks,
                    st.restored_blocks) == (REACH, REACH, REACH)
            value = p.remote.codec.value_bytes
            assert sent_bytes(store) - sent < (REACH + 1) * value  # the store sent the reach's values only
            skip = FULL - REACH
            assert a.block_table[:skip] == (0,) * skip and 0 not in a.block_table[skip:]
            c = a.num_cached_tokens
            rng = np.random.default_rng(3)
            for layer in range(SPEC.num_layers):
                p.write(layer, a.slots, k[layer, c:], v[layer, c:])
                q = rng.standard_normal((len(turn) - c, 4, SPEC.head_dim)).astype(np.float32)
                out = p.attend(layer, [a.seq_id], q, query_lens=[len(q)], window=WINDOW)
                ref = attention(q, k[layer], v[layer], SPEC.head_dim**-0.5, window=WINDOW)
                np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
            p.check_integrity()
            p.free([a.seq_id])
            p.check_integrity()
        finally:
            p.close()


@pytest.mark.parametrize("keep_first, store_lacks", [
    (0, []),
    (0, [2]),  # before the reach: never read, its tokens still a hit
    (0, [8]),  # inside the reach: the hit ends before it, its own reach restored
    (0, [9]),
    (2, []),  # a local prefix before the reach: neither held nor counted remote
    (2, [1, 2]),
])
def test_the_probe_and_the_allocate_agree_with_the_rule(keep_first, store_lacks):
    """Before, the probe counted every block the allocate restored as remote,
    while the allocate counted those its window read (10 blocks against 3),
    and a block missing from the store before the reach ended the hit there."""
    with redis_server() as store:
        p, prompt, _, _ = conversation(store.url, keep_first)
        try:
            drop(p, store, prompt, store_lacks)
            turn = prompt + [1, 2]
            want = expected(p, turn, set(range(FULL)) - set(store_lacks))
            [probe] = p.probe_cache([turn], window=WINDOW)
            assert p.cached_tokens([turn], window=WINDOW) == [want[0]]
            assert (probe.num_cached_tokens, probe.num_remote_tokens) == want
            free = p.stats().free_blocks
            [a] = p.allocate([turn], window=WINDOW)
            assert (a.num_cached_tokens, a.num_remote_tokens) == want
            assert p.remote_stats().restored_blocks == want[1] // BS
            # the allocate took the restored blocks and the fresh ones, nothing for unread blocks
            assert free - p.stats().free_blocks == want[1] // BS + -(-len(turn) // BS) - want[0] // BS
            held = [b for b in a.block_table[: want[0] // BS] if b]
            assert len(held) == min(REACH, want[0] // BS)
            p.check_integrity()
            p.free([a.seq_id])
        finally:
            p.close()


def test_a_value_gone_between_the_check_and_the_read_restores_what_came():
    """The store is asked which keys it holds, then for the reach's values: a
    value gone in between (expired, evicted) ends the hit before it; nothing
    is counted that was not restored, and the allocate fits."""
    with redis_server() as store:
        p, prompt, _, _ = conversation(store.url)
        try:
            exists = p.remote.exists

            def exists_then_lose(wants):
                held = exists(wants)
                drop(p, store, prompt, [FULL - 2])  # inside the reach
                return held

            p.remote.exists = exists_then_lose
            turn = prompt + [1, 2]
            before = p.remote_stats()
            [a] = p.allocate([turn], window=WINDOW)
            st = p.remote_stats()
            assert st.lookup_blocks - before.lookup_blocks == REACH
            assert st.restored_blocks == a.num_remote_tokens // BS
            assert a.num_cached_tokens == p.cached_tokens([turn], window=WINDOW, remote=False)[0]
            p.check_integrity()
            p.free([a.seq_id])
        finally:
            p.close()
