"""KVPool behaviour: prefix cache, copy-on-write, swap, truncate, stats, typed errors."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager import (
    InvalidArgument,
    KVPool,
    NotSwapped,
    OutOfBlocks,
    PoolSpec,
    SequenceSwapped,
    UnknownSequence,
)

BS = 16


def make_pool(num_blocks=64, host=16, dtype="float32", layers=2) -> KVPool:
    return KVPool(PoolSpec(layers, 2, 64, num_blocks=num_blocks, block_size=BS, dtype=dtype, num_host_blocks=host))


def fill(pool: KVPool, slots: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = pool.spec
    for layer in range(s.num_layers):
        k = rng.standard_normal((len(slots), s.num_kv_heads, s.head_dim)).astype(s.np_dtype)
        v = rng.standard_normal((len(slots), s.num_kv_heads, s.head_dim)).astype(s.np_dtype)
        pool.write(layer, slots, k, v)


def seq_kv(pool: KVPool, seq_id: int) -> np.ndarray:
    """Dense K/V of a sequence read back through its block table: [tokens, layers, 2, H, D]."""
    info = pool.sequence(seq_id)
    kv = pool.backend.device_array()
    rows = [kv[info.block_table[p // BS], :, :, :, p % BS] for p in range(info.num_tokens)]
    return np.stack(rows) if rows else np.zeros((0,))


def snapshot(pool: KVPool):
    return pool.stats(), pool.blocks(), [(s.seq_id, s.block_table, s.num_tokens) for s in pool.sequences()]


# -- prefix cache ------------------------------------------------------------------------
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


# -- copy-on-write ------------------------------------------------------------------------
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


# -- swap --------------------------------------------------------------------------------
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


# -- truncate ----------------------------------------------------------------------------
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


# -- all-or-nothing and typed errors ----------------------------------------------------------
def test_out_of_blocks_changes_nothing():
    pool = make_pool(num_blocks=9, host=1)
    [a] = pool.allocate([list(range(3 * BS))])
    pool.commit(a.seq_id)
    before = snapshot(pool)
    with pytest.raises(OutOfBlocks) as e:
        pool.allocate([list(range(2 * BS))] * 2 + [[5] * (4 * BS)])
    assert e.value.needed > e.value.available
    with pytest.raises(OutOfBlocks):
        pool.allocate([[1] * (100 * BS)])  # larger than the pool
    [[c1, c2]] = pool.fork(a.seq_id, 2)
    mid = snapshot(pool)
    with pytest.raises(OutOfBlocks):
        pool.append([c1, c2], 3 * BS)
    assert snapshot(pool) == mid
    pool.free([c1, c2])
    assert snapshot(pool) == before
    with pytest.raises(OutOfBlocks) as e:
        pool.swap_out(a.seq_id)  # three exclusive blocks, one host block
    assert e.value.where == "host"
    assert snapshot(pool) == before
    pool.check_integrity()


def test_unknown_sequence_and_double_free():
    pool = make_pool()
    [a] = pool.allocate([[1, 2, 3]])
    with pytest.raises(UnknownSequence):
        pool.append(12345)
    pool.free(a.seq_id)
    with pytest.raises(UnknownSequence):
        pool.free(a.seq_id)
    [b] = pool.allocate([[1]])
    with pytest.raises(UnknownSequence):
        pool.free([b.seq_id, 999])  # batch rejected whole: b survives
    assert pool.sequence(b.seq_id).num_tokens == 1
    with pytest.raises(NotSwapped):
        pool.swap_in(b.seq_id)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda p, s: p.allocate([1, 2, 3]), "token-id lists"),
        (lambda p, s: p.allocate([["a"]]), r"prompts\[0\]"),
        (lambda p, s: p.allocate([[1]], salt={"x": 1}), "salt"),
        (lambda p, s: p.append(s, -1), "count"),
        (lambda p, s: p.append([s, s]), "duplicate"),
        (lambda p, s: p.append(s, 2, token_ids=[[1]]), "token ids"),
        (lambda p, s: p.commit(s, 99), "upto"),
        (lambda p, s: p.fork(s, 0), "n must be"),
        (lambda p, s: p.truncate(s, 99), "length"),
        (lambda p, s: p.free("x"), "seq_ids"),
        (lambda p, s: p.write(2, [16], *[np.zeros((1, 2, 64), np.float32)] * 2), "layer"),
        (lambda p, s: p.write(0, [3], *[np.zeros((1, 2, 64), np.float32)] * 2), "null block"),
        (lambda p, s: p.write(0, [16], *[np.zeros((1, 2, 64), np.float16)] * 2), "dtype"),
        (lambda p, s: p.write(0, [16, 17], *[np.zeros((1, 2, 64), np.float32)] * 2), "shape"),
        (lambda p, s: p.attend(0, s, np.zeros((1, 3, 64), np.float32)), "multiple"),
        (lambda p, s: p.attend(0, s, np.zeros((2, 2, 64), np.float32)), "shape"),
        (lambda p, s: p.attend(0, s, np.zeros((1, 2, 64), np.float32), query_lens=5), "query_lens"),
        (lambda p, s: p.attend(0, s, np.zeros((1, 2, 64), np.float32), scale=-1.0), "scale"),
        (lambda p, s: p.attend(0, s, [[0.0]]), "q must be"),
    ],
)
def test_invalid_arguments_raise_and_change_nothing(call, needle):
    pool = make_pool()
    [a] = pool.allocate([[1, 2, 3]])
    before = snapshot(pool)
    with pytest.raises(InvalidArgument, match=needle):
        call(pool, a.seq_id)
    assert snapshot(pool) == before
    pool.check_integrity()


def test_stats_counts():
    pool = make_pool()
    [a, b] = pool.allocate([list(range(BS + 1)), list(range(5))])
    pool.fork(b.seq_id, 2)
    st = pool.stats()
    assert st.total_blocks == 63 and st.used_blocks == 3 and st.free_blocks == 60
    assert st.num_sequences == 4 and st.shared_blocks == 1
    assert st.tokens_stored == BS + 1 + 5  # the shared block counted once
    assert st.token_slots_allocated == 3 * BS
    assert st.slot_utilization == pytest.approx((BS + 6) / (3 * BS))
    assert st.to_dict()["prefix_hit_rate"] == 0.0


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


def test_decode_step_near_a_full_pool():
    """One token for each of many sequences when blocks are short: exact
    accounting, eviction of cached blocks, and all-or-nothing."""
    pool = make_pool(num_blocks=9, host=0)  # 8 usable
    [c] = pool.allocate([[5] * (2 * BS + 1)])
    pool.commit(c.seq_id)
    pool.free(c.seq_id)  # two cached blocks become evictable; the third is free
    allocs = pool.allocate([[i] * BS for i in range(4)])  # full blocks: the next token needs a new one
    ids = [a.seq_id for a in allocs]
    st = pool.stats()
    assert (st.free_blocks, st.evictable_blocks) == (2, 2)
    before = snapshot(pool)
    with pytest.raises(OutOfBlocks):
        pool.append(ids, 2 * BS)  # far too many
    assert snapshot(pool) == before
    slots = pool.append(ids, 1, token_ids=[[7]] * 4)  # 4 new blocks: 2 free + 2 evicted
    assert pool.stats().evictable_blocks == 0 and pool.stats().free_blocks == 0
    assert sorted(int(s[0]) // BS for s in slots) == sorted(pool.sequence(i).block_table[1] for i in ids)
    assert all(int(s[0]) % BS == 0 for s in slots)
    [[kid]] = pool.fork(ids[0], 1)
    with pytest.raises(OutOfBlocks) as e:
        pool.append([kid, ids[0]], 1)  # both would copy the shared, partly filled last block
    assert (e.value.needed, e.value.available) == (2, 0)
    pool.check_integrity()


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


# -- ownership, tables, integrity ------------------------------------------------------
def test_owners_index_checks_and_lists_one_owners_sequences():
    from kvpager import NotOwner

    pool = make_pool()
    a = pool.allocate([[1] * 20, [2] * 5], owner="s1")
    b = pool.allocate([[3] * 3], owner="s2")
    [[kid]] = pool.fork(a[0].seq_id)
    assert pool.owned("s1") == [a[0].seq_id, a[1].seq_id, kid] and pool.owned("s2") == [b[0].seq_id]
    assert [i.seq_id for i in pool.sequences(owner="s1")] == pool.owned("s1")
    assert {i.owner for i in pool.sequences(owner="s1")} == {"s1"} and pool.sequences(owner="nobody") == []
    assert sorted(pool.owners()) == ["s1", "s2"]
    pool.check_owner([kid, a[1].seq_id], "s1")
    with pytest.raises(NotOwner, match=f"sequence {b[0].seq_id} "):
        pool.check_owner([kid, b[0].seq_id], "s1")
    with pytest.raises(UnknownSequence):
        pool.check_owner([kid, 999], "s1")
    before = snapshot(pool)
    with pytest.raises(NotOwner):
        pool.append_flat([kid, b[0].seq_id], owner="s1")  # checked in append's own lookup
    assert snapshot(pool) == before
    pool.free(pool.owned("s2"))
    assert pool.owners() == ["s1"] and pool.owned("s2") == []
    pool.check_integrity()
    # The embedded owner (None) is listed while it holds a sequence, and not
    # after its last one goes, by either path (one id, a batch).
    for batch in (1, 2):
        mine = [x.seq_id for x in pool.allocate([[4] * 3] * batch)]
        assert set(pool.owners()) == {None, "s1"} and pool.owned(None) == mine
        pool.free(mine)
        assert pool.owners() == ["s1"] and pool.owned(None) == []
        pool.check_integrity()


def test_tables_are_padded_and_refuse_swapped_sequences():
    pool = make_pool()
    a, b = pool.allocate([list(range(2 * BS + 3)), [7] * 5])
    tables, lens = pool.tables([b.seq_id, a.seq_id])
    assert tables.tolist() == [[b.block_table[0], 0, 0], list(a.block_table)]
    assert lens.tolist() == [5, 2 * BS + 3] and tables.dtype == lens.dtype == np.int32
    pool.swap_out(b.seq_id)
    with pytest.raises(SequenceSwapped):
        pool.tables([a.seq_id, b.seq_id])
    with pytest.raises(UnknownSequence):
        pool.tables([12345])


def test_integrity_check_counts_independently():
    from kvpager.errors import IntegrityError

    pool = make_pool()
    [a] = pool.allocate([list(range(BS + 1))], owner="s1")
    m = pool.manager
    m.pool.ref_cnt[a.block_table[0]] += 1  # a reference no table holds
    with pytest.raises(IntegrityError, match="ref_cnt 2 but 1 block-table references"):
        pool.check_integrity()
    m.pool.ref_cnt[a.block_table[0]] -= 1
    m.owners.owned["s1"][999] = None  # an id the rows do not hold
    with pytest.raises(IntegrityError, match="owner index"):
        pool.check_integrity()
    del m.owners.owned["s1"][999]
    pool.check_integrity()
    code = m.owners.code("s1")
    mine = m.owners.by_code[code]
    m.owners.by_code[code] = dict(mine)  # equal ids, but not the index's own dict: out of step
    with pytest.raises(IntegrityError, match="owner index"):
        pool.check_integrity()
    m.owners.by_code[code] = mine
    pool.check_integrity()
