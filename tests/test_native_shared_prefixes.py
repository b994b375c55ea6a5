"""A step's shared prefixes found in C (native/shared_prefixes.c,
`kvpager._native.shared_prefixes`) against `cascade.find_shared_prefixes_numpy`,
the reference: the same segments, members, own starts, levels and saved
positions, in the same order, on random tables with nested sharing, ragged
lengths, multi-token queries and every threshold. Each result is also checked
against the tables directly (members hold the same blocks over their segment,
whole blocks before their first query only, and a segment cannot grow by a
column). Then the C function's refusals of bad arguments. Skips where the
extension was not built (test_cascade*.py run whichever path the build has)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager import cascade
from kvpager.cascade import SEGMENT_FIELDS, find_shared_prefixes, find_shared_prefixes_numpy

COMPILED = cascade.NATIVE
pytestmark = pytest.mark.skipif(COMPILED is None, reason="kvpager._native (with shared_prefixes) was not built")


def nested_tables(rng: np.random.Generator, rows: int, width: int, groups: int, forks: int) -> np.ndarray:
    """Tables of ``rows`` rows: ``groups`` system prompts of random lengths, each row's
    prompt followed by one of ``forks`` conversation prefixes of its group, then
    blocks of its own (every block id distinct across what is not shared; negative ones
    too, ordered as signed ints)."""
    ids = iter(rng.permutation(1 << 20) - (1 << 19))
    tables = np.array([[next(ids) for _ in range(width)] for _ in range(rows)], dtype=np.int32)
    prompts = [[next(ids) for _ in range(int(rng.integers(0, width)))] for _ in range(groups)]
    convs = [[[next(ids) for _ in range(int(rng.integers(0, width)))] for _ in range(forks)] for _ in range(groups)]
    for r in range(rows):
        g, f = int(rng.integers(groups)), int(rng.integers(forks))
        lead = (prompts[g] + convs[g][f])[:width]
        tables[r, : len(lead)] = lead
    return tables


def same(a, b) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.segments.dtype == b.segments.dtype == np.int32 and a.segments.shape[1] == SEGMENT_FIELDS
    np.testing.assert_array_equal(a.segments, b.segments)
    np.testing.assert_array_equal(a.members, b.members)
    np.testing.assert_array_equal(a.own_start, b.own_start)
    assert a.members.dtype == a.own_start.dtype == np.int32
    assert (a.levels, a.saved) == (b.levels, b.saved)


def check_against_tables(found, tables, seq_lens, query_lens, block_size, min_members, min_blocks) -> None:
    """The segments' meaning, read off the tables (independent of both versions)."""
    if found is None:
        return
    full = np.minimum((seq_lens - query_lens) // block_size, tables.shape[1])
    saved = 0
    for row, start, end, off, count, _level in found.segments.tolist():
        members = found.members[off : off + count]
        assert count >= max(min_members, 1) and row == members[0] and (np.diff(members) > 0).all()
        lo, hi = start // block_size, end // block_size
        assert start % block_size == end % block_size == 0 and hi - lo >= min_blocks
        assert (full[members] >= hi).all()  # whole blocks before every member's first query
        assert (tables[members, lo:hi] == tables[row, lo:hi]).all()
        # not one column more: some member ends there or holds another block
        assert hi == full[members].min() or len(set(tables[members, hi].tolist())) > 1
        saved += (count - 1) * (end - start)
    assert saved == found.saved


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 70), st.integers(1, 24), st.integers(1, 4), st.integers(1, 3), st.sampled_from([1, 2, 8, 16]),
       st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.booleans(), st.integers(0, 2**32 - 1))
def test_compiled_equals_numpy(rows, width, groups, forks, block_size, levels, min_members, min_blocks,
                               multi, seed):
    rng = np.random.default_rng(seed)
    tables = nested_tables(rng, rows, width, groups, forks)
    seq_lens = rng.integers(1, width * block_size + 1, rows).astype(np.int32)
    query_lens = rng.integers(1, seq_lens + 1).astype(np.int32) if multi else None
    kw = {"query_lens": query_lens, "levels": levels, "min_members": min_members, "min_blocks": min_blocks}
    got = find_shared_prefixes(tables, seq_lens, block_size, **kw)
    same(got, find_shared_prefixes_numpy(tables, seq_lens, block_size, **kw))
    ql = np.ones(rows, np.int64) if query_lens is None else query_lens.astype(np.int64)
    check_against_tables(got, tables, seq_lens.astype(np.int64), ql, block_size, min_members, min_blocks)


