"""Integrity check of the allocator, and what inspection reads from its arrays
(`SequenceInfo`s, the tokens-stored count of `stats`).

The check counts independently of the state it checks: block-table references
from the tables (`BlockTable.references`) against the reference counts, the
owner index against the rows' owner column, token histories against the
rows' known-token counts.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from kvpager.block_pool import NULL_BLOCK
from kvpager.errors import IntegrityError
from kvpager.types import SequenceInfo

if TYPE_CHECKING:
    from kvpager.sequences import SequenceManager


def tokens_stored(m: SequenceManager) -> int:
    """Real tokens held by in-use blocks, a shared block counted once at the fill
    of its fullest user. Every table entry is a full block except the last of a
    row whose length is not a multiple of the block size: a block is full for
    someone unless all its references are such partial last entries, and then
    it holds the most any of them filled. Vectorised over the rows' lengths and
    the partly filled last blocks."""
    bs, bt, pool = m.block_size, m.table, m.pool
    used = pool.num_used
    fill = bt.num_tokens & (bs - 1)  # of a row's last block if partly filled; 0 for free rows
    rows = (fill != 0).nonzero()[0]
    if not len(rows):
        return used * bs
    last = bt.last[rows]
    fill = fill[rows]
    partial_refs = np.bincount(last, minlength=pool.num_blocks)
    partial_refs[NULL_BLOCK] = 0  # a swapped-out last entry holds nothing here
    most = np.zeros(pool.num_blocks, dtype=np.int64)
    most[last] = fill
    several = partial_refs[last] > 1
    if np.count_nonzero(several):  # a partly filled block shared: its fullest user
        np.maximum.at(most, last[several], fill[several])
    only = (partial_refs == pool.ref_cnt) & (partial_refs > 0)
    return int(used * bs - np.count_nonzero(only) * bs + most[only].sum())


class InfoColumns(NamedTuple):
    """The fields of sequences' `SequenceInfo`s as columns (`info_columns`):
    ``tables`` int64 [sequences, widest], row k's first ``num_blocks[k]``
    entries its table; the rest lists."""

    seq_ids: list[int]
    owners: list[Any]
    num_tokens: list[int]
    num_committed: list[int]
    tables: np.ndarray
    num_blocks: list[int]
    shared_blocks: list[int]
    swapped: list[bool]
    host_blocks: list[int]


def info_columns(m: SequenceManager, seq_ids: list[int]) -> InfoColumns:
    """The `SequenceInfo` fields of ``seq_ids``: one gather of the rows
    (UnknownSequence names the first id that is not live)."""
    rows = m.lookup(seq_ids)
    bt = m.table
    tables, _ = bt.gather(rows)
    shared = ((m.pool.ref_cnt[tables] > 1) & (tables != NULL_BLOCK)).sum(axis=1)
    held, owner = m.host.held, m.owners.owner
    rl = rows.tolist()
    swapped = (bt.swapped[rows] != 0).tolist()
    return InfoColumns(
        list(seq_ids), [owner(o) for o in bt.owner[rows].tolist()], bt.num_tokens[rows].tolist(),
        bt.committed[rows].tolist(), tables.astype(np.int64, copy=False), bt.num_blocks[rows].tolist(),
        shared.tolist(), swapped, [len(held[r][1]) if sw else 0 for r, sw in zip(rl, swapped)],
    )


def infos(m: SequenceManager, seq_ids: list[int]) -> list[SequenceInfo]:
    """`SequenceManager.infos`: `info_columns`, then a `SequenceInfo` each."""
    if not len(seq_ids):
        return []
    c = info_columns(m, seq_ids)
    return [SequenceInfo(s, o, ntok, ncom, tuple(table[:n]), sh, sw, hb)
            for s, o, ntok, ncom, table, n, sh, sw, hb in zip(
                c.seq_ids, c.owners, c.num_tokens, c.num_committed, c.tables.tolist(), c.num_blocks,
                c.shared_blocks, c.swapped, c.host_blocks)]


def _other(a: Any, b: Any) -> bool:
    """Whether owners ``a`` and ``b`` differ (an owner is itself even where it is
    unequal to itself: a float NaN)."""
    return a is not b and a != b


def _null_entries(bt: Any, rows: np.ndarray, nb: np.ndarray, released: np.ndarray,
                  ) -> tuple[bool, list[list[int]], int]:
    """Over ``rows``' tables, a run of rows at a time (`BlockTable.row_chunks`: the
    whole table at once took gigabytes with many forks of a long sequence): whether
    a block sits among a row's released entries, the first five null entries
    inside rows' used and unreleased parts ([index into rows, column]), and their count."""
    held_in_released, null_at, count, at = False, [], 0, 0
    cols = np.arange(bt.width)[None, :]
    for part in bt.row_chunks(rows, bt.width):
        k = slice(at, at + len(part))
        at += len(part)
        table = bt.table[part]
        held_in_released |= bool((table != NULL_BLOCK)[cols < released[k, None]].any())
        nulls = (table == NULL_BLOCK) & (cols < nb[k, None]) & (cols >= released[k, None])
        count += int(np.count_nonzero(nulls))
        if len(null_at) < 5 and count:
            null_at += [[int(r) + k.start, int(c)] for r, c in np.argwhere(nulls)[: 5 - len(null_at)].tolist()]
    return held_in_released, null_at, count


