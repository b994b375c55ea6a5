"""Integrity check of the allocator and the counts `stats` derives from its arrays.

The check counts independently of the state it checks: block-table references
from the tables (`BlockTable.references`) against the reference counts, the
owner index against the rows' owner column, token histories against the
rows' known-token counts.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from kvpager.block_pool import NULL_BLOCK
from kvpager.errors import IntegrityError

if TYPE_CHECKING:
    from kvpager.sequences import SequenceManager


def tokens_stored(m: SequenceManager) -> int:
    """Real tokens held by in-use blocks, a shared block counted once at the fill
    of its fullest user. Every table entry is a full block except each row's
    last, which may be partly filled: a block is full for someone unless all
    its references are such partial last entries, and then it holds the most
    any of them filled. Vectorised over the rows and the blocks."""
    bs, bt, pool = m.block_size, m.table, m.pool
    rows = np.flatnonzero(bt.num_blocks)
    nb = bt.num_blocks[rows].astype(np.int64)
    last = bt.table[rows, nb - 1]
    fill = bt.num_tokens[rows] - (nb - 1) * bs
    part = (fill < bs) & (last != NULL_BLOCK)  # a swapped-out last entry holds nothing here
    last, fill = last[part], fill[part]
    used = pool.num_used
    if not len(last):
        return used * bs
    ref = pool.ref_cnt
    partial_refs = np.bincount(last, minlength=pool.num_blocks)
    only = np.flatnonzero(partial_refs == ref)
    only = only[ref[only] > 0]
    most = np.zeros(pool.num_blocks, dtype=np.int64)
    np.maximum.at(most, last, fill)
    return int((used - len(only)) * bs + most[only].sum())


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
    # A null entry inside a table only where a swapped row moved that block out.
    null_at = np.argwhere((bt.table[rows] == NULL_BLOCK) & (np.arange(bt.width)[None, :] < nb[:, None]))
    expected_nulls = sum(len(c) for c, _ in m.host.held.values())
    for k, col in null_at[:5].tolist():
        held = m.host.held.get(int(rows[k]))
        if held is None or col not in held[0].tolist():
            problems.append(f"sequence {ids[k]}: block-table entry {col} is the null block")
    if len(null_at) != expected_nulls and not problems:
        problems.append(f"{len(null_at)} null entries but {expected_nulls} blocks swapped out")
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
    owners = Counter(bt.owner[rows].tolist())
    indexed = {m._codes.get(o): len(s) for o, s in m.owned.items()}
    if owners != Counter(indexed) or any(m.rows.get(s) is None or m.owner_of(m.rows[s]) != o
                                         for o, mine in m.owned.items() for s in mine):
        problems.append(f"owner index ({sum(indexed.values())} sequences of {len(indexed)} owners) "
                        f"disagrees with the rows ({len(rows)} of {len(owners)})")
    if problems:
        raise IntegrityError("sequence state integrity violated: " + "; ".join(problems[:20]))
    expected = bt.references(pool.num_blocks)
    expected[NULL_BLOCK] = 0
    pool.check(expected)
    m.host.check()
