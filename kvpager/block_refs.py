"""The block pool's reference-count side: adding references (a prefix hit
takes a cached block, a fork shares a sequence's blocks) and dropping them (a
free, a truncate, a copy-on-write), with what a block's last reference going
means: the LRU of evictable blocks if it is published in the prefix cache,
the free list otherwise.

`BlockRefs` is mixed into `BlockPool`, which supplies ``ref_cnt`` (int32 per
block), the free list (``_free``, ``_num_free``, ``_push``), ``evictable``
(the LRU: `Lru`), ``cache``, ``tenants`` and ``_mark`` (scratch). Block ids come as
int64 arrays (int32 ones cost a conversion per indexing); every method has a
vectorised general case and short cuts for one sequence's distinct blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from kvpager.errors import IntegrityError

if TYPE_CHECKING:
    from kvpager.lru import Lru
    from kvpager.prefix_cache import PrefixCache
    from kvpager.tenants import Tenants

_ONE = np.int32(1)
#: The most references a block holds: its count is an int32 (`ref_cnt`); forks and pins
#: that would pass it are refused.
MAX_REFS = (1 << 31) - 1


def _as_ids(ids: Iterable[int] | np.ndarray) -> np.ndarray:
    if isinstance(ids, np.ndarray):
        return ids
    return np.fromiter(ids, dtype=np.int64)


class BlockRefs:
    """Reference counting of `BlockPool`'s blocks."""

    ref_cnt: np.ndarray
    evictable: Lru
    cache: PrefixCache
    tenants: Tenants
    _free: np.ndarray
    _num_free: int
    _mark: np.ndarray
    copy_of: dict[int, tuple[bytes, int]]
    _copies_take_keys: Callable[[np.ndarray], list[int]]

    def touch(self, ids: Iterable[int] | np.ndarray, distinct: bool = False) -> None:
        """Add one reference to each block (repeats add one each); an evictable
        block leaves the LRU. ``distinct``: the caller knows there are no repeats."""
        ids = _as_ids(ids)
        if not len(ids):
            return
        ref = self.ref_cnt
        before = ref[ids]
        if np.count_nonzero(before) != len(ids):
            idle = ids[before == 0]
            if not distinct and len(idle) > 1:  # each once: the last listing of a repeat kept
                k = np.arange(len(idle))
                mark = self._mark
                mark[idle] = k
                idle = idle[mark[idle] == k]
            lru = self.evictable
            stray = lru.outside(idle)
            if len(stray):
                raise IntegrityError(f"bug: touched block {int(stray[0])} that is neither in use nor evictable")
            lru.remove(idle)
            self.tenants.left_lru(idle)
        if distinct:
            ref[ids] += _ONE
        else:
            np.add.at(ref, ids, _ONE)

    def share(self, ids: np.ndarray, times: int | np.ndarray = 1, distinct: bool = False) -> None:
        """Add ``times`` references to each of blocks already in use (a fork; an
        array: one count per id); ``distinct``: no repeats among ``ids`` (one
        sequence's table)."""
        if not isinstance(times, int):
            times = np.asarray(times, dtype=np.int32)
            if distinct:
                self.ref_cnt[ids] += times
            else:
                np.add.at(self.ref_cnt, ids, times)
            return
        if distinct:
            if not len(ids):
                return
            ref = self.ref_cnt
            before = ref[ids].tolist()
            v = before[0]
            if before.count(v) == len(before):  # one count for all (a sequence's own blocks): a store
                ref[ids] = v + times
            else:
                ref[ids] += np.int32(times)
        else:
            np.add.at(self.ref_cnt, ids, np.int32(times))

    def release_all(self, ids: np.ndarray) -> None:
        """Every reference of each of ``ids`` (distinct int64) goes at once, as
        `free_blocks` of every one (its holders left together: a swapped-out
        group), in the order given."""
        self.ref_cnt[ids] = 1
        self.free_blocks(ids, distinct=True)

    def free_table(self, ids: np.ndarray, before: list[int] | None = None) -> None:
        """`free_blocks` of one sequence's blocks (distinct int64 ids, in the
        order they go), with short cuts for the common cases: all still
        shared, or all this sequence's own with nothing cached. ``before``:
        their reference counts, if the caller read them already. ``ids`` may
        be a view of the free list's room above its top (where one
        sequence's free stages them): a push there writes them over
        themselves or a copy of some of them, read before."""
        ref = self.ref_cnt
        if before is None:
            before = ref[ids].tolist()
        if before:
            v = before[0]
            if v > 1 and before.count(v) == len(before):  # every block stays in use
                ref[ids] = v - 1
                return
            if v == 1 and not self.cache.key_to_block and before.count(1) == len(before):
                ref[ids] = 0  # every block goes to the free list (`_push`, inline)
                top = self._num_free
                self._free[top : top + len(before)] = ids
                self._num_free = top + len(before)
                return
        self.free_blocks(ids, distinct=True)

    def free_blocks(self, ids: Iterable[int] | np.ndarray, distinct: bool = False) -> None:
        """Drop one reference from each block (repeats drop one each). A block
        reaching 0 becomes evictable if it is cached (most recently used end)
        or free otherwise, in the order its last reference goes: pass a block
        table in reverse so a sequence's tail is evicted first. ``distinct``:
        the caller knows there are no repeats (one sequence's table). Pass
        int64 ids: int32 ones cost a conversion per indexing."""
        if type(ids) is not np.ndarray:
            ids = _as_ids(ids)
        if not len(ids):
            return
        ref = self.ref_cnt
        after = None  # the counts after, unless every block had the same count
        if distinct:  # one sequence's blocks: a plain indexed update (ufunc.at is slower)
            before = ref[ids].tolist()
            v = before[0]
            if v > 0 and before.count(v) == len(before):  # one count for all: a store, no array arithmetic
                ref[ids] = v - 1
                if v > 1:
                    return
            else:
                ref[ids] -= _ONE
                after = ref[ids]
        else:
            np.subtract.at(ref, ids, _ONE)
            after = ref[ids]
        if after is not None and np.count_nonzero(after):
            zero = after <= 0
            done = ids[zero]
            if not len(done):
                return
            gone = after[zero]
            if np.count_nonzero(gone):  # below 0: freed once too often (the null block: always)
                np.add.at(ref, ids, _ONE)
                bad = int(done[gone < 0][0])
                raise IntegrityError(f"bug: freeing block {bad} with reference count {ref[bad]}")
        else:  # every reference went (a sequence's own blocks): no masks
            done = ids
        if not distinct and len(done) > 1:
            # A block listed more than once reaches 0 at its last listing: keep that one.
            k = np.arange(len(done))
            mark = self._mark
            mark[done] = k  # with repeats, the last write stays
            done = done[mark[done] == k]
        holders = self._copies_take_keys(done) if self.copy_of else None  # (`kvpager.block_copies`)
        if self.cache.key_to_block:  # anything cached at all (no `len` call)
            cached = self.cache.cached[done]
            if np.count_nonzero(cached):
                idle = done[cached]
                self.tenants.became_evictable(idle, self.evictable.add(idle))
                done = done[~cached]
        if holders:  # idle blocks whose key a copy took: nothing in them anyone can find, next out
            done = np.concatenate([done, np.array(holders, dtype=np.int64)])
        top = self._num_free  # `_push`, inline
        self._free[top : top + len(done)] = done
        self._num_free = top + len(done)
