"""Rows that continue other rows' sequences, as forks: beam search's reordering,
and a `PagedCache`'s reorders, repeats and selections.

`continue_rows(pool, seqs, parents)`: new row i continues row ``parents[i]``.
The first new row that continues a sequence takes it; the others fork it
(`KVPool.fork`: its blocks shared, its partly filled last one copied on write),
in one fork call a count of children; the sequences no row continues are
returned for the caller to free (after its own bookkeeping). A row with no
sequence (None) gives None to each row that continues it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvpager.batch_calls import free_all


def continue_rows(pool: Any, seqs: Sequence[int | None], parents: Sequence[int]
                  ) -> tuple[list[int | None], list[int], list[int]]:
    """(each new row's sequence, the forks made, the sequences no row continues).
    A fork call that raises frees the forks made before it and raises."""
    new: list[int | None] = [None] * len(parents)
    taken: set[int] = set()
    forks: dict[int, list[int]] = {}  # parent -> the new rows that fork it
    for i, p in enumerate(parents):
        if p not in taken:
            taken.add(p)
            new[i] = seqs[p]
        elif seqs[p] is not None:
            forks.setdefault(p, []).append(i)
    by_count: dict[int, list[int]] = {}
    for p, rows in forks.items():
        by_count.setdefault(len(rows), []).append(p)
    made: list[int] = []
    try:
        for count, ps in by_count.items():
            for p, kids in zip(ps, pool.fork([seqs[p] for p in ps], count)):
                made.extend(kids)
                for i, kid in zip(forks[p], kids):
                    new[i] = kid
    except BaseException:
        free_all(pool, made)
        raise
    gone = [s for r, s in enumerate(seqs) if r not in taken and s is not None]
    return new, made, gone
