"""Pins and tenants' quotas on the embedded pool: what stays cached, what is
evicted first, the cap, typed errors that change nothing."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager import KVPool, PoolSpec
from kvpager.errors import InvalidArgument, LimitExceeded, NotPinned, OutOfBlocks

BS = 8


def make_pool(num_blocks=17, **kw) -> KVPool:
    return KVPool(PoolSpec(1, 1, 8, num_blocks=num_blocks, block_size=BS, dtype="float32", num_host_blocks=8), **kw)


def cached_prefix(pool: KVPool, tokens: list[int], salt=None) -> list[int]:
    """Allocate, commit and free ``tokens``: its full blocks stay cached (evictable).
    Returns its block table."""
    [a] = pool.allocate([tokens], salt=salt)
    pool.commit(a.seq_id)
    pool.free(a.seq_id)
    return list(a.block_table)


def fill(pool: KVPool, blocks: int) -> list[int]:
    """Take ``blocks`` blocks with uncommitted sequences (evicting if needed); returns their ids."""
    return [pool.allocate([[7] * (BS * 1)])[0].seq_id for _ in range(blocks)]


def test_pin_holds_blocks_through_memory_pressure_and_unpin_lets_them_go():
    pool = make_pool()
    sys_prompt = list(range(4 * BS))
    table = cached_prefix(pool, sys_prompt)
    assert pool.pin([sys_prompt]) == [4 * BS]
    st = pool.stats()
    assert (st.pinned_blocks, st.evictable_blocks, st.used_blocks) == (4, 0, 4)
    # Every other block taken by new sequences: the pinned prefix is not evicted.
    assert st.free_blocks == 12
    fillers = fill(pool, 12)
    with pytest.raises(OutOfBlocks):
        pool.allocate([[9] * BS])
    assert pool.cached_tokens([sys_prompt + [0]]) == [4 * BS]
    pool.free(fillers[0])
    [a] = pool.allocate([sys_prompt + [1]])  # and it is still a hit
    assert a.num_cached_tokens == 4 * BS and list(a.block_table[:4]) == table
    pool.free([a.seq_id, *fillers[1:]])
    assert pool.unpin([sys_prompt]) == [4 * BS]
    st = pool.stats()
    assert (st.pinned_blocks, st.evictable_blocks) == (0, 4)
    fill(pool, pool.stats().free_blocks + 1)  # now the prefix's blocks can be evicted
    assert pool.cached_tokens([sys_prompt + [0]]) == [3 * BS]  # its last block went first
    pool.check_integrity()


def test_pin_of_a_partly_cached_prefix_pins_what_is_cached():
    pool = make_pool()
    prompt = list(range(5 * BS + 3))
    cached_prefix(pool, prompt[: 2 * BS + 1])
    assert pool.pin([prompt, list(range(100, 120))]) == [2 * BS, 0]
    assert [(p.num_tokens, p.count) for p in pool.pins()] == [(2 * BS, 1)]
    # Later more is cached; pinning again is another pin, of the longer prefix.
    cached_prefix(pool, prompt)
    assert pool.pin([prompt]) == [5 * BS]
    assert sorted(p.num_tokens for p in pool.pins()) == [2 * BS, 5 * BS]
    assert pool.stats().pinned_blocks == 5
    # unpin drops the pin of the longest pinned prefix first
    assert pool.unpin([prompt]) == [5 * BS]
    assert pool.unpin([prompt]) == [2 * BS]
    with pytest.raises(NotPinned):
        pool.unpin([prompt])
    pool.check_integrity()


def test_pins_are_counted_and_owned():
    pool = make_pool()
    prompt = list(range(2 * BS))
    cached_prefix(pool, prompt)
    assert pool.pin([prompt, prompt], owner="s1") == [2 * BS] * 2
    assert pool.pin([prompt], owner="s2") == [2 * BS]
    assert sorted((p.owner, p.count) for p in pool.pins()) == [("s1", 2), ("s2", 1)]
    assert pool.stats().pinned_blocks == 2  # the same two blocks
    assert pool.blocks().ref_cnt[pool.pins()[0].block_table[0]] == 3
    with pytest.raises(NotPinned, match="pool"):
        pool.unpin([prompt])  # the pool's own: none
    # s2 cannot drop s1's second pin: one pin of s2, asked twice in one batch
    with pytest.raises(NotPinned, match="session s2"):
        pool.unpin([prompt, prompt], owner="s2")
    assert sorted((p.owner, p.count) for p in pool.pins()) == [("s1", 2), ("s2", 1)]
    assert pool.release_pins("s1") == 1
    assert [(p.owner, p.count) for p in pool.pins()] == [("s2", 1)]
    assert pool.pins(owner="s1") == [] and len(pool.pins(owner="s2")) == 1
    pool.check_integrity()
    assert pool.release_pins("s2") == 1 and pool.stats().pinned_blocks == 0
    assert pool.stats().evictable_blocks == 2
    pool.check_integrity()


def test_pin_cap_is_all_or_nothing():
    pool = make_pool(max_pinned_blocks=3)
    a, b = list(range(2 * BS)), list(range(50, 50 + 2 * BS))
    cached_prefix(pool, a)
    cached_prefix(pool, b)
    before = pool.stats()
    with pytest.raises(LimitExceeded, match="max-pinned-blocks") as e:
        pool.pin([a, b])
    assert (e.value.limit, e.value.value, e.value.maximum) == ("pinned_blocks", 4, 3)
    assert pool.stats() == before and pool.pins() == []
    assert pool.pin([a]) == [2 * BS]
    assert pool.pin([a]) == [2 * BS]  # the same blocks again: nothing new counts
    with pytest.raises(LimitExceeded):
        pool.pin([b])
    assert pool.stats().pinned_blocks == 2
    with pytest.raises(InvalidArgument):
        make_pool(max_pinned_blocks=-1)
    assert make_pool(max_pinned_blocks=0).stats().max_pinned_blocks == 0
    assert make_pool().stats().max_pinned_blocks == 8  # half the 16 usable blocks


def test_bad_pin_arguments_change_nothing():
    pool = make_pool()
    prompt = list(range(2 * BS))
    cached_prefix(pool, prompt)
    before = pool.stats()
    for bad in ([prompt, "abc"], [prompt, [1.5]], prompt):
        with pytest.raises(InvalidArgument):
            pool.pin(bad)
    with pytest.raises(InvalidArgument):
        pool.pin([prompt], salt=3)
    with pytest.raises(InvalidArgument):
        pool.pin([prompt, prompt], salt=["a"])
    assert pool.stats() == before and pool.pins() == []


def test_a_pinned_block_is_never_written_in_place():
    """A sequence that ends inside a pinned block (truncate) copies it before
    writing (copy-on-write); swap-out leaves it on the device."""
    pool = make_pool()
    prompt = list(range(2 * BS))
    table = cached_prefix(pool, prompt)
    pool.pin([prompt])
    [a] = pool.allocate([prompt + [5]])
    pool.truncate(a.seq_id, BS + 3)  # now ends in the middle of pinned block table[1]
    [slots] = pool.append(a.seq_id, 1)
    assert slots[0] // BS != table[1] and pool.sequence(a.seq_id).block_table[0] == table[0]
    assert pool.cached_tokens([prompt + [0]]) == [2 * BS]
    pool.swap_out(a.seq_id)
    assert pool.sequence(a.seq_id).block_table[0] == table[0]  # shared with the pin: stays
    pool.swap_in(a.seq_id)
    pool.check_integrity()


def tenant(pool: KVPool, salt) -> tuple[int, int, int, int | None]:
    t = next((t for t in pool.stats().tenants if t.salt == salt), None)
    return (0, 0, 0, None) if t is None else (t.cached_blocks, t.evictable_blocks, t.pinned_blocks, t.quota)


def test_eviction_takes_from_tenants_over_quota_first():
    pool = make_pool()  # 16 usable blocks
    # LRU order, oldest first: a1 a2 (tenant a), b1 b2 b3 (tenant b), c1 c2 (c, no quota)
    a = cached_prefix(pool, list(range(2 * BS)), "a")
    b = cached_prefix(pool, list(range(3 * BS)), "b")
    c = cached_prefix(pool, list(range(2 * BS)), "c")
    pool.set_quota("b", 1)
    pool.set_quota("a", 2)  # at its quota: not over
    assert tenant(pool, "b") == (3, 3, 0, 1) and tenant(pool, "a") == (2, 2, 0, 2)
    # 9 free blocks; ask for 12: 3 evictions. b is over by 2 (its two oldest,
    # b's blocks are freed last first: b3 b2 b1 in LRU order), then the global LRU.
    assert pool.stats().free_blocks == 9
    fill(pool, 12)
    bm = pool.blocks()
    evicted = {x for x in a + b + c if not bm.cached[x]}
    assert evicted == {b[2], b[1], a[1]}  # b's LRU two (tail first), then the global oldest: a's tail
    assert tenant(pool, "b") == (1, 1, 0, 1) and tenant(pool, "a") == (1, 1, 0, 2)
    assert tenant(pool, "c")[0] == 2
    pool.check_integrity()


def test_over_quota_lru_across_tenants_and_pins_are_never_victims():
    pool = make_pool()
    a = cached_prefix(pool, list(range(3 * BS)), "a")  # oldest
    b = cached_prefix(pool, list(range(3 * BS)), "b")
    pool.pin([list(range(3 * BS))], salt="a")  # a's blocks are held
    pool.set_quota("a", 0)
    pool.set_quota("b", 0)
    assert tenant(pool, "a") == (3, 0, 3, 0)
    free = pool.stats().free_blocks
    fill(pool, free + 2)
    bm = pool.blocks()
    assert all(bm.cached[x] for x in a)  # pinned: never evicted though over quota
    assert [bm.cached[x] for x in b] == [True, False, False]
    pool.check_integrity()


def test_quota_set_after_blocks_are_cached_and_removed():
    pool = make_pool()
    a = cached_prefix(pool, list(range(2 * BS)), "a")
    b = cached_prefix(pool, list(range(2 * BS)), b"b")
    pool.set_quota("b", 0)  # str and bytes salts of the same bytes are one tenant
    assert tenant(pool, b"b") == (2, 2, 0, 0)
    pool.set_quota(b"b", None)
    assert tenant(pool, b"b") == (2, 2, 0, None)
    fill(pool, pool.stats().free_blocks + 1)
    bm = pool.blocks()
    assert not bm.cached[a[1]] and bm.cached[b[1]]  # no quota left: the global LRU
    with pytest.raises(InvalidArgument):
        pool.set_quota("a", -1)
    with pytest.raises(InvalidArgument):
        pool.set_quota("a", 1.5)
    with pytest.raises(InvalidArgument):
        pool.set_quota(3, 1)
    pool.check_integrity()


def test_tenants_without_blocks_or_quota_are_forgotten():
    pool = make_pool()
    for i in range(5):
        cached_prefix(pool, [i] * BS, f"user-{i}")
    assert len(pool.stats().tenants) == 5
    fill(pool, 16)  # evicts every cached block
    assert pool.stats().tenants == ()
    assert len(pool.manager.pool.tenants._codes) == 1  # the default tenant only
    pool.set_quota("q", 3)
    assert [(t.salt, t.cached_blocks, t.quota) for t in pool.stats().tenants] == [("q", 0, 3)]
    pool.check_integrity()


def test_a_commit_or_swap_in_that_publishes_nothing_keeps_no_tenant():
    """A salt's tenant entry made for blocks that then were not published: a commit whose
    full blocks a window released before their ids were known, a swap-in whose published
    blocks had been released and evicted. Before, each kept its entry (and its salt, up
    to 4 KiB) for ever: a daemon given fresh salts grew without bound while its stats
    said no tenant, and the integrity check did not see it."""
    pool = make_pool()
    codes = pool.manager.pool.tenants._codes
    for k in range(5):
        [a] = pool.allocate([[1]], salt=f"window-{k}")
        pool.append([a.seq_id], 3 * BS)  # (a pipelined step's slots: ids recorded later)
        pool.release_before([a.seq_id], [3 * BS])  # every full block released
        pool.record_tokens([a.seq_id], [list(range(2, 2 + 3 * BS))])
        pool.commit([a.seq_id])  # nothing left to publish
        pool.free([a.seq_id])
    assert len(codes) == 1 and pool.stats().tenants == ()  # the default tenant only
    pool.check_integrity()
    for k in range(3):
        [a] = pool.allocate([[100 * k + i for i in range(2 * BS + 4)]], salt=f"swapped-{k}")
        pool.commit([a.seq_id])  # two full blocks published under its salt
        pool.release_before([a.seq_id], [2 * BS + 4])  # both released: cached, evictable
        pool.free(fill(pool, 15))  # ... and evicted (its partial last block held)
        assert pool.stats().tenants == ()
        pool.swap_out([a.seq_id])
        pool.swap_in([a.seq_id])  # nothing to publish again
        pool.free([a.seq_id])
    assert len(codes) == 1 and pool.stats().tenants == ()
    pool.check_integrity()


def test_the_integrity_check_sees_a_tenant_entry_kept_for_nothing():
    pool = make_pool()
    pool.manager.pool.tenants.code(b"\x01" * 32, "forgotten")  # (an entry no block or quota holds)
    with pytest.raises(AssertionError, match="hold no block and have no quota.*'forgotten'"):
        pool.check_integrity()


def test_stats_tenants_and_json():
    pool = make_pool()
    cached_prefix(pool, list(range(2 * BS)), b"\x01\xff")
    cached_prefix(pool, list(range(3 * BS)))
    pool.pin([list(range(2 * BS))], salt=b"\x01\xff")
    d = pool.stats().to_dict()
    assert d["pinned_blocks"] == 2
    assert d["tenants"] == [
        dict(salt=None, cached_blocks=3, evictable_blocks=3, pinned_blocks=0, quota=None),
        dict(salt="hex:01ff", cached_blocks=2, evictable_blocks=0, pinned_blocks=2, quota=None),
    ]
    assert np.array_equal(pool.blocks().ref_cnt[1:3], [1, 1])


def test_json_salts_are_told_apart():
    """The str "hex:61" read as the bytes b"a" in JSON output: a str that begins
    with "hex:" or "str:" is written "str:" + it."""
    from kvpager.types import salt_text

    texts = [salt_text(s) for s in (b"a", "hex:61", "str:x", "x", "", None, b"", "hex:")]
    assert texts == ["hex:61", "str:hex:61", "str:str:x", "x", "", None, "hex:", "str:hex:"]
    assert len(set(texts)) == len(texts)
