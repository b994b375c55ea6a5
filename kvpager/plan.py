"""Step plans: one forward pass's attention metadata, built once, used by every layer.

A model runs every layer once per forward pass and every layer needs the
same block tables, lengths and slots. `make_plan` checks them once and hands
them to the backend, which uploads them once and picks its kernels; then per
layer::

    plan = pool.plan(seq_ids, query_lens, slots)   # once per step
    for layer in range(num_layers):
        plan.write(layer, k, v)                     # the step's new K/V at the plan's slots
        out = plan.attend(layer, q)                 # paged attention, causal over the new tokens

``write`` and ``attend`` check only what they cannot know in advance (the
tensors' shapes and dtypes) and launch; on a GPU they run on the caller's
current stream (torch's where torch drives the GPU, else CuPy's), never
synchronize and allocate nothing but the output (pass ``out`` to avoid that),
so a decode step can be captured in a CUDA graph. `StepPlan.update` refills a
plan's buffers in place (same addresses) before a graph replay. A plan's
launches share its device scratch (split and cascade partial states, the
persistent multi-token grid's item counter), so one plan's layers run one
after another on one stream, as a model runs them; two streams at once need
two plans.

Tensors may be NumPy / CuPy arrays or torch tensors (CPU tensors for the
NumPy backend, CUDA tensors on the pool's GPU for the CuPy backend); the
result of ``attend`` is of the same kind as ``q``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from kvpager import validate, validate_arrays
from kvpager.attend_options import (
    check_chunk,
    check_scale,
    check_sinks_shape,
    check_softcap,
    check_window,
    chunk_step,
)
from kvpager.errors import InvalidArgument, StalePlan
from kvpager.plan_guard import Foreign, Guard, Moves, view_guard
from kvpager.spec import PoolSpec
from kvpager.validate_arrays import int_array


def check_step(
    spec: PoolSpec, tables: Any, seq_lens: Any, query_lens: Any = None, slots: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate one step's metadata; returns (tables int32 [B, W], seq_lens
    int32 [B], query_lens int32 [B], slots int64 [sum(query_lens)] or None).

    Block ids must lie in the pool, each sequence's length within its table,
    1 <= query_lens <= seq_lens, slots in the pool (-1: padding, skipped) and
    never in the null block."""
    tables = int_array(tables, "block_tables", 2, np.int32)
    seq_lens = int_array(seq_lens, "seq_lens", 1, np.int32)
    nseq, width = tables.shape
    if len(seq_lens) != nseq:
        raise InvalidArgument(f"{nseq} block tables but {len(seq_lens)} seq_lens")
    if tables.size and (tables.min() < 0 or tables.max() >= spec.num_blocks):
        bad = tables[(tables < 0) | (tables >= spec.num_blocks)][0]
        raise InvalidArgument(f"block_tables holds {int(bad)}, outside [0, {spec.num_blocks})")
    if nseq and (seq_lens.min() < 1 or seq_lens.max() > width * spec.block_size):
        raise InvalidArgument(f"seq_lens must be in [1, {width * spec.block_size}] for tables {width} blocks wide")
    return (tables, seq_lens, *check_queries(spec, seq_lens, query_lens, slots))


def context_of(seq_lens: np.ndarray, context_lens: Any) -> np.ndarray:
    """The lengths a step attends over where it runs over each sequence's first
    ``context_lens`` tokens (None: all ``seq_lens`` it holds; an int: the same for
    each): a prompt allocated whole and run in parts (chunked prefill, or a model's
    recurrent layers resumed in passes), each part's tokens the last of its context.
    InvalidArgument unless each is an int in [1, its sequence's length]."""
    if context_lens is None:
        return seq_lens
    lens = int_array(validate.per_seq(context_lens, len(seq_lens), "context_lens"), "context_lens", 1, np.int64)
    if len(lens) and (lens.min() < 1 or (lens > seq_lens).any()):
        bad = int(np.flatnonzero((lens < 1) | (lens > seq_lens))[0])
        raise InvalidArgument(f"context_lens must be in [1, the sequence's length]: sequence {bad} holds "
                              f"{int(seq_lens[bad])} tokens, context_lens {int(lens[bad])}")
    return lens.astype(np.int32)


