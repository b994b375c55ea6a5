"""`PoolRank`: one rank of a tensor-parallel `KVPool` (see `kvpager.backends.ranked`).

A rank shares the pool's allocator (sequences, block tables, prefix cache)
and owns the storage of its share of the KV heads. Its ``write`` / ``attend``
/ ``plan`` / ``kv`` are `KVPool`'s, over the rank's geometry (`spec`:
``num_kv_heads / ranks`` heads) and the rank's backend: the model's shard of
rank r passes the K/V of heads ``[r*H/R, (r+1)*H/R)`` and the queries of its
query heads, exactly as it would to a one-rank pool of that many heads.
On GPUs, call a rank's ops (and its step plans' ``write`` / ``attend``) with
its GPU current (``torch.cuda.set_device`` / ``cupy.cuda.Device``), as a
worker process of that rank does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvpager.errors import InvalidArgument
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
    def _lock(self) -> Any:
        """The pool's lock: the `KVPool` methods a rank borrows hold it (`kvpager.pool.SERIALIZED`)."""
        return self.pool._lock

    @property
    def closed(self) -> bool:
        """The pool's: the `KVPool` methods a rank borrows refuse once it is closed."""
        return self.pool.closed

    @property
    def broken(self) -> str | None:
        """The pool's (`KVPool.broken`): an op of a rank left half-way breaks the pool whole."""
        return self.pool.broken

    @broken.setter
    def broken(self, why: str | None) -> None:
        self.pool.broken = why

    #: (sequences given to `KVPool.free_later` are freed by the pool's own next call)
    _later = ()

    @property
    def heads(self) -> range:
        """The pool's kv heads this rank holds."""
        n = self.spec.num_kv_heads
        return range(self.rank * n, (self.rank + 1) * n)

    plan = KVPool.plan
    _check_writable = KVPool._check_writable
    refill = KVPool.refill
    _step_of = KVPool._step_of

    def close(self) -> None:
        """A rank is a view of its pool: the pool is closed whole."""
        raise InvalidArgument("close the pool (pool.close()), not one of its ranks: its sequences are every rank's")
    tables = KVPool.tables
    kv = KVPool.kv

    def write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """`KVPool.write` of this rank's heads: k, v [tokens, num_kv_heads / ranks, head_dim]."""
        self._on_device(k, v)
        KVPool.write(self, layer, slots, k, v)  # type: ignore[arg-type]

    def attend(self, layer: int, seq_ids: Any, q: Any, *args: Any, **kw: Any) -> Any:
        """`KVPool.attend` with this rank's query heads."""
        self._on_device(q)
        return KVPool.attend(self, layer, seq_ids, q, *args, **kw)  # type: ignore[arg-type]

    def _on_device(self, *tensors: Any) -> None:
        """InvalidArgument for a GPU tensor on another GPU than this rank's."""
        index = getattr(self.backend, "index", None)
        if index is None:
            return
        for x in tensors:
            dev = getattr(x, "device", None)
            got = getattr(dev, "id", None)  # CuPy
            if not isinstance(got, int):
                got = getattr(dev, "index", None) if getattr(dev, "type", None) == "cuda" else None  # torch
            if isinstance(got, int) and got != index:
                raise InvalidArgument(f"rank {self.rank}'s storage is on cuda:{index}; a tensor given is on "
                                      f"cuda:{got}")

    def synchronize(self) -> None:
        """Wait for this rank's copies and kernels."""
        self.backend.synchronize()

    def __repr__(self) -> str:
        return f"PoolRank({self.rank} of {self.pool.ranks}, heads {self.heads.start}..{self.heads.stop - 1}, {self.device})"
