"""`KVPool`: the embedded engine = spec + block pool + prefix cache + sequences + backend.

Every op takes a batch (lists in, lists out), validates all of it, then
either applies all of it or raises a typed error and changes nothing.

`KVPool` is one class; its methods live by responsibility in the mixins it
is made of: sequence ops (`kvpager.pool_seqs`), pins, quotas and ownership
(`kvpager.pool_control`), per-layer K/V, tables and step plans
(`kvpager.pool_kv`), inspection and stats (`kvpager.pool_inspect`). This
module builds the pool and owns its lifetime.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Sequence as Seq
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from kvpager import validate
from kvpager.backends import Backend, make_backend
from kvpager.batch_calls import PoolBatch, free_all
from kvpager.errors import IntegrityError, InvalidArgument, KVPagerError
from kvpager.pool_control import PoolControl
from kvpager.pool_inspect import PoolInspection
from kvpager.pool_kv import PoolKV
from kvpager.pool_seqs import PoolSequences
from kvpager.sequences import SequenceManager
from kvpager.spec import PoolSpec

if TYPE_CHECKING:
    from kvpager.pool_rank import PoolRank
    from kvpager.remote_tier import RemoteTier


#: What a closed pool refuses (`KVPool.close`): every op on its sequences, pins,
#: quotas or K/V. Inspection (`stats`, `sequences`, `blocks`, `counters`, `pins`,
#: `owned`, `check_integrity`, ...) still answers from its bookkeeping.
CLOSED_OPS = ("allocate", "cached_tokens", "probe_cache", "append", "append_flat", "record_tokens", "commit",
              "fork", "free", "truncate", "swap_out", "swap_in", "release_before", "batch", "pin", "unpin",
              "release_pins", "set_quota", "write", "attend", "tables", "plan", "kv", "rank")
#: What a rank view (`KVPool.rank`) made before the close refuses.
CLOSED_RANK_OPS = ("write", "attend", "tables", "plan", "kv")


log = logging.getLogger("kvpager.pool")


def _closed(op: str, *args: Any, **kwargs: Any) -> NoReturn:
    raise InvalidArgument(f"{op}: this KVPool is closed")


def _check_after(pool: KVPool, op: str, e: BaseException) -> None:
    """An op left by an exception no check raised (KeyboardInterrupt at any
    line of it, MemoryError, a bug): its changes may stop half-way, so the
    bookkeeping is checked, and a pool found broken refuses every op on its
    sequences and K/V from then on (`broken`), as a closed one does, rather
    than serve tables and hits that no longer hold (Ctrl-C during allocates
    broke 15 pools in 60 and they served on: blocks counted twice, a
    sequence's tokens past its blocks).

    An op left between its bookkeeping change and the end of the K/V copies
    it asked for (copy-on-write, swap out or in: the manager's `copies_owed`,
    set before the change and cleared once the copies ran) breaks the pool
    whatever the check says: its bookkeeping holds, but tables and cached keys
    point at blocks whose K/V never came (attention read another sequence's
    K/V, or zeros, with no error)."""
    if pool.broken is not None or pool.closed:
        return
    owed = pool.manager.copies_owed
    if owed is not None:
        pool.broken = (f"{op} was left half-way by {type(e).__name__} after its bookkeeping changed, before its "
                       f"{owed} copies of K/V completed (they may not have run: blocks may not hold the K/V their "
                       "tables and cached keys say); close this pool and make a new one")
        log.error("KVPool: %s", pool.broken)
        return
    try:
        pool.manager.check_integrity()
    except IntegrityError as bad:
        why = str(bad) if len(str(bad)) <= 240 else str(bad)[:240] + "..."
        pool.broken = (f"{op} was left half-way by {type(e).__name__} and the pool's bookkeeping no longer holds "
                       f"({why}); close this pool and make a new one")
        log.error("KVPool: %s", pool.broken)


class ForkMidCall(Exception):
    """What left a call half-way in a forked child's copy of its pool: the fork."""


def _free_later(pool: KVPool) -> None:
    """Free what `KVPool.free_later` was given (under the pool's lock)."""
    while pool._later:
        ids = pool._later.popleft()
        try:
            free_all(pool, ids)
        except KVPagerError as e:
            log.warning("KVPool: freeing %d sequences of a dropped cache: %s", len(ids), e)


def _refuse_broken(pool: KVPool, op: str) -> NoReturn:
    if pool.closed:
        _closed(op)
    raise IntegrityError(f"{op}: this KVPool is broken: {pool.broken}")


def _refuse(obj: object, ops: tuple[str, ...]) -> None:
    """Hide ``obj``'s methods ``ops`` behind instance attributes that raise
    InvalidArgument: one place refuses them all. (A method taken before the
    close is refused by the ``closed`` check of `_serialized` / `_open_only`.)"""
    for op in ops:
        setattr(obj, op, partial(_closed, op))


class KVPool(PoolSequences, PoolBatch, PoolControl, PoolKV, PoolInspection):
    """A paged KV cache in this process. Threads may share one: each call runs
    whole before another thread's (`SERIALIZED`, as a daemon `Client`'s calls
    do; two threads generating on one pool once met an IntegrityError inside
    allocate). A step plan (`plan`) is the caller's: its launches do not lock.

    >>> pool = KVPool(PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=64))
    >>> [a] = pool.allocate([[1, 2, 3]])
    >>> a.num_cached_tokens, len(a.slots)
    (0, 3)
    """

    def __init__(
        self, spec: PoolSpec, device: str = "cpu", backend: Backend | None = None, *,
        max_pinned_blocks: int | None = None, remote: RemoteTier | None = None,
        devices: Seq[str] | None = None,
    ):
        """``max_pinned_blocks``: the most blocks pins may hold (default half the
        pool). ``remote``: a `kvpager.remote_tier.RemoteTier` (prefix blocks
        shared through a store across hosts); the pool closes it on `close`.
        ``devices``: tensor parallelism, one rank per device (``["cuda:0",
        "cuda:1"]``; ``["cpu", "cpu"]`` keeps the ranks in host memory): rank r
        holds kv heads ``[r*H/R, (r+1)*H/R)`` of every block, one allocator
        serves them all, and per-layer K/V ops go through `rank` (see
        `kvpager.backends.ranked`)."""
        if not isinstance(spec, PoolSpec):
            raise InvalidArgument(f"spec must be a PoolSpec, got {type(spec).__name__}")
        if backend is not None and not isinstance(backend, Backend):
            raise InvalidArgument(f"backend must be a kvpager Backend, got {type(backend).__name__} (to choose "
                                  "one by name, give device: 'cpu' or 'cuda:N')")
        if backend is not None and backend.spec != spec:
            raise InvalidArgument(f"backend holds a pool of {backend.spec}, not of this spec {spec}")
        ranks = len(getattr(backend, "ranks", ())) or 1
        if devices is not None:
            from kvpager.backends.ranked import check_devices, rank_spec

            if backend is not None or device != "cpu":
                raise InvalidArgument("give devices, or device / backend, not both")
            devices = check_devices(devices)
            ranks = len(devices)
            rank_spec(spec, ranks)  # heads divisible, before anything is allocated
        if max_pinned_blocks is not None and (not validate.is_int(max_pinned_blocks) or max_pinned_blocks < 0):
            raise InvalidArgument(f"max_pinned_blocks must be an integer >= 0, got {validate.shown(max_pinned_blocks)}")
        if remote is not None:
            from kvpager.remote_tier import RemoteTier

            if not isinstance(remote, RemoteTier):
                raise InvalidArgument(f"remote must be a RemoteTier, got {type(remote).__name__}")
            remote.attach(spec, ranks)
        if devices is not None:
            from kvpager.backends.ranked import make_ranked_backend

            backend = make_ranked_backend(spec, devices)
        self.spec = spec
        self.backend = backend if backend is not None else make_backend(spec, device)
        self.device = self.backend.device
        #: tensor-parallel ranks: 1, or the ranks of a `RankedBackend`
        self.ranks: int = ranks
        self._rank_views: list[PoolRank] | None = None  # made by the first `rank`
        self.manager = SequenceManager(spec.num_blocks, spec.block_size, spec.num_host_blocks,
                                       None if max_pinned_blocks is None else int(max_pinned_blocks))
        self.remote = remote
        # A slot is block * block_size + offset (NumPy scalars: no conversion per call).
        self._bs, self._offsets = np.int64(spec.block_size), np.arange(spec.block_size, dtype=np.int64)
        # True while copies or kernels issued by this pool may still be running
        # (cleared by synchronize): the daemon waits only when there is something to wait for.
        self.pending = False
        # Blocks copied by copy-on-write and by swaps, ever (see `counters`).
        self._cow_blocks = self._swap_out_blocks = self._swap_in_blocks = 0
        #: True once `close` ran
        self.closed = False
        # sequences to free at the next call, whose owner could not call (`free_later`)
        self._later: deque[list[int]] = deque()
        #: why this pool refuses every op on its sequences and K/V (an op left half-way by
        #: KeyboardInterrupt broke its bookkeeping: `_check_after`); None while it holds
        self.broken: str | None = None
        self._lock = threading.RLock()  # a call whole (`SERIALIZED`); an RLock: `batch` calls the ops again
        _LIVE.add(self)

    def free_later(self, seq_ids: Seq[int], session: Any = None) -> None:
        """Free ``seq_ids`` at this pool's next call (ids no longer live left out):
        for a finalizer (a `kvpager.hf.PagedCache` collected without `close`),
        which may run in the middle of a call of this very thread, where a call
        would change the pool under it. ``session``: a daemon `Client`'s (a pool
        has none)."""
        self._later.append([int(s) for s in seq_ids])

    def synchronize(self) -> None:
        """Wait until every copy and kernel this pool issued has completed."""
        self.backend.synchronize()
        self.pending = False

    def close(self) -> None:
        """Release the storage and close the remote tier. From then on every op
        on sequences, pins, quotas or K/V (`CLOSED_OPS`; a rank view's too)
        raises InvalidArgument and changes nothing, on any backend: a GPU pool's
        storage is freed, and a CPU pool's refuses the same. Inspection (`stats`,
        `sequences`, `blocks`, `counters`, `check_integrity`, ...) still answers;
        `synchronize` and a second `close` are harmless."""
        if self.closed:
            return
        self.closed = True
        _refuse(self, CLOSED_OPS)
        for view in self._rank_views or ():
            _refuse(view, CLOSED_RANK_OPS)
        if self.remote is not None:
            self.remote.detach()  # (closed with the last pool it serves)
        self.backend.close()

    def __enter__(self) -> KVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The calls that read or change the pool's bookkeeping: each holds the pool's
#: lock throughout (uncontended, a fraction of a microsecond a call), so threads
#: sharing a pool run their calls one after another, never interleaved.
SERIALIZED = ("allocate", "cached_tokens", "probe_cache", "append", "append_flat", "record_tokens", "commit",
              "fork", "free", "truncate", "swap_out", "swap_in", "release_before", "batch", "pin", "unpin",
              "release_pins", "pins", "pins_page", "pin_counts", "set_quota", "owned", "sequence_ids", "owners",
              "check_owner", "sequence", "info_columns", "sequences", "blocks", "stats", "counters", "set_event_sink",
              "remote_stats", "check_integrity", "write", "attend", "tables", "plan", "refill", "close")


def _serialized(method: Any, name: str) -> Any:
    if name not in CLOSED_OPS:
        @functools.wraps(method)
        def call(self: KVPool, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                if self._later and not self.closed and self.broken is None:
                    _free_later(self)
                return method(self, *args, **kwargs)

        return call

    @functools.wraps(method)
    def call_open(self: KVPool, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            # `close` hides these behind instance attributes, but a bound method taken
            # before it (``append = pool.append_flat``), or a thread that waited on the
            # lock while another closed the pool, comes here: it ran on the closed pool
            if self.closed or self.broken is not None:
                _refuse_broken(self, name)
            if self._later:
                _free_later(self)
            try:
                return method(self, *args, **kwargs)
            except BaseException as e:
                # (a typed error was checked before anything changed, unless copies were owed: one a copy raised)
                if not isinstance(e, KVPagerError) or self.manager.copies_owed is not None:
                    _check_after(self, name, e)
                raise

    return call_open


for _name in SERIALIZED:
    setattr(KVPool, _name, _serialized(getattr(KVPool, _name), _name))


def _open_only(method: Any, name: str) -> Any:
    """``method`` refusing on a closed pool (`_serialized`'s check, for the ops that take no lock)."""
    @functools.wraps(method)
    def call(self: KVPool, *args: Any, **kwargs: Any) -> Any:
        if self.closed or self.broken is not None:
            _refuse_broken(self, name)
        return method(self, *args, **kwargs)

    return call


for _name in [op for op in CLOSED_OPS if op not in SERIALIZED]:
    setattr(KVPool, _name, _open_only(getattr(KVPool, _name), _name))

#: Every live pool of this process, for `_after_fork_in_child`.
_LIVE: weakref.WeakSet[KVPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child's pools get fresh locks: one a parent's thread held at the
    fork would never be released here. A pool whose lock another thread of the
    parent held (a call half-way through: the child's copy of its bookkeeping
    half-done, and the child served on from it) has its bookkeeping checked, as
    an interrupted call's is (`_check_after`): found broken, it refuses every op
    on its sequences and K/V (`broken`)."""
    for pool in list(_LIVE):
        lock = pool._lock
        pool._lock = threading.RLock()
        if lock.acquire(blocking=False):  # (free, or this thread's own: the fork came from inside a call)
            lock.release()
        else:
            _check_after(pool, "a call in another thread of the parent", ForkMidCall())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
