"""The block pool: free list, reference counts and the LRU of evictable cached blocks.

Every device block other than block 0 is in exactly one state:

- free: on ``free_ids``, holds nothing anyone can find;
- evictable: reference count 0 but its K/V is still published in the prefix
  cache, so a later prompt can match it. Kept in ``evictable`` in LRU order
  (oldest first); when the free list runs dry the oldest is evicted: its
  cache entry is dropped and the block is reused;
- in use: reference count >= 1 (one per block-table entry that points at it).

Block 0 is the null block: never handed out, never freed; padding entries of
block tables point at it. Every operation is O(1) per block, and batch
allocation is all-or-nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Container, Iterable

from kvpager.errors import IntegrityError, InvalidArgument, OutOfBlocks

NULL_BLOCK = 0


class BlockPool:
    """Reference-counted device blocks with an LRU of evictable cached blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise InvalidArgument(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt: list[int] = [0] * num_blocks
        # Low ids pop first: a fresh pool hands out 1, 2, 3, ...
        self.free_ids: list[int] = list(range(num_blocks - 1, NULL_BLOCK, -1))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        # Called with a block id when an evictable block is reclaimed, so the
        # prefix cache can forget it. Set by the owner of the cache.
        self.on_evict: Callable[[int], None] = lambda block_id: None
        # Blocks still published in the prefix cache: one whose count reaches 0
        # becomes evictable rather than free. Set by the owner of the cache.
        self.cached: Container[int] = frozenset()

    # -- queries ---------------------------------------------------------------
    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def get_num_free_blocks(self) -> int:
        """Blocks an allocation can take now: free plus evictable."""
        return len(self.free_ids) + len(self.evictable)

    def get_usage(self) -> float:
        return 1.0 - self.get_num_free_blocks() / self.num_usable

    # -- mutation --------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[int]:
        """Take ``n`` blocks (reference count 1 each), evicting LRU cached blocks
        if the free list is short. All or nothing: raises OutOfBlocks and changes
        nothing if fewer than ``n`` are available."""
        free = self.free_ids
        available = len(free) + len(self.evictable)
        if n > available:
            raise OutOfBlocks(n, available)
        if n <= len(free):
            ids = free[len(free) - n :]
            del free[len(free) - n :]
            ids.reverse()
        else:
            ids = free[:]
            free.clear()
            evictable, on_evict = self.evictable, self.on_evict
            for _ in range(n - len(ids)):
                block_id, _ = evictable.popitem(last=False)
                on_evict(block_id)
                ids.append(block_id)
        ref = self.ref_cnt
        for b in ids:
            ref[b] = 1
        return ids

    def touch(self, ids: Iterable[int]) -> None:
        """Add one reference to each block; an evictable block leaves the LRU."""
        ref, evictable = self.ref_cnt, self.evictable
        for b in ids:
            if ref[b] == 0:
                if b not in evictable:
                    raise IntegrityError(f"bug: touched block {b} that is neither in use nor evictable")
                del evictable[b]
            ref[b] += 1

    def free_blocks(self, ids: Iterable[int]) -> None:
        """Drop one reference from each block. A block reaching 0 becomes
        evictable if it is cached (most recently used end) or free otherwise.
        Pass a block table in reverse so a sequence's tail is evicted first."""
        ref, cached, evictable, free = self.ref_cnt, self.cached, self.evictable, self.free_ids
        for b in ids:
            count = ref[b] - 1
            if count <= 0:
                if count < 0 or b == NULL_BLOCK:
                    raise IntegrityError(f"bug: freeing block {b} with reference count {ref[b]}")
                if b in cached:
                    evictable[b] = None
                else:
                    free.append(b)
            ref[b] = count

    def release_evictable(self, block_id: int) -> None:
        """An evictable block lost its cache entry: move it to the free list."""
        if block_id in self.evictable:
            del self.evictable[block_id]
            self.free_ids.append(block_id)

    def check(self, expected_refs: list[int]) -> None:
        """Raise IntegrityError unless every block is in exactly one state and
        reference counts equal ``expected_refs`` (block-table references)."""
        free = set(self.free_ids)
        problems = []
        if len(free) != len(self.free_ids):
            problems.append(f"free list has {len(self.free_ids) - len(free)} duplicates")
        if NULL_BLOCK in free or NULL_BLOCK in self.evictable:
            problems.append("null block 0 is on the free list or evictable")
        both = free & set(self.evictable)
        if both:
            problems.append(f"{len(both)} blocks both free and evictable, e.g. {min(both)}")
        in_use = 0
        for b in range(1, self.num_blocks):
            r = self.ref_cnt[b]
            if r != expected_refs[b]:
                problems.append(f"block {b}: ref_cnt {r} but {expected_refs[b]} block-table references")
            if r > 0:
                in_use += 1
                if b in free or b in self.evictable:
                    problems.append(f"block {b} in use (ref {r}) but also free/evictable")
            elif b not in free and b not in self.evictable:
                problems.append(f"block {b} has ref 0 but is neither free nor evictable (leaked)")
            if len(problems) > 20:
                break
        total = len(free) + len(self.evictable) + in_use
        if total != self.num_usable and not problems:
            problems.append("block states do not add up")
        if problems:
            raise IntegrityError(
                f"block pool integrity violated (free={len(self.free_ids)}, "
                f"evictable={len(self.evictable)}, in_use={in_use}, total={self.num_usable}): "
                + "; ".join(problems[:20])
            )
