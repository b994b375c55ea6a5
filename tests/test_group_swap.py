"""Swapping out a group: a parent and its forks (n > 1 sampling, beams) share
blocks; a block whose every reference is an entry of the call's sequences or
of sequences swapped out before moves to the host once and its device block
goes back, instead of staying on the device while every sharer is swapped
out. Swapped in together they share one copy again; swapped in apart, each
gets its own copy, and a host block goes back with its last entry. Blocks a
resident sequence or a pin holds stay. Contents are checked against what was
written, and accounting against the blocks counted by hand."""

from __future__ import annotations

import numpy as np
import pytest
from pool_helpers import BS, fill, make_pool, seq_kv

from kvpager import OutOfBlocks


def family(pool, prompt_blocks=3, forks=3, own=1):
    """A parent of ``prompt_blocks`` full blocks and a partial one, forked
    ``forks`` times; each child appends ``own`` blocks of its own (its first
    append copies the shared partial block). Returns the ids, parent first,
    and each one's K/V."""
    [a] = pool.allocate([list(range(prompt_blocks * BS + 3))])
    fill(pool, a.slots, 1)
    [kids] = pool.fork(a.seq_id, forks)
    for k, c in enumerate(kids):
        fill(pool, pool.append(c, own * BS)[0], 10 + k)
    ids = [a.seq_id, *kids]
    return ids, {s: seq_kv(pool, s).copy() for s in ids}


def check_contents(pool, kv):
    for s, want in kv.items():
        np.testing.assert_array_equal(seq_kv(pool, s), want, err_msg=f"sequence {s}")


def test_swapping_a_whole_group_frees_the_blocks_it_shares():
    pool = make_pool()
    ids, kv = family(pool)
    before = pool.stats()
    # 3 shared full blocks; the parent's partial block; each child: a copy of it + 1 own.
    assert before.used_blocks == 3 + 1 + 3 * 2
    pool.swap_out(ids)
    mid = pool.stats()
    assert mid.used_blocks == 0  # nothing of the group stays on the device
    assert mid.host_free_blocks == before.host_free_blocks - before.used_blocks  # each block once
    assert mid.swapped_sequences == 4
    pool.check_integrity()
    pool.swap_in(ids)
    after = pool.stats()
    assert after.used_blocks == before.used_blocks  # shared again, not a copy per sibling
    assert after.host_free_blocks == before.host_free_blocks
    tables = [pool.sequence(s).block_table for s in ids]
    assert len({t[:3] for t in tables}) == 1  # one prefix, shared
    check_contents(pool, kv)
    pool.check_integrity()


def test_a_group_swapped_in_apart_gets_a_copy_each_and_its_host_blocks_back_at_the_last():
    pool = make_pool()
    ids, kv = family(pool)
    host0 = pool.stats().host_free_blocks
    pool.swap_out(ids)
    moved = host0 - pool.stats().host_free_blocks
    pool.swap_in([ids[1]])  # its 3 shared blocks copied; the others still hold theirs
    assert pool.stats().host_free_blocks == host0 - moved + 2  # only its own two came back
    check_contents(pool, {ids[1]: kv[ids[1]]})
    pool.check_integrity()
    pool.swap_in([ids[0], ids[2]])  # these two share one new copy of the prefix
    t0, t2 = (pool.sequence(s).block_table for s in (ids[0], ids[2]))
    assert t0[:3] == t2[:3] and not set(t0[:3]) & set(pool.sequence(ids[1]).block_table)
    pool.check_integrity()
    pool.free([ids[3]])  # the last holder of the host prefix: freed, not swapped in
    assert pool.stats().host_free_blocks == host0
    check_contents(pool, {s: kv[s] for s in ids[:3]})
    pool.check_integrity()