def check_queries(spec: PoolSpec, seq_lens: np.ndarray, query_lens: Any = None,
                  slots: Any = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The query lengths (int32 [B], default 1; each in [1, seq_lens]) and slots
    (see `validate_arrays.slots`; one per query token) of a step over sequences of
    ``seq_lens`` tokens, whose tables are known good (the pool's own)."""
    nseq = len(seq_lens)
    if query_lens is None:
        query_lens = np.ones(nseq, dtype=np.int32)
        total = nseq
    else:
        if isinstance(query_lens, (int, np.integer)) or isinstance(query_lens, np.ndarray) and query_lens.ndim == 0:
            query_lens = np.broadcast_to(np.asarray(query_lens), (nseq,))
        query_lens = int_array(query_lens, "query_lens", 1, np.int32)
        if len(query_lens) != nseq:
            raise InvalidArgument(f"{len(query_lens)} query_lens for {nseq} sequences")
        if nseq and (query_lens.min() < 1 or (query_lens > seq_lens).any()):
            raise InvalidArgument(f"query_lens must be in [1, seq_lens], got {query_lens.tolist()[:8]}")
        total = int(query_lens.sum())
    if slots is not None:
        slots = validate_arrays.slots(slots, spec)
        if len(slots) != total:
            raise InvalidArgument(f"{len(slots)} slots for {total} query tokens")
    return query_lens, slots


def closed_pool() -> InvalidArgument:
    """What a plan's call raises once its pool is closed (`Backend.closed`): its
    storage is released, and a GPU plan's launches would write freed memory."""
    return InvalidArgument("this plan's pool is closed: its storage is released (make plans of an open pool)")


class StepPlan(ABC):
    """One step's block tables, lengths and slots, checked and uploaded once."""

    spec: PoolSpec
    tables: np.ndarray  # int32 [B, W], the host copy
    seq_lens: np.ndarray  # int32 [B]
    query_lens: np.ndarray  # int32 [B]
    slots: np.ndarray | None  # int64 [num_tokens]
    #: each sequence's first position still held, where some released blocks (`KVPool.release_before`)
    floor: np.ndarray | None = None
    #: whether `update` may refill this plan in place (its chunked views are then plans of their own)
    refillable: bool = False
    #: the check against the sequences the plan was made of (`kvpager.plan_guard`); None: bare tables
    guard: Guard | None = None
    #: the backend's count of changes that can make a plan stale, and the count this plan last checked at
    _moves: Moves | Foreign
    _seen: int

    def watch(self, backend: Any) -> None:
        """Follow ``backend``'s count of changes (`kvpager.plan_guard`): called by
        each backend's plan at construction."""
        self._moves = backend.moves
        self._seen = self._moves.count

    def recheck(self, write: bool = True) -> None:
        """After the pool's sequences changed (its count moved): refuse if the pool
        is closed (`closed_pool`), if this plan no longer reads its sequences'
        blocks (`StalePlan`, by its `guard`), or, for a ``write``, if its slots are
        no longer open positions of its sequences; else go on from the count now
        (a plan whose writes are refused rechecks at each call). A plan calls it
        first thing on each call whose count has moved."""
        if self.backend.closed:
            raise closed_pool()
        count = self._moves.count
        if self.guard is not None:
            refusal = self.guard(self)
            if refusal is not None:
                if write:
                    raise StalePlan(refusal)
                return
        self._seen = count

    def guard_with(self, guard: Guard | None, moves: Moves | Foreign | None = None, seen: int | None = None) -> None:
        """Tie this plan (and its chunked views) to ``guard`` from the count now, or
        from ``seen`` (a value it had earlier: a change since is checked at the next
        call); ``moves``: the count it follows from now on (default: the one it follows)."""
        self.guard = guard
        if moves is not None:
            self._moves = moves
        self._seen = self._moves.count if seen is None else seen
        # its chunked views follow what it follows (they kept the count of when they were made: a plan
        # refilled over other sessions' sequences had views blind to those sessions' releases)
        for view in self.__dict__.get("_chunk_views", {}).values():
            if view is not self:
                view._moves, view._seen = self._moves, self._seen
                view.guard = view_guard(self)  # (this plan's check as it is now, for once it is dropped)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        """Query tokens of the step: the rows of q and of k / v."""
        return int(self.query_lens.sum())

    @abstractmethod
    def write(self, layer: int, k: Any, v: Any) -> None:
        """Store ``layer``'s K and V ([num_tokens, num_kv_heads, head_dim], pool
        dtype) at the plan's slots."""

    @abstractmethod
    def attend(self, layer: int, q: Any, scale: float | None = None, out: Any = None, *,
               window: int | None = None, softcap: float | None = None, sinks: Any = None) -> Any:
        """Paged attention of q ([num_tokens, num_q_heads, head_dim], pool dtype)
        over ``layer``; each sequence's query tokens are its last ``query_lens``
        tokens and attend causally. ``scale`` defaults to 1/sqrt(head_dim).
        ``window``: sliding-window attention, the query at position i sees keys
        j with i - window < j <= i (transformers' ``sliding_window``);
        ``softcap``: scaled scores s become softcap * tanh(s / softcap) before
        the softmax (transformers' ``softcap``, Gemma-2's attn_logit_softcapping);
        ``sinks``: an attention sink per query head (float [num_q_heads], in the
        units of the scaled scores; GPT-OSS's ``sinks``, transformers' ``s_aux``):
        a logit that joins each query's softmax denominator and attends to no
        value, so the output is scaled by sum(e^s) / (sum(e^s) + e^sink). All are
        per call, so layers of one plan may differ."""

    def chunked(self, chunk: int) -> StepPlan:
        """This step as a layer of chunked attention sees it (Llama-4's
        ``attention_chunk_size``: the query at position p attends to positions
        [p - p % chunk, p]), for `attend` over layers this plan wrote: a plan of
        the rows `chunk_step` makes, built at the first call for ``chunk`` and
        kept (refilled by this plan's `update`). This plan itself where no query
        is past the first chunk and it cannot be refilled. InvalidArgument where
        a chunk would start inside a block."""
        chunk = check_chunk(chunk)
        views = self.__dict__.setdefault("_chunk_views", {})
        view = views.get(chunk)
        if view is None:
            tables, lens, qlens = chunk_step(self.tables, self.seq_lens, self.query_lens, chunk,
                                             self.spec.block_size)
            if tables is self.tables and not self.refillable:
                view = self
            else:
                view = self.backend.plan(tables, lens, qlens, None, **self.view_options())
                view.floor = table_floor(tables, self.spec.block_size)
                # stale with this plan: its check is this plan's, from the count this plan last checked at
                # (from the count now, a view made after its plan's sequences changed never rechecked)
                view.guard_with(view_guard(self), self._moves, self._seen)
            views[chunk] = view
        return view

    def view_options(self) -> dict[str, Any]:
        """The backend planner's options a chunked view of this plan is built with."""
        return {}

    def view_steps(self, tables: Any, seq_lens: Any, query_lens: Any, slots: Any) -> tuple[Any, ...]:
        """For `update`: the step checked (`check_step`) and what each chunked view
        (`chunked`) is to be refilled with, computed before anything is refilled,
        so a step a view refuses changes nothing. Returns (tables, seq_lens,
        query_lens, slots, [(view, its step), ...]); the step unchecked where the
        plan has no views (the refill checks it)."""
        views = self.__dict__.get("_chunk_views")
        if not views:
            return tables, seq_lens, query_lens, slots, []
        tables, seq_lens, query_lens, slots = check_step(self.spec, tables, seq_lens, query_lens, slots)
        bs = self.spec.block_size
        return tables, seq_lens, query_lens, slots, [
            (view, chunk_step(tables, seq_lens, query_lens, chunk, bs)) for chunk, view in views.items()]

    def write_attend(self, layer: int, q: Any, k: Any, v: Any, scale: float | None = None, *,
                     window: int | None = None, softcap: float | None = None, sinks: Any = None,
                     chunk: int | None = None) -> Any:
        """One layer of a model that keeps heads first (transformers' layout): ``k`` /
        ``v`` [1, num_kv_heads, num_tokens, head_dim] and ``q`` [1, num_q_heads,
        num_tokens, head_dim]; `write` k and v, then `attend` q (through the
        `chunked` view of the plan for a layer of chunked attention: ``chunk``).
        Returns [1, num_tokens, num_q_heads, head_dim], of the kind of ``q``.
        Where the three are views of token-major memory (a model's projections
        reshaped), the GPU plan launches on their pointers without making a view.
        Checked whole before anything is written: a refused call changes nothing."""
        check_heads_first(q, k, v)
        qt = q[0].swapaxes(0, 1)
        self.check_query(qt, check_q_shape(tuple(qt.shape), self.num_tokens, self.spec), sinks)
        check_scale(scale, self.spec.head_dim)
        check_softcap(softcap)
        target = self if chunk is None else self.chunked(chunk)
        if target.floor is not None:
            target.check_floor(window)
        else:
            check_window(window)
        self.write(layer, k[0].swapaxes(0, 1), v[0].swapaxes(0, 1))
        return target.attend(layer, qt, scale, window=window, softcap=softcap, sinks=sinks)[None]

    def check_query(self, q: Any, heads: int, sinks: Any) -> None:
        """For `write_attend`, before its write: InvalidArgument for what `attend`
        would refuse in ``q`` ([num_tokens, heads, head_dim], shape checked) and
        ``sinks``. Here the sinks' shape; a backend's plan checks q's kind too."""
        if sinks is not None:
            check_sinks_shape(sinks, heads)

    def update(self, tables: Any, seq_lens: Any, query_lens: Any = None, slots: Any = None) -> None:
        """Refill the plan in place with another step of the same shape (see the backend's plan)."""
        raise InvalidArgument(f"{type(self).__name__} cannot be updated in place; make a new plan")

    def check_floor(self, window: Any) -> None:
        """InvalidArgument unless every query's ``window`` starts at or after its
        sequence's first held position (blocks before it were released)."""
        check_floor(self.floor, self.seq_lens, self.query_lens, window)


def check_heads_first(q: Any, k: Any, v: Any) -> None:
    """InvalidArgument unless q, k and v are each [1, heads, num_tokens, head_dim]
    (`StepPlan.write_attend`'s layout; the rest of their shapes the plan checks)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 4 or shape[0] != 1:
            raise InvalidArgument(f"write_attend: {name} must be [1, heads, num_tokens, head_dim], "
                                  f"got shape {shape}")


def table_floor(tables: np.ndarray, block_size: int) -> np.ndarray | None:
    """Each row's first held position read from its block table (released
    blocks are null entries at its start, and only there); None when no row
    has one. What `KVPool.plan` takes from the pool, for a plan refilled from tables alone."""
    if not tables.size or tables[:, 0].all():
        return None
    held = tables != 0
    return held.argmax(axis=1).astype(np.int64) * block_size


def check_floor(floor: np.ndarray | None, seq_lens: np.ndarray, query_lens: np.ndarray, window: Any) -> None:
    """See `StepPlan.check_floor`; ``floor`` None: nothing released."""
    if floor is None:
        return
    w = check_window(window)
    first = np.zeros(len(floor), np.int64) if w is None else \
        np.maximum(seq_lens.astype(np.int64) - query_lens - w + 1, 0)
    bad = np.flatnonzero(first < floor)
    if len(bad):
        b = int(bad[0])
        raise InvalidArgument(
            f"attend: sequence {b} of the step released its blocks before position {int(floor[b])}; "
            f"its queries would read position {int(first[b])} "
            + ("(no window given)" if w is None else f"with window={w}")
            + ": attend with the sliding window those blocks were released for")


#: What a backend's planner takes (`make_plan`); the NumPy backend ignores all but
#: ``config`` and ``num_rows``, so code written for either runs on both.
PLAN_OPTIONS = frozenset({"num_rows", "width", "num_splits", "num_q_heads", "cascade", "host_bound", "config"})


def check_plan_options(options: dict[str, Any]) -> None:
    """InvalidArgument for a planner option no backend takes (a misspelled one, or
    an attend's such as ``window``), which one backend ignored and the other refused."""
    unknown = sorted(set(options) - PLAN_OPTIONS)
    if unknown:
        raise InvalidArgument(f"no plan option {', '.join(unknown)}; a plan takes {', '.join(sorted(PLAN_OPTIONS))} "
                              "(window, softcap, sinks and chunk are attend's)")


def make_plan(backend: Any, tables: Any, seq_lens: Any, query_lens: Any = None, slots: Any = None,
              **options: Any) -> StepPlan:
    """A step plan on ``backend`` (validated here once). ``options`` go to the
    backend's planner (the CuPy backend: ``num_rows`` / ``width`` capacities for
    in-place updates, ``num_splits`` to override the decode split-K planner,
    ``config``: a `kvpager.KernelConfig` of kernel tuning knobs, default the
    production one)."""
    return backend.plan(*check_step(backend.spec, tables, seq_lens, query_lens, slots), **options)


def check_q_shape(shape: tuple[int, ...], tokens: int, spec: PoolSpec) -> int:
    """The number of query heads of a q of ``shape``; InvalidArgument if q is
    not [tokens, a multiple of num_kv_heads, head_dim]."""
    hkv = spec.num_kv_heads
    if len(shape) != 3 or shape[0] != tokens or shape[2] != spec.head_dim or shape[1] < 1 or shape[1] % hkv:
        raise InvalidArgument(
            f"q must be [{tokens}, num_q_heads, {spec.head_dim}] with num_q_heads a multiple of "
            f"num_kv_heads={hkv}, got shape {tuple(shape)}")
    return int(shape[1])
