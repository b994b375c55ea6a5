"""A step plan's slots must be its own query tokens' positions (`kvpager.plan_guard.check_positions`).

`KVPool.plan` / `refill` and `Client.plan` / `refill` checked a plan's slots
only as slots of the pool (and, on a daemon, of the session): slots of another
of the caller's sequences, of an earlier step, out of order, or of committed
(maybe published) positions were taken, and the plan's writes went where they
pointed while its attends read the sequence's own positions: zeros or stale
K/V, silently. Each case below was accepted before; now it is an
InvalidArgument and the pool, and a refilled plan, are as they were. Checked
on an embedded pool and on a daemon's mapped pool (a thread on a fresh ipc://
endpoint), against the positions computed here from the block tables; the
compiled check (native/plan_slots.c) against its NumPy twin."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from daemon_helpers import running_server
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager import Client, KVPool, PoolSpec, plan_guard
from kvpager.errors import InvalidArgument

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=64, block_size=8, dtype="float32")
BS = SPEC.block_size


@contextmanager
def _pool(where: str) -> Iterator[Any]:
    if where == "embedded":
        with KVPool(SPEC) as pool:
            yield pool
    else:
        with running_server(SPEC) as server, Client(server.endpoint) as client:
            yield client


WHERE = pytest.mark.parametrize("where", ["embedded", "daemon"])


def _positions(table: tuple[int, ...], start: int, stop: int) -> np.ndarray:
    """The slots of positions [start, stop) of a sequence whose block table is ``table``."""
    pos = np.arange(start, stop)
    return np.asarray(table, np.int64)[pos // BS] * BS + pos % BS


def _kv(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((n, SPEC.num_kv_heads, SPEC.head_dim)).astype(np.float32) for _ in range(2))


def _append(pool: Any, ids: list[int], tokens: list[list[int]]) -> np.ndarray:
    """One new token per sequence: its slots, back to back."""
    return np.concatenate(pool.append(ids, 1, tokens)).astype(np.int64)


def _layer(pool: Any) -> np.ndarray:
    k, v = pool.kv(0)
    return np.stack([np.asarray(k), np.asarray(v)]).copy()


@WHERE
def test_the_slots_that_allocate_and_append_return_are_taken(where):
    with _pool(where) as pool:
        a, b = pool.allocate([list(range(19)), list(range(100, 111))])
        assert np.array_equal(a.slots, _positions(a.block_table, 0, 19))  # (the reference is the pool's)
        plan = pool.plan([a.seq_id, b.seq_id], [19, 11], np.concatenate([a.slots, b.slots]))
        k, v = _kv(30)
        plan.write(0, k, v)
        got = pool.kv(0)[0]
        np.testing.assert_array_equal(np.asarray(got)[a.block_table[18 // BS], :, 18 % BS], k[18])
        step = _append(pool, [a.seq_id, b.seq_id], [[7], [8]])
        pool.plan([a.seq_id, b.seq_id], [1, 1], step)
        padded = step.copy()
        padded[0] = -1  # a token not written
        pool.plan([a.seq_id, b.seq_id], [1, 1], padded)
        pool.plan([b.seq_id, a.seq_id], [1, 1], step[::-1].copy())  # (the batch's order is the caller's)


@WHERE
@pytest.mark.parametrize("case", ["other_sequence", "earlier_step", "out_of_order", "committed", "twice"])
def test_slots_that_are_not_the_query_tokens_own_are_refused_and_change_nothing(where, case):
    with _pool(where) as pool:
        a, b = pool.allocate([list(range(19)), list(range(100, 119))])
        first = _append(pool, [a.seq_id, b.seq_id], [[1], [2]])
        step = _append(pool, [a.seq_id, b.seq_id], [[3], [4]])
        ids, lens, context = [a.seq_id, b.seq_id], [1, 1], None
        good_ids, good_step = [a.seq_id, b.seq_id], step
        if case == "other_sequence":  # b's slot for a's token, a's for b's
            bad = np.asarray(step, np.int64)[::-1].copy()
        elif case == "earlier_step":  # the slots the step before returned
            bad = np.asarray(first, np.int64)
        elif case == "out_of_order":  # a's last three tokens, their slots reversed
            ids, lens = [a.seq_id], [3]
            bad = _positions(pool.tables([a.seq_id])[0][0], 18, 21)[::-1].copy()
        elif case == "committed":  # a's tokens 18 and 19, run again (its first 20 as the context) once committed
            pool.commit([a.seq_id])
            ids, lens, context = [a.seq_id], [2], [20]
            bad = _positions(pool.tables([a.seq_id])[0][0], 18, 20)
            good_ids, good_step = [b.seq_id], step[1:]
        else:
            ids, lens = [a.seq_id, a.seq_id], [1, 1]
            bad = np.asarray([step[0], step[0]], np.int64)
        refused = "is not its position|committed|twice"
        with pytest.raises(InvalidArgument, match=refused):
            pool.plan(ids, lens, bad, context_lens=context)
        good = pool.plan(good_ids, [1] * len(good_ids), good_step)
        before = good.slots.copy(), good.tables.copy()
        with pytest.raises(InvalidArgument, match=refused):  # (checked before the plan is touched)
            pool.refill(good, ids, lens, bad, context_lens=context)
        np.testing.assert_array_equal(good.slots, before[0])  # the plan refused is the plan it was
        np.testing.assert_array_equal(good.tables, before[1])
        layer = _layer(pool)
        good.write(0, *_kv(len(good_ids), seed=5))  # and it still writes its own step, nowhere else
        after = _layer(pool)
        changed = np.argwhere((after != layer).any(axis=(0, 2, 4)))  # (block, offset) pairs written
        assert sorted(int(bl) * BS + int(o) for bl, o in changed) == sorted(int(s) for s in good_step)


@WHERE
def test_a_sequence_listed_twice_may_not_write_one_position_from_both_rows(where):
    with _pool(where) as pool:
        [a] = pool.allocate([list(range(12))])
        q = np.random.default_rng(1).standard_normal((1, 4, SPEC.head_dim)).astype(np.float32).repeat(2, axis=0)
        pool.write(0, a.slots, *_kv(12))
        out = pool.plan([a.seq_id, a.seq_id]).attend(0, q)  # no slots: reads only
        np.testing.assert_allclose(np.asarray(out)[0], np.asarray(out)[1], rtol=1e-6)
        with pytest.raises(InvalidArgument, match="twice"):
            pool.plan([a.seq_id, a.seq_id], [1, 1], [a.slots[-1], a.slots[-1]])
        pool.plan([a.seq_id, a.seq_id], [1, 1], [a.slots[-1], -1])  # one row writes it
        # two parts of one prompt in one step (its first 10 tokens' last 2, then tokens 10 and 11)
        pool.plan([a.seq_id, a.seq_id], [2, 2], a.slots[8:12], context_lens=[10, 12])


@pytest.mark.skipif(plan_guard.SLOTS_OWN is None, reason="the compiled check (kvpager._native) is not built")
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_the_compiled_check_agrees_with_its_numpy_twin(data):
    """native/plan_slots.c against `plan_guard._explain`: random tables, lengths, query
    lengths (a decode step's one each, or several), slots their own positions with
    some -1, some moved by one or swapped, and committed counts around the queries."""
    bs = data.draw(st.sampled_from([1, 8, 16, 64]))
    nseq = data.draw(st.integers(1, 6))
    width = data.draw(st.integers(1, 5))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    tables = rng.integers(1, 1000, (nseq, width)).astype(np.int32)
    lens = rng.integers(1, width * bs + 1, nseq).astype(np.int32)
    decode = data.draw(st.booleans())
    qlens = np.ones(nseq, np.int32) if decode else np.minimum(rng.integers(1, 9, nseq), lens).astype(np.int32)
    row = np.repeat(np.arange(nseq), qlens)
    pos = np.concatenate([np.arange(n - q, n) for n, q in zip(lens.tolist(), qlens.tolist())])
    slots = tables[row, pos // bs].astype(np.int64) * bs + pos % bs
    slots[rng.random(len(slots)) < 0.1] = -1
    how = data.draw(st.sampled_from(["own", "moved", "swapped"]))
    if how == "moved":
        slots[rng.integers(len(slots))] += 1
    elif how == "swapped" and len(slots) > 1:
        slots[[0, -1]] = slots[[-1, 0]]
    committed = None
    if data.draw(st.booleans()):
        committed = np.maximum(lens - qlens + rng.integers(-2, 3, nseq), 0).astype(np.int64)
    ids = list(range(10, 10 + nseq))
    try:
        plan_guard._explain(ids, tables, lens, qlens, slots, bs, committed)
        twin = True
    except InvalidArgument:
        twin = False
    assert plan_guard.SLOTS_OWN(tables, lens, None if decode else qlens, slots, bs, committed) is twin


def test_the_compiled_check_refuses_arrays_it_cannot_read_and_lengths_that_do_not_add_up():
    if plan_guard.SLOTS_OWN is None:
        pytest.skip("the compiled check (kvpager._native) is not built")
    tables, lens, slots = np.array([[3, 4]], np.int32), np.array([9], np.int32), np.array([4 * 8], np.int64)
    assert plan_guard.SLOTS_OWN(tables, lens, None, slots, 8, None) is True
    with pytest.raises(TypeError):
        plan_guard.SLOTS_OWN(tables.astype(np.int64), lens, None, slots, 8, None)
    assert plan_guard.SLOTS_OWN(tables, lens, None, np.array([32, 33], np.int64), 8, None) is False  # 2 slots, 1 row
    assert plan_guard.SLOTS_OWN(tables, lens, np.array([2], np.int32), slots, 8, None) is False
    assert plan_guard.SLOTS_OWN(tables, np.array([17], np.int32), None, slots, 8, None) is False  # past its table
    with pytest.raises(ValueError):
        plan_guard.SLOTS_OWN(tables, lens, None, slots, 0, None)
