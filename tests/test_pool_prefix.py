"""KVPool's prefix cache: committed full blocks shared, never an uncommitted
block or another salt's, a fully cached prompt's last block computed, LRU
eviction of freed cached blocks, hashes stable across processes, the
read-only `cached_tokens` probe, blocks shared within one allocate."""

from __future__ import annotations

import pytest
from pool_helpers import BS, fill, make_pool, snapshot

from kvpager import InvalidArgument


def test_second_allocation_shares_committed_full_blocks():
    pool = make_pool()
    prompt = list(range(3 * BS + 5))
    [a] = pool.allocate([prompt])
    fill(pool, a.slots, 0)
    pool.commit(a.seq_id)
    [b] = pool.allocate([prompt + [9, 9]])
    assert b.num_cached_tokens == 3 * BS
    assert b.block_table[:3] == a.block_table[:3]
    assert b.block_table[3] != a.block_table[3]
    assert len(b.slots) == len(prompt) + 2 - 3 * BS
    st = pool.stats()
    assert st.shared_blocks == 3 and st.prefix_hit_tokens == 3 * BS
    assert st.prefix_query_tokens == 2 * len(prompt) + 2
    pool.check_integrity()


def test_uncommitted_block_is_never_matched():
    pool = make_pool()
    prompt = list(range(2 * BS + 1))
    [a] = pool.allocate([prompt])
    [b] = pool.allocate([prompt])
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)
    pool.commit(a.seq_id, upto=BS + 3)  # only the first block is complete and written
    [c] = pool.allocate([prompt])
    assert c.num_cached_tokens == BS and c.block_table[0] == a.block_table[0]


def test_different_salts_never_match():
    pool = make_pool()
    prompt = list(range(2 * BS + 1))
    [a] = pool.allocate([prompt], salt="model-a")
    pool.commit(a.seq_id)
    [b, c, d] = pool.allocate([prompt] * 3, salt=["model-b", None, "model-a"])
    assert b.num_cached_tokens == 0 and c.num_cached_tokens == 0
    assert d.num_cached_tokens == 2 * BS


def test_fully_cached_prompt_leaves_last_block_to_compute():
    pool = make_pool()
    prompt = list(range(2 * BS))
    [a] = pool.allocate([prompt])
    pool.commit(a.seq_id)
    [b] = pool.allocate([prompt])
    assert b.num_cached_tokens == BS and len(b.slots) == BS


def test_freed_cached_blocks_stay_matchable_then_evict_in_lru_order():
    pool = make_pool(num_blocks=9, host=0)  # 8 usable blocks
    p1, p2 = [1] * (2 * BS + 1), [2] * (2 * BS + 1)
    [a] = pool.allocate([p1])
    pool.commit(a.seq_id)
    [b] = pool.allocate([p2])
    pool.commit(b.seq_id)
    pool.free([a.seq_id])  # a's blocks become evictable first (older)
    pool.free([b.seq_id])
    st = pool.stats()
    assert st.evictable_blocks == 4 and st.free_blocks == 4 and st.used_blocks == 0
    [c] = pool.allocate([[3] * (6 * BS)])  # needs 6: 4 free + the 2 oldest evictable (p1's)
    assert pool.stats().evictable_blocks == 2
    pool.free(c.seq_id)  # never committed: straight to the free list
    assert pool.stats().evictable_blocks == 2
    [d] = pool.allocate([p2])
    assert d.num_cached_tokens == 2 * BS  # p2 survived
    [e] = pool.allocate([p1])
    assert e.num_cached_tokens == 0  # p1 was evicted
    pool.check_integrity()


def test_hash_is_stable_across_processes():
    import subprocess
    import sys

    code = (
        "from kvpager.prefix_cache import chain_keys, root_key, token_array;"
        "print(chain_keys(root_key('s'), token_array(list(range(40))), 16)[-1].hex())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""}, cwd=str(__import__("pathlib").Path(__file__).parents[1]),
        ).stdout.strip()
        for seed in (1, 2)
    }
    assert len(outs) == 1 and len(outs.pop()) == 32


