"""A step plan used after its sequences changed under it (`kvpager.plan_guard`).

A plan is a snapshot of its sequences' block tables and of the slots its step
writes. Freed, truncated, swapped out or released, those blocks can go to
another sequence (another worker's, on a daemon); committed, the blocks its
slots fill are published for every sequence sharing the prefix. Each test
makes the change, lets another sequence take the blocks where it can, and
checks that the stale plan refuses (`StalePlan`) and that the other
sequence's K/V is byte for byte what it wrote; and that a plan whose own
sequences did not change goes on, equal to a fresh plan. (A daemon's workers'
plans: test_stale_plan_daemon.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpager import KVPool, PoolSpec
from kvpager.errors import InvalidArgument, StalePlan

BS = 8


SMALL = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=12, block_size=BS, dtype="float32",
                 num_host_blocks=8)


RNG = np.random.default_rng(7)


def kv(n: int, spec: PoolSpec = SMALL, value: float | None = None) -> np.ndarray:
    shape = (n, spec.num_kv_heads, spec.head_dim)
    if value is not None:
        return np.full(shape, value, np.float32)
    return RNG.standard_normal(shape).astype(np.float32)


def q(n: int, spec: PoolSpec = SMALL) -> np.ndarray:
    return RNG.standard_normal((n, 2 * spec.num_kv_heads, spec.head_dim)).astype(np.float32)


def fill(pool, allocs, layers=range(SMALL.num_layers)) -> None:
    """Write random K/V at every slot of ``allocs`` (every layer)."""
    for a in allocs:
        for layer in layers:
            pool.write(layer, a.slots, kv(len(a.slots)), kv(len(a.slots)))


def prefill_plan(pool, allocs):
    ids = [a.seq_id for a in allocs]
    return pool.plan(ids, [len(a.slots) for a in allocs], np.concatenate([a.slots for a in allocs]))


def taken_by_another(pool, freed_blocks, tokens: int):
    """Allocate prompts (and write them) until one holds a block of ``freed_blocks``
    (``pool``: a `KVPool` or a worker's `Client` of the same K/V shape); returns
    that allocation and every one made."""
    got = []
    for n in range(40):
        a = pool.allocate([[10_000 + 97 * n + i for i in range(tokens)]])[0]
        fill(pool, [a])
        got.append(a)
        if set(a.block_table) & set(freed_blocks):
            return a, got
    raise AssertionError("no allocation took the freed blocks")


def stale_everywhere(plan, tokens: int) -> None:
    with pytest.raises(StalePlan):
        plan.write(0, kv(tokens, value=7.0), kv(tokens, value=7.0))
    with pytest.raises(StalePlan):
        plan.attend(1, q(tokens))
    with pytest.raises(StalePlan):  # checked whole before anything is written
        plan.write_attend(0, q(tokens)[None].swapaxes(1, 2), kv(tokens, value=7.0)[None].swapaxes(1, 2),
                          kv(tokens, value=7.0)[None].swapaxes(1, 2))


def test_a_plan_of_a_freed_sequence_refuses_and_its_blocks_new_holder_keeps_its_kv():
    pool = KVPool(SMALL)
    a, b = pool.allocate([list(range(20)), list(range(100, 120))])
    fill(pool, [a, b])
    plan = prefill_plan(pool, [a, b])
    plan.write(0, kv(40), kv(40))  # fine while they live
    pool.free([b.seq_id])
    other, _ = taken_by_another(pool, b.block_table, 20)
    before = pool.backend.kv.copy()
    stale_everywhere(plan, 40)
    np.testing.assert_array_equal(pool.backend.kv, before)
    pool.check_integrity()


def test_a_plan_of_a_truncated_sequence_refuses():
    pool = KVPool(SMALL)
    (a,) = pool.allocate([list(range(30))])
    fill(pool, [a])
    plan = pool.plan([a.seq_id], [6], a.slots[-6:])
    pool.truncate([a.seq_id], [10])  # blocks 2 and 3 go back
    _, got = taken_by_another(pool, a.block_table[2:], 20)
    before = pool.backend.kv.copy()
    stale_everywhere(plan, 6)
    np.testing.assert_array_equal(pool.backend.kv, before)


def test_a_plan_of_a_swapped_out_sequence_refuses():
    pool = KVPool(SMALL)
    (a,) = pool.allocate([list(range(20))])
    fill(pool, [a])
    plan = pool.plan([a.seq_id], [20], a.slots)
    pool.swap_out([a.seq_id])
    taken_by_another(pool, a.block_table, 20)
    before = pool.backend.kv.copy()
    stale_everywhere(plan, 20)
    np.testing.assert_array_equal(pool.backend.kv, before)
    pool.swap_in([a.seq_id])  # back under new blocks: still stale (the plan's are others')
    with pytest.raises(StalePlan):
        plan.attend(0, q(20))


def test_a_plan_reading_released_blocks_refuses():
    pool = KVPool(SMALL)
    (a,) = pool.allocate([list(range(40))])
    fill(pool, [a])
    plan = pool.plan([a.seq_id], None, None)  # attend only: reads all 40 positions
    plan.attend(0, q(1))
    assert pool.release_before([a.seq_id], [24]) == [3]
    taken_by_another(pool, a.block_table[:3], 20)
    with pytest.raises(StalePlan):
        plan.attend(0, q(1), window=8)  # (a window inside what is held would not help: the tables changed)


def test_a_committed_step_is_not_written_again():
    """Reusing a step's plan after its commit would rewrite published blocks,
    which every later prompt with that prefix reads from the cache."""
    pool = KVPool(SMALL)
    prompt = list(range(17))
    (a,) = pool.allocate([prompt])
    plan = prefill_plan(pool, [a])
    for layer in range(SMALL.num_layers):
        plan.write(layer, kv(17), kv(17))
    pool.commit([a.seq_id])
    before = pool.backend.kv.copy()
    with pytest.raises(StalePlan, match="committed"):
        plan.write(0, kv(17, value=7.0), kv(17, value=7.0))
    with pytest.raises(StalePlan, match="committed"):  # every write, not just the first
        plan.write_attend(0, q(17)[None].swapaxes(1, 2), kv(17, value=7.0)[None].swapaxes(1, 2),
                          kv(17, value=7.0)[None].swapaxes(1, 2))
    np.testing.assert_array_equal(pool.backend.kv, before)
    qq = q(17)  # its attends read what they read before
    np.testing.assert_array_equal(plan.attend(1, qq), pool.plan([a.seq_id], [17]).attend(1, qq))
    (hit,) = pool.allocate([prompt + [99]])
    assert hit.num_cached_tokens == 16


def cow_after_plan(pool, both: bool):
    """A sequence with a partly filled last block, its step's slot planned, then
    forked and appended again (``both``: the child too, then freed): the append
    copies the shared block on write for the parent (the child, its last holder
    in the batch, writes it in place, and once freed gives it back to the free
    list). Returns (plan, the parent's allocation, the old block)."""
    [a] = pool.allocate([list(range(10))])  # blocks: one full, one of 2 tokens
    fill(pool, [a])
    [slot] = pool.append([a.seq_id], 1)
    plan = pool.plan([a.seq_id], [1], slot)
    [[child]] = pool.fork([a.seq_id])
    pool.append([a.seq_id, child] if both else [a.seq_id], 1)  # pipelined: the next step's slots
    if both:
        pool.free([child])
    return plan, a, int(slot[0]) // BS


@pytest.mark.parametrize("both", [True, False])
def test_a_plan_whose_block_was_copied_on_write_refuses(both):
    """A step plan made before an append that copied its sequence's shared last
    block on write: the copy moved no count, so the plan never rechecked. It
    wrote into the old block, which (the child that kept it freed) had gone to
    another sequence, or (the parent alone) is now the child's alone: another
    sequence's K/V overwritten, its own write lost. Now it refuses."""
    pool = KVPool(SMALL)
    plan, a, old = cow_after_plan(pool, both)
    assert old not in pool.sequence(a.seq_id).block_table
    if both:
        other, _ = taken_by_another(pool, [old], 5)
    before = pool.backend.kv.copy()
    stale_everywhere(plan, 1)
    np.testing.assert_array_equal(pool.backend.kv, before)
    fresh = pool.plan([a.seq_id], [1], pool.append([a.seq_id], 1)[0])  # a plan made now goes on
    fresh.write(0, kv(1), kv(1))
    pool.check_integrity()


def test_a_plan_whose_sequences_did_not_change_goes_on():
    pool = KVPool(SMALL)
    a, b = pool.allocate([list(range(20)), list(range(100, 110))])
    fill(pool, [a, b])
    slots = pool.append([a.seq_id])
    plan = pool.plan([a.seq_id], None, np.ravel(slots))
    pool.free([b.seq_id])  # another sequence's change: the plan rechecks and goes on
    pool.commit([a.seq_id], [20])  # the tokens before the step's
    taken_by_another(pool, b.block_table, 20)
    k, v, qq = kv(1), kv(1), q(1)
    plan.write(0, k, v)
    got = plan.attend(0, qq)
    fresh = pool.plan([a.seq_id], None, np.ravel(slots))
    np.testing.assert_array_equal(got, fresh.attend(0, qq))


def test_a_closed_pool_still_says_closed():
    pool = KVPool(SMALL)
    (a,) = pool.allocate([list(range(5))])
    plan = prefill_plan(pool, [a])
    pool.close()
    with pytest.raises(InvalidArgument, match="closed") as e:
        plan.write(0, kv(5), kv(5))
    assert not isinstance(e.value, StalePlan)


def test_a_chunked_view_is_stale_with_its_plan():
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=8, num_blocks=16, block_size=BS, dtype="float32")
    pool = KVPool(spec)
    a, b = pool.allocate([list(range(40)), list(range(100, 130))])
    fill(pool, [a, b], range(1))
    plan = pool.plan([a.seq_id, b.seq_id], None, None)
    view = plan.chunked(16)
    view.attend(0, q(2, spec))
    pool.free([b.seq_id])
    with pytest.raises(StalePlan):
        view.attend(0, q(2, spec))


def test_refill_needs_a_plan_of_this_pool():
    pool, other = KVPool(SMALL), KVPool(SMALL)
    (a,) = pool.allocate([list(range(5))])
    (b,) = other.allocate([list(range(5))])
    with pytest.raises(InvalidArgument, match="no step plan of this pool"):
        pool.refill(other.plan([b.seq_id]), [a.seq_id])
    with pytest.raises(InvalidArgument, match="no step plan"):
        pool.refill("plan", [a.seq_id])
    with pytest.raises(InvalidArgument, match="cannot be updated in place"):  # a CPU plan is never refilled
        pool.refill(pool.plan([a.seq_id]), [a.seq_id])


# -- any order of changes -------------------------------------------------------------------


OPS = st.lists(st.tuples(st.sampled_from(["free", "truncate", "commit", "allocate", "append", "swap", "release",
                                          "fork"]),
                         st.integers(0, 3), st.integers(1, 30)), max_size=6)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lens=st.lists(st.integers(1, 30), min_size=1, max_size=3), ops=OPS, step=st.integers(1, 3))
