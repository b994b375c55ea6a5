"""Block tables of many sequences as rows of one preallocated int32 array.

Row ``r`` holds one sequence's block ids in ``table[r, :num_blocks[r]]`` and
its length in ``num_tokens[r]``; entries past ``num_blocks[r]`` are 0 (the
null block), so a slice of rows is a padded block table as the kernels take
it. Rows are handed out and taken back by the owner (the allocator, or a
worker's mirror of its own sequences); both dimensions grow geometrically,
so appending is amortised O(1) per block and a step's tables are one gather.

Batch methods take rows as an int array and are vectorised; they assume the
rows are live and distinct (the caller checked its ids).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

from kvpager.errors import IntegrityError


class BlockTable:
    """Rows of block ids with a token count each."""

    def __init__(self, rows: int = 64, width: int = 16):
        self.table = np.zeros((max(rows, 1), max(width, 1)), dtype=np.int32)
        self.num_blocks = np.zeros(max(rows, 1), dtype=np.int32)
        self.num_tokens = np.zeros(max(rows, 1), dtype=np.int64)
        # Low rows first, so live rows stay dense and a gather touches few pages.
        self._free_rows: list[int] = list(range(len(self.num_blocks) - 1, -1, -1))

    # -- capacity ------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.table.shape[1]

    @property
    def num_live(self) -> int:
        return len(self.num_blocks) - len(self._free_rows)

    def _grow_rows(self, need: int) -> None:
        old = len(self.num_blocks)
        new = max(need, 2 * old)
        table = np.zeros((new, self.width), dtype=np.int32)
        table[:old] = self.table
        self.table = table
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros(new - old, np.int32)])
        self.num_tokens = np.concatenate([self.num_tokens, np.zeros(new - old, np.int64)])
        self._free_rows = list(range(new - 1, old - 1, -1)) + self._free_rows

    def reserve_width(self, width: int) -> None:
        """Make every row able to hold ``width`` blocks (geometric growth)."""
        if width > self.width:
            new = max(width, 2 * self.width)
            table = np.zeros((len(self.num_blocks), new), dtype=np.int32)
            table[:, : self.width] = self.table
            self.table = table

    # -- rows ----------------------------------------------------------------------
    def add_row(self, blocks: Seq[int] | np.ndarray, num_tokens: int) -> int:
        """A new row holding ``blocks``; returns its index."""
        if not self._free_rows:
            self._grow_rows(len(self.num_blocks) + 1)
        row = self._free_rows.pop()
        n = len(blocks)
        self.reserve_width(n)
        self.table[row, :n] = blocks
        self.num_blocks[row] = n
        self.num_tokens[row] = num_tokens
        return row

    def copy_row(self, src: int, times: int = 1) -> list[int]:
        """``times`` new rows equal to row ``src`` (a fork)."""
        if len(self._free_rows) < times:
            self._grow_rows(len(self.num_blocks) + times)
        rows = self._free_rows[len(self._free_rows) - times :][::-1]
        del self._free_rows[len(self._free_rows) - times :]
        n = int(self.num_blocks[src])
        self.table[rows, :n] = self.table[src, :n]
        self.num_blocks[rows] = n
        self.num_tokens[rows] = self.num_tokens[src]
        return rows

    def release_rows(self, rows: Seq[int] | np.ndarray) -> None:
        """Give rows back (their entries are zeroed for the next owner)."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        width = int(self.num_blocks[rows].max())
        self.table[rows, :width] = 0
        self.num_blocks[rows] = 0
        self.num_tokens[rows] = 0
        self._free_rows.extend(rows[::-1].tolist())

    def blocks(self, row: int) -> np.ndarray:
        """Row ``row``'s block ids (a view)."""
        return self.table[row, : self.num_blocks[row]]

    # -- changes ---------------------------------------------------------------------
    def append_blocks(self, rows: np.ndarray, blocks: np.ndarray) -> None:
        """Append one block to each of ``rows`` (distinct)."""
        if not len(rows):
            return
        ends = self.num_blocks[rows]
        self.reserve_width(int(ends.max()) + 1)
        self.table[rows, ends] = blocks
        self.num_blocks[rows] = ends + 1

    def extend(self, row: int, blocks: Seq[int] | np.ndarray) -> None:
        """Append several blocks to one row."""
        n, k = int(self.num_blocks[row]), len(blocks)
        if k:
            self.reserve_width(n + k)
            self.table[row, n : n + k] = blocks
            self.num_blocks[row] = n + k

    def set_blocks(self, rows: np.ndarray, cols: np.ndarray, blocks: np.ndarray) -> None:
        """``table[rows[i], cols[i]] = blocks[i]`` for existing entries (copy-on-write, swap)."""
        self.table[rows, cols] = blocks

    def truncate(self, row: int, num_blocks: int) -> np.ndarray:
        """Keep the first ``num_blocks`` blocks of ``row``; returns the dropped ones (a copy)."""
        n = int(self.num_blocks[row])
        dropped = self.table[row, num_blocks:n].copy()
        self.table[row, num_blocks:n] = 0
        self.num_blocks[row] = min(n, num_blocks)
        return dropped

    # -- reading -----------------------------------------------------------------------
    def gather(self, rows: Seq[int] | np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The padded block tables of ``rows`` (int32 [B, width], null-block
        padding; width defaults to the longest of them) and their token counts
        (int32 [B]). One vectorised gather: no Python loop over rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if width is None:
            width = int(self.num_blocks[rows].max()) if len(rows) else 0
        width = max(int(width), 1)
        if width <= self.width:
            tables = self.table[rows, :width]
        else:  # wider than any row: pad with null blocks
            tables = np.zeros((len(rows), width), dtype=np.int32)
            tables[:, : self.width] = self.table[rows]
        return tables, self.num_tokens[rows].astype(np.int32)

    def references(self, num_blocks: int) -> np.ndarray:
        """How many entries of live rows point at each block id: int64 [num_blocks]
        (an independent count for integrity checks)."""
        live = self.num_blocks > 0
        mask = np.arange(self.width)[None, :] < self.num_blocks[live][:, None]
        return np.bincount(self.table[live][mask], minlength=num_blocks)

    def check(self, rows: Seq[int] | np.ndarray) -> None:
        """Raise IntegrityError unless ``rows`` are exactly the live rows and
        every entry past a row's end is the null block."""
        live = set(range(len(self.num_blocks))) - set(self._free_rows)
        if len(live) + len(self._free_rows) != len(self.num_blocks) or live != set(np.asarray(rows).tolist()):
            raise IntegrityError(
                f"block table rows out of step: {len(live)} live, {len(self._free_rows)} free, "
                f"{len(self.num_blocks)} in all, {len(rows)} sequences")
        past = np.arange(self.width)[None, :] >= self.num_blocks[:, None]
        if self.table[past].any():
            raise IntegrityError("block table holds entries past a row's end")
