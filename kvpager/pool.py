"""`KVPool`: the embedded engine = spec + block pool + prefix cache + sequences + backend.

Every op takes a batch (lists in, lists out), validates all of it, then
either applies all of it or raises a typed error and changes nothing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.backends import Backend, make_backend
from kvpager.block_pool import NULL_BLOCK
from kvpager.errors import InvalidArgument
from kvpager.plan import StepPlan, make_plan
from kvpager.sequences import Sequence, SequenceManager
from kvpager.spec import PoolSpec
from kvpager.types import Allocation, BlockMap, PoolStats, SequenceInfo


def _ids(seq_ids: int | Seq[int], what: str = "seq_ids") -> list[int]:
    """A batch of sequence ids; a single int is a batch of one."""
    if isinstance(seq_ids, (int, np.integer)) and not isinstance(seq_ids, bool):
        return [int(seq_ids)]
    if isinstance(seq_ids, (str, bytes)) or not hasattr(seq_ids, "__iter__"):
        raise InvalidArgument(f"{what} must be an int or a list of ints, got {type(seq_ids).__name__}")
    out = list(seq_ids)
    if set(map(type, out)) <= {int}:  # the common case, checked at C speed
        return out
    for s in out:
        if not isinstance(s, (int, np.integer)) or isinstance(s, bool):
            raise InvalidArgument(f"{what} must hold ints, got {s!r}")
    return [int(s) for s in out]


def _per_seq(value: Any, n: int, what: str) -> list[Any]:
    """Broadcast a scalar (or None) to n entries; check a list's length."""
    if value is None or isinstance(value, (int, np.integer, str, bytes)):
        return [value] * n
    if not isinstance(value, (list, tuple, np.ndarray)):
        raise InvalidArgument(f"{what} must be a scalar or a list, got {type(value).__name__}")
    out = list(value)
    if len(out) != n:
        raise InvalidArgument(f"{what} has {len(out)} entries for {n} sequences")
    return out


def _check_prompts(prompts: Any) -> None:
    if isinstance(prompts, (str, bytes, np.ndarray)) or not hasattr(prompts, "__len__"):
        raise InvalidArgument("prompts must be a list of token-id lists")
    if len(prompts) and isinstance(prompts[0], (int, np.integer)):
        raise InvalidArgument("prompts must be a list of token-id lists: pass [tokens] for one prompt")


