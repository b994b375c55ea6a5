"""`KVPool.record_tokens`: the token ids of slots appended without them.

A pipelined decode loop appends step t+1's slots before it knows step t's
sampled tokens, and records those tokens' ids once it does. After that,
`commit` must publish exactly what it would have if the ids had come with
the append. Checked against two independent references: the same ops on a
second pool whose appends carry the ids, and block keys recomputed from
their definition (BLAKE2b over the parent key and the block's little-endian
int64 ids). Refusals are typed and change nothing; forks keep their token
histories apart (copy-on-write); a truncate moves where the next ids go.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpager import InvalidArgument, KVPool, PoolSpec, SequenceSwapped, UnknownSequence
from kvpager.errors import NotOwner
from kvpager.events import EventSink

BS = 8


def make(bs: int = BS, num_blocks: int = 64, scalar: bool = True) -> KVPool:
    pool = KVPool(PoolSpec(1, 1, 8, num_blocks=num_blocks, block_size=bs, dtype="float32", num_host_blocks=16))
    pool.manager.scalar = scalar
    return pool


def chain(tokens, bs: int = BS, salt: bytes = b"") -> list[bytes]:
    """The keys of the full blocks of ``tokens``, from their definition."""
    parent = hashlib.blake2b(b"kvpager-root\0" + salt, digest_size=16).digest()
    keys = []
    for i in range(len(tokens) // bs):
        block = np.asarray(tokens[i * bs : (i + 1) * bs], dtype="<i8").tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


def published(pool: KVPool) -> dict[bytes, int]:
    return dict(pool.manager.pool.cache.key_to_block)


def known(pool: KVPool, seq_id: int) -> int:
    m = pool.manager
    return int(m.table.known[m.rows[seq_id]])


def known_ids(pool: KVPool, seq_id: int) -> list[int]:
    h = pool.manager.history[seq_id]
    return h.prompt.tolist() + list(h.tail)


def state(pool: KVPool):
    """Everything an op could change: stats, block states, sequences, each
    sequence's known ids and keys, which sequences hold one history, the cache."""
    m = pool.manager
    holders: dict[int, list[int]] = {}
    for s, h in m.history.items():
        holders.setdefault(id(h), []).append(s)
    histories = {s: (known_ids(pool, s), list(h.keys), h.shared) for s, h in m.history.items()}
    return (pool.stats(), pool.blocks(), pool.sequences(), {s: known(pool, s) for s in m.rows}, histories,
            sorted(holders.values()), published(pool))


def expected_cache(pool: KVPool, tokens: dict[int, list[int]], full: dict[int, int], bs: int) -> dict[bytes, int]:
    """Key -> block of each sequence's first ``full[s]`` blocks (distinct ids: no key is shared)."""
    out = {}
    for s, toks in tokens.items():
        table = pool.sequence(s).block_table
        for i, key in enumerate(chain(toks, bs)[: full[s]]):
            out[key] = table[i]
    return out


def stored_blocks(sink: EventSink, bs: int) -> set[tuple[bytes, bytes | None, tuple[int, ...]]]:
    """The BlockStored events as one (key, parent, token ids) per block."""
    out = set()
    for item in sink.take():
        if item[0] == 0:
            _, keys, parent, tokens = item
            toks = np.asarray(tokens).tolist()
            for i, key in enumerate(keys):
                out.add((key, parent if i == 0 else keys[i - 1], tuple(toks[i * bs : (i + 1) * bs])))
    return out


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
    assert published(pool) == {chain(range(8))[0]: pool.sequence(a.seq_id).block_table[0]}
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


# -- refusals: typed, and nothing changes ------------------------------------------------------

def _setup():
    """s1: 5 slots without ids; s2: 3; s3: none (a prompt only); s4: 2, and swapped out;
    s5: 1, owned by "w1"; one freed id."""
    pool = make()
    s1, s2, s3, s4 = (a.seq_id for a in pool.allocate([list(range(10)), list(range(20, 30)), [1, 2], [3, 4]]))
    [s5] = [a.seq_id for a in pool.allocate([[9, 9]], owner="w1")]
    [gone] = [a.seq_id for a in pool.allocate([[8]])]
    pool.free(gone)
    pool.commit([s1, s2])
    pool.append([s1, s2, s4], [5, 3, 2])
    pool.append_flat([s5], 1, owner="w1")
    pool.record_tokens([s1], [[10]])  # s1 now owes 4
    pool.swap_out(s4)
    return pool, {"s1": s1, "s2": s2, "s3": s3, "s4": s4, "s5": s5, "gone": gone}