@pytest.mark.parametrize("block_size", [1, 8, 16, 64])
def test_keys_are_their_definition(block_size):
    """Chained keys and a match's keys are BLAKE2b-128 of the parent key and
    the block's int64 little-endian token ids (root: of b"kvpager-root\\0" +
    salt), recomputed here from that definition; a match stops at the first
    block not published and at its limit."""
    import hashlib

    import numpy as np

    from kvpager.prefix_cache import PrefixCache, chain_keys, root_key

    tokens = np.random.default_rng(block_size).integers(0, 2**40, 5 * block_size + 3)
    parent = hashlib.blake2b(b"kvpager-root\0" + b"salt", digest_size=16).digest()
    assert root_key("salt") == parent
    expected = []
    for i in range(len(tokens) // block_size):  # every full block
        block = b"".join(int(t).to_bytes(8, "little", signed=True) for t in tokens[i * block_size : (i + 1) * block_size])
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        expected.append(parent)
    assert chain_keys(root_key("salt"), tokens, block_size) == expected
    cache = PrefixCache(16)
    for b, key in enumerate(expected[:4], start=1):
        cache.publish(b, key)
    assert cache.match_tokens(root_key("salt"), tokens, block_size, 5) == (expected[:4], [1, 2, 3, 4])
    assert cache.match_tokens(root_key("salt"), tokens, block_size, 2) == (expected[:2], [1, 2])
    assert cache.match_tokens(root_key(None), tokens, block_size, 5) == ([], [])


def test_remove_many_is_remove_of_each():
    """An eviction's keys removed at once: the same keys back (None for a block that had
    none) and the same maps as removing them one at a time."""
    from kvpager.prefix_cache import PrefixCache

    one, many = PrefixCache(40), PrefixCache(40)
    for cache in (one, many):
        for b in range(1, 40, 2):
            cache.publish(b, bytes([b]) * 16)
    victims = [7, 2, 31, 30, 1, 39, 12]  # (keyed and unkeyed blocks, in no order)
    assert many.remove_many(victims) == [one.remove(b) for b in victims]
    assert many.key_to_block == one.key_to_block and many.block_key == one.block_key
    assert (many.cached == one.cached).all() and not many.problems()
    assert many.remove_many([]) == [] and len(many) == len(one) == 20 - 4




def test_cached_tokens_probe_predicts_allocate_and_changes_nothing():
    pool = make_pool()
    prompt = list(range(3 * BS + 5))
    assert pool.cached_tokens([prompt]) == [0]
    [a] = pool.allocate([prompt])
    assert pool.cached_tokens([prompt]) == [0]  # not committed yet
    pool.commit(a.seq_id, upto=2 * BS)
    pool.free(a.seq_id)  # its two committed blocks stay matchable (evictable)
    probes = [prompt, prompt[: 2 * BS], prompt[:BS], [7] + prompt]
    before = snapshot(pool)
    got = pool.cached_tokens(probes)
    assert snapshot(pool) == before  # read-only: no block touched, no counter moved
    assert got == [2 * BS, BS, 0, 0]  # a fully cached prompt leaves its last block to compute
    assert pool.cached_tokens([prompt], salt="other") == [0]
    assert [x.num_cached_tokens for x in pool.allocate(probes)] == got
    with pytest.raises(InvalidArgument):
        pool.cached_tokens(prompt)


def test_share_in_batch_shares_fresh_prompt_blocks_within_one_allocate():
    pool = make_pool()
    system = list(range(3 * BS + 2))
    prompts = [system + [1], system + [2, 3], list(range(BS)) + [9], system[:BS]]
    plain = pool.allocate(prompts)
    assert [a.num_cached_tokens for a in plain] == [0, 0, 0, 0]
    pool.free([a.seq_id for a in plain])
    before = pool.stats().used_blocks
    a, b, c, d = pool.allocate(prompts, share_in_batch=True)
    # b shares a's three full blocks; c's first block has the same tokens as a's
    # first block (same salt): shared too; d is one block long and must compute it.
    assert (a.num_cached_tokens, b.num_cached_tokens, c.num_cached_tokens, d.num_cached_tokens) == (0, 3 * BS, BS, 0)
    assert b.block_table[:3] == a.block_table[:3] and c.block_table[0] == a.block_table[0]
    assert len(b.slots) == 4 and len(c.slots) == 1
    assert pool.stats().used_blocks == before + 4 + 1 + 1 + 1  # a: 4, b/c/d: one own block each
    assert pool.stats().prefix_hit_tokens == 4 * BS
    [e] = pool.allocate([system + [4]], share_in_batch=True)
    assert e.num_cached_tokens == 0  # nothing committed: only the same batch shares
    pool.commit([a.seq_id])
    [f] = pool.allocate([system + [5]])
    assert f.num_cached_tokens == 3 * BS
    with pytest.raises(InvalidArgument, match="share_in_batch"):
        pool.allocate(prompts, share_in_batch="yes")
    pool.check_integrity()




def test_one_block_key_equals_the_chained_key():
    """`block_key` (a decode step's one block, from a list of ints) gives the key
    `chain_keys` gives for the same ids: over the whole int64 range and every
    block size a pool takes."""
    import numpy as np

    from kvpager.prefix_cache import block_key, chain_keys, root_key

    rng = np.random.default_rng(7)
    for bs in (8, 16, 32, 64, 128):
        parent = root_key(f"salt{bs}")
        for _ in range(50):
            ids = rng.integers(-(2**63), 2**63 - 1, bs, dtype=np.int64, endpoint=True)
            ids[: rng.integers(0, 3)] = rng.choice([-(2**63), 2**63 - 1, 0])
            key = block_key(parent, ids.tolist())
            assert key == chain_keys(parent, ids, bs)[0]
            parent = key