def test_a_block_moves_once_its_last_resident_holder_is_swapped_out():
    pool = make_pool()
    ids, kv = family(pool)
    used, host0 = pool.stats().used_blocks, pool.stats().host_free_blocks
    pool.swap_out(ids[:3])  # the last child still holds the prefix: it stays
    assert pool.stats().used_blocks == used - 1 - 2 * 2  # the parent's partial block, two children's own
    assert pool.sequence(ids[0]).host_blocks == 1
    pool.check_integrity()
    pool.swap_out(ids[3:])  # now the prefix's holders are all swapped out: it moves, once
    assert pool.stats().used_blocks == 0
    assert host0 - pool.stats().host_free_blocks == used
    assert pool.sequence(ids[0]).host_blocks == 4  # the earlier rows' entries joined it
    pool.check_integrity()
    pool.swap_in(ids[1:3])  # two of them share one copy of the prefix
    t1, t2 = (pool.sequence(s).block_table for s in ids[1:3])
    assert t1[:3] == t2[:3]
    check_contents(pool, {s: kv[s] for s in ids[1:3]})
    pool.check_integrity()
    pool.swap_in([ids[3], ids[0]])
    check_contents(pool, kv)
    assert pool.stats().host_free_blocks == host0
    assert pool.stats().used_blocks == used + 3  # two copies of the prefix now
    pool.check_integrity()


def test_a_block_a_resident_sequence_holds_stays_on_the_device():
    pool = make_pool()
    ids, kv = family(pool)
    for s in ids[:3]:  # one at a time, the fourth staying resident
        pool.swap_out([s])
    prefix = pool.sequence(ids[3]).block_table[:3]
    assert all(pool.sequence(s).block_table[:3] == prefix for s in ids[:3])  # still shared, on the device
    assert pool.stats().used_blocks == 3 + 2  # the prefix, the resident child's own
    pool.swap_in(ids[:3])
    check_contents(pool, kv)
    pool.check_integrity()


def test_a_pinned_shared_prefix_stays_while_the_group_is_out():
    pool = make_pool()
    prompt = list(range(3 * BS + 3))
    [a] = pool.allocate([prompt])
    fill(pool, a.slots, 1)
    pool.commit(a.seq_id)
    assert pool.pin([prompt]) == [3 * BS]
    [kids] = pool.fork(a.seq_id, 2)
    pool.swap_out([a.seq_id, *kids])
    stats = pool.stats()
    assert stats.used_blocks == 3  # the pinned blocks, held by the pin
    assert stats.host_total_blocks - stats.host_free_blocks == 1  # the partial block only
    pool.swap_in([a.seq_id, *kids])
    assert pool.sequence(kids[0]).block_table[:3] == a.block_table[:3]
    pool.check_integrity()


def test_host_room_is_counted_in_distinct_blocks():
    pool = make_pool(host=5)  # 4 siblings hold 13 entries but 5 distinct blocks
    [a] = pool.allocate([list(range(4 * BS + 3))])
    fill(pool, a.slots, 2)
    [kids] = pool.fork(a.seq_id, 3)
    ids = [a.seq_id, *kids]
    kv = {s: seq_kv(pool, s).copy() for s in ids}
    pool.swap_out(ids)
    assert pool.stats().host_free_blocks == 0 and pool.stats().used_blocks == 0
    pool.swap_in(ids)
    check_contents(pool, kv)
    [b] = pool.allocate([list(range(1000, 1000 + 5 * BS))])
    with pytest.raises(OutOfBlocks):  # 6 distinct blocks: refused, nothing moved
        pool.swap_out([*ids, b.seq_id])
    assert pool.stats().swapped_sequences == 0
    pool.check_integrity()


def test_group_swap_in_re_shares_a_still_cached_prefix_once():
    pool = make_pool()
    [a] = pool.allocate([list(range(2 * BS + 5))])
    fill(pool, a.slots, 3)
    pool.commit(a.seq_id)
    [kids] = pool.fork(a.seq_id, 2)
    ids = [a.seq_id, *kids]
    kv = {s: seq_kv(pool, s).copy() for s in ids}
    pool.swap_out(ids)  # the published prefix becomes evictable, still matchable
    assert pool.stats().evictable_blocks == 2
    pool.swap_in(ids)
    assert all(pool.sequence(s).block_table[:2] == a.block_table[:2] for s in ids)
    assert pool.stats().used_blocks == 3  # the prefix and one shared partial block
    check_contents(pool, kv)
    pool.check_integrity()


