"""Releasing blocks that no attention will read again (sliding windows).

In a model whose every layer attends within a sliding window of ``w`` tokens,
the query at position ``p`` reads only positions after ``p - w``: once a
sequence's next query is at ``n``, its blocks wholly before ``n - w + 1`` are
dead weight. `release_before` gives them back (one reference each: a block
still shared or cached lives on for the others) and leaves the null block in
their table entries, so positions and block indices stay as they were. The
row's ``released`` column counts those leading entries; every later op knows
them: forks share only the live blocks, commit never publishes a released
entry, truncation never cuts into them, swaps move only live blocks, and
attention over such a sequence must use a window that starts at or after its
first live position (`kvpager.plan.check_floor`). A model with any
full-attention layer keeps every block (one pool serves all layers).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.validate import is_int, shown

if TYPE_CHECKING:
    from kvpager.sequences import SequenceManager


def release_before(m: SequenceManager, seq_ids: list[int], positions: Seq[int], owner: Any) -> list[int]:
    """`SequenceManager.release_before`: blocks released per sequence."""
    rows = m.batch(seq_ids, "release", owner)
    if len(positions) != len(rows):
        raise InvalidArgument(f"release: {len(positions)} positions for {len(rows)} sequences")
    bt, bs = m.table, m.block_size
    nt = bt.num_tokens[rows]
    for s, p, n in zip(seq_ids, positions, nt.tolist()):
        if not is_int(p) or not 0 <= p <= n:
            raise InvalidArgument(f"release: position for sequence {s} must be in [0, {n}], got {shown(p)}")
    pos = np.fromiter(map(int, positions), np.int64, len(rows))
    old = bt.released[rows]
    # whole blocks before the position, never a row's last block (appends write there)
    new = np.maximum(old, np.minimum(pos // bs, bt.num_blocks[rows].astype(np.int64) - 1))
    count = new - old
    if not count.any():
        return [0] * len(rows)
    rep = np.repeat(rows, count)
    cols = np.repeat(old, count) + (np.arange(len(rep)) - np.repeat(np.cumsum(count) - count, count))
    blocks = bt.table[rep, cols].astype(np.int64)
    bt.table[rep, cols] = 0
    bt.released[rows] = new
    m.num_released += int(np.count_nonzero((old == 0) & (new > 0)))
    m.pool.free_blocks(blocks)
    return count.tolist()


def live_blocks(m: SequenceManager, blocks: np.ndarray) -> np.ndarray:
    """``blocks`` (entries of rows) without released entries (the null block)."""
    return blocks[blocks != 0] if m.num_released else blocks
