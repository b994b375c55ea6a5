"""The LRU of evictable cached blocks as arrays, with lazy deletion.

A block that becomes evictable gets the next tick of a clock (``tick[b]``,
one int64 per block; `NOT_IN` while it is not evictable) and an entry
(block, tick) appended to a queue. Taking a block out of the LRU (a prefix
hit, an eviction, an un-publish) is one store into ``tick``: its entry no
longer matches and is skipped when the queue's head reaches it. So a run of
blocks entering, leaving or being evicted is a few array operations, where
an ``OrderedDict`` paid a Python call a block (a 1M-token prompt's 62,500
blocks: 25-60 ms of the daemon's loop for its free, and again for its eviction).

Entries sit in the queue in tick order, so the live ones, head to tail, are
the blocks least recently made evictable first: the order an ``OrderedDict``
appended to and popped from the front kept. Stale entries are dropped when
the queue fills (`TickQueue._compact`): its arrays hold at most about twice
the entries ever live at once, and each entry is skipped or moved a bounded
number of times.

`TickQueue` is the queue alone, over a tick array it shares: `Lru` owns the
pool's ticks and one queue of every evictable block; `Tenants` keeps one
queue per quota'd tenant over the same ticks (a block leaving the pool's LRU
leaves its tenant's at no cost).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import numpy as np

#: A block's tick while it is not evictable.
NOT_IN = -1
#: The tick of an entry taken out of its own queue alone (`TickQueue.pop`): never a block's.
_KILLED = -2
_FIRST = 64  # a queue's first capacity
_EMPTY = np.zeros(0, dtype=np.int64)
_EMPTY.flags.writeable = False


class TickQueue:
    """Blocks in the order they were pushed, as (block, tick) entries in two
    arrays; an entry is live while ``ticks[block]`` (shared, written by the
    owner of the ticks) still holds its tick. ``count``: live entries, kept by
    whoever makes entries stale (the queue cannot see a store into ``ticks``)."""

    def __init__(self, ticks: np.ndarray):
        self.ticks = ticks
        self._block = np.empty(_FIRST, dtype=np.int64)
        self._tick = np.empty(_FIRST, dtype=np.int64)
        self._head = self._tail = 0  # entries [head, tail) may be live
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids().tolist())

    def _live(self, lo: int, hi: int) -> np.ndarray:
        return self.ticks[self._block[lo:hi]] == self._tick[lo:hi]

    def ids(self) -> np.ndarray:
        """The live blocks, oldest first (int64, a copy)."""
        h, t = self._head, self._tail
        return self._block[h:t][self._live(h, t)]

    def push(self, blocks: np.ndarray, ticks: np.ndarray) -> None:
        """Append ``blocks`` (not in this queue) with their ticks, later than any here."""
        n = len(blocks)
        if self._tail + n > len(self._block):
            self._compact(n)
        t = self._tail
        self._block[t : t + n] = blocks
        self._tick[t : t + n] = ticks
        self._tail = t + n
        self.count += n

    def _compact(self, room: int) -> None:
        """Keep only the live entries, at the front, with ``room`` more after
        them: in place while they fill at most half the arrays, else in arrays
        twice that large (or, far too large, half as large), so the next
        compaction is at least as many pushes away as it moves entries."""
        h, t = self._head, self._tail
        keep = np.flatnonzero(self._live(h, t))
        n, cap = len(keep), len(self._block)
        want = 2 * (n + room)
        if want > cap or (cap > 4 * want and cap > _FIRST):
            cap = max(want, _FIRST)
        block, tick = self._block[h:t][keep], self._tick[h:t][keep]
        if cap != len(self._block):
            self._block = np.empty(cap, dtype=np.int64)
            self._tick = np.empty(cap, dtype=np.int64)
        self._block[:n] = block
        self._tick[:n] = tick
        self._head, self._tail = 0, n

    def first(self, k: int) -> np.ndarray:
        """Positions of the first ``k`` live entries (all of them if fewer), in
        order; the head moves past the stale entries before the first. Chunks
        of the queue are read, each twice as long as the last, from ``2 * k``."""
        found, got = [], 0
        lo, tail, step = self._head, self._tail, max(2 * k, 64)
        while got < k and lo < tail:
            hi = min(lo + step, tail)
            pos = np.flatnonzero(self._live(lo, hi))
            if not got:
                self._head = lo + int(pos[0]) if len(pos) else hi
            if len(pos):
                pos = pos[: k - got] + lo
                found.append(pos)
                got += len(pos)
            lo, step = hi, 2 * step
        if not found:
            return _EMPTY
        return found[0] if len(found) == 1 else np.concatenate(found)

    def blocks_at(self, positions: np.ndarray) -> np.ndarray:
        return self._block[positions]

    def consumed(self, upto: int) -> None:
        """Every entry before position ``upto`` is stale now (taken from the front)."""
        self._head = max(self._head, upto)

    # -- one block, as an OrderedDict names it (a scan: not on any hot path) -----------------
    def pop(self, block: int) -> None:
        """Take ``block``'s entry out of this queue alone (the shared tick stays)."""
        h, t = self._head, self._tail
        at = np.flatnonzero((self._block[h:t] == block) & self._live(h, t))
        if not len(at):
            raise KeyError(block)
        self._tick[h + at] = _KILLED
        self.count -= len(at)

    def move_to_end(self, block: int) -> None:
        """``block``'s entry moved to the end of this queue (its tick kept)."""
        self.pop(block)
        self.push(np.array([block], dtype=np.int64), self.ticks[[block]])

    def problems(self) -> list[str]:
        """What disagrees with a count over the entries themselves (empty if nothing)."""
        out = []
        h, t = self._head, self._tail
        if not 0 <= h <= t <= len(self._block) or len(self._tick) != len(self._block):
            return [f"queue bounds out of order: head {h}, tail {t}, capacity {len(self._block)}"]
        live = self._live(h, t)
        ids = self._block[h:t][live]
        if len(ids) != self.count:
            out.append(f"queue counts {self.count} live entries but holds {len(ids)}")
        ids = np.sort(ids)
        if (ids[1:] == ids[:-1]).any():
            out.append("a block has two live entries in one queue")
        if (np.diff(self._tick[h:t][live]) <= 0).any():
            out.append("live entries out of tick order")
        return out


