"""BlockPool unit tests: null block, all-or-nothing, LRU eviction, integrity check."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager.block_pool import BlockPool
from kvpager.errors import IntegrityError, OutOfBlocks


def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    ids = pool.get_new_blocks(4)
    assert sorted(ids) == [1, 2, 3, 4]
    with pytest.raises(OutOfBlocks):
        pool.get_new_blocks(1)


def test_batch_allocation_is_all_or_nothing():
    pool = BlockPool(10)
    pool.get_new_blocks(5)
    with pytest.raises(OutOfBlocks) as e:
        pool.get_new_blocks(5)
    assert (e.value.needed, e.value.available) == (5, 4)
    assert pool.get_num_free_blocks() == 4


def test_evictable_blocks_are_reclaimed_oldest_first():
    pool = BlockPool(6)
    ids = pool.get_new_blocks(5)
    assert ids.tolist() == [1, 2, 3, 4, 5]
    keys = {b: bytes([b]) * 16 for b in (1, 2, 3)}
    for b, key in keys.items():
        assert pool.publish(b, key)
    pool.free_blocks([3, 1, 4, 2, 5])
    assert list(pool.evictable) == [3, 1, 2] and sorted(pool.free_ids) == [4, 5]
    pool.touch([1])  # a prefix hit takes 1 back out of the LRU
    got = pool.get_new_blocks(4).tolist()
    evicted = got[2:]  # after the two free blocks, evicted oldest first
    assert sorted(got) == [2, 3, 4, 5] and evicted == [3, 2]
    assert [pool.lookup(keys[b]) for b in (1, 2, 3)] == [1, None, None]  # evicted: forgotten
    assert pool.ref_cnt[1] == 1


def test_free_with_repeats_and_unpublish():
    pool = BlockPool(6)
    a, b = pool.get_new_blocks(2).tolist()
    pool.share([a, b], 2)  # three references each
    assert pool.publish(a, b"k" * 16)
    pool.free_blocks([a, b, a, b])  # repeats drop one reference each
    assert pool.ref_cnt[[a, b]].tolist() == [1, 1]
    pool.free_blocks([b, a])
    assert list(pool.evictable) == [a] and pool.free_ids[-1] == b
    pool.unpublish(a)  # an evictable block that loses its key is free
    assert not pool.evictable and pool.num_free == 5 and pool.lookup(b"k" * 16) is None
    pool.check(np.zeros(6, np.int64))


@pytest.mark.parametrize("seed", range(20))
def test_distinct_free_and_touch_agree_with_the_general_path(seed):
    """``distinct=True`` and `free_table` (one sequence's blocks: a plain store
    when every count is the same, an indexed update otherwise) leave what the
    repeat-safe path leaves: counts, free list in order, LRU; and refuse a
    block without references (IntegrityError, counts restored) the same way.
    Odd seeds publish nothing (`free_table`'s short cut to the free list)."""
    rng = np.random.default_rng(seed)
    pools = [BlockPool(30), BlockPool(30)]
    for pool in pools:
        pool.get_new_blocks(29)
        for b in range(1, 30, 3) if seed % 2 == 0 else ():
            assert pool.publish(b, bytes([b]) * 16)
    for _ in range(40):
        ids = rng.choice(np.arange(1, 30), size=int(rng.integers(1, 8)), replace=False).astype(np.int64)
        live = ids[pools[0].ref_cnt[ids] > 0]
        op = rng.integers(3)
        if op == 0 and len(live):  # share with a uniform or a mixed count
            times = int(rng.integers(1, 3))
            for pool in pools:
                pool.share(live, times)
            continue
        results = []
        table = bool(rng.integers(2))
        for pool, distinct in zip(pools, (True, False)):
            try:
                if op == 1 and distinct and table:
                    pool.free_table(ids)
                elif op == 1:
                    pool.free_blocks(ids, distinct=distinct)
                else:
                    pool.touch(ids[(pool.ref_cnt[ids] > 0) | pool.cache.cached[ids]], distinct=distinct)
                results.append(None)
            except IntegrityError as e:
                results.append(str(e))
        a, b = pools
        assert results[0] == results[1]
        assert a.ref_cnt.tolist() == b.ref_cnt.tolist()
        assert a.free_ids == b.free_ids and list(a.evictable) == list(b.evictable)


def test_check_reports_counts():
    pool = BlockPool(4)
    [a, _] = pool.get_new_blocks(2)
    pool.check([0, 1, 1, 0])
    with pytest.raises(IntegrityError, match=r"free=1, evictable=0, in_use=2, total=3"):
        pool.check([0, 2, 1, 0])
    pool.free_blocks([a])
    with pytest.raises(IntegrityError, match="bug"):
        pool.free_blocks([a])
