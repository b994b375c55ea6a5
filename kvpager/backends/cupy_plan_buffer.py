"""The metadata buffer of a `CupyPlan`: a step's block tables, per-item
lengths and slots packed into one pinned host buffer and uploaded with one
asynchronous copy on the caller's stream into one device buffer.

Layout (int32 fields, then the int64 slots 8-byte aligned): ``tables``
[rows, width], ``item_seq`` and ``item_len`` [items], ``seq_lens``,
``query_lens`` and ``q_start`` [rows] (read by the multi-token kernel
only), ``slots`` [items] (-1: padding). The host never waits for a busy
GPU (`cupy_uploads`), and the host buffer is rewritten only after its
last copy has run, which is what `update` (a decode step refilled in
place for a CUDA graph) relies on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.cascade import find_shared_prefixes
from kvpager.errors import InvalidArgument
from kvpager.launch import current_stream
from kvpager.plan import check_step, table_floor

if TYPE_CHECKING:
    from kvpager.backends.cupy_plan import CupyPlan


def allocate(plan: CupyPlan, backend: Any) -> None:
    """Size ``plan``'s buffers for its rows, width and items (set before), take
    the pinned host buffer and the device buffer, and the fields' offsets and
    device pointers (``plan.ptrs``, what the launches read)."""
    import cupy

    n32 = plan.rows * plan.width + 2 * plan.items + 3 * plan.rows
    plan._n32 = -(-n32 // 2) * 2  # slots (int64) start 8-byte aligned
    nbytes = plan._n32 * 4 + plan.items * 8
    # Pinned, so the upload never waits for a busy GPU; fill writes every field the kernels read.
    plan._upload = backend.uploads.take(nbytes, plan)
    plan._host = plan._upload.host
    # A bare allocation from CuPy's pool (no ndarray around it); the backend made this device current.
    plan._dev = cupy.cuda.alloc(nbytes)
    base = plan._dev.ptr
    plan._items_written = False  # item_seq of a one-item-a-row plan: written at the first fill
    w = plan.rows * plan.width
    plan._offsets = {"tables": 0, "item_seq": w, "item_len": w + plan.items,
                     "seq_lens": w + 2 * plan.items, "query_lens": w + 2 * plan.items + plan.rows,
                     "q_start": w + 2 * plan.items + 2 * plan.rows}
    plan.ptrs = {k: base + 4 * off for k, off in plan._offsets.items()}
    plan.ptrs["slots"] = base + 4 * plan._n32


def _view(plan: CupyPlan, name: str, n: int) -> np.ndarray:
    off = plan._offsets[name]
    return plan._host[4 * off : 4 * (off + n)].view(np.int32)


def fill(plan: CupyPlan, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
         slots: np.ndarray | None) -> None:
    """Pack the step into the host buffer and upload it on the caller's stream."""
    nseq, w = tables.shape
    plan._upload.wait()  # update(): the last upload from this buffer has run
    plan.tables, plan.seq_lens, plan.query_lens, plan.slots = tables, seq_lens, query_lens, slots
    t = _view(plan, "tables", plan.rows * plan.width).reshape(plan.rows, plan.width)
    t[:nseq, :w] = tables
    if w < plan.width:  # (empty slices are skipped: each assignment costs a microsecond)
        t[:nseq, w:] = 0
    if nseq < plan.rows:
        t[nseq:] = 0
    item_seq, item_len = _view(plan, "item_seq", plan.items), _view(plan, "item_len", plan.items)
    if not plan.decode:  # the multi-token kernel reads the per-sequence fields only
        item_len = seq_lens
    elif plan.items == plan.rows:  # one item per row (a decode step, padded or not)
        if not plan._items_written:  # the same for every step this plan holds
            item_seq[:] = np.arange(plan.items, dtype=np.int32)
            plan._items_written = True
        item_len[:nseq] = seq_lens
        if nseq < plan.items:
            item_len[nseq:] = 0  # padding: reads nothing
    else:  # one item per query token (float32 multi-token)
        starts = np.cumsum(query_lens) - query_lens
        item_seq[:] = np.repeat(np.arange(nseq, dtype=np.int32), query_lens)
        j = np.arange(plan.items, dtype=np.int32) - np.repeat(starts, query_lens).astype(np.int32)
        item_len[:] = np.repeat(seq_lens - query_lens, query_lens) + j + 1
    if not plan.decode:  # the per-sequence fields only the multi-token kernel reads
        for name, arr in (("seq_lens", seq_lens), ("query_lens", query_lens),
                          ("q_start", np.cumsum(query_lens) - query_lens)):
            view = _view(plan, name, plan.rows)
            view[:nseq] = arr
            view[nseq:] = 0
    s = plan._host[4 * plan._n32 :].view(np.int64)
    if slots is not None:
        s[: len(slots)] = slots
        if len(slots) < len(s):
            s[len(slots) :] = -1
    else:
        s[:] = -1
    plan.max_len = int(item_len.max()) if plan.items else 0
    plan._upload.copy_to(plan._dev.ptr, current_stream(plan.device))


def update(plan: CupyPlan, tables: Any, seq_lens: Any, query_lens: Any = None, slots: Any = None) -> None:
    """See `CupyPlan.update`."""
    tables, seq_lens, query_lens, slots = check_step(plan.spec, tables, seq_lens, query_lens, slots)
    if not plan.decode or not (query_lens == 1).all():
        raise InvalidArgument("only a decode plan (one query token per sequence) can be updated in place")
    if len(seq_lens) > plan.rows or tables.shape[1] > plan.width:
        raise InvalidArgument(
            f"step of {len(seq_lens)} sequences x {tables.shape[1]} blocks exceeds the plan's "
            f"capacity of {plan.rows} x {plan.width}")
    if plan.items != plan.rows:
        raise InvalidArgument("this plan runs one item per query token; only a plan of one item "
                              "per sequence (a decode step, or num_rows given) can be updated")
    if (slots is not None) != plan.has_slots:
        raise InvalidArgument("update must give slots exactly when the plan was built with them")
    fill(plan, tables, seq_lens, query_lens, slots)
    plan.floor = table_floor(tables, plan.spec.block_size)
    if plan._cascades:
        found = find_shared_prefixes(tables, seq_lens, plan.spec.block_size,
                                     levels=max(c.levels for c in plan._cascades))
        fits = [c.fill(found) for c in plan._cascades]
        plan._shared = found if all(fits) else None
