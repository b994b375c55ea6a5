"""A step plan over each sequence's first ``context_lens`` tokens (`KVPool.plan`'s
``context_lens``, `kvpager.plan.context_of`): a prompt allocated whole and run in
parts, each part's queries the last tokens of its context, attending over exactly
the positions up to themselves; bad lengths refused, nothing changed. CPU, NumPy
backend (the daemon's workers: test_client_plan.py)."""

from __future__ import annotations

import numpy as np
import pytest
from test_plan_chunked import dense_chunked, make_pool

from kvpager.errors import InvalidArgument

LENS = [70, 9, 33, 48]


def prompts_written(pool, rng):
    """``LENS`` prompts allocated whole, their K/V written; (ids, tables)."""
    allocs = pool.allocate([[int(t) for t in rng.integers(3, 100, n)] for n in LENS])
    ids = [a.seq_id for a in allocs]
    hkv, d = pool.spec.num_kv_heads, pool.spec.head_dim
    plan = pool.plan(ids, LENS, np.concatenate([a.slots for a in allocs]))
    for layer in range(pool.spec.num_layers):
        plan.write(layer, rng.standard_normal((sum(LENS), hkv, d), np.float32),
                   rng.standard_normal((sum(LENS), hkv, d), np.float32))
    return ids, allocs, pool.tables(ids)[0]


def test_each_part_attends_over_its_context_up_to_itself():
    rng = np.random.default_rng(5)
    pool = make_pool()
    ids, _, tables = prompts_written(pool, rng)
    d = pool.spec.head_dim
    for context, qlens in (([17, 9, 1, 48], [5, 9, 1, 16]), ([64, 2, 33, 40], [64, 1, 8, 40]), (9, 3)):
        plan = pool.plan(ids, qlens, context_lens=context)
        ctx, ql = (np.broadcast_to(np.asarray(x), (len(ids),)) for x in (context, qlens))
        np.testing.assert_array_equal(plan.seq_lens, ctx)
        q = rng.standard_normal((int(ql.sum()), 4, d), np.float32)
        ref = dense_chunked(pool.backend.kv, 1, q, tables, ctx, ql, 1 << 20)
        np.testing.assert_allclose(plan.attend(1, q), ref, rtol=1e-4, atol=1e-5)


def test_parts_written_in_turn_equal_the_prompt_run_whole():
    """A prompt's K/V written and attended a part at a time (each part's plan over its
    context) gives what one pass over the whole prompt gives."""
    rng = np.random.default_rng(6)
    hkv, d = 2, 16
    lens = [40, 27]
    kvs = [rng.standard_normal((n, 2, hkv, d)).astype(np.float32) for n in lens]
    qs = [rng.standard_normal((n, 4, d)).astype(np.float32) for n in lens]
    whole_pool, parts_pool = make_pool(), make_pool()
    outs = []
    for pool, cuts in ((whole_pool, [[0, 40], [0, 27]]), (parts_pool, [[0, 13, 16, 40], [0, 1, 27]])):
        toks = [list(range(3, 3 + n)) for n in lens]
        allocs = pool.allocate(toks)
        ids = [a.seq_id for a in allocs]
        got = [[] for _ in lens]
        for step in range(max(len(c) for c in cuts) - 1):
            live = [i for i, c in enumerate(cuts) if step + 1 < len(c)]
            parts = [(cuts[i][step], cuts[i][step + 1]) for i in live]
            slots = np.concatenate([np.asarray(allocs[i].slots)[a:b] for i, (a, b) in zip(live, parts)])
            plan = pool.plan([ids[i] for i in live], [b - a for a, b in parts], slots,
                             context_lens=[b for _, b in parts])
            k = np.concatenate([kvs[i][a:b, 0] for i, (a, b) in zip(live, parts)])
            v = np.concatenate([kvs[i][a:b, 1] for i, (a, b) in zip(live, parts)])
            plan.write(0, k, v)
            out = plan.attend(0, np.concatenate([qs[i][a:b] for i, (a, b) in zip(live, parts)]))
            row = 0
            for i, (a, b) in zip(live, parts):
                got[i].append(out[row : row + b - a])
                row += b - a
        outs.append([np.concatenate(g) for g in got])
    for whole, parted in zip(*outs):
        np.testing.assert_allclose(parted, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("context, qlens, match", [
    ([71, 9, 33, 48], None, "context_lens must be in"),  # past the first prompt
    ([0, 9, 33, 48], None, "context_lens must be in"),
    ([10, 9, 33], None, "context_lens has 3 entries"),
    ([10, 9, 33, 48], [11, 1, 1, 1], "query_lens must be in"),  # more queries than their context
    ([10.0, 9, 33, 48], None, "context_lens"),
    ("10", None, "context_lens"),
    ([1 << 40, 9, 33, 48], None, "context_lens"),
])
def test_bad_context_lens_are_refused_and_change_nothing(context, qlens, match):
    rng = np.random.default_rng(7)
    pool = make_pool()
    ids, _, tables = prompts_written(pool, rng)
    before = pool.backend.kv.copy()
    with pytest.raises(InvalidArgument, match=match):
        pool.plan(ids, qlens, context_lens=context)
    np.testing.assert_array_equal(pool.backend.kv, before)
    np.testing.assert_array_equal(pool.tables(ids)[0], tables)
    pool.check_integrity()
