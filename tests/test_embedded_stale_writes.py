"""An embedded pool's `write` with slots kept from before a free.

A freed sequence's committed blocks stay on the LRU, answering for their
prefix; a write through slots kept from before the free went into them, and
every later prompt that found the prefix attended over that K/V, with no word
(`KVPool._check_writable`). Blocks a sequence holds are written as before,
after their commit too (a step that publishes full blocks before its forward
pass runs), and so are blocks that answer for nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from pool_helpers import BS, fill, make_pool, seq_kv, snapshot

from kvpager import NotOwner, PoolSpec
from kvpager.pool import KVPool

PROMPT = list(range(1, 2 * BS + 5))  # two full blocks and a part


def _kv(pool, n, seed):
    s = pool.spec
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, s.num_kv_heads, s.head_dim)).astype(s.np_dtype)


def test_a_freed_sequences_slots_write_nothing_into_its_cached_blocks():
    pool = make_pool()
    a = pool.allocate([PROMPT])[0]
    fill(pool, np.asarray(a.slots), seed=1)
    pool.commit(a.seq_id)
    written = seq_kv(pool, a.seq_id)
    pool.free(a.seq_id)
    before = snapshot(pool), pool.backend.device_array().copy()
    stale = np.asarray(a.slots[:BS])  # the first block's: on the LRU, answering for the prompt's first 16 tokens
    with pytest.raises(NotOwner, match="held by no sequence and holds a cached prefix"):
        pool.write(0, stale, _kv(pool, BS, 2), _kv(pool, BS, 3))
    after = snapshot(pool), pool.backend.device_array()
    assert repr(after[0]) == repr(before[0])
    assert np.array_equal(after[1], before[1])
    # the next prompt that finds the prefix reads the K/V its first prompt wrote
    b = pool.allocate([PROMPT])[0]
    assert b.num_cached_tokens == 2 * BS
    assert np.array_equal(seq_kv(pool, b.seq_id)[: 2 * BS], written[: 2 * BS])
    pool.free(b.seq_id)
    pool.check_integrity()


def test_a_held_block_is_written_after_its_commit_and_a_free_block_as_ever():
    pool = make_pool()
    a = pool.allocate([PROMPT])[0]
    pool.commit(a.seq_id)  # the full blocks published first, their K/V written after (a step's order)
    fill(pool, np.asarray(a.slots), seed=4)
    got = seq_kv(pool, a.seq_id)
    k = _kv(pool, len(a.slots), 4)  # (fill's first layer: the same generator, k drawn first)
    assert np.array_equal(got[:, 0, 0], k)
    free_block = pool.spec.num_blocks - 1  # answers for nothing: the caller's to fill
    assert pool.blocks().ref_cnt[free_block] == 0
    slots = np.arange(free_block * BS, free_block * BS + 2)
    pool.write(1, slots, _kv(pool, 2, 5), _kv(pool, 2, 6))
    assert np.array_equal(pool.backend.device_array()[free_block, 1, 0, :, :2].swapaxes(0, 1), _kv(pool, 2, 5))
    pool.free(a.seq_id)
    pool.check_integrity()


def test_a_rank_of_a_pool_refuses_the_same_slots():
    spec = PoolSpec(2, 4, 64, num_blocks=32, block_size=BS, dtype="float32")
    pool = KVPool(spec, devices=["cpu"] * 2)
    a = pool.allocate([PROMPT])[0]
    pool.commit(a.seq_id)
    pool.free(a.seq_id)
    rank = pool.rank(1)
    k = np.ones((BS, 2, 64), np.float32)
    with pytest.raises(NotOwner, match="held by no sequence"):
        rank.write(0, np.asarray(a.slots[:BS]), k, k)
    b = pool.allocate([PROMPT + [7]])[0]
    rank.write(0, np.asarray(b.slots), np.ones((len(b.slots), 2, 64), np.float32),
               np.ones((len(b.slots), 2, 64), np.float32))
    pool.free(b.seq_id)
    pool.check_integrity()
