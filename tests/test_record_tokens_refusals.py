"""`record_tokens` refusals: typed errors (too many ids, unknown or duplicate
sequences, malformed token ids, mismatched lengths, a swapped-out or another
owner's sequence, as `append` refuses them), each changing nothing."""

from __future__ import annotations

import numpy as np
import pytest
from record_tokens_helpers import (
    BS,
    expected_cache,
    known_ids,
    make,
    published,
    state,
)

from kvpager import InvalidArgument, SequenceSwapped, UnknownSequence
from kvpager.errors import NotOwner

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