BAD_TOKENS = [
    ["a"], "ab", b"ab", [[1]], [2**63], [2**64], [2**64 - 1], [-(2**63) - 1], [1.0], [1.5], [float("nan")],
    [True], None, {}, {1: 2}, [1, [2]], [None], np.array([1.0]), np.array([2**63], np.uint64),
    np.array([[1]]), 3, np.int64(3),
]


@pytest.mark.parametrize(
    "call, error",
    [
        # more ids than slots without them (a sequence at its length: none at all)
        pytest.param(lambda p, s: p.record_tokens(s["s1"], [[1, 2, 3, 4, 5]]), InvalidArgument, id="too many ids"),
        pytest.param(lambda p, s: p.record_tokens([s["s1"], s["s2"]], [[1, 2], [1, 2, 3, 4]]),
                     InvalidArgument, id="too many ids, second of a batch"),
        pytest.param(lambda p, s: p.record_tokens([s["s1"], s["s3"]], [[1], [1]]),
                     InvalidArgument, id="ids for a sequence at its known length"),
        # unknown, freed and duplicate ids, malformed seq_ids
        pytest.param(lambda p, s: p.record_tokens([s["s1"], 12345], [[1], [2]]), UnknownSequence, id="unknown id"),
        pytest.param(lambda p, s: p.record_tokens([s["gone"]], [[1]]), UnknownSequence, id="freed id"),
        pytest.param(lambda p, s: p.record_tokens([s["s1"], s["s1"]], [[1], [2]]),
                     InvalidArgument, id="duplicate ids"),
        pytest.param(lambda p, s: p.record_tokens("x", [[1]]), InvalidArgument, id="seq_ids a str"),
        pytest.param(lambda p, s: p.record_tokens([True], [[1]]), InvalidArgument, id="seq_ids a bool"),
        pytest.param(lambda p, s: p.record_tokens([1.0], [[1]]), InvalidArgument, id="seq_ids a float"),
        # mismatched lengths
        pytest.param(lambda p, s: p.record_tokens([s["s1"], s["s2"]], [[1]]),
                     InvalidArgument, id="fewer lists than ids"),
        pytest.param(lambda p, s: p.record_tokens([s["s1"]], [[1], [2]]), InvalidArgument, id="more lists than ids"),
        pytest.param(lambda p, s: p.record_tokens([s["s1"], s["s2"]], []), InvalidArgument, id="no lists"),
        # the outer list malformed
        pytest.param(lambda p, s: p.record_tokens(s["s1"], "abc"), InvalidArgument, id="token_ids a str"),
        pytest.param(lambda p, s: p.record_tokens(s["s1"], b"abc"), InvalidArgument, id="token_ids bytes"),
        pytest.param(lambda p, s: p.record_tokens(s["s1"], None), InvalidArgument, id="token_ids None"),
        pytest.param(lambda p, s: p.record_tokens(s["s1"], 7), InvalidArgument, id="token_ids an int"),
        pytest.param(lambda p, s: p.record_tokens(s["s1"], {s["s1"]: [1]}), InvalidArgument, id="token_ids a dict"),
        pytest.param(lambda p, s: p.record_tokens(s["s1"], np.array(5)), InvalidArgument, id="token_ids a 0-d array"),
        pytest.param(lambda p, s: p.record_tokens(s["s1"], [1, 2]), InvalidArgument, id="token_ids flat"),
        # swapped out, another owner's
        pytest.param(lambda p, s: p.record_tokens([s["s1"], s["s4"]], [[1], [1]]), SequenceSwapped, id="swapped out"),
        pytest.param(lambda p, s: p.record_tokens([s["s5"]], [[1]], owner="w2"), NotOwner, id="another owner"),
        pytest.param(lambda p, s: p.record_tokens([s["s1"], s["s5"]], [[1], [1]], owner="w1"),
                     NotOwner, id="another owner, second of a batch"),
        pytest.param(lambda p, s: p.record_tokens([s["s5"]], [[1]], owner=None),
                     NotOwner, id="the embedded owner's ids for a worker's"),
    ] + [
        # a malformed list of ids, after a good one for another sequence (which must not be recorded)
        pytest.param(lambda p, s, bad=bad: p.record_tokens([s["s2"], s["s1"]], [[1], bad]), InvalidArgument,
                     id=f"token ids {bad!r}"[:40])
        for bad in BAD_TOKENS
    ],
)
def test_refusals_are_typed_and_change_nothing(call, error):
    pool, s = _setup()
    before = state(pool)
    with pytest.raises(error) as e:
        call(pool, s)
    assert type(e.value) is error
    assert state(pool) == before
    pool.check_integrity()
    # Nothing half-done: the ids owed are still owed, in full.
    pool.record_tokens([s["s1"], s["s2"]], [[11, 12, 13, 14], [30, 31, 32]])
    pool.record_tokens([s["s5"]], [[0]], owner="w1")
    with pytest.raises(InvalidArgument):
        pool.record_tokens([s["s1"]], [[15]])
    assert pool.commit([s["s1"], s["s2"]]) == [0, 0]  # 15 and 13 tokens: blocks 0 already published
    pool.append([s["s1"], s["s2"]], [1, 3], token_ids=[[15], [33, 34, 35]])
    assert pool.commit([s["s1"], s["s2"]]) == [1, 1]
    toks = {s["s1"]: list(range(16)), s["s2"]: list(range(20, 36))}
    assert published(pool) == expected_cache(pool, toks, dict.fromkeys(toks, 2), BS)
    pool.check_integrity()


