"""`KVPool.record_tokens`: the token ids of slots appended without them.

A pipelined decode loop appends step t+1's slots before it knows step t's
sampled tokens, and records those tokens' ids once it does. After that,
`commit` must publish exactly what it would have if the ids had come with
the append. Checked against two independent references: the same ops on a
second pool whose appends carry the ids, and block keys recomputed from
their definition (BLAKE2b over the parent key and the block's little-endian
int64 ids). Refusals: test_record_tokens_refusals.py; forks and truncates:
test_record_tokens_forks.py; shared helpers: record_tokens_helpers.py.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from record_tokens_helpers import (
    BS,
    chain,
    expected_cache,
    known,
    known_ids,
    make,
    published,
    stored_blocks,
)

from kvpager import InvalidArgument
from kvpager.events import EventSink

# -- late ids publish as ids given with the append ---------------------------------------------

def _int64s(rng: np.random.Generator, n: int) -> list[int]:
    """Token ids over the whole int64 range, its ends included now and then."""
    ids = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True).tolist()
    for k in range(n):
        if rng.random() < 0.05:
            ids[k] = int(rng.choice([-(2**63), 2**63 - 1, 0, -1]))
    return ids


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_late_ids_publish_as_ids_given_with_the_append(data):
    bs = data.draw(st.sampled_from([8, 16]), "block size")
    scalar = data.draw(st.booleans(), "scalar paths")
    lens = data.draw(st.lists(st.integers(1, 3 * bs + 3), min_size=1, max_size=4), "prompt lengths")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    with_ids, late = make(bs, 160, scalar), make(bs, 160, scalar)
    sinks = [EventSink(), EventSink()]
    with_ids.set_event_sink(sinks[0])
    late.set_event_sink(sinks[1])
    prompts = [_int64s(rng, n) for n in lens]
    allocs = [p.allocate(prompts) for p in (with_ids, late)]
    assert allocs[0] == allocs[1]
    ids = [a.seq_id for a in allocs[0]]
    tokens = {s: list(p) for s, p in zip(ids, prompts)}
    recorded = {s: len(p) for s, p in zip(ids, prompts)}  # ids `late` knows
    committed = dict.fromkeys(ids, 0)
    pending: dict[int, list[tuple[int, list[int]]]] = {s: [] for s in ids}  # (due step, ids), in order
    totals = [0, 0]
    full = [dict.fromkeys(ids, 0), dict.fromkeys(ids, 0)]  # blocks each pool has published per sequence

    def committing() -> None:
        """A commit publishes the full blocks below min(committed, known ids)."""
        for k, knows in enumerate(({s: len(t) for s, t in tokens.items()}, recorded)):
            for s in ids:
                full[k][s] = max(full[k][s], min(committed[s], knows[s]) // bs)

    def check_publication() -> None:
        for k, pool in enumerate((with_ids, late)):
            assert published(pool) == expected_cache(pool, tokens, full[k], bs)
            pool.check_integrity()

    def record(due: int) -> None:
        """Record in ``late`` every sequence's ids that are due, in order (some
        sequences with none: an empty list), in one batch or one call each."""
        batch, lists = [], []
        for s in ids:
            got = []
            while pending[s] and pending[s][0][0] <= due:
                got += pending[s].pop(0)[1]
            if got or data.draw(st.booleans(), "empty list"):
                batch.append(s)
                lists.append(got)
        if data.draw(st.booleans(), "one call each"):
            for s, got in zip(batch, lists):
                late.record_tokens(s, [got])
        elif batch:
            late.record_tokens(batch, lists)
        for s, got in zip(batch, lists):
            recorded[s] += len(got)
            assert known_ids(late, s) == tokens[s][: recorded[s]]

    for step in range(data.draw(st.integers(1, 10), "steps")):
        chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, unique=True), "stepped")
        chosen.sort()
        if data.draw(st.booleans(), "decode step"):
            counts: int | list[int] = 1
            per = [1] * len(chosen)
        else:
            per = data.draw(st.lists(st.integers(0, bs + 3), min_size=len(chosen), max_size=len(chosen)), "counts")
            counts = per
        new = [_int64s(rng, n) for n in per]
        slots_ids = with_ids.append(chosen, counts, token_ids=new)
        slots_late = late.append(chosen, counts)
        assert [x.tolist() for x in slots_ids] == [x.tolist() for x in slots_late]
        delays = data.draw(st.lists(st.integers(0, 3), min_size=len(chosen), max_size=len(chosen)), "delays")
        for s, toks, d in zip(chosen, new, delays):
            tokens[s] += toks
            pending[s].append((step + d, toks))
        record(step)
        check_publication()
        if data.draw(st.booleans(), "commit"):
            lags = data.draw(st.lists(st.one_of(st.none(), st.integers(0, 2 * bs)), min_size=len(ids),
                                      max_size=len(ids)), "commit lags")
            upto = [None if lag is None else max(0, len(tokens[s]) - lag) for s, lag in zip(ids, lags)]
            for k, pool in enumerate((with_ids, late)):
                totals[k] += sum(pool.commit(ids, upto))
            for s, u in zip(ids, upto):
                committed[s] = max(committed[s], len(tokens[s]) if u is None else u)
            committing()
            check_publication()

    record(10**9)  # every id still owed
    assert all(not q for q in pending.values())
    for k, pool in enumerate((with_ids, late)):
        totals[k] += sum(pool.commit(ids))
    committed = {s: len(tokens[s]) for s in ids}
    committing()
    assert full[0] == full[1] == {s: len(tokens[s]) // bs for s in ids}
    check_publication()
    # The same blocks under the same keys, told as the same events, however late the ids came.
    assert totals[0] == totals[1] == sum(len(t) // bs for t in tokens.values())
    assert published(with_ids) == published(late)
    assert with_ids.blocks() == late.blocks() and with_ids.sequences() == late.sequences()
    assert with_ids.stats() == late.stats()
    for s in ids:
        full = len(tokens[s]) // bs
        for pool in (with_ids, late):
            assert known_ids(pool, s) == tokens[s]
            assert pool.manager.history[s].key_blocks(full, bs)[:full] == chain(tokens[s], bs)
    blocks = [stored_blocks(sink, bs) for sink in sinks]
    assert blocks[0] == blocks[1]
    assert {b[0] for b in blocks[0]} == set(published(late))
    # A prompt of each sequence's ids (and of a prefix of them) finds its full blocks.
    queries = []
    for s in ids:
        cut = int(rng.integers(1, len(tokens[s]) + 1))
        queries += [tokens[s], tokens[s][:cut], tokens[s] + [5]]
    want = [(len(q) - 1) // bs * bs for q in queries]
    assert with_ids.cached_tokens(queries) == late.cached_tokens(queries) == want


def test_the_pipelined_decode_loop():
    """Step t+1's slot appended before step t's token is known, the token
    recorded one step late: every full block is published, as with ids."""
    prompt = list(range(100, 113))
    ref, pool = make(), make()
    [a] = ref.allocate([prompt])
    [b] = pool.allocate([prompt])
    ref.commit(a.seq_id)
    pool.commit(b.seq_id)
    sampled = [1000 + t for t in range(3 * BS)]
    pool.append(b.seq_id, 1)  # step 0's slot
    for t, token in enumerate(sampled):
        ref.append(a.seq_id, 1, token_ids=[[token]])
        if t + 1 < len(sampled):
            pool.append(b.seq_id, 1)  # step t+1's slot, before step t's token is known
        pool.record_tokens(b.seq_id, [[token]])
        assert known(pool, b.seq_id) == len(prompt) + t + 1
        ref.commit(a.seq_id)
        pool.commit(b.seq_id)
        assert published(pool) == published(ref)
        pool.check_integrity()
    want = expected_cache(pool, {b.seq_id: prompt + sampled}, {b.seq_id: (len(prompt) + len(sampled)) // BS}, BS)
    assert published(pool) == want and len(want) == 4


def test_an_append_with_ids_while_ids_are_owed_keeps_none():
    """Ids given to an append while earlier slots have none are not kept (the
    known ids stay a prefix): record_tokens owes them too."""
    pool = make()
    [a] = pool.allocate([list(range(6))])
    pool.append(a.seq_id, 2)
    pool.append(a.seq_id, 1, token_ids=[[77]])  # not kept: slots 6 and 7 have no ids yet
    assert known(pool, a.seq_id) == 6
    with pytest.raises(InvalidArgument):
        pool.record_tokens(a.seq_id, [[1, 2, 3, 4]])
    pool.record_tokens(a.seq_id, [[6, 7, 77]])
    assert known_ids(pool, a.seq_id) == [0, 1, 2, 3, 4, 5, 6, 7, 77]
    pool.commit(a.seq_id)
    assert published(pool) == {chain(range(8), BS)[0]: pool.sequence(a.seq_id).block_table[0]}
    pool.check_integrity()


def test_accepted_forms():
    """One int for one sequence, tuples, NumPy arrays (int64 and narrower) and
    empty lists record what the lists would."""
    forms = [
        (lambda s: s[0], lambda t: [t[0]]),
        (lambda s: tuple(s), lambda t: tuple(tuple(x) for x in t)),
        (lambda s: np.array(s), lambda t: [np.array(x, dtype=np.int64) for x in t]),
        (lambda s: s, lambda t: np.array(t, dtype=np.int32)),
    ]
    for ids_form, tokens_form in forms:
        pool = make()
        a, b = pool.allocate([[1, 2, 3], [4, 5]])
        pool.append([a.seq_id, b.seq_id], 3)
        seqs = [a.seq_id, b.seq_id]
        lists = [[7, 8, 9], [10, 11, 12]]
        pool.record_tokens(ids_form(seqs), tokens_form(lists))
        n = 1 if isinstance(ids_form(seqs), int) else 2
        for s, t, prompt in list(zip(seqs, lists, ([1, 2, 3], [4, 5])))[:n]:
            assert known_ids(pool, s) == prompt + t
            assert all(type(x) is int for x in pool.manager.history[s].tail)
        pool.record_tokens(seqs, [[], []])
        pool.check_integrity()
