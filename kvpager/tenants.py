"""Tenants of the prefix cache: the salt each cached block was published
under, how many cached blocks each tenant holds, quotas, and which evictable
blocks eviction takes first.

A tenant is a salt (a model, an adapter, a customer): a block a sequence
publishes belongs to the tenant of that sequence's salt, identified by the
salt's root key (so ``"x"`` and ``b"x"`` are one tenant, and the default
``None`` salt is tenant 0). A quota bounds a tenant's cached blocks
(published, in use or evictable), softly: a tenant may hold more while
memory is free, but when the pool must evict, it first takes the least
recently used evictable blocks among tenants over their quota, each only
until it is back at its quota, and then the global least recently used.
Blocks in use (by sequences or pins) are never evicted, quota or not.

`BlockPool` owns one `Tenants` and tells it what it publishes, removes and
makes evictable; only tenants with a quota keep an LRU of their own (a
`TickQueue` over the pool LRU's ticks: a block leaving the pool's LRU leaves
its tenant's with it), so a pool without quotas pays nothing here when a
block turns evictable, and with quotas a run of blocks is a few array
operations.
A tenant's code is released once it holds no block and has no quota: a
daemon serving many salts over time keeps only the live ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.lru import TickQueue
from kvpager.pins import salt_bytes
from kvpager.prefix_cache import root_key
from kvpager.validate import whole

if TYPE_CHECKING:
    from kvpager.lru import Lru

#: The code of the default tenant (salt None); never released.
DEFAULT = 0


class Tenants:
    """Per-block tenant codes, per-tenant cached-block counts, quotas and the
    evictable blocks of every tenant with a quota (oldest first)."""

    def __init__(self, num_blocks: int, ticks: np.ndarray):
        self.of_block = np.zeros(num_blocks, dtype=np.int32)  # meaningful for cached blocks only
        # The pool LRU's ticks (`Lru.tick`): when each evictable block became evictable,
        # which orders blocks of different tenants as the pool's LRU does.
        self.ticks = ticks
        self.usage = np.zeros(8, dtype=np.int64)  # cached blocks per code
        self.quotas: dict[int, int] = {}
        self.lru: dict[int, TickQueue] = {}  # quota'd tenants' evictable blocks
        self._queued = np.zeros(8, dtype=bool)  # per code: it has an LRU of its own (a quota)
        self._codes: dict[bytes, int] = {root_key(None): DEFAULT}
        self.roots: list[bytes | None] = [root_key(None)]  # code -> root; None: a free code
        self.salts: list[str | bytes | None] = [None]  # code -> the salt as first given
        self._free: list[int] = []

    # -- codes -----------------------------------------------------------------------
    def code(self, root: bytes, salt: str | bytes | None) -> int:
        """The code of the tenant of ``root`` (the root key of ``salt``), made if new."""
        c = self._codes.get(root)
        if c is None:
            c = self._free.pop() if self._free else len(self.roots)
            if c == len(self.roots):
                self.roots.append(root)
                self.salts.append(salt)
                if c >= len(self.usage):
                    self.usage = np.concatenate([self.usage, np.zeros(len(self.usage), np.int64)])
                    self._queued = np.concatenate([self._queued, np.zeros(len(self._queued), bool)])
            else:
                self.roots[c], self.salts[c] = root, salt
            self._codes[root] = c
        return c

    def find(self, salt: str | bytes | None) -> int | None:
        """The code of ``salt``'s tenant if it has one now."""
        return self._codes.get(root_key(salt))

    def release_idle(self, codes: Iterable[int]) -> None:
        """Release each of ``codes`` that holds no block and has no quota: what a caller
        of `code` does when nothing it meant to publish was published (a commit whose
        full blocks were all released, a key cached already), or a daemon serving
        many salts keeps an entry for each it was ever given."""
        self._release_idle(np.fromiter(codes, dtype=np.int64))

    def _release_idle(self, codes: np.ndarray) -> None:
        for c in codes.tolist():
            if c != DEFAULT and self.usage[c] == 0 and c not in self.quotas and self.roots[c] is not None:
                del self._codes[self.roots[c]]
                self.roots[c] = self.salts[c] = None
                self._free.append(c)

    # -- what the block pool tells ------------------------------------------------------
    def published(self, block: int, code: int) -> None:
        self.of_block[block] = code
        self.usage[code] += 1

    def published_many(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        """`published` of each block with its code."""
        self.of_block[blocks] = codes
        counts = np.bincount(codes)
        self.usage[: len(counts)] += counts

    def removed(self, blocks: np.ndarray) -> None:
        """Blocks gone from the prefix cache (evicted or un-published)."""
        counts = np.bincount(self.of_block[blocks])
        self.usage[: len(counts)] -= counts
        self._release_idle(np.flatnonzero(counts))

    def became_evictable(self, blocks: np.ndarray, ticks: np.ndarray) -> None:
        """Cached blocks whose last reference went, in this order (the pool's LRU
        end), with the ticks the pool's LRU gave them."""
        if self.lru:
            codes = self.of_block[blocks]
            mine = self._queued[codes]
            if np.count_nonzero(mine):
                blocks, ticks, codes = blocks[mine], ticks[mine], codes[mine]
                if (codes == codes[0]).all():  # (one tenant's blocks: one push)
                    self.lru[int(codes[0])].push(blocks, ticks)
                    return
                order = np.argsort(codes, kind="stable")  # each tenant's blocks in the pool's order
                codes = codes[order]
                cuts = np.flatnonzero(codes[1:] != codes[:-1]) + 1
                for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(codes)]):
                    at = order[lo:hi]
                    self.lru[int(codes[lo])].push(blocks[at], ticks[at])

    def left_lru(self, blocks: np.ndarray) -> None:
        """Evictable blocks taken back into use, evicted or un-published (distinct
        ids, their pool LRU ticks cleared already: only the counts change here)."""
        if self.lru:
            codes = self.of_block[blocks]
            codes = codes[self._queued[codes]]
            if len(codes):
                counts = np.bincount(codes)
                lru = self.lru
                for c in np.flatnonzero(counts).tolist():
                    lru[c].count -= int(counts[c])

    def victims(self, n: int) -> np.ndarray:
        """Up to ``n`` evictable blocks of tenants over their quota, least recently
        used first across them, each tenant only until it is back at its quota
        (int64). They leave this LRU; the caller evicts them (and clears their
        ticks, which makes their entries here stale).

        Taking the tenant with the oldest first block, one block at a time, is
        merging the tenants' lists, each cut at its excess: so the ``n`` oldest
        of every over-quota tenant's first ``min(excess, n)`` blocks."""
        lru, firsts, picks = self.lru, [], []
        for c, q in self.quotas.items():
            mine = lru[c]
            excess = int(self.usage[c]) - q
            if excess > 0 and mine.count:
                pos = mine.first(min(excess, n))
                firsts.append((mine, pos))
                picks.append(mine.blocks_at(pos))
        if not picks:
            return np.zeros(0, dtype=np.int64)
        if len(picks) == 1:
            taken = picks[0][:n]
        else:
            every = np.concatenate(picks)
            taken = every[np.argsort(self.ticks[every])[:n]]  # (ticks are distinct)
        # what each tenant gave is the front of its picks (in tick order): its queue moves past it
        last = self.ticks[taken[-1]]
        for (mine, pos), got in zip(firsts, picks):
            k = int(np.searchsorted(self.ticks[got], last, side="right"))
            if k:
                mine.count -= k
                mine.consumed(int(pos[k - 1]) + 1)
        return taken

    # -- quotas ------------------------------------------------------------------------
    def set_quota(self, salt: str | bytes | None, blocks: int | None, evictable: Lru) -> None:
        """Bound ``salt``'s cached blocks softly by ``blocks`` (None: no quota)."""
        root = root_key(salt)  # InvalidArgument for a salt of the wrong type
        if blocks is not None:
            blocks = quota_blocks(blocks)
        if blocks is None:
            c = self._codes.get(root)
            if c is not None and self.quotas.pop(c, None) is not None:
                del self.lru[c]
                self._queued[c] = False
                self._release_idle(np.array([c]))
            return
        c = self.code(root, salt)
        if c not in self.lru:  # its evictable blocks, in the pool's LRU order
            ids = evictable.ids()
            mine = ids[self.of_block[ids] == c]
            self.lru[c] = TickQueue(self.ticks)
            self.lru[c].push(mine, self.ticks[mine])
            self._queued[c] = True
        self.quotas[c] = blocks

    # -- inspection ----------------------------------------------------------------------
    def rows(self, cached: np.ndarray, evictable: np.ndarray, pinned: np.ndarray, most: int,
             salt_room: int) -> tuple[list[tuple], int]:
        """(salt, cached, evictable, pinned, quota) of the tenants with cached
        blocks or a quota, most cached first, and how many there are. Past
        ``most`` tenants or ``salt_room`` bytes of salts, only every tenant with
        a quota, then the largest others, up to either bound. Masks are per block.

        Chosen in NumPy, a row made only for each tenant listed: a client may
        name a tenant with every salt it sends, and a row made for each of tens
        of thousands took the daemon's loop 250 ms a `stats` (and a metrics
        scrape's snapshot) where the pool's own figures took 16."""
        n = len(self.roots)
        usage = self.usage[:n]
        quota = np.zeros(n, dtype=bool)
        quota[list(self.quotas)] = True
        live = np.flatnonzero((usage > 0) | quota)  # (a released code holds no block and has no quota)
        order = live[np.argsort(-usage[live], kind="stable")]  # most cached first, then by code
        if len(order) > most or sum(salt_bytes(self.salts[c]) for c in order.tolist()) > salt_room:
            first = np.concatenate([order[quota[order]], order[~quota[order]]])[:most].tolist()
            kept, room = [], salt_room
            for c in first:
                room -= salt_bytes(self.salts[c])
                if room < 0:
                    break
                kept.append(c)
            order = np.array(sorted(kept, key=lambda c: -usage[c]), dtype=np.int64)
        if not len(order):
            return [], len(live)
        of = self.of_block
        ev = np.bincount(of[evictable & cached], minlength=n)[order].tolist()
        pin = np.bincount(of[pinned & cached], minlength=n)[order].tolist()
        codes = order.tolist()
        rows = list(zip([self.salts[c] for c in codes], usage[order].tolist(), ev, pin,
                        [self.quotas.get(c) for c in codes]))
        return rows, len(live)

    def problems(self, cached: np.ndarray, evictable: Lru) -> list[str]:
        """What disagrees with an independent count over the blocks (empty if nothing)."""
        out = []
        n = len(self.roots)
        counted = np.bincount(self.of_block[cached], minlength=n)
        if len(counted) > n or not np.array_equal(counted, self.usage[:n]) or self.usage[n:].any():
            bad = np.flatnonzero(counted[:n] != self.usage[:n])
            out.append(f"tenant usage disagrees with the cached blocks, e.g. code {bad[:1].tolist()}")
        if any(self.roots[c] is None for c in self.quotas) or set(self.lru) != set(self.quotas) \
                or set(np.flatnonzero(self._queued).tolist()) != set(self.lru):
            out.append("a quota without a live tenant or its LRU")
        live = np.fromiter((r is not None for r in self.roots), dtype=bool, count=n)
        if set(self._codes.values()) != set(np.flatnonzero(live).tolist()):
            out.append("tenant codes and roots disagree")
        live[DEFAULT] = False
        live[list(self.quotas)] = False
        idle = np.flatnonzero(live & (self.usage[:n] == 0))
        if len(idle):
            out.append(f"{len(idle)} tenant(s) hold no block and have no quota but were kept (e.g. salt "
                       f"{self.salts[idle[0]]!r:.80}): a leaked tenant entry")
        if self.lru:
            # each quota'd tenant's evictable blocks in the pool's LRU order, grouped in one
            # stable sort: a comparison per block and tenant took seconds of the daemon's
            # loop (a `check` needs no session) with a few dozen quotas on a large pool
            ev = evictable.ids()
            order = np.argsort(self.of_block[ev], kind="stable")
            grouped, codes = ev[order], self.of_block[ev][order]
            for c, mine in self.lru.items():
                lo, hi = np.searchsorted(codes, [c, c + 1])
                expected = grouped[lo:hi]
                if len(mine) != len(expected) or not np.array_equal(mine.ids(), expected):
                    out.append(f"tenant {self.salts[c]!r}: LRU of {len(mine)} blocks, but {len(expected)} of its "
                               "blocks are evictable (or in another order)")
                out += [f"tenant {self.salts[c]!r}: {p}" for p in mine.problems()]
        return out


def quota_blocks(blocks: Any) -> int:
    """A quota's blocks: an int or a NumPy integer (as a Client sends it), not a
    bool; within int64, as `stats` carries it (a larger one made every stats reply
    unencodable). InvalidArgument otherwise."""
    n = whole(blocks)
    if n is None or not 0 <= n < 1 << 63:
        raise InvalidArgument(f"quota must be a number of blocks in [0, 2**63) or None, got {blocks!r}")
    return n
