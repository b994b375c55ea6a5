"""The compiled decode step (`kvpager.native`, native/decode_step.c) against
its reference, the NumPy step of `seq_append._decode`: two pools take the same
random schedule (prompts of any length, so rows cross block boundaries at
different steps; forks, whose shared partly filled last blocks are copied on
write by the NumPy step, the compiled one declining; commits, truncates that leave a published partial last block, frees,
a pool that runs out of blocks, decode steps with and without token ids) and
must return the same slots and copies and end every op in the same state:
block tables, per-row counts and columns, reference counts, free list, prefix
cache. Then the C functions' own checks of bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpager import KVPool, PoolSpec, native
from kvpager.errors import OutOfBlocks
from kvpager.seq_lookup import LAST

pytestmark = pytest.mark.skipif(native.DECODE is None, reason="kvpager._native was not built")

BS = 8
SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=64, block_size=BS, dtype="float32")


def state(pool: KVPool) -> tuple:
    m = pool.manager
    bt, bp = m.table, m.pool
    live = sorted(m.rows.values())
    return (bt.table[live].tolist(), bt.row_data[live].tolist(), bp.ref_cnt.tolist(),
            bp._free[: bp._num_free].tolist(), bp.cache.cached.tolist(), dict(bp.cache.key_to_block),
            {s: (list(h.prompt), list(h.tail)) for s, h in m.history.items()})


def run(plan: list[tuple], compiled: bool) -> list:
    pool = KVPool(SPEC)
    pool.manager.native = native.DECODE if compiled else None
    seen: list = []
    ids: list[int] = []
    g = np.random.default_rng(0)
    for op, arg in plan:
        try:
            if op == "allocate":
                ids += [a.seq_id for a in pool.allocate([list(range(100, 100 + n)) for n in arg])]
            elif op == "decode" and ids:
                with_ids = arg
                tokens = [[int(t)] for t in g.integers(0, 5, len(ids))] if with_ids else None
                seen.append(pool.append_flat(ids, 1, tokens).tolist())
            elif op == "fork" and ids:
                ids += [c for [c] in pool.fork(ids[: arg], 1)]
            elif op == "commit" and ids:
                seen.append(pool.commit(ids))
            elif op == "truncate" and ids:
                k = arg % len(ids)
                n = pool.sequence(ids[k]).num_tokens
                pool.truncate([ids[k]], [max(0, n - 1 - arg % 3)])
            elif op == "free" and ids:
                pool.free([ids.pop(arg % len(ids))])
        except OutOfBlocks as e:
            seen.append(("out of blocks", e.needed, e.available))
        seen.append(state(pool))
    pool.check_integrity()
    return seen


ops = st.one_of(
    st.tuples(st.just("allocate"), st.lists(st.integers(0, 17), min_size=1, max_size=4)),
    st.tuples(st.just("decode"), st.booleans()),
    st.tuples(st.just("decode"), st.booleans()),
    st.tuples(st.just("decode"), st.booleans()),
    st.tuples(st.just("fork"), st.integers(1, 3)),
    st.tuples(st.just("commit"), st.none()),
    st.tuples(st.just("truncate"), st.integers(0, 20)),
    st.tuples(st.just("free"), st.integers(0, 20)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.lists(ops, min_size=1, max_size=40))
def test_the_compiled_step_equals_numpy(plan):
    assert run(plan, True) == run(plan, False)


def test_every_branch_is_taken():
    """One schedule through the single call (no row needs a block), the second
    call (boundaries) and the fallback (copies on write after a fork; a
    published, partly filled last block: truncated while shared, then its
    sharer freed), checked against the NumPy step."""
    calls: list[str] = []

    class Counted:
        def scan(self, *a):
            k, widest = native.DECODE.scan(*a)
            calls.append("fallback" if k < 0 else "one call" if k == 0 else "two calls")
            return k, widest

        def place(self, *a):
            return native.DECODE.place(*a)

    plan = [("allocate", [6, 8, 9]), ("decode", True), ("decode", True), ("commit", None),
            ("fork", 3), ("decode", False), ("commit", None), ("truncate", None), ("free", None), ("decode", True)]
    pool_runs = []
    for compiled in (Counted(), None):
        pool = KVPool(SPEC)
        pool.manager.native = compiled
        seen = []
        for op, arg in plan:
            ids = list(pool.manager.rows)
            if op == "allocate":
                pool.allocate([list(range(100 * i, 100 * i + n)) for i, n in enumerate(arg)])
            elif op == "decode":
                seen.append(pool.append_flat(ids, 1, [[7]] * len(ids) if arg else None).tolist())
            elif op == "fork":
                pool.fork(ids[:arg], 1)
            elif op == "commit":
                pool.commit(ids)
            elif op == "truncate":
                pool.truncate([ids[2]], [7])  # into its first block: published, shared with its child
            elif op == "free":
                pool.free([ids[-1]])  # that child: the partly filled block stays published, now unshared
            seen.append(state(pool))
        pool_runs.append(seen)
    assert pool_runs[0] == pool_runs[1]
    assert {"one call", "two calls", "fallback"} <= set(calls), calls


def test_bad_arguments_raise_and_change_nothing():
    """The C functions check what they are given: item sizes and kinds, contiguity, rows and
    blocks in range, a table wide enough, as many new blocks as needed. A failed
    call leaves every array as it was."""
    m = KVPool(SPEC).manager
    m.allocate([[1, 2, 3, 4, 5, 6, 7, 8], [5, 6]], [None, None])
    bt, bp, c = m.table, m.pool, native.DECODE
    rows = np.array([0, 1], np.int64)
    slots = np.zeros(2, np.int64)
    before = (bt.row_data.copy(), bt.table.copy())
    read_only = bt.row_data.copy()
    read_only.flags.writeable = False

    def unchanged():
        np.testing.assert_array_equal(bt.row_data, before[0])
        np.testing.assert_array_equal(bt.table, before[1])

    bad_scans = [
        ((rows.astype(np.int32), bt.row_data, LAST, bp.ref_cnt, None, 3, slots, None), TypeError),
        ((rows, bt.row_data, LAST, bp.ref_cnt.astype(np.int64), None, 3, slots, None), TypeError),
        ((np.array([0, 5000], np.int64), bt.row_data, LAST, bp.ref_cnt, None, 3, slots, None), IndexError),
        ((np.array([-1, 0], np.int64), bt.row_data, LAST, bp.ref_cnt, None, 3, slots, None), IndexError),
        ((rows, bt.row_data, 99, bp.ref_cnt, None, 3, slots, None), IndexError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, None, 2, np.zeros(3, np.int64), None), ValueError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, np.zeros(3, bool), 3, slots, None), ValueError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, None, 40, slots, None), ValueError),
        ((rows, bt.row_data[:, ::2], LAST, bp.ref_cnt, None, 3, slots, None), (BufferError, ValueError)),
        ((rows, read_only, LAST, bp.ref_cnt, None, 3, slots, None), (BufferError, ValueError)),
        ((np.array([1, 1], np.int64), bt.row_data, LAST, bp.ref_cnt, None, 3, slots, None), ValueError),
        # another kind of the same item size: read as ids and counts before
        ((rows.astype(np.float64), bt.row_data, LAST, bp.ref_cnt, None, 3, slots, None), TypeError),
        ((rows.astype(np.uint64), bt.row_data, LAST, bp.ref_cnt, None, 3, slots, None), TypeError),
        ((rows, bt.row_data, LAST, bp.ref_cnt.astype(np.float32), None, 3, slots, None), TypeError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, None, 3, np.zeros(2, np.float64), None), TypeError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, None, 3, slots, np.zeros(2, np.float64)), TypeError),
    ]
    for args, err in bad_scans:
        with pytest.raises(err):
            c.scan(*args)
        unchanged()
    # Row 0 (8 tokens) is at a block boundary and needs a block in column 1; row 1 (2 tokens) does not.
    k, widest = c.scan(rows, bt.row_data, LAST, bp.ref_cnt, None, 3, slots, None)
    assert (k, widest) == (1, 1)
    unchanged()
    bad_places = [
        ((rows, bt.row_data, LAST, bp.ref_cnt, bt.table, 3, np.zeros(0, np.int64), slots), ValueError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, bt.table, 3, np.array([7, 8], np.int64), slots), ValueError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, bt.table, 3, np.array([0], np.int64), slots), IndexError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, bt.table, 3, np.array([10**6], np.int64), slots), IndexError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, bt.table[:, :1].copy(), 3, np.array([7], np.int64), slots),
         (IndexError, ValueError)),
        ((rows, bt.row_data, LAST, bp.ref_cnt, bt.table, 3, np.array([7], np.int64), np.zeros(3, np.int64)),
         ValueError),
        # A row given twice stepped twice: its second step (past its first block) wrote past
        # a one-column table and read a new block past ``new``.
        ((np.array([1] * 7, np.int64), bt.row_data, LAST, bp.ref_cnt, bt.table[:, :1].copy(), 3,
          np.zeros(0, np.int64), np.zeros(7, np.int64)), ValueError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, bt.table, 3, np.array([7], np.float64), slots), TypeError),
        ((rows, bt.row_data, LAST, bp.ref_cnt, bt.table.view(np.float32), 3, np.array([7], np.int64), slots),
         TypeError),
    ]
    for args, err in bad_places:
        with pytest.raises(err):
            c.place(*args)
        unchanged()
    # Row 1's partly filled last block shared (a fork's): the scan declines the step
    # (copy-on-write is the NumPy path's) and a place called anyway refuses it.
    shared = bp.ref_cnt.copy()
    shared[int(bt.last[1])] = 2
    assert c.scan(rows, bt.row_data, LAST, shared, None, 3, slots, None)[0] == -1
    with pytest.raises(ValueError, match="shared"):
        c.place(rows, bt.row_data, LAST, shared, bt.table, 3, np.array([7], np.int64), slots)
    unchanged()


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("KVPAGER_NATIVE", "0")
    assert native.load() is None
    monkeypatch.setenv("KVPAGER_NATIVE", "1")
    assert native.load() is native.DECODE


def test_a_failed_second_call_gives_its_blocks_back():
    """A `place` that refuses (an inconsistency its checks catch) leaves the pool as it
    was: the blocks taken for it are free again and the step changed nothing."""
    pool = KVPool(SPEC)
    ids = [a.seq_id for a in pool.allocate([list(range(8)), list(range(100, 108))])]
    m = pool.manager
    before = state(pool)

    class Refusing:
        scan = staticmethod(native.DECODE.scan)

        @staticmethod
        def place(*a):
            raise IndexError("decode step: block table too narrow")

    m.native = Refusing()
    with pytest.raises(IndexError):
        pool.append_flat(ids, 1)
    assert state(pool) == before
    pool.check_integrity()
    m.native = native.DECODE
    assert len(pool.append_flat(ids, 1)) == 2