def test_a_swapped_sequence_is_refused_as_append_refuses_it():
    pool, s = _setup()
    with pytest.raises(SequenceSwapped) as by_append:
        pool.append([s["s1"], s["s4"]], 1)
    with pytest.raises(SequenceSwapped) as by_record:
        pool.record_tokens([s["s1"], s["s4"]], [[1], [1]])
    assert by_record.value.seq_id == by_append.value.seq_id == s["s4"]
    assert by_record.value.op == "record_tokens" and by_append.value.op == "append"
    pool.swap_in(s["s4"])
    pool.record_tokens(s["s4"], [[5, 6]])  # back on the device: its owed ids are taken
    assert known_ids(pool, s["s4"]) == [3, 4, 5, 6]
    pool.check_integrity()


def test_another_owners_sequence_is_refused_as_append_refuses_it():
    pool, s = _setup()
    for owner in ("w2", None):
        with pytest.raises(NotOwner) as by_append:
            pool.append_flat([s["s5"]], 1, owner=owner)
        with pytest.raises(NotOwner) as by_record:
            pool.record_tokens([s["s5"]], [[1]], owner=owner)
        assert str(by_record.value) == str(by_append.value)
    for bad in (12345, s["gone"]):
        with pytest.raises(UnknownSequence) as by_append:
            pool.append_flat([bad], 1, owner="w1")
        with pytest.raises(UnknownSequence) as by_record:
            pool.record_tokens([bad], [[1]], owner="w1")
        assert by_record.value.seq_id == by_append.value.seq_id == bad


# -- forks: copy-on-write histories ------------------------------------------------------------

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]  # two full blocks and half a third


@pytest.mark.parametrize("scalar", [True, False])
def test_recording_on_a_child_leaves_the_parent(scalar):
    pool = make(scalar=scalar)
    [a] = pool.allocate([PROMPT])
    parent = a.seq_id
    pool.commit(parent)
    parent_keys = list(pool.manager.history[parent].keys)
    assert parent_keys == chain(PROMPT)[:2]
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
    assert published(pool) == {k: table[i] for i, k in enumerate(chain(PROMPT + x))}
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
    assert pool.manager.history[parent].key_blocks(3, BS) == chain(PROMPT + y)
    assert pool.manager.history[kid].key_blocks(3, BS) == chain(PROMPT + x)
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