def test_one_prompt_and_forks_two_levels():
    """256 rows in 8 groups of forks under 2 prompts: both levels, the groups in block order."""
    rng = np.random.default_rng(3)
    tables = nested_tables(rng, 256, 96, 2, 4)
    seq_lens = np.full(256, 96 * 16, np.int32)
    got = find_shared_prefixes(tables, seq_lens, 16)
    same(got, find_shared_prefixes_numpy(tables, seq_lens, 16))
    check_against_tables(got, tables, seq_lens.astype(np.int64), np.ones(256, np.int64), 16, 2, 1)


def test_tables_of_other_types_and_layouts():
    """Tables as a non-contiguous int64 view and lengths as a list: the same as the reference."""
    rng = np.random.default_rng(5)
    wide = nested_tables(rng, 40, 30, 3, 2).astype(np.int64)[:, :20]
    lens = [int(x) for x in rng.integers(1, 20 * 8 + 1, 40)]
    same(find_shared_prefixes(wide, lens, 8), find_shared_prefixes_numpy(wide, lens, 8))
    assert find_shared_prefixes(np.zeros((0, 4), np.int32), np.zeros(0, np.int32), 8) is None


def test_more_levels_than_the_compiled_version_takes_run_numpy():
    tables = np.tile(np.arange(10, dtype=np.int32), (3, 1))
    lens = np.full(3, 80, np.int32)
    big = cascade.NATIVE_LEVELS + 1
    same(find_shared_prefixes(tables, lens, 8, levels=big), find_shared_prefixes_numpy(tables, lens, 8, levels=big))
    assert find_shared_prefixes(tables, lens, 8, levels=-1) is None


def call(tables=None, lens=None, qlens=None, block_size=16, levels=2, seg=None, mem=None, own=None):
    tables = np.zeros((4, 8), np.int32) if tables is None else tables
    n = tables.shape[0] if tables.ndim == 2 else 4
    lens = np.full(n, 64, np.int32) if lens is None else lens
    seg = np.zeros((max(levels, 0) * n, SEGMENT_FIELDS), np.int32) if seg is None else seg
    mem = np.zeros(max(levels, 0) * n, np.int32) if mem is None else mem
    own = np.zeros(n, np.int32) if own is None else own
    return COMPILED(tables, lens, qlens, block_size, levels, 2, 1, seg, mem, own)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"tables": np.zeros((4, 8), np.int64)}, TypeError, "tables"),
    ({"tables": np.zeros(8, np.int32)}, TypeError, "tables"),
    ({"tables": np.zeros((8, 4), np.int32).T}, ValueError, "contiguous"),
    ({"lens": np.full(4, 64, np.int64)}, TypeError, "seq_lens"),
    ({"lens": np.full(3, 64, np.int32)}, ValueError, "shapes disagree"),
    ({"qlens": np.ones(5, np.int32)}, ValueError, "shapes disagree"),
    ({"qlens": np.ones(4, np.float32)}, TypeError, None),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"levels": -1}, ValueError, "levels"),
    ({"levels": 65}, ValueError, "levels"),
    ({"seg": np.zeros((8, 5), np.int32)}, ValueError, "shapes disagree"),
    ({"seg": np.zeros((7, 6), np.int32)}, ValueError, "levels * rows"),
    ({"mem": np.zeros(7, np.int32)}, ValueError, "levels * rows"),
    ({"own": np.zeros(3, np.int32)}, ValueError, "shapes disagree"),
    ({"own": np.zeros(4, np.int32)[::-1]}, ValueError, "contiguous"),
    ({"block_size": 1 << 30}, ValueError, "int32"),
])
def test_bad_arguments_are_refused_and_write_nothing(kwargs, error, words):
    own = kwargs.get("own")
    target = np.full(4, 7, np.int32) if own is None or own.flags.c_contiguous else None
    if target is not None:
        kwargs = {**kwargs, "own": target if own is None else own}
        before = kwargs["own"].copy()
    with pytest.raises((error, BufferError)) as info:
        call(**kwargs)
    if words is not None:
        assert words in str(info.value)
    if target is not None:
        np.testing.assert_array_equal(kwargs["own"], before)


def test_a_read_only_output_is_refused():
    own = np.zeros(4, np.int32)
    own.flags.writeable = False
    with pytest.raises((TypeError, BufferError, ValueError)):
        call(own=own)
