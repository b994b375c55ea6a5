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

from kvpager import KVPool, PoolSpec, cascade
from kvpager.cascade import SEGMENT_FIELDS, find_shared_prefixes, find_shared_prefixes_numpy
from kvpager.plan import check_step

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


@pytest.fixture
def compiled_calls(monkeypatch):
    """The calls `find_shared_prefixes` makes to the compiled search."""
    calls = []

    def counted(*args):
        calls.append(args)
        return COMPILED(*args)

    monkeypatch.setattr(cascade, "NATIVE", counted)
    return calls


def test_a_plans_step_takes_the_compiled_search(compiled_calls):
    """Tables and lengths as a plan holds them (`check_step`'s int32 arrays, the spec's
    block size): the compiled search runs, decode and multi-token alike."""
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=256, block_size=8)
    pool = KVPool(spec)
    prompt = list(range(100, 140))  # 5 blocks
    [first] = pool.allocate([prompt + [1]])
    pool.commit([first.seq_id])
    ids = [a.seq_id for a in pool.allocate([prompt + [i, i + 1, i + 2] for i in range(6)])]
    tables, lens, qlens, _ = check_step(spec, *pool.tables(ids), np.full(len(ids), 2))
    for ql in (None, qlens):
        found = find_shared_prefixes(tables, lens, spec.block_size, query_lens=ql)
        same(found, find_shared_prefixes_numpy(tables, lens, spec.block_size, query_lens=ql))
        assert found is not None and found.members.tolist() == list(range(6))
    assert len(compiled_calls) == 2


def test_what_a_cast_could_change_runs_numpy(compiled_calls):
    """Inputs the compiled search would read other than NumPy does (other dtypes, lists, a
    scalar query length, sizes and thresholds out of its ranges) run the NumPy reference;
    a non-contiguous int32 table is copied and runs compiled."""
    rng = np.random.default_rng(5)
    base = nested_tables(rng, 40, 30, 3, 2)
    lens = rng.integers(1, 20 * 8 + 1, 40).astype(np.int32)
    far = base.astype(np.int64)
    far[:, 0] += np.arange(40) % 2 << 32  # ids alike in their low 32 bits only
    cases = [
        (far, lens, {}), (base.tolist(), lens, {}), (base, lens.tolist(), {}), (base, lens.astype(np.int64), {}),
        (base, lens, {"query_lens": 1}), (base, lens, {"query_lens": np.ones(40, np.int64)}),
        (base, lens, {"levels": 2.0}),
        (base, lens, {"levels": cascade.NATIVE_LEVELS + 1}), (base, lens, {"levels": -1}),
        (base, lens, {"min_blocks": 2**63}),
    ]
    for tables, sl, kw in cases:
        try:
            want = find_shared_prefixes_numpy(tables, sl, 8, **kw)
        except Exception as e:  # noqa: BLE001 (the reference's own refusal, met alike)
            with pytest.raises(type(e)):
                find_shared_prefixes(tables, sl, 8, **kw)
            continue
        same(find_shared_prefixes(tables, sl, 8, **kw), want)
    for bs in (0, -8, 2**31):
        with np.errstate(divide="ignore"):
            same(find_shared_prefixes(base, lens, bs), find_shared_prefixes_numpy(base, lens, bs))
    assert compiled_calls == []
    wide = nested_tables(rng, 40, 30, 3, 2)[:, :20]
    same(find_shared_prefixes(wide, lens, 8), find_shared_prefixes_numpy(wide, lens, 8))
    kw = {"min_members": np.int64(2), "levels": np.int32(2)}
    same(find_shared_prefixes(base, lens, np.int64(8), **kw), find_shared_prefixes_numpy(base, lens, 8, **kw))
    assert len(compiled_calls) == 2
    assert find_shared_prefixes(np.zeros((0, 4), np.int32), np.zeros(0, np.int32), 8) is None


def test_overlapping_outputs_cannot_steer_the_walk():
    """Outputs that overlap each other (own inside segments) or the inputs: the walk runs in
    memory of its own, so the counts and members are those of separate outputs."""
    tables = np.tile(np.arange(8, dtype=np.int32) - 100, (8, 1))
    tables[4:, 4:] += 50
    lens = np.full(8, 129, np.int32)
    args = (tables, lens, None, 16, 2, 2, 1)
    seg, mem, own = np.zeros((16, SEGMENT_FIELDS), np.int32), np.zeros(16, np.int32), np.zeros(8, np.int32)
    want = COMPILED(*args, seg, mem, own)
    shared = np.zeros((16, SEGMENT_FIELDS), np.int32)
    mem2 = np.zeros(1000, np.int32)
    assert COMPILED(*args, shared, mem2, shared.reshape(-1)[:8]) == want
    np.testing.assert_array_equal(mem2[: want[1]], mem[: want[1]])
    in_tables = tables.copy()
    assert COMPILED(in_tables, lens, None, 16, 2, 2, 1, seg, mem, in_tables.reshape(-1)[:8]) == want


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


def test_member_rows_past_int32_are_refused_before_any_arithmetic():
    """``levels`` x rows past int32 (the segments' member offsets are int32): refused by
    name before the walk, nothing written. The rows hold no blocks (width 0), so the
    arrays of 2**25 + 1 rows are never read: the refusal comes first."""
    n = 2**25 + 1  # x 64 levels: 2**31 + 64 member rows
    own = np.zeros(n, np.int32)
    with pytest.raises(ValueError, match="member rows past int32"):
        COMPILED(np.zeros((n, 0), np.int32), np.zeros(n, np.int32), None, 16, 64, 2, 1,
                 np.zeros((1, SEGMENT_FIELDS), np.int32), np.zeros(1, np.int32), own)
    assert not own.any()
    # (below the bound, the same rows get as far as the outputs' size)
    with pytest.raises(ValueError, match="segments and members need levels"):
        COMPILED(np.zeros((n, 0), np.int32), np.zeros(n, np.int32), None, 16, 63, 2, 1,
                 np.zeros((1, SEGMENT_FIELDS), np.int32), np.zeros(1, np.int32), own)
    # the Python side does not hand such a call to the compiled search
    assert cascade._native_takes(np.zeros((n, 0), np.int32), np.zeros(n, np.int32), None, 16, 64, 2, 1) is None
