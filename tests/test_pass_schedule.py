"""`kvpager.hf.pass_schedule`: passes that run segments of distinct lengths in parts
of lengths their rows share (the prefill of a model with recurrent layers resumed
from held states). Pure Python; the passes a model runs: test_hf_recurrent_ends.py."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager.hf.pass_schedule import schedule


def parts_of(passes, n: int) -> list[list[int]]:
    """Each segment's parts, in pass order."""
    parts = [[] for _ in range(n)]
    for length, members in passes:
        for i in members:
            parts[i].append(length)
    return parts


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=64), st.booleans())
def test_every_segment_runs_whole_once_in_few_passes(lens, first_whole):
    passes = schedule(lens, first_whole=first_whole)
    assert all(length >= 1 and members and members == sorted(set(members)) for length, members in passes)
    assert [sum(p) for p in parts_of(passes, len(lens))] == lens  # each token once, in its segment's order
    assert sum(length * len(members) for length, members in passes) == sum(lens)
    if first_whole:
        assert passes[0][1] == list(range(len(lens)))
    # never more than a pass a distinct length, nor than the shortest's and the rest's bits
    assert len(passes) <= len(set(lens))
    assert len(passes) <= 1 + (max(lens) - min(lens)).bit_length()
    if not first_whole:
        assert len(passes) <= max(lens).bit_length()


@pytest.mark.parametrize("lens, first_whole, want", [
    ([271] * 8, False, [(271, list(range(8)))]),  # one length: one pass
    ([300, 301], False, [(300, [0, 1]), (1, [1])]),
    ([3, 4], True, [(3, [0, 1]), (1, [1])]),
    ([100, 200, 300, 400], True, [(100, [0, 1, 2, 3]), (100, [1, 2, 3]), (100, [2, 3]), (100, [3])]),
    ([8, 9, 10, 11, 16, 17, 24], False, [(16, [4, 5, 6]), (8, [0, 1, 2, 3, 6]), (2, [2, 3]), (1, [1, 3, 5])]),
])
def test_the_fewest_passes_of_three_ways(lens, first_whole, want):
    assert schedule(lens, first_whole=first_whole) == want


def test_thirty_two_lengths_in_ten_passes():
    lens = [256 + 512 * i // 31 for i in range(32)]
    assert len(set(lens)) == 32 and len(schedule(lens)) == 10


def test_no_segments_and_empty_ones():
    assert schedule([]) == []
    with pytest.raises(ValueError, match="at least one token"):
        schedule([3, 0])
