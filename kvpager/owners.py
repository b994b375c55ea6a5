"""`OwnerIndex`: who owns which sequences (the daemon's sessions).

Each owner gets a small integer code, stored per row in the block table's
``owner`` column, so an ownership check of a batch is one array comparison;
and the index keeps each owner's sequence ids in id order, so listing or
ending one session costs what it holds, not a scan of every sequence. The
embedded pool's owner is None (code 0, the value of a fresh row); it keeps
its (possibly empty) entry, other owners are forgotten with their last id.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument

#: The code of an owner nobody has: a check against it fails for every row.
NO_CODE = -1


def unhashable(owner: Any) -> InvalidArgument:
    return InvalidArgument(f"owner must be a hashable name, got {type(owner).__name__}")


class OwnerIndex:
    """Owner <-> code, and each owner's live sequence ids."""

    def __init__(self) -> None:
        self.owned: dict[Any, dict[int, None]] = {}  # owner -> its seq ids, in id order
        self.by_code: dict[int, dict[int, None]] = {}  # code -> the same dict (one lookup from a row's column)
        self._codes: dict[Any, int] = {None: 0}
        self._owners: dict[int, Any] = {0: None}
        self._next = itertools.count(1)

    def code(self, owner: Any) -> int:
        """The code of ``owner``, NO_CODE if it owns nothing (InvalidArgument for an
        owner that cannot be one: unhashable)."""
        try:
            return self._codes.get(owner, NO_CODE)
        except TypeError:
            raise unhashable(owner) from None

    def owner(self, code: int) -> Any:
        return self._owners[code]

    def live(self) -> list[Any]:
        """Every owner with a live sequence."""
        return [o for o, mine in self.owned.items() if mine]

    def ids(self, owner: Any) -> list[int]:
        """``owner``'s live sequence ids, in id order."""
        try:
            return list(self.owned.get(owner, ()))
        except TypeError:
            raise unhashable(owner) from None

    def add(self, owner: Any, ids: Seq[int]) -> int:
        """``ids`` (new, increasing) now belong to ``owner``; returns its code."""
        code = self._codes.get(owner)
        if code is None:
            code = self._codes[owner] = next(self._next)
            self._owners[code] = owner
        mine = self.owned.get(owner)
        if mine is None:
            mine = self.owned[owner] = self.by_code[code] = {}
        if len(ids) == 1:
            mine[ids[0]] = None
        else:
            mine.update(dict.fromkeys(ids))
        return code

    def add_one(self, code: int, seq_id: int) -> None:
        """``seq_id`` (new) belongs to the owner of ``code``, who owns others already (a fork's child)."""
        self.by_code[code][seq_id] = None

    def add_codes(self, codes: np.ndarray, ids: list[int]) -> None:
        """``ids[i]`` now belongs to the owner of ``codes[i]`` (children of a fork)."""
        for code, group in self._groups(codes, ids):
            self.add(self._owners[code], group)

    def drop(self, codes: np.ndarray, ids: list[int]) -> None:
        """``ids[i]`` (owned by the owner of ``codes[i]``) are gone; an owner left
        with none is forgotten (`forget`)."""
        for code, group in self._groups(codes, ids):
            mine = self.by_code[code]
            deque(map(mine.pop, group), maxlen=0)
            if not mine:
                self.forget(code)

    def drop_one(self, code: int, seq_id: int) -> None:
        """`drop` of one id."""
        mine = self.by_code[code]
        del mine[seq_id]
        if not mine:
            self.forget(code)

    def forget(self, code: int) -> None:
        """The owner of ``code`` has no sequence left: drop its entries. None
        (code 0, the embedded pool's owner) keeps its entry, empty: an embedded
        pool that frees its last sequence and allocates again pays nothing."""
        if code:
            owner = self._owners[code]
            del self.owned[owner], self.by_code[code], self._codes[owner], self._owners[code]

    @staticmethod
    def _groups(codes: np.ndarray, ids: list[int]) -> list[tuple[int, list[int]]]:
        if len(ids) == 1 or len(ids) and not np.count_nonzero(codes != codes[0]):
            return [(int(codes[0]), ids)]
        return [(int(c), [ids[k] for k in np.flatnonzero(codes == c).tolist()]) for c in np.unique(codes)]

    def counts(self) -> dict[int, int]:
        """Sequences per owner code (for integrity checks); -1: the two indexes
        (by owner, by code) disagree."""
        counts = {self._codes[o]: len(mine) for o, mine in self.owned.items()}
        if len(self.by_code) != len(self.owned) or any(self.by_code.get(c) is not self.owned[self._owners[c]]
                                                        for c in counts):
            counts[-1] = 1
        return counts
