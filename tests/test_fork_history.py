"""A fork's token history is copy-on-write: parent and children hold one
history until one of them changes its token ids (an append with ids, a
truncation), and what each sequence publishes stays its own. The published
keys are checked against keys recomputed from their definition (BLAKE2b
over the parent key and the block's little-endian int64 ids), per sequence
and block, on both the one-sequence and the batch paths."""

from __future__ import annotations

import pytest
from pool_helpers import chain, published

from kvpager import KVPool, PoolSpec
from kvpager.errors import IntegrityError

BS = 8
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3] * 2  # two full blocks and half of a third


@pytest.mark.parametrize("scalar", [True, False])
@pytest.mark.parametrize("n", [1, 2])
def test_children_publish_their_own_ids(scalar, n):
    pool = KVPool(PoolSpec(1, 1, 8, num_blocks=40, block_size=BS, dtype="float32"))
    pool.manager.scalar = scalar
    [a] = pool.allocate([PROMPT])
    parent = a.seq_id
    pool.commit(parent)
    [kids] = pool.fork([parent], n)
    pool.check_integrity()
    tokens = {parent: list(PROMPT), **{k: list(PROMPT) for k in kids}}
    # Different ids after the fork: the child first (it writes the shared partial block, copied first).
    for s, extra in ((kids[0], [7, 8, 9] * 4), (parent, [2, 7, 1, 8] * 3)):
        pool.append([s], len(extra), token_ids=[extra])
        tokens[s] += extra
        pool.check_integrity()
    pool.commit([parent] + kids)
    pool.check_integrity()
    cache = published(pool)
    expected = {}
    for s, toks in tokens.items():
        table = pool.sequence(s).block_table
        for i, key in enumerate(chain(toks, BS)):
            assert cache.get(key) is not None, f"sequence {s}: block {i} not published under its key"
            expected[key] = cache[key]
            if i >= 2:  # past the shared prefix: this sequence's own block
                assert cache[key] == table[i], f"sequence {s}: block {i} published as another block"
    assert cache == expected  # nothing published under a key of ids no sequence holds
    assert len({cache[k] for k in chain(tokens[parent], BS)[2:]} & {cache[k] for k in chain(tokens[kids[0]], BS)[2:]}) == 0

    # A child cut back below the fork point leaves the parent's ids and keys whole.
    pool.truncate([kids[0]], 10)
    tokens[kids[0]] = tokens[kids[0]][:10]
    pool.append([kids[0]], 6, token_ids=[[6] * 6])
    tokens[kids[0]] += [6] * 6
    pool.commit([parent] + kids)
    pool.check_integrity()
    assert published(pool)[chain(tokens[kids[0]], BS)[1]] == pool.sequence(kids[0]).block_table[1]
    # A new prompt of the parent's ids finds every full block of the parent's but its last.
    [b] = pool.allocate([tokens[parent]])
    assert b.num_cached_tokens == (len(tokens[parent]) - 1) // BS * BS
    assert b.block_table[: b.num_cached_tokens // BS] == pool.sequence(parent).block_table[: b.num_cached_tokens // BS]
    pool.free(pool.owned(None))
    pool.check_integrity()


@pytest.mark.parametrize("scalar", [True, False])
def test_child_cut_back_while_shared_leaves_the_parents_ids(scalar):
    pool = KVPool(PoolSpec(1, 1, 8, num_blocks=40, block_size=BS, dtype="float32"))
    pool.manager.scalar = scalar
    [a] = pool.allocate([PROMPT + [4] * 4])  # three full blocks, none committed yet
    [[kid]] = pool.fork([a.seq_id])
    pool.truncate([kid], 10)  # before either has changed its ids: the history is still shared
    pool.append([kid], 14, token_ids=[[9] * 14])
    pool.commit([a.seq_id, kid])
    pool.check_integrity()
    cache = published(pool)
    for s, toks in ((a.seq_id, PROMPT + [4] * 4), (kid, PROMPT[:10] + [9] * 14)):
        table = pool.sequence(s).block_table
        assert [cache.get(k) for k in chain(toks, BS)] == list(table[:3]), f"sequence {s}"


def test_integrity_check_finds_a_shared_history_not_marked():
    pool = KVPool(PoolSpec(1, 1, 8, num_blocks=16, block_size=BS, dtype="float32"))
    [a] = pool.allocate([PROMPT])
    [[kid]] = pool.fork([a.seq_id])
    m = pool.manager
    assert m.history[kid] is m.history[a.seq_id]  # one history for both until one changes it
    m.history[kid].shared = False  # as if a fork had not marked it: a change by one would reach the other
    with pytest.raises(IntegrityError, match="not marked shared"):
        pool.check_integrity()
