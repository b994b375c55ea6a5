"""Copies of a cached block's K/V in other blocks, and the key passed to them.

A full block computed again while its key is cached on another block in use
(a prompt ending on a block boundary, fully cached, recomputes its last
block: the prefix cache's hits leave one token to compute) holds the same
K/V under the same key. The pool keeps one block a key (`BlockPool.publish`
refuses the second), and vLLM caches both: its key then lives until its last
copy is evicted, while kvpager's lived only as long as the first block, so a
prompt whose newer copy was still held, or freed last, missed where vLLM hit
(`tools/peers_vllm.py`'s block-boundary trace: 60 of 1,000 requests).

So the pool remembers each such copy (its key and tenant) while it is in use,
and passes the key on without a word to the event stream (the key never
leaves the cache):

- where the key's block leaves the cache (evicted; or written again, a
  truncated sequence appending into it), the first copy takes the key;
- where a copy's last reference goes while the key's block is idle (in the
  LRU), the copy takes the key at the LRU's newest end and the idle block
  goes to the free list (it holds nothing another copy does not).

A key then lives as long as its newest copy, as in vLLM, in one block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from kvpager.lru import Lru
    from kvpager.prefix_cache import PrefixCache
    from kvpager.tenants import Tenants


class BlockCopies:
    """`BlockPool`'s copies of cached blocks (mixed in)."""

    ref_cnt: np.ndarray
    evictable: Lru
    cache: PrefixCache
    tenants: Tenants

    def _init_copies(self, num_blocks: int) -> None:
        #: key -> copies of its block in use, oldest first; block -> (key, tenant code)
        self.copies: dict[bytes, list[int]] = {}
        self.copy_of: dict[int, tuple[bytes, int]] = {}
        self.is_copy = np.zeros(num_blocks, dtype=bool)

    def holds_key(self, blocks: np.ndarray | int) -> np.ndarray | np.bool_:
        """Whether ``blocks`` hold K/V a key answers for: published, or kept as a
        copy (one written in place must be un-published first: `BlockPool.unpublish`;
        a client's staged write into one is refused)."""
        return self.cache.cached[blocks] | self.is_copy[blocks]

    def _add_copy(self, block: int, key: bytes, tenant: int) -> None:
        """``block`` (in use, uncached) holds the K/V of ``key``, cached on another block."""
        self.copies.setdefault(key, []).append(block)
        self.copy_of[block] = (key, tenant)
        self.is_copy[block] = True

    def _forget_copy(self, block: int) -> tuple[bytes, int]:
        key, tenant = self.copy_of.pop(block)
        self.is_copy[block] = False
        blocks = self.copies[key]
        blocks.remove(block)
        if not blocks:
            del self.copies[key]
        return key, tenant

    def _pass_on(self, key: bytes) -> bool:
        """``key`` has just left its block: its first copy, if any, takes it (True)."""
        blocks = self.copies.get(key)
        if not blocks:
            return False
        block = blocks[0]
        _, tenant = self._forget_copy(block)
        self.cache.publish(block, key)
        self.tenants.published(block, tenant)
        return True

    def _keys_gone(self, keys: list[bytes | None]) -> list[bytes | None]:
        """Of keys just evicted, those no copy took (the ones to report removed)."""
        if not self.copies:
            return keys
        return [key for key in keys if key is None or not self._pass_on(key)]

    def _copies_take_keys(self, done: np.ndarray) -> list[int]:
        """Of blocks whose last reference just went, the copies: each takes its key
        where the key's block is idle, which leaves the LRU and the cache; those
        blocks, for the free list."""
        idle_holders = []
        for block in done[self.is_copy[done]].tolist():
            key, tenant = self._forget_copy(block)
            holder = self.cache.get(key)
            if holder is None or self.ref_cnt[holder]:
                continue  # (a holder in use keeps it: this copy goes free)
            one = np.array([holder], dtype=np.int64)
            if holder in self.evictable:
                self.evictable.remove_one(holder)
                self.tenants.left_lru(one)
                idle_holders.append(holder)
            elif np.flatnonzero(done == holder)[-1] > np.flatnonzero(done == block)[-1]:
                continue  # (its last reference went in this free too, after this copy's: the newer keeps it)
            self.cache.remove(holder)  # (one going in this free too, before it: to the free list with the rest)
            self.cache.publish(block, key)
            self.tenants.published(block, tenant)  # (before the holder's removal: its tenant stays known)
            self.tenants.removed(one)
        return idle_holders

    def copy_problems(self) -> list[str]:
        """What is wrong with the books of copies (for `BlockPool.check`)."""
        problems = []
        listed = sum(len(b) for b in self.copies.values())
        if listed != len(self.copy_of) or int(np.count_nonzero(self.is_copy)) != len(self.copy_of):
            problems.append(f"{listed} copies listed by key, {len(self.copy_of)} by block, "
                            f"{int(np.count_nonzero(self.is_copy))} marked")
        for block, (key, _) in list(self.copy_of.items())[:1000]:
            holder = self.cache.get(key)
            if not self.ref_cnt[block] or self.cache.cached[block] or holder is None or holder == block:
                problems.append(f"block {block} is kept as a copy of a cached block, but it is "
                                f"{'cached' if self.cache.cached[block] else 'idle' if not self.ref_cnt[block] else 'in use'}"
                                f", its key {'not cached' if holder is None else 'on block ' + str(holder)}")
                break
        return problems
