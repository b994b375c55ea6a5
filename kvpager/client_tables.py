"""`TableMirror`: a worker's copy of its own sequences' block tables.

The daemon owns the allocator; a worker's `Client` follows the block tables
of the sequences its session owns from the replies of the ops that change
them (allocate: the tables; append: the new slots; fork: the children;
truncate: the lengths; swap_in: the new tables), so attention and step plans
gather tables here instead of asking the daemon once per layer.

Ops are all-or-nothing on the daemon, so an update runs only after an ok
reply. A sequence whose op had no clear outcome (a timeout) is forgotten:
its tables come from the daemon again, which is slower but never wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager.block_table import BlockTable
from kvpager.client_marks import BlockMarks
from kvpager.errors import SequenceSwapped
from kvpager.plan_guard import Moves
from kvpager.recent_batches import RecentBatches


class TableMirror:
    """Block tables and token counts of one session's sequences, a row each."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        # leading blocks released (null entries); tokens committed (by this client's commits)
        self.table = BlockTable(columns=("released", "committed"))
        #: moved by every change that can make a step plan of these sequences stale
        #: (`kvpager.plan_guard`): the mapped pool's count once the pool is mapped
        self.moves = Moves()
        # blocks issued to these sequences and blocks they know published (`kvpager.client_marks`)
        self.marks = BlockMarks(block_size)
        self._shift = block_size.bit_length() - 1
        self.rows: dict[int, int] = {}  # seq_id -> row of `table`
        self.swapped: set[int] = set()
        #: ids dropped without an outcome (`forget`, `lost_track`): the session may hold them still
        self.forgotten: set[int] = set()
        # Batches lately found wholly mirrored: a decode loop follows the same ids
        # step after step, and a row changes only when its sequence is freed or forgotten.
        self._recent = RecentBatches()

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self.rows

    # -- reading ------------------------------------------------------------------------
    def gather(self, ids: list[int], op: str = "tables") -> tuple[np.ndarray, np.ndarray] | None:
        """Padded int32 block tables [B, max_blocks] and lengths [B] of ``ids``
        exactly as the daemon's `tables` answers, or None unless every id is
        mirrored here. A swapped sequence raises SequenceSwapped (naming ``op``), as there."""
        rows = list(map(self.rows.get, ids))
        if None in rows:
            return None
        if self.swapped and not self.swapped.isdisjoint(ids):
            raise SequenceSwapped(next(i for i in ids if i in self.swapped), op)
        return self.table.gather(rows)

    def _moved(self) -> None:
        """A change that may release blocks (or ends a step): plans recheck, and
        the blocks issued so far are no longer known to be held."""
        self.moves.bump()
        self.marks.forget_issued()

    def _cow_moved(self, slots: np.ndarray) -> None:
        """An append copied a shared block on write: its old block may go to another
        sequence, so plans recheck (`_moved`); ``slots``, just issued, stay known."""
        self._moved()
        self.marks.issue(slots)

    def published_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """Those of ``blocks`` known published: a write there is refused, as the
        daemon refuses a staged one."""
        return self.marks.published_of(blocks)

    def foreign_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """Those of ``blocks`` that no resident mirrored sequence holds (a swapped-out
        one's table is stale: its blocks went back to the pool). Blocks an allocate
        or append gave since the last release are found at once; others by a
        search of every table."""
        if len(blocks) and self.marks.all_issued(blocks):
            return blocks[:0]
        rows = [r for i, r in self.rows.items() if i not in self.swapped] if self.swapped else list(self.rows.values())
        held = self.table.row_blocks(np.asarray(rows, np.int64)) if rows else np.zeros(0, np.int64)
        return blocks[~np.isin(blocks, held)]

    def committed_of(self, ids: list[int]) -> np.ndarray | None:
        """The committed token counts (int64) of ``ids``, or None unless every id is mirrored."""
        rows = list(map(self.rows.get, ids))
        return None if None in rows else self.table.committed[rows]

    def rows_now(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """`gather` and the committed token counts of ``ids`` (what a step plan's
        guard checks, `kvpager.plan_guard`), or None unless every id is mirrored."""
        got = self.gather(ids)
        return None if got is None else (*got, self.committed_of(ids))  # type: ignore[return-value]

    def _known(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the mirrored ``ids`` and where they are in ``ids``."""
        found = self._recent.get(ids)
        if found is not None:
            return found, np.arange(len(ids))
        rows = list(map(self.rows.get, ids))
        if None not in rows:
            return self._recent.put(ids, None, np.array(rows, dtype=np.int64)), np.arange(len(ids))
        at = [k for k, r in enumerate(rows) if r is not None]
        return np.array([rows[k] for k in at], dtype=np.int64), np.array(at, dtype=np.int64)

    # -- updates from ok replies ----------------------------------------------------------
    def allocated(self, allocations: Any) -> None:
        """`allocate`'s sequences: their tables; length = cached tokens + new slots."""
        bt, bs = self.table, self.block_size
        hits = []  # (row, table entry of its first hit block, the hit blocks)
        for a in allocations:
            row = self.rows[a.seq_id] = bt.add_row(a.block_table, a.num_cached_tokens + len(a.slots))
            bt.committed[row] = a.num_cached_tokens  # a prefix hit is committed K/V
            self.marks.issue(a.slots)
            if a.num_cached_tokens >= bs:
                hit = np.asarray(a.block_table[: a.num_cached_tokens // bs], np.int64)
                skipped = 0
                if hit[0] == 0:  # a windowed hit: leading entries released (the null block)
                    held = np.flatnonzero(hit)
                    bt.released[row] = skipped = int(held[0]) if len(held) else len(hit)
                    hit = hit[skipped:]
                hits.append((row, skipped, hit))
        if not hits:
            return
        written = np.concatenate([np.asarray(a.slots, np.int64) for a in allocations]) >> self._shift
        for row, skipped, hit in hits:
            # blocks shared within the batch (`share_in_batch`) follow a prompt's cache hits: an
            # earlier prompt of the batch writes them, and they are published by the first commit
            # that covers them, this sequence's too (as the daemon counts: its hits alone committed)
            mine = np.isin(hit, written)
            if mine.any():
                k = int(np.argmax(mine))
                bt.committed[row] = (skipped + k) * bs
                hit = hit[:k]
            self.marks.publish(hit)

    def appended(self, ids: list[int], num_tokens: Any, slots: np.ndarray) -> None:
        """``num_tokens`` (an int, or one per sequence) new tokens per sequence
        at ``slots`` (every sequence's, back to back). Token ``p`` of a sequence
        lives in block ``slot // block_size`` = table entry ``p // block_size``,
        which covers a new block at a block boundary and a copy-on-write copy
        of the last block alike."""
        if not ids:
            return
        self.marks.issue(slots)
        bs, bt = self.block_size, self.table
        if type(num_tokens) is int and num_tokens == 1:  # a decode step: one slot per sequence
            if len(ids) == 1:  # plain ints: no array operation pays off for one row
                row = self.rows.get(ids[0])
                if row is not None:
                    p = int(bt.num_tokens[row])
                    col = p // bs
                    if col >= bt.width:
                        bt.reserve_width(col + 1)
                    block = int(slots[0]) // bs
                    if p % bs and int(bt.table[row, col]) != block:  # copied on write: plans recheck
                        self._cow_moved(slots)
                    bt.table[row, col] = block
                    bt.num_blocks[row] = col + 1
                    bt.num_tokens[row] = p + 1
                return
            rows, at = self._known(ids)
            if len(at) == len(ids):
                pos = bt.num_tokens[rows]
                col = pos // bs
                bt.reserve_width(int(col.max()) + 1)
                blocks = slots // bs
                if ((pos % bs != 0) & (bt.table[rows, col] != blocks)).any():  # copied on write
                    self._cow_moved(slots)
                bt.table[rows, col] = blocks
                bt.num_blocks[rows] = col + 1
                bt.num_tokens[rows] = pos + 1
                return
        scalar = isinstance(num_tokens, (int, np.integer))
        counts = np.full(len(ids), int(num_tokens), np.int64) if scalar else np.asarray(num_tokens, np.int64)
        rows, at = self._known(ids)
        if len(at) < len(ids):  # some forgotten: keep the others' slots only
            starts = np.cumsum(counts) - counts
            keep = np.zeros(len(slots), dtype=bool)
            for k in at.tolist():
                keep[starts[k] : starts[k] + counts[k]] = True
            slots, counts, scalar = slots[keep], counts[at], False
        start = bt.num_tokens[rows]
        end = start + counts
        if scalar and num_tokens == 1:  # a decode step
            rep, pos = rows, start
        else:
            rep = np.repeat(rows, counts)
            first = np.repeat(np.cumsum(counts) - counts - start, counts)
            pos = np.arange(len(rep), dtype=np.int64) - first
        nblocks = -(-end // bs)
        if len(nblocks):
            bt.reserve_width(int(nblocks.max()))
        # a sequence's first new token in a partly filled block that changed: copied on write
        part = (start % bs != 0) & (counts > 0)
        if part.any():
            col = start[part] // bs
            firsts = (np.cumsum(counts) - counts)[part]
            if (bt.table[rows[part], col] != slots[firsts] // bs).any():
                self._cow_moved(slots)
        bt.set_blocks(rep, pos // bs, slots // bs)
        bt.num_blocks[rows] = nblocks
        bt.num_tokens[rows] = end

    def forked(self, ids: list[int], children: list[list[int]]) -> None:
        """Children share every block of their parent: copies of its row."""
        for parent, kids in zip(ids, children):
            row = self.rows.get(parent)
            if row is not None and kids:
                self.rows.update(zip(kids, self.table.copy_row(row, len(kids))))

    def committed(self, ids: list[int], upto: Any) -> None:
        """`commit`'s: tokens ``[0, upto)`` of each sequence declared written (``upto``
        None: all; else an int or None per sequence). Step plans writing them are
        done; no block is released. (A commit of ids not read here: `lost_track`.)"""
        self.moves.bump()
        rows, at = self._known(ids)
        if not len(rows):
            return
        bt = self.table
        lens = bt.num_tokens[rows]
        ups = [None] * len(ids) if upto is None else list(np.asarray(upto, dtype=object).reshape(-1))
        if len(ups) == 1 and len(ids) > 1:
            ups = ups * len(ids)
        new = np.array([int(lens[k]) if ups[j] is None else int(ups[j]) for k, j in enumerate(at.tolist())],
                       np.int64)
        old = bt.committed[rows].astype(np.int64)
        now = np.maximum(old, np.minimum(new, lens))
        bt.committed[rows] = now
        self._publish_full(rows, old, now)

    def _publish_full(self, rows: np.ndarray, old: np.ndarray, now: np.ndarray) -> None:
        """The blocks of ``rows`` that committed tokens filled from ``old`` to ``now``
        (whole blocks: a commit publishes those)."""
        first, last = old // self.block_size, now // self.block_size
        counts = np.maximum(last - first, 0)
        if counts.any():
            rep = np.repeat(rows, counts)
            cols = np.arange(len(rep), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts - first, counts)
            self.marks.publish(self.table.table[rep, cols].astype(np.int64))

    def freed(self, ids: list[int]) -> None:
        self._moved()
        rows = [r for r in map(self.rows.pop, ids, [None] * len(ids)) if r is not None]
        self._recent.clear()
        self.table.release_rows(rows)
        self.swapped.difference_update(ids)

    def forget(self, ids: list[int]) -> None:
        """Sequences whose op had no clear outcome: dropped from the mirror (the
        daemon's tables are the truth), which from now on may lack some of this
        session's sequences (``incomplete``)."""
        self.freed(ids)
        self.forgotten.update(ids)
        self.incomplete = True

    #: whether a sequence of this session may be missing here (forgotten after an op without an outcome)
    incomplete = False

    def lost_track(self) -> None:
        """An op changed sequences whose ids this mirror could not read (the daemon
        took them): everything is dropped and the daemon's tables are the truth from
        now on (``incomplete``), rather than tables that no longer hold."""
        self.forgotten.update(self.rows)
        self.clear()
        self.incomplete = True

    def truncated(self, ids: list[int], lengths: Any) -> None:
        """Sequences cut to ``lengths`` tokens (an int, or one per sequence)."""
        self._moved()
        rows, at = self._known(ids)
        if not len(rows):
            return
        bt = self.table
        lengths = np.broadcast_to(np.asarray(lengths, np.int64), (len(ids),))[at]
        keep = -(-lengths // self.block_size)
        old = bt.num_blocks[rows].astype(np.int64)
        drop = np.maximum(old - keep, 0)
        if drop.any():  # dropped entries back to the null block
            rep = np.repeat(rows, drop)
            cols = np.arange(len(rep), dtype=np.int64) - np.repeat(np.cumsum(drop) - drop - keep, drop)
            bt.set_blocks(rep, cols, np.zeros(len(rep), np.int32))
        bt.num_blocks[rows] = np.minimum(old, keep)
        bt.num_tokens[rows] = lengths
        bt.committed[rows] = np.minimum(bt.committed[rows], lengths)

    def released(self, ids: list[int], counts: list[int]) -> None:
        """`release`'s reply: each sequence's next ``counts[i]`` leading blocks became null entries."""
        self._moved()
        rows, at = self._known(ids)
        bt = self.table
        for row, n in zip(rows.tolist(), np.asarray(counts, np.int64)[at].tolist()):
            if n:
                old = int(bt.released[row])
                bt.table[row, old : old + n] = 0
                bt.released[row] = old + n

    def floors(self, ids: list[int]) -> np.ndarray | None:
        """Each mirrored sequence's first position still held, or None when none released any."""
        rows = list(map(self.rows.get, ids))
        if None in rows:
            return None
        floor = self.table.released[rows] * self.block_size
        return floor if floor.any() else None

    def swapped_out(self, ids: list[int]) -> None:
        """Swapped rows keep their stale tables but are never read until swapped in."""
        self._moved()
        self.swapped.update(i for i in ids if i in self.rows)

    def swapped_in(self, ids: list[int], tables: np.ndarray, lens: np.ndarray) -> None:
        """The new tables of swapped-in sequences (`swap_in`'s reply): their
        swapped-out blocks came back under new ids."""
        rows, at = self._known(ids)
        self.swapped.difference_update(ids)
        if not len(rows):
            return
        bt = self.table
        lens = np.asarray(lens, np.int64)[at]
        nblocks = -(-lens // self.block_size)
        bt.reserve_width(max(int(nblocks.max()), 1))
        mask = np.arange(tables.shape[1])[None, :] < nblocks[:, None]
        rep, cols = np.nonzero(mask)
        bt.set_blocks(rows[rep], cols, np.asarray(tables)[at][mask])
        bt.num_blocks[rows] = nblocks
        bt.num_tokens[rows] = lens
        # Blocks that came back are new to them: what this session once knew of those ids
        # (published when it held them before) holds no more; their committed blocks came back
        # published (still cached) or as copies of published K/V, the rest to write. A block
        # another of its sequences holds (a fork's, shared within a batch) never left the device:
        # what is known of it holds (a sibling's commit may have published it).
        blocks = np.asarray(tables)[at][mask].astype(np.int64)
        back = set(rows.tolist())
        others = [r for i, r in self.rows.items() if i not in self.swapped and r not in back]
        if others:
            blocks = blocks[~np.isin(blocks, self.table.row_blocks(np.asarray(others, np.int64)))]
        self.marks.unpublish(blocks)
        self._publish_full(rows, np.zeros(len(rows), np.int64), bt.committed[rows].astype(np.int64))

    def clear(self) -> None:
        """Forget everything (the session is lost or closed)."""
        self._moved()
        self.marks.clear()
        self.table = BlockTable(columns=("released", "committed"))
        self.rows.clear()
        self.swapped.clear()
        self._recent.clear()