def test_the_integrity_check_sees_a_wrong_host_count():
    pool = make_pool()
    ids, _ = family(pool)
    pool.swap_out(ids)
    host = pool.manager.host
    shared = int(np.flatnonzero(host.refs > 1)[0])
    host.refs[shared] -= 1
    with pytest.raises(Exception, match="host block entry counts"):
        pool.check_integrity()


def test_sequences_swapped_out_one_at_a_time_in_any_order_move_their_prefix_at_the_last():
    pool = make_pool()
    ids, kv = family(pool)
    for s in (ids[2], ids[0], ids[3]):  # held in an order unlike their rows'
        pool.swap_out([s])
        pool.check_integrity()
    assert pool.stats().used_blocks == 3 + 2  # the prefix stays with the resident child
    pool.swap_out([ids[1]])
    assert pool.stats().used_blocks == 0
    pool.check_integrity()
    for s in (ids[3], ids[1]):
        pool.swap_in([s])
        pool.check_integrity()
    pool.swap_in([ids[0], ids[2]])
    check_contents(pool, kv)
    pool.check_integrity()


def test_a_group_swap_in_looks_up_and_copies_each_host_block_once(monkeypatch):
    """A thousand forks of a committed sequence: their prefix comes back from one
    lookup a block, not one an entry (a dict lookup per fork and block held the
    daemon's loop for minutes at the tables limit)."""
    pool = make_pool(num_blocks=256, host=64)
    [a] = pool.allocate([list(range(6 * BS + 1))])
    fill(pool, a.slots, 4)
    [kids] = pool.fork(a.seq_id, 999)
    pool.commit(a.seq_id)  # after the fork: the parent published its blocks, the forks did not
    ids = [a.seq_id, *kids]
    want = seq_kv(pool, kids[-1]).copy()
    pool.swap_out(ids)
    assert pool.stats().used_blocks == 0
    looked = []
    lookup = pool.manager.pool.lookup
    monkeypatch.setattr(pool.manager.pool, "lookup", lambda key: looked.append(key) or lookup(key))
    pool.swap_in(ids)
    assert len(looked) == 6  # the published blocks, once each
    assert pool.stats().used_blocks == 7  # re-shared by every fork, cached or copied once
    np.testing.assert_array_equal(seq_kv(pool, kids[-1]), want)
    pool.check_integrity()


@pytest.mark.parametrize("n", [0, 1, 7, 5000])
def test_first_order_against_a_sort(n):
    from kvpager.seq_swap import first_order

    values = np.random.default_rng(n).integers(0, 60, n)
    distinct, which, counts = first_order(values, 60)
    _, first = np.unique(values, return_index=True)
    np.testing.assert_array_equal(distinct, values[np.sort(first)])
    np.testing.assert_array_equal(distinct[which], values)
    np.testing.assert_array_equal(counts, [np.count_nonzero(values == d) for d in distinct])


def test_swapping_out_one_fork_reads_no_other_swapped_sequence(monkeypatch):
    """A fork swapped out beside its resident parent reads its own table only,
    however many unrelated sequences are swapped out (each such call read every
    swapped-out entry: swapping out a thousand forks one at a time took seconds)."""
    pool = make_pool(num_blocks=256, host=128)
    others = pool.allocate([list(range(1000 * k, 1000 * k + 8 * BS)) for k in range(1, 11)])
    pool.swap_out([a.seq_id for a in others])
    [a] = pool.allocate([list(range(2 * BS + 3))])
    [[kid]] = pool.fork(a.seq_id, 1)
    read = []
    table = type(pool.manager.table)
    entries = table.entries
    monkeypatch.setattr(table, "entries", lambda self, rows: read.append(len(rows)) or entries(self, rows))
    pool.swap_out([kid])
    assert read == [1]
    assert pool.sequence(kid).host_blocks == 0  # all three shared with the parent: kept
    pool.swap_out([a.seq_id])  # the last resident holder: now they move
    assert pool.stats().used_blocks == 0
    pool.check_integrity()
    pool.swap_in([a.seq_id, kid])
    pool.check_integrity()