def check_integrity(m: SequenceManager) -> None:
    """See `SequenceManager.check_integrity`."""
    bs, bt, pool = m.block_size, m.table, m.pool
    ids = np.fromiter(m.rows, np.int64, len(m.rows))
    rows = np.fromiter(m.rows.values(), np.int64, len(m.rows))
    bt.check(rows)
    problems = []
    if not np.array_equal(bt.seq_id[rows], ids):
        problems.append("row columns name other sequence ids than the id -> row map")
    nb, nt = bt.num_blocks[rows].astype(np.int64), bt.num_tokens[rows]
    wrong = np.flatnonzero(nb != -(-nt // bs))
    for k in wrong[:5].tolist():
        problems.append(f"sequence {ids[k]}: {nb[k]} blocks for {nt[k]} tokens (block size {bs})")
    swapped = bt.swapped[rows] != 0
    if int(swapped.sum()) != m.num_swapped or set(rows[swapped].tolist()) != set(m.host.held):
        problems.append(f"{int(swapped.sum())} rows marked swapped, {m.num_swapped} counted, "
                        f"{len(m.host.held)} holding host blocks")
    kept = np.zeros(pool.num_blocks, dtype=np.int64)
    for part in bt.row_chunks(rows[swapped]):
        kept += np.bincount(bt.row_blocks(part), minlength=pool.num_blocks)
    kept[NULL_BLOCK] = 0
    if not np.array_equal(kept, m.host.kept):
        problems.append("the count of device blocks swapped-out rows keep disagrees with their tables")
    # A null entry inside a table only where a swapped row moved that block out,
    # or among the leading blocks a row released (which are all null).
    released = bt.released[rows]
    held_in_released, null_at, num_null = _null_entries(bt, rows, nb, released)
    if (released >= np.maximum(nb, 1)).any() or held_in_released:
        problems.append("a row released its last block, or holds a block among its released entries")
    if int(np.count_nonzero(released)) != m.num_released:
        problems.append(f"{int(np.count_nonzero(released))} rows released blocks, {m.num_released} counted")
    expected_nulls = sum(len(c) for c, _ in m.host.held.values())
    for k, col in null_at:
        held = m.host.held.get(int(rows[k]))
        if held is None or col not in held[0].tolist():
            problems.append(f"sequence {ids[k]}: block-table entry {col} is the null block")
    if num_null != expected_nulls and not problems:
        problems.append(f"{num_null} null entries but {expected_nulls} blocks swapped out")
    last = np.where(nb > 0, bt.table[rows, np.maximum(nb - 1, 0)], 0)
    if not np.array_equal(bt.last[rows], last):
        problems.append("a row's last-block column disagrees with its table")
    if (bt.committed[rows] > nt).any() or (bt.published[rows] * bs > nt).any():
        problems.append("a row has more tokens committed or blocks published than it holds")
    if set(m.history) != set(m.rows):
        problems.append(f"{len(m.history)} token histories for {len(m.rows)} sequences")
    else:
        for s, row in m.rows.items():
            h = m.history[s]
            if h.num_known != bt.known[row] or len(h.keys) < bt.published[row] or len(h.keys) * bs > h.num_known:
                problems.append(f"sequence {s}: history of {h.num_known} tokens and {len(h.keys)} keys "
                                f"but {bt.known[row]} known and {bt.published[row]} published")
                break
        holders = Counter(map(id, m.history.values()))  # a history held by several (forks) is copy-on-write
        if any(holders[id(h)] > 1 and not h.shared for h in m.history.values()):
            problems.append("a token history held by several sequences is not marked shared")
    owners = Counter(bt.owner[rows].tolist())
    indexed = m.owners.counts()
    if owners != Counter(indexed) or any(m.rows.get(s) is None or _other(m.owner_of(m.rows[s]), o)
                                         for o, mine in m.owners.owned.items() for s in mine):
        problems.append(f"owner index ({sum(indexed.values())} sequences of {len(indexed)} owners) "
                        f"disagrees with the rows ({len(rows)} of {len(owners)})")
    problems += m.pins.problems(pool)
    if problems:
        raise IntegrityError("sequence state integrity violated: " + "; ".join(problems[:20]))
    # A block's references: its block-table entries and its pins.
    expected = bt.references(pool.num_blocks) + m.pins.references(pool.num_blocks)
    expected[NULL_BLOCK] = 0
    pool.check(expected)
    m.host.check()