def _split(flat: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """One view of ``flat`` per sequence."""
    out, start = [], 0
    for n in counts:
        out.append(flat[start : start + n])
        start += n
    return out


class KVPool:
    """A paged KV cache in this process.

    >>> pool = KVPool(PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=64))
    >>> [a] = pool.allocate([[1, 2, 3]])
    >>> a.num_cached_tokens, len(a.slots)
    (0, 3)
    """

    def __init__(self, spec: PoolSpec, device: str = "cpu", backend: Backend | None = None):
        if not isinstance(spec, PoolSpec):
            raise InvalidArgument(f"spec must be a PoolSpec, got {type(spec).__name__}")
        self.spec = spec
        self.backend = backend if backend is not None else make_backend(spec, device)
        self.device = self.backend.device
        self.manager = SequenceManager(spec.num_blocks, spec.block_size, spec.num_host_blocks)
        # True while copies or kernels issued by this pool may still be running
        # (cleared by synchronize): the daemon waits only when there is something to wait for.
        self.pending = False

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
        before attending in it (a batched forward pass does)."""
        _check_prompts(prompts)
        salts = _per_seq(salt, len(prompts), "salt")
        if not isinstance(share_in_batch, bool):
            raise InvalidArgument(f"share_in_batch must be a bool, got {share_in_batch!r}")
        made = self.manager.allocate(prompts, salts, owner, share_in_batch)
        # Slots of every block of every new sequence in one vectorised pass,
        # then each sequence's uncached token range is a slice of it.
        bs = self.spec.block_size
        tables = [seq.block_table for seq, _ in made]
        flat = np.fromiter(itertools.chain.from_iterable(tables), np.int64, sum(map(len, tables)))
        all_slots = (flat[:, None] * bs + np.arange(bs, dtype=np.int64)).ravel()
        out, start = [], 0
        for (seq, cached), table in zip(made, tables):
            slots = all_slots[start + cached : start + seq.num_tokens]
            out.append(Allocation(seq.seq_id, tuple(table), cached, slots))
            start += len(table) * bs
        return out

    def cached_tokens(
        self, prompts: Seq[Seq[int]], salt: str | bytes | None | Seq[str | bytes | None] = None
    ) -> list[int]:
        """How many tokens of each prompt an `allocate` would find cached now,
        without allocating or touching anything: for cache-aware admission."""
        _check_prompts(prompts)
        return self.manager.cached_tokens(prompts, _per_seq(salt, len(prompts), "salt"))

    def append(
        self,
        seq_ids: int | Seq[int],
        num_tokens: int | Seq[int] = 1,
        token_ids: Seq[Seq[int] | None] | None = None,
    ) -> list[np.ndarray]:
        """Extend each sequence by ``num_tokens`` slots; returns their slot ids.
        Passing the ``token_ids`` lets the new blocks be published on commit.
        A shared, partly filled last block is copied first (copy-on-write)."""
        ids = _ids(seq_ids)
        flat = self.append_flat(ids, num_tokens, token_ids)
        if isinstance(num_tokens, (int, np.integer)):
            return list(flat.reshape(len(ids), int(num_tokens)))  # row views, made in C
        return _split(flat, list(num_tokens))

    def append_flat(
        self,
        seq_ids: int | Seq[int],
        num_tokens: int | Seq[int] = 1,
        token_ids: Seq[Seq[int] | None] | None = None,
    ) -> np.ndarray:
        """As `append`, but every sequence's slots back to back in one int64 array."""
        ids = _ids(seq_ids)
        counts = num_tokens if isinstance(num_tokens, (int, np.integer)) else list(num_tokens)
        if token_ids is not None:
            token_ids = _per_seq(token_ids, len(ids), "token_ids")
        flat, copies = self.manager.append(ids, counts, token_ids)
        if copies:
            self.backend.copy_blocks(np.asarray(copies, dtype=np.int64))
            self.pending = True
        return flat

    def commit(self, seq_ids: int | Seq[int], upto: int | None | Seq[int | None] = None) -> list[int]:
        """Declare K/V written for tokens ``[0, upto)`` (default: all), publishing
        full blocks in the prefix cache. Returns how many blocks each published.
        Call it only after the writes have completed on the device."""
        ids = _ids(seq_ids)
        return self.manager.commit(ids, _per_seq(upto, len(ids), "upto"))

    def fork(self, seq_ids: int | Seq[int], n: int = 1) -> list[list[int]]:
        """``n`` children per sequence, sharing all of its blocks; returns their ids."""
        return [[c.seq_id for c in kids] for kids in self.manager.fork(_ids(seq_ids), n)]

    def free(self, seq_ids: int | Seq[int]) -> None:
        """Release sequences. Committed full blocks stay matchable until evicted."""
        self.manager.free(_ids(seq_ids))

    def truncate(self, seq_ids: int | Seq[int], lengths: int | Seq[int]) -> None:
        """Shorten sequences to ``lengths`` tokens, releasing blocks past the end."""
        ids = _ids(seq_ids)
        self.manager.truncate(ids, _per_seq(lengths, len(ids), "lengths"))

    def swap_out(self, seq_ids: int | Seq[int]) -> None:
        """Move the sequences' exclusively owned blocks to host memory in one
        batched copy; shared blocks stay on the device."""
        pairs = self.manager.swap_out(_ids(seq_ids))
        if pairs:
            self.backend.swap_out(np.asarray(pairs, dtype=np.int64))
            self.pending = True

    def swap_in(self, seq_ids: int | Seq[int]) -> None:
        """Bring swapped sequences back to the device in one batched copy."""
        pairs = self.manager.swap_in(_ids(seq_ids))
        if pairs:
            self.backend.swap_in(np.asarray(pairs, dtype=np.int64))
            self.pending = True

    # -- K/V ------------------------------------------------------------------------
    def write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """Store one layer's K/V for the tokens at ``slots`` (-1 = padding, skipped).
        ``k`` and ``v`` are [len(slots), num_kv_heads, head_dim] in the pool dtype."""
        spec = self.spec
        self._check_layer(layer)
        slots = self._slots(slots)
        shape = (len(slots), spec.num_kv_heads, spec.head_dim)
        k = self._tensor(k, "k", shape)
        v = self._tensor(v, "v", shape)
        self.backend.write(int(layer), slots, k, v)
        self.pending = True

    def attend(
        self,
        layer: int,
        seq_ids: int | Seq[int],
        q: Any,
        query_lens: int | Seq[int] | None = None,
        scale: float | None = None,
    ) -> Any:
        """Paged attention of ``q`` over the sequences' K/V in ``layer``.

        q: [sum(query_lens), num_q_heads, head_dim] in the pool dtype, the
        sequences' query tokens back to back; they are each sequence's last
        ``query_lens[i]`` tokens (default 1: decode) and attend causally.
        ``scale`` defaults to 1/sqrt(head_dim). Returns q's shape."""
        spec = self.spec
        self._check_layer(layer)
        ids = _ids(seq_ids)
        seqs = [self.manager.get(s, "attend") for s in ids]
        qlens = _per_seq(1 if query_lens is None else query_lens, len(ids), "query_lens")
        for seq, ql in zip(seqs, qlens):
            if not isinstance(ql, (int, np.integer)) or isinstance(ql, bool) or not 1 <= ql <= seq.num_tokens:
                raise InvalidArgument(
                    f"query_lens for sequence {seq.seq_id} must be in [1, {seq.num_tokens}], got {ql!r}"
                )
        num_q = getattr(q, "shape", (0, 0))[1] if getattr(q, "ndim", 0) == 3 else 0
        if num_q < 1 or num_q % spec.num_kv_heads:
            raise InvalidArgument(
                f"q must be [tokens, num_q_heads, {spec.head_dim}] with num_q_heads a multiple of "
                f"num_kv_heads={spec.num_kv_heads}, got shape {getattr(q, 'shape', None)}"
            )
        q = self._tensor(q, "q", (int(sum(qlens)), num_q, spec.head_dim))
        if scale is None:
            scale = 1.0 / math.sqrt(spec.head_dim)
        elif not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise InvalidArgument(f"scale must be a positive finite number, got {scale!r}")
        tables, seq_lens = self.block_tables(seqs)
        self.pending = True
        return self.backend.attend(
            int(layer), q, tables, seq_lens, np.asarray(qlens, dtype=np.int32), float(scale)
        )

    def block_tables(self, seqs: Seq[Sequence]) -> tuple[np.ndarray, np.ndarray]:
        """Padded int32 block tables [B, max_blocks] (null-block padding) and lengths [B]."""
        width = max((len(s.block_table) for s in seqs), default=0) or 1
        tables = np.zeros((len(seqs), width), dtype=np.int32)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = s.block_table
        return tables, np.asarray([s.num_tokens for s in seqs], dtype=np.int32)

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
        the sequences change. ``options`` go to the backend's planner."""
        ids = _ids(seq_ids)
        tables, seq_lens = self.block_tables([self.manager.get(s, "attend") for s in ids])
        if query_lens is not None:
            query_lens = np.asarray(_per_seq(query_lens, len(ids), "query_lens"))
        self.pending = True
        return make_plan(self.backend, tables, seq_lens, query_lens, slots, **options)

    def kv(self, layer: int) -> tuple[Any, Any]:
        """Views of one layer's K and V: each [num_blocks, num_kv_heads, block_size, head_dim]."""
        self._check_layer(layer)
        return self.backend.layer_kv(int(layer))

    # -- inspection -------------------------------------------------------------------
    def sequence(self, seq_id: int) -> SequenceInfo:
        return self._info(self.manager.get(seq_id))

    def sequences(self) -> list[SequenceInfo]:
        """Every live sequence, in id order."""
        return [self._info(s) for _, s in sorted(self.manager.seqs.items())]

    def blocks(self) -> BlockMap:
        """State and reference count of every device block."""
        pool = self.manager.pool
        ref = np.asarray(pool.ref_cnt, dtype=np.int32)
        state = np.where(ref > 0, BlockMap.USED, BlockMap.FREE).astype(np.uint8)
        if pool.evictable:
            state[np.fromiter(pool.evictable, dtype=np.int64)] = BlockMap.EVICTABLE
        state[NULL_BLOCK] = BlockMap.NULL
        cached = np.zeros(len(ref), dtype=bool)
        if self.manager.cache.block_key:
            cached[np.fromiter(self.manager.cache.block_key, dtype=np.int64)] = True
        return BlockMap(state, ref, cached)

    def stats(self) -> PoolStats:
        """The pool at a glance. Vectorised over all block tables (a few ms for
        millions of entries), since the daemon answers it on its only thread."""
        m, spec = self.manager, self.spec
        pool, bs = m.pool, spec.block_size
        used = pool.num_usable - pool.get_num_free_blocks()
        return PoolStats(
            total_blocks=pool.num_usable,
            free_blocks=len(pool.free_ids),
            evictable_blocks=len(pool.evictable),
            used_blocks=used,
            shared_blocks=len(pool.ref_cnt) - pool.ref_cnt.count(0) - pool.ref_cnt.count(1),
            cached_blocks=len(m.cache),
            num_sequences=len(m.seqs),
            swapped_sequences=len(m.swapped_ids),
            host_total_blocks=m.num_host_blocks,
            host_free_blocks=len(m.host_free),
            prefix_query_tokens=m.prefix_query_tokens,
            prefix_hit_tokens=m.prefix_hit_tokens,
            tokens_stored=self._tokens_stored(),
            token_slots_allocated=used * bs,
            block_size=bs,
            bytes_per_block=spec.bytes_per_block,
        )

    def _tokens_stored(self) -> int:
        """Real tokens held by in-use blocks, a shared block counted once at the
        fill of its fullest user. Every table entry is a full block except each
        sequence's last, which holds the remainder."""
        seqs = list(self.manager.seqs.values())
        if not seqs:
            return 0
        bs = self.spec.block_size
        lens = np.fromiter((len(s.block_table) for s in seqs), np.int64, len(seqs))
        flat = np.fromiter(itertools.chain.from_iterable(s.block_table for s in seqs), np.int64, int(lens.sum()))
        has = lens > 0
        ends = np.cumsum(lens)[has] - 1
        last_fill = np.fromiter((s.num_tokens for s in seqs), np.int64, len(seqs))[has] - (lens[has] - 1) * bs
        per_block = np.zeros(self.spec.num_blocks, dtype=np.int64)
        full = np.ones(len(flat), dtype=bool)
        full[ends] = False
        per_block[flat[full]] = bs  # duplicates write the same value
        np.maximum.at(per_block, flat[ends], last_fill)  # one entry per sequence
        per_block[NULL_BLOCK] = 0  # swapped-out entries hold nothing on the device
        return int(per_block.sum())

    def check_integrity(self) -> None:
        """Raise IntegrityError (with the counts) if any allocator invariant is broken."""
        self.manager.check_integrity()

    def synchronize(self) -> None:
        """Wait until every copy and kernel this pool issued has completed."""
        self.backend.synchronize()
        self.pending = False

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> KVPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------
    def _info(self, s: Sequence) -> SequenceInfo:
        ref = self.manager.pool.ref_cnt
        return SequenceInfo(
            seq_id=s.seq_id,
            owner=s.owner,
            num_tokens=s.num_tokens,
            num_committed=s.num_committed,
            block_table=tuple(s.block_table),
            shared_blocks=sum(1 for b in s.block_table if b != NULL_BLOCK and ref[b] > 1),
            swapped=s.swapped,
            host_blocks=len(s.host_blocks or ()),
        )

    def _check_layer(self, layer: Any) -> None:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not 0 <= layer < self.spec.num_layers:
            raise InvalidArgument(f"layer must be an int in [0, {self.spec.num_layers}), got {layer!r}")

    def _slots(self, slots: Any) -> np.ndarray:
        arr = np.asarray(slots.get() if hasattr(slots, "get") and not isinstance(slots, np.ndarray) else slots)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InvalidArgument(f"slots must be a 1-D integer array, got dtype {arr.dtype} shape {arr.shape}")
        arr = arr.astype(np.int64, copy=False)
        limit = self.spec.num_blocks * self.spec.block_size
        bad = (arr < -1) | (arr >= limit) | ((arr >= 0) & (arr < self.spec.block_size))
        if bad.any():
            raise InvalidArgument(
                f"slot {int(arr[bad][0])} is outside [{self.spec.block_size}, {limit}) "
                "(block 0 is the null block; -1 marks padding)"
            )
        return arr

    def _tensor(self, x: Any, name: str, shape: tuple[int, ...]) -> Any:
        xp = self.backend.xp
        if not isinstance(x, xp.ndarray):
            if hasattr(x, "__dlpack__"):
                try:
                    x = xp.from_dlpack(x)
                except Exception as e:
                    raise InvalidArgument(f"{name}: cannot take a {type(x).__name__} as a {xp.__name__} array: {e}") from None
            else:
                raise InvalidArgument(f"{name} must be a {xp.__name__} array, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise InvalidArgument(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if x.dtype != self.spec.np_dtype:
            raise InvalidArgument(f"{name} must have dtype {self.spec.dtype}, got {x.dtype}")
        return x
