"""Shared prefixes of a step (decode or multi-token), for cascade attention.

Sequences that share a prefix point at the same physical blocks at the same
leading positions of their block tables (the prefix cache and `fork` make it
so). `find_shared_prefixes` finds them from the step's tables alone: it groups
the rows by the block at the current column, takes the run of leading
columns every member of a group holds in common (checked column by column, so
nothing is assumed about how the tables were made), and repeats inside each
group for a second level (a system prompt shared by all, then a conversation
prefix shared by a few forks). A segment's K/V is then attended once for all
its members (`cuda/cascade_prefix.cu`) and each sequence reads only its own
part; the partial results merge by their log-sum-exp.

Only whole blocks strictly before a sequence's first query position
(``seq_len - query_len``) are shared: every shared position precedes every
query, so no causal mask applies inside a segment. In a multi-token step
(chunked prefill on a cached prefix, speculative verification) a segment's
rows are every query token of every member (`query_rows`), and whether it
pays is counted in the tensor-core tiles' reads (`multi_token_worth_it`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from operator import index
from typing import Any

import numpy as np

from kvpager import native

#: Segment columns: (table row read for the segment's K/V, first position, end
#: position, offset of its members in ``members``, member count, level).
SEGMENT_FIELDS = 6


@dataclass(frozen=True)
class SharedPrefixes:
    """The segments of one step (see `SEGMENT_FIELDS`), their members (row
    indices, segment after segment), each row's first position of its own
    (the end of its deepest segment, 0 for none), the number of levels, and
    how many K/V positions the cascade reads fewer than plain attention."""

    segments: np.ndarray  # int32 [S, 6]
    members: np.ndarray  # int32 [M]
    own_start: np.ndarray  # int32 [B]
    levels: int
    saved: int


#: The compiled ``shared_prefixes`` (native/shared_prefixes.c), or None: `find_shared_prefixes_numpy`
#: (not built, an older build without it, or KVPAGER_NATIVE=0). Tests set it to compare.
NATIVE = getattr(native.load(), "shared_prefixes", None)
NATIVE_LEVELS = 64  # the most levels the compiled version takes (segments of more nest past any real step)


def find_shared_prefixes(tables: np.ndarray, seq_lens: np.ndarray, block_size: int, *,
                         query_lens: np.ndarray | None = None, levels: int = 2, min_members: int = 2,
                         min_blocks: int = 1) -> SharedPrefixes | None:
    """The shared prefixes of a step over ``tables`` (int32 [B, W]), ``seq_lens``
    (each sequence's length, its queries the last ``query_lens`` positions; one
    each when None: a decode step); None when no group of ``min_members`` rows
    shares ``min_blocks`` whole blocks before their first queries. Found in C
    where `NATIVE` is built (one call; a decode step's plan pays it every step),
    else by `find_shared_prefixes_numpy`, the reference, with the same result."""
    ints = _native_takes(tables, seq_lens, query_lens, block_size, levels, min_members, min_blocks)
    if ints is None:
        return find_shared_prefixes_numpy(tables, seq_lens, block_size, query_lens=query_lens, levels=levels,
                                          min_members=min_members, min_blocks=min_blocks)
    n = tables.shape[0]
    cap = ints[1] * n  # each level's groups are disjoint sets of rows
    segments = np.empty((cap, SEGMENT_FIELDS), dtype=np.int32)
    members = np.empty(cap, dtype=np.int32)
    own = np.empty(n, dtype=np.int32)
    nseg, nmem, used, saved = NATIVE(np.ascontiguousarray(tables), np.ascontiguousarray(seq_lens),
                                     None if query_lens is None else np.ascontiguousarray(query_lens),
                                     *ints, segments, members, own)
    if nseg == 0:
        return None
    return SharedPrefixes(segments=segments[:nseg], members=members[:nmem], own_start=own, levels=used, saved=saved)


_INT32 = np.dtype(np.int32)
_INT32_MAX = 2**31 - 1


def _native_takes(tables: Any, seq_lens: Any, query_lens: Any, block_size: Any, levels: Any, min_members: Any,
                  min_blocks: Any) -> tuple[int, int, int, int] | None:
    """The integers the compiled search takes the call with, or None where it does not take
    it as it is: it takes int32 arrays of one row count (a plan's, from `plan.check_step`) and
    integers in its ranges; anything else runs the NumPy reference, which reads it as it is (a
    cast to int32 could change ids or lengths)."""
    if (NATIVE is None or type(tables) is not np.ndarray or type(seq_lens) is not np.ndarray
            or tables.dtype != _INT32 or seq_lens.dtype != _INT32 or tables.ndim != 2):
        return None
    n, width = tables.shape
    if seq_lens.shape != (n,) or (query_lens is not None and (
            type(query_lens) is not np.ndarray or query_lens.dtype != _INT32 or query_lens.shape != (n,))):
        return None
    try:
        ints = (index(block_size), index(levels), index(min_members), index(min_blocks))
    except TypeError:
        return None
    bs, lv, lo, hi = ints[0], ints[1], min(ints[2:]), max(ints[2:])
    if (0 <= lv <= NATIVE_LEVELS and lv * n <= _INT32_MAX and bs >= 1 and width * bs <= _INT32_MAX
            and lo >= -(2**63) and hi < 2**63):
        return ints
    return None


def find_shared_prefixes_numpy(tables: np.ndarray, seq_lens: np.ndarray, block_size: int, *,
                               query_lens: np.ndarray | None = None, levels: int = 2, min_members: int = 2,
                               min_blocks: int = 1) -> SharedPrefixes | None:
    """`find_shared_prefixes` in NumPy: the reference for the compiled version."""
    n = len(seq_lens)
    ql = 1 if query_lens is None else np.asarray(query_lens, dtype=np.int64)
    # whole blocks before the block of the first query
    full = np.minimum((np.asarray(seq_lens, dtype=np.int64) - ql) // block_size, tables.shape[1])
    own = np.zeros(n, dtype=np.int64)
    segments: list[tuple[int, int, int, int, int, int]] = []
    members: list[np.ndarray] = []
    offset = saved = 0
    frontier = [(np.arange(n), 0)]  # (rows that share columns < col, col)
    for level in range(levels):
        nxt = []
        for rows, col in frontier:
            for group in _groups(tables, full, rows, col, min_members):
                end = _common_end(tables, full, group, col)
                if end - col < min_blocks:
                    continue
                segments.append((int(group[0]), col * block_size, end * block_size, offset, len(group), level))
                members.append(group)
                offset += len(group)
                saved += (len(group) - 1) * (end - col) * block_size
                own[group] = end * block_size
                nxt.append((group, end))
        frontier = nxt
        if not frontier:
            break
    if not segments:
        return None
    return SharedPrefixes(
        segments=np.asarray(segments, dtype=np.int32).reshape(-1, SEGMENT_FIELDS),
        members=np.concatenate(members).astype(np.int32),
        own_start=own.astype(np.int32),
        levels=1 + max(s[5] for s in segments),
        saved=saved,
    )


def _groups(tables: np.ndarray, full: np.ndarray, rows: np.ndarray, col: int, min_members: int) -> list[np.ndarray]:
    """``rows`` with a whole block at ``col``, grouped by that block id (groups of at least ``min_members``)."""
    rows = rows[full[rows] > col]
    if len(rows) < max(min_members, 1):
        return []
    keys = tables[rows, col]
    order = np.argsort(keys, kind="stable")
    keys, rows = keys[order], rows[order]
    cuts = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    bounds = np.concatenate(([0], cuts, [len(rows)]))
    return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= min_members]


def _common_end(tables: np.ndarray, full: np.ndarray, group: np.ndarray, col: int) -> int:
    """The end of the run of columns from ``col`` in which every row of ``group``
    holds the same block (whole blocks only)."""
    hi = int(full[group].min())
    sub = tables[group, col:hi]
    same = (sub == sub[0]).all(axis=0)
    return hi if same.all() else col + int(np.argmin(same))


#: A decode step whose host sets the pace (an eager step of a model in Python: transformers
#: spends 0.5-1 ms of host time on a layer) cascades only from this many bytes of K/V spared
#: a layer (about 0.5 ms of reading on an H200): below it the device waits for the host
#: either way, and the cascade's extra launches are host time (eager steps with the cascade
#: took 4.6-13.4% longer than plain ones at 64 and 256 sequences on a 1,024-token prompt,
#: where a captured step gains 7-25% from it; H200, 2026-11-30).
HOST_BOUND_MIN_SAVED = 2 << 30


def worth_it(shared: SharedPrefixes | None, seq_lens: np.ndarray, bytes_per_position: int, *,
             min_saved_bytes: int = 192 << 20, min_fraction: float = 0.25) -> bool:
    """Whether cascading pays: the K/V bytes it spares rereading (positions x
    ``bytes_per_position``, K and V of every kv head of a layer) are at least
    ``min_saved_bytes`` and ``min_fraction`` of the step's positions. Reading
    192 MiB takes about 45 us on an H200: on smaller steps the cascade's two
    extra launches a layer cost more than it saves, in the kernels (16 x 1,024
    shared positions: 0.032 ms against 0.026 plain) and in an eager decode step,
    whose host queues every launch (a Llama-3.2-1B-shaped model at batch 64
    with a 1,024-token shared prompt, 132 MiB spared a layer, stepped 8% slower;
    replayed from CUDA graphs, where no host queues the launches, 4% slower)."""
    if shared is None:
        return False
    return (shared.saved * bytes_per_position >= min_saved_bytes
            and shared.saved >= min_fraction * float(np.sum(seq_lens)))


def query_rows(shared: SharedPrefixes, query_lens: np.ndarray) -> SharedPrefixes:
    """``shared`` with its members as rows of q (every query token of every
    member, packed per sequence in order: sequence b's rows start at the sum of
    the query lengths before it) and each segment's member offset and count in
    those rows; the same object for a decode step (one row per sequence)."""
    ql = np.asarray(query_lens, dtype=np.int64)
    if (ql == 1).all():
        return shared
    q_start = np.cumsum(ql) - ql
    per = ql[shared.members]
    first = np.cumsum(per) - per
    rows = np.repeat(q_start[shared.members] - first, per) + np.arange(int(per.sum()))
    ends = np.concatenate(([0], np.cumsum(per)))
    seg = shared.segments.astype(np.int64)
    seg[:, 3], seg[:, 4] = ends[seg[:, 3]], ends[seg[:, 3] + seg[:, 4]] - ends[seg[:, 3]]
    return dataclasses.replace(shared, segments=seg.astype(np.int32), members=rows.astype(np.int32))


def tile_positions(shared: SharedPrefixes, seq_lens: np.ndarray, query_lens: np.ndarray,
                   tokens_per_tile: int) -> tuple[int, int]:
    """(plain, cascade): the K/V positions the multi-token kernels' query tiles
    of ``tokens_per_tile`` query tokens (64 * MT rows over a GQA group) read, per
    kv head, without and with the cascade. Each tile reads every position up to
    its last query (causal), so a tile of a sequence with few query tokens reads
    the whole prefix for a few rows; the cascade's segment tiles hold the
    query rows of several members, its own tiles read from the sequence's own
    start. Both the K/V reads and the tensor-core work (padded rows included)
    are proportional to these counts."""
    sl, ql = np.asarray(seq_lens, dtype=np.int64), np.asarray(query_lens, dtype=np.int64)
    qt = int(tokens_per_tile)
    n = -(-ql // qt)
    causal = qt * n * (n - 1) // 2 + ql  # the tiles' reads within the queries
    plain = int((n * (sl - ql) + causal).sum())
    own = int((n * (sl - shared.own_start.astype(np.int64) - ql) + causal).sum())
    seg = shared.segments.astype(np.int64)
    per = ql[shared.members]
    ends = np.concatenate(([0], np.cumsum(per)))
    seg_rows = ends[seg[:, 3] + seg[:, 4]] - ends[seg[:, 3]]
    return plain, own + int((-(-seg_rows // qt) * (seg[:, 2] - seg[:, 1])).sum())


def multi_token_worth_it(shared: SharedPrefixes | None, seq_lens: np.ndarray, query_lens: np.ndarray,
                         tokens_per_tile: int, bytes_per_position: int, partial_bytes_per_row: int, *,
                         min_saved_bytes: int = 192 << 20, min_fraction: float = 0.25) -> bool:
    """Whether cascading a multi-token step pays: the K/V bytes its tiles spare
    reading (`tile_positions`, times ``bytes_per_position``: K and V of every kv
    head of a layer), less the float32 partial states it writes and merges
    (``partial_bytes_per_row`` per query token and part), are at least
    ``min_saved_bytes`` and the reads fall by ``min_fraction``. A multi-token
    step is more compute-bound than decode, but the tensor-core work falls in the
    same proportion as the reads: the twin's FLOP count (4 x head dim per query
    head, query token and visible position) is the same either way, and the
    plain kernel's padded rows are what the cascade saves. 64 sequences x 8
    query tokens at GQA 4 (32 tokens a tile) on an 8k shared prefix: 64 tiles
    of 8 used tokens each read 8k positions (4x the twin's FLOPs), the cascade
    16 tiles; 8 x 1,024 new tokens on a 4k prefix fill their tiles either way,
    so nothing is spared and the plain kernel runs."""
    if shared is None:
        return False
    plain, cascade = tile_positions(shared, seq_lens, query_lens, tokens_per_tile)
    rows = int(np.sum(query_lens)) + int(np.asarray(query_lens)[shared.members].sum())
    saved = (plain - cascade) * bytes_per_position - 2 * rows * partial_bytes_per_row
    return saved >= min_saved_bytes and plain - cascade >= min_fraction * plain