class Lru:
    """Every evictable block, least recently made evictable first: ``tick``
    per block and one `TickQueue`. Reads as the ordered collection of block
    ids it stands for: ``len``, ``in``, iteration oldest first."""

    def __init__(self, num_blocks: int):
        self.tick = np.full(num_blocks, NOT_IN, dtype=np.int64)
        self.clock = 0  # the next tick
        self._queue = TickQueue(self.tick)

    def __len__(self) -> int:
        return self._queue.count

    def __contains__(self, block: object) -> bool:
        try:
            b = operator.index(block)  # type: ignore[arg-type]
        except TypeError:  # not a block id
            return False
        return 0 <= b < len(self.tick) and self.tick[b] >= 0

    def __iter__(self) -> Iterator[int]:
        return iter(self._queue)

    def ids(self) -> np.ndarray:
        """The evictable blocks, oldest first (int64, a copy)."""
        return self._queue.ids()

    def add(self, blocks: np.ndarray) -> np.ndarray:
        """Blocks just made evictable (distinct, none evictable now), in this
        order, at the most recently used end. Returns their ticks."""
        n = len(blocks)
        ticks = np.arange(self.clock, self.clock + n, dtype=np.int64)
        self.clock += n
        self.tick[blocks] = ticks
        self._queue.push(blocks, ticks)
        return ticks

    def remove(self, blocks: np.ndarray) -> None:
        """Blocks taken out (distinct int64 ids, each evictable now)."""
        self.tick[blocks] = NOT_IN
        self._queue.count -= len(blocks)

    def remove_one(self, block: int) -> None:
        """`remove` of one evictable block, without an array."""
        self.tick[block] = NOT_IN
        self._queue.count -= 1

    def outside(self, blocks: np.ndarray) -> np.ndarray:
        """Those of ``blocks`` that are not evictable."""
        return blocks[self.tick[blocks] < 0]

    def pop(self, n: int) -> np.ndarray:
        """Take out the ``n`` least recently used blocks (at most ``len``), oldest first."""
        q = self._queue
        if n <= 0:
            return _EMPTY
        pos = q.first(n)
        blocks = q.blocks_at(pos)
        self.remove(blocks)
        if len(pos):  # every entry up to the last taken is stale now
            q.consumed(int(pos[-1]) + 1)
        return blocks

    def problems(self) -> list[str]:
        """What is wrong, counted over the ticks and the queue's entries apart
        (empty if nothing): every block with a tick has exactly one live
        entry, and no entry of a block without one is live."""
        out = self._queue.problems()
        marked = np.flatnonzero(self.tick >= 0)
        listed = np.sort(self._queue.ids())
        if len(marked) != len(listed) or not np.array_equal(marked, listed):
            out.append(f"{len(marked)} blocks carry an LRU tick but {len(listed)} are listed")
        if len(marked) and int(self.tick.max()) >= self.clock:
            out.append("an LRU tick past the clock")
        return out
