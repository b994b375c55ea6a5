"""Finding and checking a batch's sequences: ids -> rows, the checks every op
runs before it changes anything (unknown ids, duplicates, ownership, swapped
out), and the padded tables of resident sequences.

`SequenceLookup` is mixed into `SequenceManager`, which supplies ``rows``
(id -> row), ``table`` (the `BlockTable`), ``owners``, ``block_size`` and the
counters read here (``num_swapped``, ``num_released``) and ``recent``, the
batches checked lately (`RecentBatches`). The per-row columns are named here too (`COLUMNS`), with
the positions of the ones the scalar paths read in a row's `row_data`.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument, NotOwner, SequenceSwapped, UnknownSequence

#: Per-row state beside the block table: the sequence id, its owner (a code,
#: 0 = None), tokens whose K/V is committed, blocks offered to the prefix
#: cache, known token ids (prompt + tail), whether it is swapped out (0/1) and
#: its last block (0: none, or swapped out), which append and stats read, and
#: how many leading blocks it released (`seq_release`: null entries).
COLUMNS = ("seq_id", "owner", "committed", "published", "known", "swapped", "last", "released")

#: Positions in a row of `BlockTable.row_data` ([num_blocks, num_tokens, *COLUMNS]).
OWNER, SWAPPED, RELEASED, LAST = (2 + COLUMNS.index(c) for c in ("owner", "swapped", "released", "last"))

ANY_OWNER = object()  # `batch` without an ownership check (None is an owner: the embedded one)


class SequenceLookup:
    """Ids to rows and the checks of a batch, for `SequenceManager`."""

    rows: dict[int, int]

    def lookup(self, seq_ids: list[int]) -> np.ndarray:
        """Rows of ``seq_ids`` (int64); UnknownSequence names the first unknown id."""
        try:
            if len(seq_ids) == 1:
                return np.array([self.rows[seq_ids[0]]], dtype=np.int64)
            if not seq_ids:
                return np.zeros(0, dtype=np.int64)
            # itemgetter looks every id up in one C call (a map calls back per id)
            return np.fromiter(itemgetter(*seq_ids)(self.rows), np.int64, len(seq_ids))
        except (KeyError, TypeError):
            for s in seq_ids:
                try:
                    self.rows[s]
                except (KeyError, TypeError):
                    raise UnknownSequence(s) from None
            raise

    def batch(self, seq_ids: list[int] | np.ndarray, op: str | None, owner: Any = ANY_OWNER,
              name: str | None = None) -> np.ndarray:
        """Rows of a batch of distinct, known ids (a list, or packed: an int64
        array); resident ones if ``op`` needs them; ``owner``'s only if one is
        given (UnknownSequence / NotOwner before anything else, as the daemon
        checks a session's ids). Recent batches' rows are kept: a decode loop
        sends the same ids step after step, and finds them by a comparison (of
        the bytes, for packed ids)."""
        key = seq_ids.tobytes() if isinstance(seq_ids, np.ndarray) else seq_ids
        rows = self.recent.get(key, owner)
        if rows is None:
            if isinstance(seq_ids, np.ndarray):
                seq_ids = seq_ids.tolist()
            try:
                rows = self.lookup(seq_ids)
                if owner is not ANY_OWNER:
                    self._check_rows_owner(seq_ids, rows, owner)
            except (UnknownSequence, NotOwner):
                if len(set(seq_ids)) != len(seq_ids):  # (the caller's own mistake first, as `check_owner` has it)
                    raise self._duplicates(name or op) from None
                raise
            if not self.table.distinct(rows):
                raise self._duplicates(name or op)
            self.recent.put(key, owner, rows)  # read-only from now: shared with later calls
        if op is not None and self.num_swapped:
            swapped = self.table.swapped[rows]
            if np.count_nonzero(swapped):
                raise SequenceSwapped(int(seq_ids[int(np.argmax(swapped))]), op)
        return rows

    @staticmethod
    def _duplicates(op: str | None) -> InvalidArgument:
        return InvalidArgument(f"{op or 'operation'}: duplicate sequence ids in one batch")

    def check_owner(self, seq_ids: list[int], owner: Any, op: str | None = None) -> None:
        """UnknownSequence / NotOwner unless every id is live and ``owner``'s; ids
        given twice InvalidArgument before either, as the ops themselves say
        (looked for only once a check fails: the common call pays nothing)."""
        try:
            self._check_rows_owner(seq_ids, self.lookup(seq_ids), owner)
        except (UnknownSequence, NotOwner):
            if len(set(seq_ids)) != len(seq_ids):
                raise self._duplicates(op) from None
            raise

    def _check_rows_owner(self, seq_ids: list[int], rows: np.ndarray, owner: Any) -> None:
        bad = self.table.owner[rows] != self.owners.code(owner)
        if np.count_nonzero(bad):
            raise NotOwner(f"sequence {int(seq_ids[int(np.argmax(bad))])} belongs to another session")

    def tables(self, seq_ids: list[int], op: str = "attend") -> tuple[np.ndarray, np.ndarray]:
        """Padded int32 block tables and int32 lengths of resident sequences
        (SequenceSwapped naming ``op`` for a swapped-out one)."""
        return self.table.gather(self._resident(seq_ids, op))

    def rows_now(self, seq_ids: list[int], op: str = "attend") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`tables` and the committed token counts of resident sequences: what a
        step plan's guard checks it against (`kvpager.plan_guard`)."""
        rows = self._resident(seq_ids, op)
        return (*self.table.gather(rows), self.table.committed[rows])

    def _resident(self, seq_ids: list[int], op: str) -> np.ndarray:
        rows = self.recent.get(seq_ids)  # the ids the step's append just took: no lookup
        if rows is None:
            rows = self.lookup(seq_ids)
        if self.num_swapped:
            swapped = self.table.swapped[rows]
            if np.count_nonzero(swapped):
                raise SequenceSwapped(seq_ids[int(np.argmax(swapped))], op)
        return rows

    def floors(self, seq_ids: list[int]) -> np.ndarray | None:
        """Each sequence's first position still held (int64), or None when none of
        them released any blocks."""
        if not self.num_released:
            return None
        floor = self.table.released[self.lookup(seq_ids)] * self.block_size
        return floor if floor.any() else None
