"""Shared prefixes of a decode step, for cascade attention.

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

Only whole blocks strictly before a sequence's query block are shared: every
shared position precedes every query, so no causal mask applies inside a
segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def find_shared_prefixes(tables: np.ndarray, seq_lens: np.ndarray, block_size: int, *, levels: int = 2,
                         min_members: int = 2, min_blocks: int = 1) -> SharedPrefixes | None:
    """The shared prefixes of a decode step over ``tables`` (int32 [B, W]) and
    ``seq_lens`` (each sequence's length, its query the last position); None
    when no group of ``min_members`` rows shares ``min_blocks`` blocks."""
    n = len(seq_lens)
    full = (np.asarray(seq_lens, dtype=np.int64) - 1) // block_size  # whole blocks before the query's
    full = np.minimum(full, tables.shape[1])
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
    if len(rows) < min_members:
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
