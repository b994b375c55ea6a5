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


class RecentItems:
    """Up to ``size`` (key, owner, value) entries, least recently used dropped
    first (``size`` 0 keeps none), found by a scan newest first: for a few
    entries whose keys differ early, cheaper than hashing one key. Also the
    daemon's memo of decode-step requests (`kvpager.request_memo`)."""

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = RECENT_BATCHES):
        self._entries: list[tuple[Any, Any, Any]] = []
        self.size = size

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Any, owner: Any = WHOEVER) -> Any:
        """The value kept for ``key`` and ``owner`` (`WHOEVER`: any owner's), or None."""
        entries = self._entries
        for i in range(len(entries) - 1, -1, -1):
            k, o, value = entries[i]
            if (owner is WHOEVER or o == owner) and k == key:
                if i != len(entries) - 1:
                    entries.append(entries.pop(i))
                return value
        return None

    def put(self, key: Any, owner: Any, value: Any) -> Any:
        """Keep ``value`` for ``key`` and ``owner``; returns it."""
        entries = self._entries
        if len(entries) >= self.size:
            if not self.size:
                return value
            del entries[0]
        entries.append((key, owner, value))
        return value

    def clear(self) -> None:
        """Forget every entry."""
        self._entries.clear()


class RecentBatches(RecentItems):
    """Batches' rows (``value``): keys are the ids as sent, an owner is the one
    the rows were checked for (`WHOEVER` in `get`: the rows being the same for
    all). ``size`` 0: every batch is looked up."""

    __slots__ = ()

    def put(self, key: bytes | list[int], owner: Any, rows: np.ndarray) -> np.ndarray:
        """Keep ``rows`` (made read-only: every later call with ``key`` shares
        them) for ``key`` as checked for ``owner``; returns them. Call `clear`
        when rows are given back (they may be reused)."""
        rows.flags.writeable = False
        return super().put(key if isinstance(key, bytes) else list(key), owner, rows)
