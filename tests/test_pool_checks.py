"""KVPool's refusals and accounting: all-or-nothing ops (out of blocks, a decode
step near a full pool), every typed error changing nothing, stats, the owner
index, padded tables, the independent integrity check."""

from __future__ import annotations

import numpy as np
import pytest
from pool_helpers import BS, make_pool, snapshot

from kvpager import InvalidArgument, NotSwapped, OutOfBlocks, SequenceSwapped, UnknownSequence


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
        pool.append([kid, ids[0]], 1)  # the kid copies the shared, partly filled last block; the parent,
    assert (e.value.needed, e.value.available) == (1, 0)  # its last holder, writes it in place
    pool.check_integrity()


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


@pytest.mark.parametrize("prompt", [
    [1.5], ["a"], [None], [[1]], np.array([1.0, 2.0]), [np.int64(3), 1.0], "abc", b"ab", [1] * (100 * BS),
    [True, 2], [-1], [2**40], np.array([1, 2], np.uint64),
], ids=repr)
@pytest.mark.parametrize("salt", [None, "s", 5])
def test_one_prompt_is_refused_or_taken_as_in_a_batch(prompt, salt):
    """An allocate of one prompt takes its own scalar path (its own type checks): whatever
    a careless or hostile caller sends, it refuses exactly what the batch path refuses,
    with the same typed error and nothing changed, and takes what the batch path takes."""
    outcomes = []
    for prompts in ([prompt], [prompt, list(range(BS + 3))]):
        pool = make_pool(num_blocks=16)
        before = snapshot(pool)
        try:
            allocs = pool.allocate(prompts, salt=salt if len(prompts) == 1 or salt is None else [salt] * 2)
        except Exception as exc:  # noqa: BLE001 - the error's type is what is compared
            assert isinstance(exc, (InvalidArgument, OutOfBlocks)), repr(exc)
            assert snapshot(pool) == before
            outcomes.append(type(exc))
        else:
            outcomes.append((allocs[0].block_table, allocs[0].num_cached_tokens, allocs[0].slots.tolist()))
            pool.check_integrity()
    assert outcomes[0] == outcomes[1]


def test_threads_sharing_a_pool_run_their_calls_whole():
    """Four threads allocating over one shared prefix, committing, appending, forking
    and freeing on one pool: each call runs whole (`kvpager.pool.SERIALIZED`).
    Interleaved, two allocates' prefix hits met an IntegrityError ("touched block
    that is neither in use nor evictable"), and the books went out of step."""
    import sys
    import threading

    pool = make_pool(num_blocks=256)
    shared = list(range(3 * BS))
    errors: list[BaseException] = []
    start = threading.Barrier(4, timeout=30)

    def work(k: int) -> None:
        rng = np.random.default_rng(k)
        try:
            start.wait()
            for _ in range(150):
                own = rng.integers(1000, 2000, int(rng.integers(1, 2 * BS))).tolist()
                [a] = pool.allocate([shared + own])
                pool.commit(a.seq_id)
                pool.append(a.seq_id, int(rng.integers(1, BS)))
                [kids] = pool.fork(a.seq_id, 2)
                pool.free([a.seq_id, *kids])
        except BaseException as e:  # (reported below, with the thread's books)
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads switch inside calls, as a loaded host makes them)
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_a_plan_given_appends_arrays_as_they_came_says_to_join_them():
    """`append` answers an array a sequence; a step's plan and write take the slots
    in one array. Passed as `append` answered them, they are refused saying how
    (the README said "as append returned them"), and taken once joined."""
    pool = make_pool()
    a, b = pool.allocate([[1] * 5, [2] * 9])
    slots = pool.append([a.seq_id, b.seq_id], 1)
    before = snapshot(pool)
    for given in (slots, [s.tolist() for s in slots]):
        with pytest.raises(InvalidArgument, match="append_flat"):
            pool.plan([a.seq_id, b.seq_id], 1, given)
        assert snapshot(pool) == before
    plan = pool.plan([a.seq_id, b.seq_id], 1, np.concatenate(slots))
    assert plan.num_seqs == 2
