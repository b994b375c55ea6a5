"""KVPool moving a sequence's blocks: copy-on-write of a shared last block after
a fork, swap out and in (bit for bit, accounting restored, still-cached blocks
re-shared), truncate (blocks released, a block to be rewritten un-published)."""

from __future__ import annotations

import numpy as np
import pytest
from pool_helpers import BS, fill, make_pool, seq_kv

from kvpager import SequenceSwapped


def test_fork_then_append_copies_shared_last_block():
    pool = make_pool()
    [a] = pool.allocate([list(range(BS + 5))])
    fill(pool, a.slots, 1)
    [[c1, c2]] = pool.fork(a.seq_id, 2)
    before = seq_kv(pool, c2).copy()
    [s1] = pool.append(c1, 1)
    t1 = pool.sequence(c1).block_table
    assert t1[0] == a.block_table[0] and t1[1] != a.block_table[1]  # last block copied
    assert s1[0] == t1[1] * BS + 5
    fill(pool, s1, 2)  # write into the copy
    np.testing.assert_array_equal(seq_kv(pool, c2), before)  # sibling bit-identical
    np.testing.assert_array_equal(seq_kv(pool, c1)[: BS + 5], before)  # prefix copied exactly
    pool.check_integrity()
    # c2 and the parent still share their last block: c2 copies too, then the
    # parent owns the original alone and appends without copying.
    pool.append(c2, 1)
    assert pool.sequence(c2).block_table[1] not in (a.block_table[1], t1[1])
    pool.append(a.seq_id, 1)
    assert pool.sequence(a.seq_id).block_table[1] == a.block_table[1]
    pool.check_integrity()


def test_append_into_full_last_block_needs_no_copy():
    pool = make_pool()
    [a] = pool.allocate([list(range(BS))])
    [[c]] = pool.fork(a.seq_id, 1)
    used = pool.stats().used_blocks
    pool.append(c, 1)
    assert pool.stats().used_blocks == used + 1
    assert pool.sequence(c).block_table[0] == a.block_table[0]




def test_swap_round_trip_is_bit_identical_and_restores_accounting():
    pool = make_pool(dtype="bfloat16")
    [a] = pool.allocate([list(range(3 * BS + 2))])
    fill(pool, a.slots, 3)
    [[c]] = pool.fork(a.seq_id, 1)
    pool.append(c, BS)  # c: copy of the last block + one more of its own
    kv_c = seq_kv(pool, c).copy()
    before = pool.stats()
    pool.swap_out([c])
    mid = pool.stats()
    assert mid.swapped_sequences == 1
    assert mid.host_free_blocks == before.host_free_blocks - 2  # c's two exclusive blocks
    assert mid.used_blocks == before.used_blocks - 2  # the shared three stay
    pool.check_integrity()
    pool.swap_in([c])
    after = pool.stats()
    np.testing.assert_array_equal(seq_kv(pool, c).view(np.uint16), kv_c.view(np.uint16))
    assert (after.used_blocks, after.host_free_blocks, after.swapped_sequences) == (
        before.used_blocks, before.host_free_blocks, 0
    )
    pool.check_integrity()


def test_swapped_sequence_cannot_be_attended_or_appended():
    pool = make_pool()
    [a] = pool.allocate([list(range(20))])
    pool.swap_out(a.seq_id)
    q = np.zeros((1, 2, 64), np.float32)
    for call in (lambda: pool.append(a.seq_id), lambda: pool.attend(0, a.seq_id, q),
                 lambda: pool.fork(a.seq_id), lambda: pool.truncate(a.seq_id, 3),
                 lambda: pool.swap_out(a.seq_id), lambda: pool.commit(a.seq_id)):
        with pytest.raises(SequenceSwapped):
            call()
    pool.free(a.seq_id)  # freeing a swapped sequence releases its host blocks
    assert pool.stats().host_free_blocks == 16
    pool.check_integrity()


def test_swap_in_reuses_a_still_cached_block():
    pool = make_pool()
    [a] = pool.allocate([list(range(2 * BS + 1))])
    pool.commit(a.seq_id)
    pool.swap_out(a.seq_id)  # published blocks become evictable, still matchable
    assert pool.stats().evictable_blocks == 2
    pool.swap_in(a.seq_id)
    assert pool.sequence(a.seq_id).block_table[:2] == a.block_table[:2]
    pool.check_integrity()




def test_truncate_releases_blocks_and_unpublishes_a_block_that_will_be_rewritten():
    pool = make_pool()
    prompt = list(range(3 * BS))
    [a] = pool.allocate([prompt])
    pool.commit(a.seq_id)
    pool.truncate(a.seq_id, BS + 4)
    assert pool.sequence(a.seq_id).block_table == a.block_table[:2]
    pool.append(a.seq_id, 2)
    [b] = pool.allocate([prompt])
    assert b.num_cached_tokens == BS  # block 1 is being rewritten: no longer matched
    pool.check_integrity()


