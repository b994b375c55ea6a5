"""The block pool: free list, reference counts, the prefix cache and the LRU of
evictable cached blocks.

Every device block other than block 0 is in exactly one state:

- free: on the free list, holds nothing anyone can find;
- evictable: reference count 0 but its K/V is still published in the prefix
  cache, so a later prompt can match it. Kept in ``evictable`` (an `Lru`:
  arrays, so a long prompt's blocks enter and leave it in a few array
  operations) in LRU order (oldest first); when the free list runs dry the
  oldest is evicted: its cache entry is dropped and the block is reused;
- in use: reference count >= 1 (one per block-table entry that points at it).

Block 0 is the null block: never handed out, never freed; padding entries of
block tables point at it. The pool owns the prefix cache, so publishing,
un-publishing and eviction keep the states consistent in one place. Batch
operations take block ids as arrays and are vectorised (NumPy), and batch
allocation is all-or-nothing.

Every cached block belongs to a tenant (its salt; `Tenants`): with quotas
set, eviction takes from tenants over their quota first.

Adding and dropping references (a prefix hit, a fork, a free) is the
reference-count side, `BlockRefs`, mixed in from `block_refs`.

Counters and events: ``num_evicted`` counts cached blocks evicted to make
room; with an `EventSink` attached (``events``), every key that leaves the
cache is reported there (the sequence layer reports the keys it publishes,
with their token ids, which the pool does not know).
"""

from __future__ import annotations

import numpy as np

from kvpager.block_copies import BlockCopies
from kvpager.block_refs import BlockRefs
from kvpager.errors import IntegrityError, InvalidArgument, OutOfBlocks
from kvpager.events import EventSink
from kvpager.lru import Lru
from kvpager.prefix_cache import PrefixCache
from kvpager.tenants import DEFAULT, Tenants
from kvpager.types import BlockMap

NULL_BLOCK = 0


