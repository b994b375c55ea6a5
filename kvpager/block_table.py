"""Block tables of many sequences as rows of one preallocated int32 array.

Row ``r`` holds one sequence's block ids in ``table[r, :num_blocks[r]]`` and
its length in ``num_tokens[r]``; entries past ``num_blocks[r]`` are 0 (the
null block), so a slice of rows is a padded block table as the kernels take
it. Rows are handed out and taken back by the owner (the allocator, or a
worker's mirror of its own sequences); both dimensions grow geometrically,
so appending is amortised O(1) per block and a step's tables are one gather.

An owner that keeps more per-row state names it as ``columns``: int64 columns
of one array (``row_data``, after the block and token counts), each read as
an attribute (``BlockTable(columns=["owner"]).owner`` is a 1-D view); a row's
counts and columns grow, copy and clear in one operation each. These views
are replaced when rows grow, so read them again after adding rows instead of
keeping a reference.

Batch methods take rows as an int array and are vectorised; they assume the
rows are live and distinct (the caller checked its ids).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import numpy as np

from kvpager.errors import IntegrityError

#: A table of at least these bytes gives memory back as its rows go (`BlockTable.shrink`).
SHRINK_FROM = 64 << 20
#: Padded entries a run of rows holds at most where work goes over every entry (`BlockTable.row_chunks`)
CHUNK_ENTRIES = 1 << 20


class BlockTable:
    """Rows of block ids with a token count each (and the owner's ``columns``)."""

    def __init__(self, rows: int = 64, width: int = 16, columns: Seq[str] = ()):
        rows = max(rows, 1)
        self.table = np.zeros((rows, max(width, 1)), dtype=np.int32)
        self._set_whole_from()
        self.column_names = tuple(columns)
        for name in self.column_names:
            if hasattr(self, name) or name in ("num_blocks", "num_tokens"):
                raise ValueError(f"column name {name!r} is taken")
        #: Every per-row number in one int64 array [rows, 2 + columns]: the
        #: number of blocks, the token count, then the owner's columns; so a
        #: row's state copies (a fork) or clears (a free) in one operation.
        self.row_data = np.zeros((rows, 2 + len(self.column_names)), dtype=np.int64)
        self._views()
        self._mark = np.zeros(rows, dtype=np.int64)  # scratch for `distinct`
        # Low rows first, so live rows stay dense and a gather touches few pages.
        self._free_rows: list[int] = list(range(rows - 1, -1, -1))
        # rows given back since `shrink` last looked, and the live rows then (`_released`)
        self._since_shrink = self._live_at_look = 0

    def _set_whole_from(self) -> None:
        #: A row of at least this many blocks is copied or cleared whole (one
        #: operation, the null entries past its end with it); a shorter one,
        #: in a table more than about twice as wide, by its used part.
        self.whole_from = max(0, -(-(self.table.shape[1] - 16) // 2))

    def _views(self) -> None:
        data = self.row_data
        self.num_blocks = data[:, 0]  # views: read them again after rows grow
        self.num_tokens = data[:, 1]
        self.cols = data[:, 2:]  # [rows, columns]
        for j, name in enumerate(self.column_names):
            setattr(self, name, data[:, 2 + j])

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

        data = np.zeros((new, self.row_data.shape[1]), dtype=np.int64)
        data[:old] = self.row_data
        self.row_data = data
        self._views()
        self._mark = np.zeros(new, dtype=np.int64)
        self._free_rows[:0] = range(new - 1, old - 1, -1)  # the same list: a caller may hold it

    def reserve_width(self, width: int) -> None:
        """Make every row able to hold ``width`` blocks (geometric growth)."""
        if width > self.width:
            new = max(width, 2 * self.width)
            table = np.zeros((len(self.num_blocks), new), dtype=np.int32)
            table[:, : self.width] = self.table
            self.table = table
            self._set_whole_from()

    def _take_rows(self, k: int) -> list[int]:
        if len(self._free_rows) < k:
            self._grow_rows(len(self.num_blocks) + k)
        free = self._free_rows
        if k == 1:
            return [free.pop()]
        rows = free[len(free) - k :][::-1]
        del free[len(free) - k :]
        return rows

    # -- rows ----------------------------------------------------------------------
    def add_row(self, blocks: Seq[int] | np.ndarray, num_tokens: int) -> int:
        """A new row holding ``blocks``; returns its index."""
        [row] = self._take_rows(1)
        n = len(blocks)
        self.reserve_width(n)
        self.table[row, :n] = blocks
        self.num_blocks[row] = n
        self.num_tokens[row] = num_tokens
        return row

    def add_rows(self, blocks: np.ndarray, lengths: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
        """New rows: row ``i`` holds the next ``lengths[i]`` ids of ``blocks`` (every
        row's blocks back to back). Returns the rows (int64)."""
        k = len(lengths)
        rows = np.asarray(self._take_rows(k), dtype=np.int64)
        if k:
            lengths = np.asarray(lengths, dtype=np.int64)
            self.reserve_width(int(lengths.max()))
            rep = np.repeat(rows, lengths)
            cols = np.arange(len(rep)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            self.table[rep, cols] = blocks
            self.num_blocks[rows] = lengths
            self.num_tokens[rows] = num_tokens
        return rows

    def copy_row(self, src: int, times: int = 1) -> list[int]:
        """``times`` new rows equal to row ``src`` (a fork)."""
        rows = self._take_rows(times)
        n = self.num_blocks.item(src)
        if times == 1:  # one child: scalar indexing, no row-list conversions
            row = rows[0]
            self.table[row, :n] = self.table[src, :n]
            self.row_data[row] = self.row_data[src]
            return rows
        self.table[rows, :n] = self.table[src, :n]
        self.row_data[rows] = self.row_data[src]
        return rows

    def copy_rows(self, srcs: np.ndarray) -> np.ndarray:
        """A new row equal to each of ``srcs`` (repeats allowed: forks); returns them (int64)."""
        rows = np.asarray(self._take_rows(len(srcs)), dtype=np.int64)
        if len(srcs) == 1:
            src, row = int(srcs[0]), int(rows[0])
            n = self.num_blocks[src]
            self.table[row, :n] = self.table[src, :n]
            self.row_data[row] = self.row_data[src]
        elif len(srcs):
            width = int(self.num_blocks[srcs].max())
            self.table[rows, :width] = self.table[srcs, :width]
            self.row_data[rows] = self.row_data[srcs]
        return rows

    def release_row(self, row: int, entries: np.ndarray | None = None) -> None:
        """Give one row back (`release_rows` of one, with scalar indexing);
        ``entries``: the row's block ids (a view, as `blocks` gives), if the caller has them."""
        if entries is None:
            entries = self.table[row, : self.num_blocks.item(row)]
        entries.fill(0)
        self.row_data[row] = 0
        self._free_rows.append(row)
        if self.table.nbytes >= SHRINK_FROM:
            self._released(1)

    def release_rows(self, rows: Seq[int] | np.ndarray) -> None:
        """Give rows back (their entries and columns are zeroed for the next owner)."""
        if len(rows) == 1:
            self.release_row(int(rows[0]))
            return
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        width = int(self.num_blocks[rows].max())
        self.table[rows, :width] = 0
        self.row_data[rows] = 0
        self._free_rows.extend(rows[::-1].tolist())
        if self.table.nbytes >= SHRINK_FROM:
            self._released(len(rows))

    def _released(self, n: int) -> None:
        """``n`` rows given back in a large table: once an eighth of its rows went
        since the last look, or its live rows halved since then, give memory back
        (`shrink`), so a table grown by a burst of sequences or one long one does
        not keep its size for good, whatever order they end in."""
        self._since_shrink += n
        live = self.num_live
        if 8 * self._since_shrink >= len(self.num_blocks) or 2 * live <= self._live_at_look:
            self._since_shrink, self._live_at_look = 0, live
            self.shrink()

    def shrink(self) -> None:
        """Give back rows past the last live one and columns past twice the longest
        live row, where that at least halves the table (row indices of live rows
        stay as they are; free rows past the new end are dropped)."""
        live_width = int(self.num_blocks.max()) if len(self.num_blocks) else 0
        free = self._free_rows
        held = np.ones(len(self.num_blocks), dtype=bool)
        held[free] = False
        last = int(np.flatnonzero(held)[-1]) + 1 if held.any() else 0
        rows = max(64, 2 * last)
        width = max(16, 2 * live_width)
        if rows * width * 2 > self.table.size:
            return
        rows, width = min(rows, len(self.num_blocks)), min(width, self.width)
        self.table = self.table[:rows, :width].copy()  # (copies: a view would keep the old array alive)
        self._set_whole_from()
        self.row_data = self.row_data[:rows].copy()
        self._views()
        self._mark = np.zeros(rows, dtype=np.int64)
        free[:] = [r for r in free if r < rows]  # (the same list: a caller may hold it)

    def distinct(self, rows: np.ndarray) -> bool:
        """Whether ``rows`` (int64) holds no row twice."""
        if len(rows) < 2:
            return True
        k = np.arange(len(rows))
        mark = self._mark
        mark[rows] = k
        return not np.count_nonzero(mark[rows] != k)

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

    def entries(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every entry of ``rows``, row after row: (block ids, row of each, column of
        each), int64."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.num_blocks[rows].astype(np.int64)
        rep = np.repeat(rows, counts)
        cols = np.arange(len(rep)) - np.repeat(np.cumsum(counts) - counts, counts)
        return self.table[rep, cols].astype(np.int64), rep, cols

    def row_blocks(self, rows: np.ndarray, reverse: bool = False) -> np.ndarray:
        """The block ids of ``rows``, row after row (int64, a copy); ``reverse``:
        each row's last to first (the order a free releases them)."""
        if len(rows) == 1:  # one sequence: a slice
            row = rows[0]
            blocks = self.table[row, : self.num_blocks[row]]
            return (blocks[::-1] if reverse else blocks).astype(np.int64)
        counts = self.num_blocks[rows]
        width = int(counts.max()) if len(rows) else 0
        padded = self.table[rows, :width]  # one gather of whole rows (contiguous), then the used part of each
        if reverse:
            padded = padded[:, ::-1]
            used = np.arange(width) >= (width - counts)[:, None]
        else:
            used = np.arange(width) < counts[:, None]
        return (padded.ravel() if used.all() else padded[used]).astype(np.int64)

    def row_chunks(self, rows: np.ndarray, width: int | None = None, most: int = CHUNK_ENTRIES) -> list[np.ndarray]:
        """``rows`` in consecutive runs of at most ``most`` padded entries each (at
        least a row a run; ``width``: the columns read a row, default the longest
        row's), so work over every entry of many long rows (a free of 65,535 forks
        of a 4,000-block sequence: 266M entries) holds one run's temporaries at a
        time, not gigabytes."""
        rows = np.asarray(rows, dtype=np.int64)
        if width is None:
            width = int(self.num_blocks[rows].max()) if len(rows) else 0
        per = max(1, most // max(width, 1))
        return [rows[i : i + per] for i in range(0, len(rows), per)] if len(rows) > per else [rows]

    def references(self, num_blocks: int) -> np.ndarray:
        """How many entries of live rows point at each block id: int64 [num_blocks]
        (an independent count for integrity checks), a run of rows at a time."""
        refs = np.zeros(num_blocks, dtype=np.int64)
        for rows in self.row_chunks(np.flatnonzero(self.num_blocks > 0)):
            counts = self.num_blocks[rows]
            width = int(counts.max()) if len(rows) else 0
            used = np.arange(width)[None, :] < counts[:, None]
            refs += np.bincount(self.table[rows, :width][used], minlength=num_blocks)
        return refs

    def check(self, rows: Seq[int] | np.ndarray) -> None:
        """Raise IntegrityError unless ``rows`` are exactly the live rows and
        every entry past a row's end is the null block."""
        live = set(range(len(self.num_blocks))) - set(self._free_rows)
        if len(live) + len(self._free_rows) != len(self.num_blocks) or live != set(np.asarray(rows).tolist()):
            raise IntegrityError(
                f"block table rows out of step: {len(live)} live, {len(self._free_rows)} free, "
                f"{len(self.num_blocks)} in all, {len(rows)} sequences")
        for part in self.row_chunks(np.arange(len(self.num_blocks)), self.width):
            past = np.arange(self.width)[None, :] >= self.num_blocks[part][:, None]
            if self.table[part][past].any():
                raise IntegrityError("block table holds entries past a row's end")
