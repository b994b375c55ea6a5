"""A `PagedCache`'s next decode pass taken ahead: its slots, and its plan or captured step, made while this pass runs.

transformers' ``generate`` waits for each pass to end (its stopping check
reads the device) before it feeds the next, so what the cache does between the
next pass's call and its launch leaves the device idle: appending the rows'
tokens and refilling the plan (a replayed pass's: the captured step's) were
most of that (docs/benchmarks.md). So after a decode pass (one token every
row) that followed another with no call on the cache between, the cache
appends the next pass's slots (`KVPool.append_flat` without token ids) and
refills its plan or captured step there, while the device runs this pass
(`PassAhead.after`). The next pass whose shapes are those of a decode pass
of the same rows is launched at once (`cache_pass.ahead_pass`), the copy of
its inputs to the host queued before it; once launched they are read, and
where every token is real and the mask keeps what the cache holds, the pass
keeps the slots and records its token ids in them (`record_tokens`) before its
blocks are committed (`cache_pass.confirm`). A pass they refute is undone (its
slots given back) and begun again as any pass. Anything else gives them back
first (`PassAhead.take` / `drop`: each row's sequence truncated to the tokens
the cache counts): another kind of pass, a reorder, crop, reset or close.

This is done for a cache made with ``cuda_graphs``: an eager pass, paced by
the host, would do the same work at another time and gain nothing (over a
daemon `Client`, it would pay a round trip more: `record_tokens`). Between
passes of such a cache its rows' sequences in the pool hold one slot more than
the cache counts (`PagedCache.get_seq_length` counts what it was fed), and a
row whose slot starts a block holds that block, until the next pass or call.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvpager.errors import KVPagerError


@dataclass
class Ahead:
    """The next pass's slots (one a row of ``seq_ids``), taken after a pass whose
    longest row held ``longest - 1`` tokens; its eager ``plan`` or its captured
    step (``graph``, `DecodeGraphs.prepare`) where made (None: the pass makes it)."""

    seq_ids: list[int]
    slots: np.ndarray
    longest: int
    plan: Any = None
    graph: Any = None


class PassAhead:
    """The next decode pass of ``cache`` (a `PagedCache`), taken ahead where it may pay."""

    def __init__(self, cache: Any) -> None:
        self._cache = weakref.ref(cache)  # (held strongly, the cache lived until a cycle collection)
        self.ahead: Ahead | None = None
        self.decodes = 0  # decode passes in a row, no call on the cache between them
        pool = cache.pool
        ops = getattr(pool, "ops", None)  # (a daemon Client: what its daemon answers)
        #: taken for a cache whose decode passes replay captured steps (an eager pass is paced by the
        #: host, whose work this moves, not spares)
        self.enabled = cache._graphs is not None and hasattr(pool, "record_tokens") and (
            ops is None or "record_tokens" in ops)

    @property
    def cache(self) -> Any:
        return self._cache()

    def after(self, decode: bool, replayed: bool) -> None:
        """A pass ran and was counted (`CacheRows.done`): ``decode``, one token every
        row, ``replayed`` from a captured step. After the second such pass in a row,
        the next one's slots and plan (or captured step) are taken."""
        self.decodes = self.decodes + 1 if decode else 0
        if not self.enabled or self.decodes < 2:
            return
        c = self.cache
        ids = list(c.seq_ids)
        try:
            slots = c.pool.append_flat(ids, 1)
        except KVPagerError:  # (a full pool: the next pass appends and says so itself)
            return
        ahead = self.ahead = Ahead(ids, slots, int(c._rows.lens.max()) + 1)
        try:
            if replayed:
                ahead.graph = c._graphs.prepare(ids, slots)
            else:
                ahead.plan = c._plans.plan(ids, np.ones(len(ids), dtype=np.int64), slots, ahead.longest)
        except KVPagerError:
            self.drop()

    def take(self, width: int, mask: Any) -> Ahead | None:
        """The slots taken for this pass (``width`` columns, `cache_mask.PassMask`
        ``mask``) where it is the pass they were taken for: a decode pass of the same
        rows, each token real, its mask keeping the tokens the cache holds. Else they
        are given back, and None. The caller owns what it takes (a pass that fails
        truncates its rows: `CacheRows.undo`)."""
        a = self.ahead
        if a is None:
            return None
        rows = self.cache._rows
        if width == 1 and a.seq_ids == rows.seq_ids and mask.real.all() and (
                mask.held is None or np.array_equal(mask.held, rows.lens)):
            self.ahead = None
            return a
        self.drop()
        return None

    def drop(self) -> None:
        """Give back the slots taken ahead (each row's sequence truncated to the
        tokens the cache counts); the next pass is not taken ahead."""
        self.decodes = 0
        a, self.ahead = self.ahead, None
        if a is not None:
            self.cache.pool.truncate(a.seq_ids, self.cache._rows.lens.tolist())

    def forget(self) -> None:
        """The rows' sequences were freed: nothing to give back."""
        self.decodes, self.ahead = 0, None