def test_after_any_changes_a_plan_writes_only_its_sequences_open_positions(lens, ops, step):
    """Whatever happened since the plan was made, its write either refuses and
    changes nothing, or lands only at slots that are now positions of its own
    sequences, past what they committed; and it never reads another's blocks
    (its tables are its sequences' as they are now)."""
    pool = KVPool(SMALL)
    try:
        allocs = pool.allocate([[1000 * s + i for i in range(n)] for s, n in enumerate(lens)])
    except Exception:
        return
    ids = [a.seq_id for a in allocs]
    fill(pool, allocs)
    counts = [min(step, len(a.slots)) for a in allocs]
    slots = np.concatenate([a.slots[len(a.slots) - c:] for a, c in zip(allocs, counts)])
    plan = pool.plan(ids, counts, slots)
    live = list(ids)
    for op, who, n in ops:
        try:
            if op == "allocate":
                live += [x.seq_id for x in pool.allocate([[50_000 + 31 * n + i for i in range(n)]])]
                continue
            if not live:
                continue
            s = live[who % len(live)]
            if op == "free":
                pool.free([s])
                live.remove(s)
            elif op == "truncate":
                pool.truncate([s], [min(n, pool.sequence(s).num_tokens)])
            elif op == "commit":
                pool.commit([s], [min(n, pool.sequence(s).num_tokens)])
            elif op == "append":
                pool.append([s], n % 4 + 1)
            elif op == "swap":
                pool.swap_out([s])
                pool.swap_in([s])
            elif op == "fork":  # (a later append of either copies their shared last block)
                live += pool.fork([s])[0]
            else:
                pool.release_before([s], [n])
        except Exception as e:  # out of blocks, a truncate under released blocks...: nothing changed
            assert type(e).__name__ in {"OutOfBlocks", "InvalidArgument", "SequenceSwapped"}, e
    before = pool.backend.kv.copy()
    marker = kv(len(slots), value=123.0)
    try:
        plan.write(1, marker, marker)
    except StalePlan:
        np.testing.assert_array_equal(pool.backend.kv, before)
        return
    # the write went on: every slot must be an open position of its own sequence now
    row = np.repeat(np.arange(len(ids)), counts)
    for s, r in zip(slots.tolist(), row.tolist()):
        info = pool.sequence(ids[r])
        table = list(info.block_table)
        assert not info.swapped and s // BS in table
        assert table.index(s // BS) * BS + s % BS >= info.num_committed
    changed = np.argwhere((pool.backend.kv != before).any(axis=(1, 2, 3, 4, 5)))
    assert set(changed.ravel().tolist()) <= {s // BS for s in slots.tolist()}


def test_a_plans_check_reads_the_pool_under_its_lock(monkeypatch):
    """A plan's layers take no lock, but its check reads the pool's tables and its
    memo of recent batches, which another thread's call changes (a free clears it,
    a lookup reorders it): read without the lock, a plan's write raised a bare
    IndexError under threads (5 runs in 5). It reads under the pool's lock now."""
    pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=64, block_size=8, dtype="float32"))
    held = []
    rows_now = pool.manager.rows_now

    def reading(seq_ids, *op):
        held.append(pool._lock._is_owned())
        return rows_now(seq_ids, *op)

    monkeypatch.setattr(pool.manager, "rows_now", reading)
    ids = [a.seq_id for a in pool.allocate([[1, 2, 3], [4, 5, 6], [7, 8]])]
    plan = pool.plan(ids[:2], 1, pool.append_flat(ids[:2], 1))
    pool.free([ids[2]])  # (the pool's count of moves moved: the plan checks its sequences again)
    k = np.ones((2, 1, 8), np.float32)
    plan.write(0, k, k)
    assert held and all(held)