def window_reach(window: int, block_size: int) -> int:
    """Blocks before a prompt's first new token that its sliding window of
    ``window`` positions (its own included) reads: the cached blocks a windowed
    hit holds. One at least: a hit stands on a cached block."""
    return max(1, -(-(window - 1) // block_size))


class BlockPool(BlockRefs, BlockCopies):
    """Reference-counted device blocks, the prefix cache over them, and an LRU
    of evictable cached blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise InvalidArgument(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = np.zeros(num_blocks, dtype=np.int32)
        # A stack: ids [0, _num_free) are free, the top is handed out first.
        # Low ids on top: a fresh pool hands out 1, 2, 3, ...
        self._free = np.arange(num_blocks - 1, NULL_BLOCK, -1, dtype=np.int64)
        self._num_free = num_blocks - 1
        self.evictable = Lru(num_blocks)
        self.cache = PrefixCache(num_blocks)
        self.tenants = Tenants(num_blocks, self.evictable.tick)
        self._mark = np.zeros(num_blocks, dtype=np.int64)  # scratch for free_blocks and touch
        self.num_evicted = 0  # cached blocks evicted to make room, ever
        #: where keys leaving the cache are reported (None: nowhere, at no cost)
        self.events: EventSink | None = None
        self._init_copies(num_blocks)  # copies of cached blocks' K/V in use (`block_copies`)

    # -- queries ---------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks on the free list."""
        return self._num_free

    @property
    def num_evictable(self) -> int:
        return len(self.evictable)

    @property
    def num_cached(self) -> int:
        """Blocks published in the prefix cache (in use or evictable)."""
        return len(self.cache)

    @property
    def num_used(self) -> int:
        return self.num_usable - self._num_free - len(self.evictable)

    def num_shared(self) -> int:
        """Blocks with more than one reference."""
        return int(np.count_nonzero(self.ref_cnt > 1))

    @property
    def free_ids(self) -> list[int]:
        """The free list, bottom first (the last id is handed out next)."""
        return self._free[: self._num_free].tolist()

    def get_num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free plus evictable."""
        return self._num_free + len(self.evictable)

    def get_usage(self) -> float:
        return 1.0 - self.get_num_free_blocks() / self.num_usable

    def block_map(self) -> BlockMap:
        """Every block's state, reference count and whether it is published (copies)."""
        ref = self.ref_cnt.copy()
        state = np.where(ref > 0, BlockMap.USED, BlockMap.FREE).astype(np.uint8)
        if self.evictable:
            state[self.evictable.ids()] = BlockMap.EVICTABLE
        state[NULL_BLOCK] = BlockMap.NULL
        return BlockMap(state, ref, self.cache.cached.copy())

    # -- prefix cache ------------------------------------------------------------
    def match(self, root: bytes, tokens: np.ndarray, block_size: int, max_blocks: int) -> tuple[list[bytes], list[int]]:
        """Longest published prefix of ``tokens``: the keys and block ids of the hits."""
        return self.cache.match_tokens(root, tokens, block_size, max_blocks)

    def match_window(self, root: bytes, tokens: np.ndarray, block_size: int, max_blocks: int, window: int,
                     keys: list[bytes], hits: list[int]) -> tuple[list[bytes], list[int], int, list[bytes]]:
        """Past `match`'s ``keys`` and ``hits``: the furthest hit for queries that
        read at most ``window`` positions, themselves included (`PrefixCache.match_window`):
        keys up to it, the hit blocks, the blocks left unread before them, and every usable block's key."""
        return self.cache.match_window(root, tokens, block_size, max_blocks, window_reach(window, block_size),
                                       keys, hits)

    def lookup(self, key: bytes) -> int | None:
        return self.cache.get(key)

    def publish(self, block_id: int, key: bytes, tenant: int = DEFAULT) -> bool:
        """Make a block in use matchable under ``key``, a block of ``tenant`` (a
        `Tenants` code). False: the key is published on a block in use, or the
        block already carries a key.

        A key published on an evictable block moves to this one (the idle copy
        goes to the free list): its K/V was just written again (a prompt ending
        on a block boundary recomputes its last block), so the key ages from
        this use, as vLLM's newer copy of it does; kept on the idle copy, it
        would be evicted at that copy's older place in the LRU. A block in use
        refused for a key cached on another block in use is kept as its copy
        (`kvpager.block_copies`: it takes the key when that block goes)."""
        old = self.cache.get(key)
        if old is not None and old != block_id and not self.ref_cnt[old] and not self.cache.cached[block_id]:
            self.unpublish(old, pass_on=False)
        if not self.cache.publish(block_id, key):
            if old is not None and old != block_id and self.ref_cnt[block_id] and not self.cache.cached[block_id] \
                    and not self.is_copy[block_id]:
                self._add_copy(block_id, key, tenant)
            return False
        if self.is_copy[block_id]:
            self._forget_copy(block_id)
        self.tenants.published(block_id, tenant)
        return True

    def publish_new(self, blocks: list[int], keys: list[bytes], tenants: np.ndarray,
                    ids: np.ndarray | None = None) -> bool:
        """`publish` of every block under its key, for its tenant (codes, int32),
        at once where all keys and blocks are new and distinct (True); False and
        nothing changed otherwise (`PrefixCache.publish_new`). ``ids``: ``blocks``
        as an int64 array, if the caller has it."""
        ids = np.array(blocks, dtype=np.int64) if ids is None else ids
        if not self.cache.publish_new(blocks, keys, ids):
            return False
        self.tenants.published_many(ids, tenants)
        return True

    def unpublish(self, block_id: int, pass_on: bool = True) -> None:
        """Forget a block about to be written again (its K/V will change); an
        evictable block then goes to the free list. A copy of its K/V in use
        takes its key (``pass_on``; `kvpager.block_copies`), or it leaves the cache."""
        if self.is_copy[block_id]:  # (a copy written again holds the key's K/V no more)
            self._forget_copy(block_id)
        key = self.cache.remove(block_id)
        if key is None:
            return
        if not (pass_on and self._pass_on(key)) and self.events is not None:
            self.events.removed([key])
        one = np.array([block_id], dtype=np.int64)
        self.tenants.removed(one)
        if block_id in self.evictable:
            self.evictable.remove_one(block_id)
            self.tenants.left_lru(one)
            self._push(one)

    def set_quota(self, salt: str | bytes | None, blocks: int | None) -> None:
        """A soft bound on the cached blocks of ``salt``'s tenant (see `Tenants`)."""
        self.tenants.set_quota(salt, blocks, self.evictable)

    # -- mutation --------------------------------------------------------------
    def _push(self, ids: np.ndarray) -> None:
        top = self._num_free
        self._free[top : top + len(ids)] = ids
        self._num_free = top + len(ids)

    def get_new_blocks(self, n: int, top_first: bool = False) -> np.ndarray:
        """Take ``n`` blocks (reference count 1 each; int64 ids), evicting LRU
        cached blocks if the free list is short. All or nothing: raises
        OutOfBlocks and changes nothing if fewer than ``n`` are available.
        The free list's top comes first; when it is short, its blocks come
        bottom first (``top_first``: top first, as one-at-a-time pops would)."""
        top = self._num_free
        if n <= top:
            ids = self._free[top - n : top][::-1].copy()
            self._num_free = top - n
        else:
            available = top + len(self.evictable)
            if n > available:
                raise OutOfBlocks(n, available)
            lru, tenants = self.evictable, self.tenants
            # Tenants over their quota first (their least recently used), then the LRU.
            victims = tenants.victims(n - top) if tenants.quotas else None
            if victims is not None and len(victims):
                lru.remove(victims)
                rest = lru.pop(n - top - len(victims))
                tenants.left_lru(rest)
                victims = np.concatenate([victims, rest])
            else:
                victims = lru.pop(n - top)
                tenants.left_lru(victims)
            keys = self._keys_gone(self.cache.remove_many(victims))  # (a copy in use may take a key)
            self.num_evicted += len(victims)
            if self.events is not None:
                self.events.removed(keys)
            tenants.removed(victims)
            free = self._free[:top][::-1] if top_first else self._free[:top]
            ids = np.concatenate([free, victims])
            self._num_free = 0
        self.ref_cnt[ids] = 1
        return ids

    # -- integrity -----------------------------------------------------------------
    def check(self, expected_refs: np.ndarray) -> None:
        """Raise IntegrityError unless every block is in exactly one state,
        reference counts equal ``expected_refs`` (block-table references,
        counted by the caller) and the cache maps only to live blocks."""
        ref = self.ref_cnt
        free_list = self._free[: self._num_free]
        problems = []
        is_free = np.zeros(self.num_blocks, dtype=np.int64)
        np.add.at(is_free, free_list, 1)
        if (is_free > 1).any():
            problems.append(f"free list has {int((is_free > 1).sum())} duplicates")
        # the LRU's entries counted (each evictable block listed once), and its own books
        listed = np.bincount(self.evictable.ids(), minlength=self.num_blocks)
        if (listed > 1).any():
            problems.append(f"LRU lists {int((listed > 1).sum())} blocks more than once")
        is_evictable = listed > 0
        problems += self.evictable.problems()
        if is_free[NULL_BLOCK] or is_evictable[NULL_BLOCK]:
            problems.append("null block 0 is on the free list or evictable")
        both = np.flatnonzero((is_free > 0) & is_evictable)
        if len(both):
            problems.append(f"{len(both)} blocks both free and evictable, e.g. {int(both[0])}")
        expected = np.asarray(expected_refs)
        for b in np.flatnonzero(ref[1:] != expected[1:])[:20].tolist():
            problems.append(f"block {b + 1}: ref_cnt {ref[b + 1]} but {expected[b + 1]} block-table references")
        used = ref > 0
        used[NULL_BLOCK] = False
        for b in np.flatnonzero(used & ((is_free > 0) | is_evictable))[:5].tolist():
            problems.append(f"block {b} in use (ref {ref[b]}) but also free/evictable")
        idle = ~used & (is_free == 0) & ~is_evictable
        idle[NULL_BLOCK] = False
        for b in np.flatnonzero(idle)[:5].tolist():
            problems.append(f"block {b} has ref 0 but is neither free nor evictable (leaked)")
        if (ref < 0).any():
            problems.append(f"negative reference counts, e.g. block {int(np.flatnonzero(ref < 0)[0])}")
        in_use = int(used.sum())
        if self._num_free + len(self.evictable) + in_use != self.num_usable and not problems:
            problems.append("block states do not add up")
        problems += self.cache.problems()
        problems += self.copy_problems()
        problems += self.tenants.problems(self.cache.cached, self.evictable)
        cached = self.cache.cached
        for b in np.flatnonzero(cached & ~used & ~is_evictable)[:5].tolist():
            problems.append(f"cache maps to block {b}, which is free")
        if (is_evictable & ~cached).any():
            problems.append("an evictable block is not in the prefix cache")
        if problems:
            raise IntegrityError(
                f"block pool integrity violated (free={self._num_free}, "
                f"evictable={len(self.evictable)}, in_use={in_use}, total={self.num_usable}, "
                f"cached={len(self.cache)}): " + "; ".join(problems[:20])
            )
