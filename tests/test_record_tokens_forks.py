"""`record_tokens` with forks and truncates: forks keep their token histories
apart (copy-on-write), and a truncate moves where the next ids go; each
checked against block keys recomputed from their definition."""

from __future__ import annotations

import pytest
from record_tokens_helpers import (
    BS,
    chain,
    expected_cache,
    known,
    known_ids,
    make,
    published,
)

from kvpager import InvalidArgument

# -- forks: copy-on-write histories ------------------------------------------------------------

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]  # two full blocks and half a third


@pytest.mark.parametrize("scalar", [True, False])
def test_recording_on_a_child_leaves_the_parent(scalar):
    pool = make(scalar=scalar)
    [a] = pool.allocate([PROMPT])
    parent = a.seq_id
    pool.commit(parent)
    parent_keys = list(pool.manager.history[parent].keys)
    assert parent_keys == chain(PROMPT, BS)[:2]
    pool.append(parent, 6)  # slots 20..25 without ids: block 2 fills, block 3 starts
    [[kid]] = pool.fork(parent)
    assert pool.manager.history[kid] is pool.manager.history[parent]
    x = [70, 71, 72, 73, 74, 75]
    pool.record_tokens(kid, [x])
    pool.check_integrity()
    assert pool.manager.history[kid] is not pool.manager.history[parent]
    assert known(pool, parent) == 20 and known_ids(pool, parent) == PROMPT
    assert pool.manager.history[parent].keys == parent_keys
    assert known_ids(pool, kid) == PROMPT + x
    assert pool.commit([parent, kid]) == [0, 1]  # the parent knows two full blocks only: both published
    table = pool.sequence(kid).block_table
    assert published(pool) == {k: table[i] for i, k in enumerate(chain(PROMPT + x, BS))}
    assert pool.manager.history[parent].keys == parent_keys

    # The same as the child's ids given with the parent's append before the fork.
    ref = make(scalar=scalar)
    [r] = ref.allocate([PROMPT])
    ref.commit(r.seq_id)
    ref.append(r.seq_id, 6, token_ids=[x])
    [[rkid]] = ref.fork(r.seq_id)
    ref.commit([r.seq_id, rkid])
    assert published(ref) == published(pool)

    # Other ids on the parent: its own keys; the shared block stays published as the child's.
    y = [80, 81, 82, 83, 84, 85]
    before = published(pool)
    pool.record_tokens(parent, [y])
    assert known_ids(pool, kid) == PROMPT + x
    assert pool.commit(parent) == [0]  # block 2 already carries the child's key
    assert published(pool) == before
    assert pool.manager.history[parent].key_blocks(3, BS) == chain(PROMPT + y, BS)
    assert pool.manager.history[kid].key_blocks(3, BS) == chain(PROMPT + x, BS)
    pool.check_integrity()


@pytest.mark.parametrize("scalar", [True, False])
def test_recording_on_the_parent_leaves_the_children(scalar):
    pool = make(scalar=scalar)
    [a] = pool.allocate([PROMPT[:16]])
    parent = a.seq_id
    pool.commit(parent)
    pool.append(parent, 4)  # block 2: four slots without ids, shared with the children below
    [kids] = pool.fork(parent, 2)
    shared = [40, 41, 42, 43]
    pool.record_tokens(parent, [shared])
    pool.check_integrity()
    for k in kids:
        assert known(pool, k) == 16 and known_ids(pool, k) == PROMPT[:16]
        assert pool.manager.history[k] is not pool.manager.history[parent]
    assert pool.manager.history[kids[0]] is pool.manager.history[kids[1]]  # still one, shared by both
    tokens = {parent: PROMPT[:16] + shared}
    for n, k in enumerate(kids):
        own = [50 + 10 * n + i for i in range(12)]
        pool.append(k, 12)  # copy-on-write of block 2, then block 3
        pool.record_tokens(k, [shared + own])
        tokens[k] = PROMPT[:16] + shared + own
        pool.check_integrity()
    assert known_ids(pool, parent) == tokens[parent]
    assert pool.commit([parent] + kids) == [0, 2, 2]
    assert published(pool) == expected_cache(pool, tokens, {parent: 2, kids[0]: 4, kids[1]: 4}, BS)
    assert len(set(pool.sequence(kids[0]).block_table[2:]) & set(pool.sequence(kids[1]).block_table[2:])) == 0
    pool.check_integrity()


# -- truncate ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scalar", [True, False])
@pytest.mark.parametrize("case", ["cut below the known ids", "cut above the known ids", "cut into the prompt"])
def test_truncate_then_record_continues_at_the_cut(case, scalar):
    prompt = list(range(100, 100 + (20 if case == "cut into the prompt" else 10)))
    first = list(range(200, 214))  # ids of the first append
    second = list(range(300, 307))  # ids of the append after the cut
    recorded, cut = {"cut below the known ids": (10, 13), "cut above the known ids": (4, 20),
                     "cut into the prompt": (3, 12)}[case]
    pool, ref = make(scalar=scalar), make(scalar=scalar)
    [a] = pool.allocate([prompt])
    [r] = ref.allocate([prompt])
    s = a.seq_id
    for p in (pool, ref):
        p.commit(s)
    pool.append(s, len(first))
    ref.append(s, len(first), token_ids=[first])
    pool.record_tokens(s, [first[:recorded]])
    for p in (pool, ref):
        p.commit(s, len(prompt) + recorded)  # what both know: the same blocks published (and freed)
        p.truncate(s, cut)
        p.check_integrity()
    whole = (prompt + first)[:cut]
    have = min(len(prompt) + recorded, cut)
    assert known(pool, s) == have and known_ids(pool, s) == whole[:have]
    # The ids still owed run up to the cut, then the new slots' ids follow.
    pool.append(s, len(second))
    ref.append(s, len(second), token_ids=[second])
    owed = whole[have:] + second
    with pytest.raises(InvalidArgument):
        pool.record_tokens(s, [owed + [1]])
    pool.record_tokens(s, [owed])
    assert known_ids(pool, s) == known_ids(ref, s) == whole + second
    with pytest.raises(InvalidArgument):
        pool.record_tokens(s, [[1]])
    pool.record_tokens(s, [[]])
    for p in (pool, ref):
        p.commit(s)
        p.check_integrity()
    n = len(whole + second)
    assert published(pool) == published(ref) == expected_cache(pool, {s: whole + second}, {s: n // BS}, BS)
    assert pool.blocks() == ref.blocks()
    assert pool.cached_tokens([whole + second + [1]]) == [n // BS * BS]
