"""`PoolRank`: one rank of a tensor-parallel `KVPool` (see `kvpager.backends.ranked`).

A rank shares the pool's allocator (sequences, block tables, prefix cache)
and owns the storage of its share of the KV heads. Its ``write`` / ``attend``
/ ``plan`` / ``kv`` are `KVPool`'s, over the rank's geometry (`spec`:
``num_kv_heads / ranks`` heads) and the rank's backend: the model's shard of
rank r passes the K/V of heads ``[r*H/R, (r+1)*H/R)`` and the queries of its
query heads, exactly as it would to a one-rank pool of that many heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvpager.pool import KVPool

if TYPE_CHECKING:
    from kvpager.backends.base import Backend
    from kvpager.spec import PoolSpec


class PoolRank:
    """Rank ``rank`` of ``pool``: per-layer K/V ops over its heads."""

    ranks = 1  # a rank is a one-rank view: its per-layer ops run here

    def __init__(self, pool: KVPool, rank: int, spec: PoolSpec, backend: Backend):
        self.pool, self.rank = pool, rank
        self.spec, self.backend = spec, backend
        self.manager = pool.manager
        self.device = backend.device

    @property
    def pending(self) -> bool:
        return self.pool.pending

    @pending.setter
    def pending(self, value: bool) -> None:
        self.pool.pending = value

    @property
    def heads(self) -> range:
        """The pool's kv heads this rank holds."""
        n = self.spec.num_kv_heads
        return range(self.rank * n, (self.rank + 1) * n)

    write = KVPool.write
    attend = KVPool.attend
    plan = KVPool.plan
    tables = KVPool.tables
    kv = KVPool.kv

    def synchronize(self) -> None:
        """Wait for this rank's copies and kernels."""
        self.backend.synchronize()

    def __repr__(self) -> str:
        return f"PoolRank({self.rank} of {self.pool.ranks}, heads {self.heads.start}..{self.heads.stop - 1}, {self.device})"
