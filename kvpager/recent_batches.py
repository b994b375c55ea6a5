"""The rows of recently checked batches, found again by their ids alone.

A decode loop sends the same sequence ids step after step; a daemon serving
several workers, or one worker pipelining two micro-batches, sees a few such
batches in turn. While no sequence is freed, a batch's rows (and every check
made when they were looked up: known ids, distinct, the owner's) stay true,
so a repeated batch needs one comparison instead of a lookup. Rows move only
when a sequence is freed, so a free forgets every batch (`clear`).

Keys are the ids as sent: bytes for packed ids (an int64 array's buffer) or a
list of ints; a packed batch and the same ids as a list are different keys.
Entries are scanned newest first: a comparison of two different batches ends
at the first id (or at the length), so a scan of a few costs less than
hashing one batch of 256 ids."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Batches remembered: enough for a daemon's workers each stepping one batch,
#: or pipelined micro-batches, without a scan that costs more than a lookup.
RECENT_BATCHES = 8
#: `RecentBatches.get`'s owner for a caller that checks no owner (the rows alone).
WHOEVER = object()


class RecentBatches:
    """Up to ``size`` (key, owner, rows) entries, least recently used dropped
    first (``size`` 0 keeps none: every batch is looked up)."""

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = RECENT_BATCHES):
        self._entries: list[tuple[bytes | list[int], Any, np.ndarray]] = []
        self.size = size

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes | list[int], owner: Any = WHOEVER) -> np.ndarray | None:
        """The rows kept for ``key`` checked for ``owner`` (`WHOEVER`: for any
        owner, the rows being the same for all), or None."""
        entries = self._entries
        for i in range(len(entries) - 1, -1, -1):
            k, o, rows = entries[i]
            if (owner is WHOEVER or o == owner) and k == key:
                if i != len(entries) - 1:
                    entries.append(entries.pop(i))
                return rows
        return None

    def put(self, key: bytes | list[int], owner: Any, rows: np.ndarray) -> np.ndarray:
        """Keep ``rows`` (made read-only: every later call with ``key`` shares
        them) for ``key`` as checked for ``owner``; returns them."""
        rows.flags.writeable = False
        entries = self._entries
        if len(entries) >= self.size:
            if not self.size:
                return rows
            del entries[0]
        entries.append((key if isinstance(key, bytes) else list(key), owner, rows))
        return rows

    def clear(self) -> None:
        """Forget every batch: rows were given back, and may be reused."""
        self._entries.clear()
