"""`KVPool`'s K/V ops: per-layer ``write`` and ``attend`` through the backend,
padded block ``tables``, step plans (`kvpager.plan`), layer views and the
per-rank ops of a tensor-parallel pool (`kvpager.pool_rank`)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager import validate, validate_arrays
from kvpager.attend_options import check_scale, check_softcap, check_window, chunk_step
from kvpager.errors import InvalidArgument, NotOwner
from kvpager.plan import StepPlan, check_floor, check_queries, context_of, table_floor
from kvpager.plan_guard import check_positions, sequence_guard
from kvpager.plan_numpy import from_numpy, to_numpy

if TYPE_CHECKING:
    from kvpager.pool_rank import PoolRank


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _tensor(x: Any, name: str, shape: tuple[int, ...], spec: Any, xp: Any) -> Any:
    """``x`` as an ``xp`` array of ``shape`` in the pool dtype (`validate_arrays.tensor`).
    On the NumPy backend a CPU torch tensor crosses as a step plan's does
    (`kvpager.plan_numpy.to_numpy`): bfloat16 too, which DLPack cannot carry
    into NumPy."""
    if xp is np and _is_torch(x):
        x = to_numpy(x, name, spec.np_dtype)[0]
    return validate_arrays.tensor(x, name, shape, spec, xp)


def _as_torch(out: Any, xp: Any) -> Any:
    """``attend``'s result for a torch q: a torch tensor over the same memory, as
    step plans answer torch with torch (`kvpager.plan`)."""
    if xp is np:
        return from_numpy(out)
    import torch

    return torch.from_dlpack(out)


class PoolKV:
    """Mixed into `KVPool`, which supplies ``spec``, ``backend``, ``manager``,
    ``ranks``, ``pending`` and ``_rank_views``."""

    def write(self, layer: int, slots: Any, k: Any, v: Any) -> None:
        """Store one layer's K/V for the tokens at ``slots`` (-1 = padding, skipped).
        ``k`` and ``v`` are [len(slots), num_kv_heads, head_dim] in the pool dtype:
        arrays of the backend (NumPy / CuPy) or torch tensors on its device.
        A slot in a cached block no sequence holds (kept from before a free) is
        refused with `NotOwner` (`_check_writable`)."""
        if self.ranks > 1:
            raise self.backend._per_rank("write")
        spec = self.spec
        validate.layer(layer, spec)
        slots = validate_arrays.slots(slots, spec)
        self._check_writable(slots)
        shape = (len(slots), spec.num_kv_heads, spec.head_dim)
        k = _tensor(k, "k", shape, spec, self.backend.xp)
        v = _tensor(v, "v", shape, spec, self.backend.xp)
        self.backend.write(int(layer), slots, k, v)
        self.pending = True

    def _check_writable(self, slots: np.ndarray) -> None:
        """NotOwner for a slot in a block that no sequence holds and that holds K/V
        the prefix cache answers for (a freed sequence's committed block, kept on
        the LRU): slots kept from before the free wrote into it, and every later
        prompt that found the prefix read that K/V, silently. (A block a sequence
        holds may be written after its commit, as a step that publishes full blocks
        before its forward pass does; a block nothing answers for is the caller's
        to fill.) A daemon's clients get more: only their own, unpublished blocks."""
        blocks = slots[slots >= 0] // self.spec.block_size
        if not len(blocks):
            return
        pool = self.manager.pool
        stale = blocks[(pool.ref_cnt[blocks] == 0) & pool.holds_key(blocks)]
        if len(stale):
            b = int(stale[0])
            raise NotOwner(f"write: block {b} (slots {b * self.spec.block_size}...) is held by no sequence and "
                           "holds a cached prefix's K/V, which later prompts read: slots kept from before a free "
                           "(take them from the latest allocate / append)")

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
        sinks: Any = None,
        chunk: int | None = None,
    ) -> Any:
        """Paged attention of ``q`` over the sequences' K/V in ``layer``.

        q: [sum(query_lens), num_q_heads, head_dim] in the pool dtype, the
        sequences' query tokens back to back; they are each sequence's last
        ``query_lens[i]`` tokens (default 1: decode) and attend causally.
        ``scale`` defaults to 1/sqrt(head_dim). ``window`` / ``softcap`` / ``sinks``:
        sliding window, logit soft cap and attention sinks, as
        `kvpager.plan.StepPlan.attend`; ``chunk``: chunked attention (the query
        at position p attends to positions [p - p % chunk, p]: Llama-4's
        chunked layers; `kvpager.attend_options.chunk_step`). Returns q's shape, of q's kind
        (a torch tensor for a torch q, as a step plan's ``attend``)."""
        if self.ranks > 1:
            raise self.backend._per_rank("attend")
        spec = self.spec
        validate.layer(layer, spec)
        ids = validate.seq_ids(seq_ids)
        tables, seq_lens = self.manager.tables(ids)
        qlens = validate.query_lens(query_lens, ids, seq_lens)
        num_q = getattr(q, "shape", (0, 0))[1] if getattr(q, "ndim", 0) == 3 else 0
        if num_q < 1 or num_q % spec.num_kv_heads:
            raise InvalidArgument(
                f"q must be [tokens, num_q_heads, {spec.head_dim}] with num_q_heads a multiple of "
                f"num_kv_heads={spec.num_kv_heads}, got shape {getattr(q, 'shape', None)}"
            )
        torch_q = _is_torch(q)
        q = _tensor(q, "q", (int(qlens.sum()), num_q, spec.head_dim), spec, self.backend.xp)
        qlens = np.asarray(qlens, dtype=np.int32)
        if chunk is None:
            check_floor(self.manager.floors(ids), seq_lens, qlens, window)
        else:  # rows of one chunk each, their tables from their chunk's first block
            tables, seq_lens, qlens = chunk_step(tables, seq_lens, qlens, chunk, spec.block_size)
            check_floor(table_floor(tables, spec.block_size), seq_lens, qlens, window)
        scale = check_scale(scale, spec.head_dim)
        self.pending = True
        out = self.backend.attend(
            int(layer), q, tables, seq_lens, qlens, scale,
            window=check_window(window), softcap=check_softcap(softcap), sinks=sinks,
        )
        return _as_torch(out, self.backend.xp) if torch_q else out

    def tables(self, seq_ids: int | Seq[int]) -> tuple[np.ndarray, np.ndarray]:
        """Padded int32 block tables [B, max_blocks] (null-block padding) and
        lengths int32 [B] of resident sequences: one vectorised gather.
        Raises UnknownSequence, or SequenceSwapped for a swapped-out one."""
        return self.manager.tables(validate.seq_ids(seq_ids), "tables")

    def plan(
        self,
        seq_ids: int | Seq[int],
        query_lens: int | Seq[int] | None = None,
        slots: Any = None,
        *,
        context_lens: int | Seq[int] | None = None,
        **options: Any,
    ) -> StepPlan:
        """A step plan for one forward pass over ``seq_ids``: their block tables,
        lengths and the step's ``slots`` (where its new tokens' K/V go, as
        `append` / `allocate` returned them, in one array as `append_flat`
        returns them: each its own query token's open
        position, -1 for one not written; `kvpager.plan_guard.check_positions`)
        checked and uploaded once; then per
        layer ``plan.write(layer, k, v)`` and ``plan.attend(layer, q, scale)``
        (see `kvpager.plan`). ``query_lens``: new tokens per sequence (default 1),
        the last of each sequence's tokens, or of its first ``context_lens``
        (default: all it holds; a prompt allocated whole and run in parts,
        `kvpager.plan.context_of`). The plan is a snapshot: make a new one (or
        `StepPlan.update` it) after the sequences change. ``options`` go to the
        backend's planner (see `kvpager.plan.make_plan`; ``config=KernelConfig(...)``
        for other kernel knobs)."""
        if self.ranks > 1:
            raise self.backend._per_rank("plan")
        ids = validate.seq_ids(seq_ids)
        tables, seq_lens, query_lens, slots = self._step_of(ids, query_lens, slots, context_lens, "plan")
        self.pending = True
        plan = self.backend.plan(tables, seq_lens, query_lens, slots, **options)
        plan.floor = self.manager.floors(ids)
        plan.guard_with(sequence_guard(ids, partial(_rows_under_lock, self)))
        return plan

    def refill(self, plan: StepPlan, seq_ids: int | Seq[int], query_lens: int | Seq[int] | None = None,
               slots: Any = None, *, context_lens: int | Seq[int] | None = None) -> None:
        """`StepPlan.update` from this pool's block tables of ``seq_ids``: the
        plan keeps its buffers (a captured CUDA graph replays the new step) and
        stays tied to these sequences, so it refuses its calls once they change
        under it (`kvpager.plan_guard`), as a plan from `plan` does. ``query_lens``,
        ``slots`` and ``context_lens`` as `plan` takes them."""
        if self.ranks > 1:
            raise self.backend._per_rank("refill")
        if not isinstance(plan, StepPlan) or plan.backend is not self.backend:
            raise InvalidArgument(f"refill: {type(plan).__name__} is no step plan of this pool")
        ids = validate.seq_ids(seq_ids)
        plan.update(*self._step_of(ids, query_lens, slots, context_lens, "refill"))
        plan.floor = self.manager.floors(ids)
        plan.guard_with(sequence_guard(ids, partial(_rows_under_lock, self)))

    def _step_of(self, ids: list[int], query_lens: Any, slots: Any, context_lens: Any, op: str,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """The tables, lengths, query lengths and slots of a step over ``ids``, checked:
        the tables are the pool's own, the step's part is the caller's (its slots each
        its own query token's open position, `kvpager.plan_guard.check_positions`)."""
        if slots is None:
            tables, seq_lens = self.manager.tables(ids, op)
            committed = None
        else:
            tables, seq_lens, committed = self.manager.rows_now(ids, op)
        seq_lens = context_of(seq_lens, context_lens)
        if query_lens is not None:
            query_lens = validate.per_seq(query_lens, len(ids), "query_lens")  # (check_queries makes the array)
        query_lens, slots = check_queries(self.spec, seq_lens, query_lens, slots)
        check_positions(ids, tables, seq_lens, query_lens, slots, self.spec.block_size, committed)
        return tables, seq_lens, query_lens, slots

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


def _rows_under_lock(pool: Any, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A step plan's guard's reading of its sequences (`kvpager.plan_guard`), under
    the pool's lock (a `KVPool`'s or a rank view's, the pool's): a plan's layers do
    not take it, and another thread's call changing the batch memo between its
    reads raised a bare IndexError from the plan's write or attend."""
    with pool._lock:
        return pool.manager.rows_now(ids)
