"""`KVPool`: the embedded engine = spec + block pool + prefix cache + sequences + backend.

Every op takes a batch (lists in, lists out), validates all of it, then
either applies all of it or raises a typed error and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager import seq_one, validate
from kvpager.backends import Backend, make_backend
from kvpager.errors import InvalidArgument
from kvpager.events import EventSink
from kvpager.plan import StepPlan, check_floor, check_queries, check_softcap, check_window
from kvpager.sequences import ANY_OWNER, SequenceManager
from kvpager.spec import PoolSpec
from kvpager.types import (
    Allocation,
    BlockMap,
    PinInfo,
    PoolCounters,
    PoolStats,
    RemoteStats,
    SequenceInfo,
    TenantUsage,
)

if TYPE_CHECKING:
    from kvpager.pool_rank import PoolRank
    from kvpager.remote_tier import RemoteTier


def _split(flat: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """One view of ``flat`` per sequence."""
    out, start = [], 0
    for n in counts:
        out.append(flat[start : start + n])
        start += n
    return out


_EVERY = object()  # sequences(): no owner filter (None is an owner: the embedded one)


class KVPool:
    """A paged KV cache in this process.

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
        ranks = len(getattr(backend, "ranks", ())) or 1
        if devices is not None:
            from kvpager.backends.ranked import check_devices, rank_spec

            if backend is not None or device != "cpu":
                raise InvalidArgument("give devices, or device / backend, not both")
            devices = check_devices(devices)
            ranks = len(devices)
            rank_spec(spec, ranks)  # heads divisible, before anything is allocated
        if max_pinned_blocks is not None and (not validate.is_int(max_pinned_blocks) or max_pinned_blocks < 0):
            raise InvalidArgument(f"max_pinned_blocks must be an integer >= 0, got {max_pinned_blocks!r}")
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

    # -- sequence ops ----------------------------------------------------------------
    def allocate(
        self,
        prompts: Seq[Seq[int]],
        salt: str | bytes | None | Seq[str | bytes | None] = None,
        *,
        owner: str | None = None,
        share_in_batch: bool = False,
    ) -> list[Allocation]:
        """New sequences for ``prompts`` (a list of token-id lists). Each shares
        the longest committed prefix of full blocks found in the cache under its
        ``salt`` and gets fresh blocks for the rest.

        ``share_in_batch``: prompts of this batch also share the full blocks an
        earlier prompt of the batch gets fresh; those count in
        ``num_cached_tokens`` though their K/V comes from the earlier prompt's
        prefill in the same step, so write the whole batch's K/V of a layer
        before attending in it (a batched forward pass does).

        With a remote tier, full blocks missing here are first looked up in
        the store (one batch) and restored into device blocks; they count in
        ``num_cached_tokens`` and in ``num_remote_tokens``."""
        validate.prompts(prompts)
        salts = validate.per_seq(salt, len(prompts), "salt")
        if not isinstance(share_in_batch, bool):
            raise InvalidArgument(f"share_in_batch must be a bool, got {share_in_batch!r}")
        restore = None
        if self.remote is not None:
            from kvpager.remote_restore import restore as restore_from

            restore = restore_from(self, prompts, salts)
        try:
            ids, flat, lengths, cached, ntok = self.manager.allocate(prompts, salts, owner, share_in_batch)
        finally:
            if restore is not None:
                restore.release(self.manager.pool)
        bs = self.spec.block_size
        remote = restore.remote_tokens(flat, lengths, cached, bs) if restore is not None else [0] * len(ids)
        if len(ids) == 1:  # one sequence: the slots of its uncached blocks only
            c, t = cached[0], ntok[0]
            slots = (flat[c // bs :, None] * self._bs + self._offsets).ravel()[: t - c]
            return [Allocation(ids[0], tuple(flat.tolist()), c, slots, remote[0])]
        # Slots of every block of every new sequence in one vectorised pass,
        # then each sequence's uncached token range is a slice of it.
        all_slots = (flat[:, None] * self._bs + self._offsets).ravel()
        blocks = flat.tolist()
        out, start = [], 0
        for seq_id, n, c, t, r in zip(ids, lengths, cached, ntok, remote):
            out.append(Allocation(seq_id, tuple(blocks[start : start + n]), c,
                                  all_slots[start * bs + c : start * bs + t], r))
            start += n
        return out

    def cached_tokens(
        self, prompts: Seq[Seq[int]], salt: str | bytes | None | Seq[str | bytes | None] = None
    ) -> list[int]:
        """How many tokens of each prompt an `allocate` would find cached now,
        without allocating or touching anything: for cache-aware admission."""
        validate.prompts(prompts)
        return self.manager.cached_tokens(prompts, validate.per_seq(salt, len(prompts), "salt"))

    def append(
        self,
        seq_ids: int | Seq[int],
        num_tokens: int | Seq[int] = 1,
        token_ids: Seq[Seq[int] | None] | None = None,
    ) -> list[np.ndarray]:
        """Extend each sequence by ``num_tokens`` slots; returns their slot ids.
        Passing the ``token_ids`` lets the new blocks be published on commit.
        A shared, partly filled last block is copied first (copy-on-write)."""
        ids = validate.seq_ids(seq_ids)
        flat = self.append_flat(ids, num_tokens, token_ids)
        if isinstance(num_tokens, (int, np.integer)):
            return list(flat.reshape(len(ids), int(num_tokens)))  # row views, made in C
        return _split(flat, list(num_tokens))

    def append_flat(
        self,
        seq_ids: int | Seq[int],
        num_tokens: int | Seq[int] = 1,
        token_ids: Seq[Seq[int] | None] | None = None,
        *,
        owner: Any = ANY_OWNER,
    ) -> np.ndarray:
        """As `append`, but every sequence's slots back to back in one int64 array.
        ``owner``: if given, every sequence must be its (as `check_owner`, in the
        same lookup: the daemon's decode step)."""
        ids = validate.seq_ids(seq_ids)
        counts = num_tokens if isinstance(num_tokens, (int, np.integer)) else list(num_tokens)
        if token_ids is not None:
            token_ids = validate.per_seq(token_ids, len(ids), "token_ids")
        flat, copies = self.manager.append(ids, counts, token_ids, owner)
        if len(copies):
            self.backend.copy_blocks(copies)
            self.pending = True
            self._cow_blocks += len(copies)
        return flat

    def commit(self, seq_ids: int | Seq[int], upto: int | None | Seq[int | None] = None) -> list[int]:
        """Declare K/V written for tokens ``[0, upto)`` (default: all), publishing
        full blocks in the prefix cache. Returns how many blocks each published.
        Call it only after the writes have completed on the device."""
        ids = validate.seq_ids(seq_ids)
        upto = validate.per_seq(upto, len(ids), "upto")
        if self.remote is None:
            return self.manager.commit(ids, upto)
        fresh: list[tuple[int, bytes, bytes]] = []
        published = self.manager.commit(ids, upto, fresh)
        self.remote.offer(self.backend, fresh)  # copies the bytes now, sends them later
        return published

    def fork(self, seq_ids: int | Seq[int], n: int = 1) -> list[list[int]]:
        """``n`` children per sequence, sharing all of its blocks; returns their ids."""
        m = self.manager
        if type(seq_ids) is list and len(seq_ids) == 1 and type(seq_ids[0]) is int and type(n) is int and n > 0 \
                and m.scalar:  # one sequence, valid arguments: straight to its path (`seq_one`)
            return seq_one.fork(m, seq_ids[0], n)
        return m.fork(validate.seq_ids(seq_ids), n)

    def free(self, seq_ids: int | Seq[int]) -> None:
        """Release sequences. Committed full blocks stay matchable until evicted."""
        self.manager.free(validate.seq_ids(seq_ids))

    def truncate(self, seq_ids: int | Seq[int], lengths: int | Seq[int]) -> None:
        """Shorten sequences to ``lengths`` tokens, releasing blocks past the end."""
        ids = validate.seq_ids(seq_ids)
        self.manager.truncate(ids, validate.per_seq(lengths, len(ids), "lengths"))

    def swap_out(self, seq_ids: int | Seq[int]) -> None:
        """Move the sequences' exclusively owned blocks to host memory in one
        batched copy; shared blocks stay on the device."""
        pairs = self.manager.swap_out(validate.seq_ids(seq_ids))
        if len(pairs):
            self.backend.swap_out(pairs)
            self.pending = True
            self._swap_out_blocks += len(pairs)

    def swap_in(self, seq_ids: int | Seq[int]) -> None:
        """Bring swapped sequences back to the device in one batched copy."""
        pairs = self.manager.swap_in(validate.seq_ids(seq_ids))
        if len(pairs):
            self.backend.swap_in(pairs)
            self.pending = True
            self._swap_in_blocks += len(pairs)

    # -- control: pins and tenants' quotas (kvpager/pins.py, kvpager/tenants.py) ---------------
    def pin(self, prompts: Seq[Seq[int]], salt: str | bytes | None | Seq[str | bytes | None] = None, *,
            owner: Any = None) -> list[int]:
        """Pin the longest cached prefix of full blocks of each prompt: its blocks
        stay in the prefix cache, never evicted, until unpinned. Returns the tokens
        pinned per prompt (0: none of it is cached; nothing is waited for). Pinning
        a prefix again counts: each `unpin` drops one. LimitExceeded (nothing
        changes) past ``max_pinned_blocks``. ``owner``: whose pin (a daemon's session)."""
        validate.prompts(prompts)
        salts = validate.per_seq(salt, len(prompts), "salt")
        m = self.manager
        return m.pins.pin(m.pool, self.spec.block_size, prompts, salts, owner)

    def unpin(self, prompts: Seq[Seq[int]], salt: str | bytes | None | Seq[str | bytes | None] = None, *,
              owner: Any = None) -> list[int]:
        """Drop one of ``owner``'s pins per prompt, of its longest pinned prefix;
        returns the tokens it held. NotPinned (nothing changes) for a prompt
        ``owner`` holds no pin of. Unpinned blocks become evictable, still cached."""
        validate.prompts(prompts)
        salts = validate.per_seq(salt, len(prompts), "salt")
        m = self.manager
        return m.pins.unpin(m.pool, self.spec.block_size, prompts, salts, owner)

    def release_pins(self, owner: Any) -> int:
        """Drop every pin of ``owner`` (the daemon: a session that ended); returns how many."""
        m = self.manager
        return m.pins.release(m.pool, owner)

    def pins(self, owner: Any = _EVERY) -> list[PinInfo]:
        """Every pin, or ``owner``'s."""
        pins, bs = self.manager.pins, self.spec.block_size
        return pins.infos(bs) if owner is _EVERY else pins.infos(bs, owner)

    def set_quota(self, salt: str | bytes | None, blocks: int | None) -> None:
        """A soft quota on the cached blocks of ``salt``'s tenant (None: none):
        when the pool must evict, it takes from tenants over their quota first
        (least recently used among them), then the global LRU (`kvpager.tenants`)."""
        self.manager.pool.set_quota(salt, blocks)

    # -- ownership (the daemon's sessions) ----------------------------------------------
    def owned(self, owner: Any) -> list[int]:
        """Ids of ``owner``'s live sequences, in id order."""
        return self.manager.owned(owner)

    def owners(self) -> list[Any]:
        """Every owner that has a live sequence."""
        return self.manager.owners.live()

    def check_owner(self, seq_ids: int | Seq[int], owner: Any) -> None:
        """Raise UnknownSequence or NotOwner unless every sequence is live and ``owner``'s."""
        self.manager.check_owner(validate.seq_ids(seq_ids), owner)

    # -- K/V ------------------------------------------------------------------------
    def write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """Store one layer's K/V for the tokens at ``slots`` (-1 = padding, skipped).
        ``k`` and ``v`` are [len(slots), num_kv_heads, head_dim] in the pool dtype."""
        if self.ranks > 1:
            raise self.backend._per_rank("write")
        spec = self.spec
        validate.layer(layer, spec)
        slots = validate.slots(slots, spec)
        shape = (len(slots), spec.num_kv_heads, spec.head_dim)
        k = validate.tensor(k, "k", shape, spec, self.backend.xp)
        v = validate.tensor(v, "v", shape, spec, self.backend.xp)
        self.backend.write(int(layer), slots, k, v)
        self.pending = True

    def attend(
        self,
        layer: int,
        seq_ids: int | Seq[int],
        q: Any,
        query_lens: int | Seq[int] | None = None,
        scale: float | None = None,
        *,
        window: int | None = None,
        softcap: float | None = None,
    ) -> Any:
        """Paged attention of ``q`` over the sequences' K/V in ``layer``.

        q: [sum(query_lens), num_q_heads, head_dim] in the pool dtype, the
        sequences' query tokens back to back; they are each sequence's last
        ``query_lens[i]`` tokens (default 1: decode) and attend causally.
        ``scale`` defaults to 1/sqrt(head_dim). ``window`` / ``softcap``: sliding
        window and logit soft cap, as `kvpager.plan.StepPlan.attend`. Returns q's shape."""
        if self.ranks > 1:
            raise self.backend._per_rank("attend")
        spec = self.spec
        validate.layer(layer, spec)
        ids = validate.seq_ids(seq_ids)
        tables, seq_lens = self.tables(ids)
        qlens = validate.per_seq(1 if query_lens is None else query_lens, len(ids), "query_lens")
        for s, n, ql in zip(ids, seq_lens.tolist(), qlens):
            if not isinstance(ql, (int, np.integer)) or isinstance(ql, bool) or not 1 <= ql <= n:
                raise InvalidArgument(f"query_lens for sequence {s} must be in [1, {n}], got {ql!r}")
        num_q = getattr(q, "shape", (0, 0))[1] if getattr(q, "ndim", 0) == 3 else 0
        if num_q < 1 or num_q % spec.num_kv_heads:
            raise InvalidArgument(
                f"q must be [tokens, num_q_heads, {spec.head_dim}] with num_q_heads a multiple of "
                f"num_kv_heads={spec.num_kv_heads}, got shape {getattr(q, 'shape', None)}"
            )
        q = validate.tensor(q, "q", (int(sum(qlens)), num_q, spec.head_dim), spec, self.backend.xp)
        check_floor(self.manager.floors(ids), seq_lens, np.asarray(qlens, np.int64), window)
        if scale is None:
            scale = 1.0 / math.sqrt(spec.head_dim)
        elif not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise InvalidArgument(f"scale must be a positive finite number, got {scale!r}")
        self.pending = True
        return self.backend.attend(
            int(layer), q, tables, seq_lens, np.asarray(qlens, dtype=np.int32), float(scale),
            window=check_window(window), softcap=check_softcap(softcap),
        )

    def tables(self, seq_ids: int | Seq[int]) -> tuple[np.ndarray, np.ndarray]:
        """Padded int32 block tables [B, max_blocks] (null-block padding) and
        lengths int32 [B] of resident sequences: one vectorised gather.
        Raises UnknownSequence, or SequenceSwapped for a swapped-out one."""
        return self.manager.tables(validate.seq_ids(seq_ids))

    def plan(
        self,
        seq_ids: int | Seq[int],
        query_lens: int | Seq[int] | None = None,
        slots: Any = None,
        **options: Any,
    ) -> StepPlan:
        """A step plan for one forward pass over ``seq_ids``: their block tables,
        lengths and the step's ``slots`` (where its new tokens' K/V go, as
        `append` / `allocate` returned them) checked and uploaded once; then per
        layer ``plan.write(layer, k, v)`` and ``plan.attend(layer, q, scale)``
        (see `kvpager.plan`). ``query_lens``: new tokens per sequence (default 1).
        The plan is a snapshot: make a new one (or `StepPlan.update` it) after
        the sequences change. ``options`` go to the backend's planner (see
        `kvpager.plan.make_plan`; ``config=KernelConfig(...)`` for other kernel knobs)."""
        if self.ranks > 1:
            raise self.backend._per_rank("plan")
        ids = validate.seq_ids(seq_ids)
        tables, seq_lens = self.tables(ids)  # the pool's own: only the step's part needs checks
        if query_lens is not None:
            query_lens = np.asarray(validate.per_seq(query_lens, len(ids), "query_lens"))
        query_lens, slots = check_queries(self.spec, seq_lens, query_lens, slots)
        self.pending = True
        plan = self.backend.plan(tables, seq_lens, query_lens, slots, **options)
        plan.floor = self.manager.floors(ids)
        return plan

    def release_before(self, seq_ids: int | Seq[int], positions: int | Seq[int], *, owner: Any = ANY_OWNER
                       ) -> list[int]:
        """Give back each sequence's whole blocks before ``positions[i]`` (its last
        block stays): K/V no attention will read again once every layer's sliding
        window has moved past it (see `kvpager.seq_release`). Their table entries
        become the null block; attention over the sequence must then use a window
        that starts at or after what is held. A block still shared or cached
        stays for the others. Returns blocks released per sequence."""
        ids = validate.seq_ids(seq_ids)
        positions = validate.per_seq(positions, len(ids), "positions")
        return self.manager.release_before(ids, positions, owner)

    def kv(self, layer: int) -> tuple[Any, Any]:
        """Views of one layer's K and V: each [num_blocks, num_kv_heads, block_size, head_dim]."""
        if self.ranks > 1:
            raise self.backend._per_rank("kv")
        return self.backend.layer_kv(validate.layer(layer, self.spec))

    def rank(self, r: int) -> PoolRank:
        """Rank ``r``'s per-layer K/V ops (`kvpager.pool_rank.PoolRank`): write,
        attend, plan and kv over its ``num_kv_heads / ranks`` heads, with this
        pool's block tables. A one-rank pool's rank 0 is the whole pool's storage."""
        from kvpager.pool_rank import PoolRank

        if not validate.is_int(r) or not 0 <= r < self.ranks:
            raise InvalidArgument(f"rank must be an int in [0, {self.ranks}), got {r!r}")
        if self._rank_views is None:
            if self.ranks == 1:
                self._rank_views = [PoolRank(self, 0, self.spec, self.backend)]
            else:
                self._rank_views = [PoolRank(self, i, b.spec, b) for i, b in enumerate(self.backend.ranks)]
        return self._rank_views[int(r)]

    # -- inspection -------------------------------------------------------------------
    def sequence(self, seq_id: int) -> SequenceInfo:
        [info] = self.manager.infos([seq_id])
        return info

    def sequences(self, owner: Any = _EVERY) -> list[SequenceInfo]:
        """Every live sequence, or ``owner``'s only, in id order. Costs what it
        returns: one owner's list is read from an index, not a scan."""
        return self.manager.infos(self.manager.ids() if owner is _EVERY else self.owned(owner))

    def blocks(self) -> BlockMap:
        """State and reference count of every device block."""
        return self.manager.pool.block_map()

    def stats(self) -> PoolStats:
        """The pool at a glance, from the block pool's counters and a few array
        reductions (the daemon answers it on its only thread)."""
        m, spec = self.manager, self.spec
        pool, bs = m.pool, spec.block_size
        used = pool.num_used
        return PoolStats(
            total_blocks=pool.num_usable,
            free_blocks=pool.num_free,
            evictable_blocks=pool.num_evictable,
            used_blocks=used,
            shared_blocks=pool.num_shared(),
            cached_blocks=pool.num_cached,
            num_sequences=m.num_sequences,
            swapped_sequences=m.num_swapped,
            host_total_blocks=m.host.num_blocks,
            host_free_blocks=m.host.num_free,
            prefix_query_tokens=m.prefix_query_tokens,
            prefix_hit_tokens=m.prefix_hit_tokens,
            tokens_stored=m.tokens_stored(),
            token_slots_allocated=used * bs,
            block_size=bs,
            bytes_per_block=spec.bytes_per_block,
            pinned_blocks=m.pins.num_pinned,
            max_pinned_blocks=m.pins.limit,
            tenants=self._tenants(),
            ranks=self.ranks,
        )

    def counters(self) -> PoolCounters:
        """Cumulative counts since the pool was made (prefix lookups and hits in
        tokens, evictions, copy-on-write and swap copies in blocks); O(1)."""
        m = self.manager
        return PoolCounters(
            prefix_query_tokens=m.prefix_query_tokens,
            prefix_hit_tokens=m.prefix_hit_tokens,
            evicted_blocks=m.pool.num_evicted,
            cow_blocks=self._cow_blocks,
            swap_out_blocks=self._swap_out_blocks,
            swap_in_blocks=self._swap_in_blocks,
            bytes_per_block=self.spec.bytes_per_block,
        )

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Report every key entering or leaving the prefix cache to ``sink``
        (`kvpager.events`: vLLM's BlockStored / BlockRemoved), or stop (None).
        Without a sink nothing is recorded."""
        if sink is not None and not isinstance(sink, EventSink):
            raise InvalidArgument(f"sink must be an EventSink or None, got {type(sink).__name__}")
        self.manager.pool.events = sink

    def _tenants(self) -> tuple[TenantUsage, ...]:
        pool = self.manager.pool
        evictable = np.zeros(pool.num_blocks, dtype=bool)
        if pool.evictable:
            evictable[np.fromiter(pool.evictable, dtype=np.int64, count=len(pool.evictable))] = True
        rows = pool.tenants.rows(pool.cache.cached, evictable, self.manager.pins.refs > 0)
        return tuple(TenantUsage(*r) for r in rows)

    def remote_stats(self) -> RemoteStats | None:
        """The remote tier's counters, or None without one."""
        return self.remote.stats() if self.remote is not None else None

    def check_integrity(self) -> None:
        """Raise IntegrityError (with the counts) if any allocator invariant is broken."""
        self.manager.check_integrity()

    def synchronize(self) -> None:
        """Wait until every copy and kernel this pool issued has completed."""
        self.backend.synchronize()
        self.pending = False

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
        self.backend.close()

    def __enter__(self) -> KVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
