"""The step plan of the CuPy backend: a step's metadata on the GPU and its launches.

At construction the step's block tables, per-item lengths and slots are
packed and uploaded once into one device buffer (`cupy_plan_buffer`: one
asynchronous copy from pinned memory on the caller's stream). The first
``attend`` with a given number of query heads picks the kernel (decode on
tensor cores, CUDA-core decode for float32, or the multi-token kernel), its
layout and split count, and packs the launch arguments
(`kvpager.launch.Launch`). Every later ``write`` / ``attend`` sets a few
pointers and launches: no validation beyond the tensors, no upload, no
synchronization, no allocation but the output. The K/V write launch, and the
dense query rows it fills for the attention, are `cupy_write`'s.

With ``num_rows`` / ``width`` capacities a decode plan can be refilled in
place by `CupyPlan.update` (rows past the step's sequences are padding: they
read nothing, write nothing and attend to zeros), which is what a captured
CUDA graph needs: the same buffers at the same addresses, the same grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager import kernels, validate
from kvpager.attend_options import check_scale, check_softcap, check_window
from kvpager.backends import cupy_plan_buffer as buffer
from kvpager.backends.cupy_cascade import (
    CascadeLaunch,
    cascade_applies,
    cascade_holds,
    choose_cascade,
)
from kvpager.backends.cupy_launches import (
    attention_launches,
    check_device_kind,
    check_sinks_kind,
    cupy_empty_like,
    device_tensor,
    fast_ptr,
    sinks_ptr,
    token_layout,
    torch_kinds,
)
from kvpager.backends.cupy_write import dense_q, launch_write
from kvpager.errors import InvalidArgument
from kvpager.kernel_config import KernelConfig, check_config
from kvpager.launch import ForkJoin, Launch, current_stream
from kvpager.plan import StepPlan, check_q_shape, closed_pool
from kvpager.plan_guard import view_guard

_LOG2E = 1.4426950408889634


class CupyPlan(StepPlan):
    """See the module docstring. Build it through `kvpager.plan.make_plan` or `KVPool.plan`."""

    def __init__(self, backend: Any, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
                 slots: np.ndarray | None, *, num_rows: int | None = None, width: int | None = None,
                 num_splits: int | None = None, num_q_heads: int | None = None, cascade: bool | None = None,
                 config: KernelConfig | None = None, host_bound: bool = False):
        spec = self.spec = backend.spec
        # The kernels' tuning knobs (kvpager.kernel_config); None: the backend's (production) config.
        self.config = backend.config if config is None else check_config(config)
        self.backend, self.device = backend, backend.index
        self.watch(backend)
        nseq = len(seq_lens)
        self.rows = int(num_rows or nseq)
        self.width = int(max(width or 0, tables.shape[1], 1))
        if self.rows < nseq:
            raise InvalidArgument(f"num_rows={num_rows} is less than the step's {nseq} sequences")
        queries = int(query_lens.sum())
        one_each = queries == nseq  # (query lengths are at least 1)
        self.decode = one_each or kernels.cuda_core_steps(spec)  # decode kernels: a work item per query token
        if self.rows > nseq and not one_each:
            raise InvalidArgument("padding rows (num_rows) need a decode step: one query token per sequence")
        self.num_splits = num_splits
        self.has_slots = slots is not None
        # Items: decode kernels run one per query token (one per row when padded).
        self.items = self.rows if self.rows > nseq else queries
        self._tokens = self.items if self.decode else queries
        buffer.allocate(self, backend)
        self._attn: dict[int, list[Launch]] = {}
        self._raw: dict[int, bool] = {}  # per query-head count: the kernel's scores are raw q . k
        # Shared-prefix (cascade) attention: a decode step on tensor cores (one item a row)
        # or a multi-token step (no padding rows); FP8 pools too. None: when it pays
        # (kvpager.cascade), True: whenever prefixes are shared. A plan with capacities
        # (for CUDA graphs, decode only) sizes its cascade tables for later steps too.
        self._cascade = cascade
        if type(host_bound) is not bool:
            raise InvalidArgument(f"host_bound must be a bool, got {host_bound!r}")
        #: a step paced by its host (a model's eager step): a decode cascades only where that would
        #: pace the device, and splits only where its unsplit CTAs would not reach every SM or its
        #: read is long (`cupy_decode.decode_kernel`)
        self.host_bound = host_bound
        self._cascade_ok = cascade is not False and cascade_applies(self, spec, nseq)
        self.cascade_slack = 2 if num_rows is not None or width is not None else 1
        self._shared: Any = None  # kvpager.cascade.SharedPrefixes of the step, found at the first attend
        self._cascades: list[CascadeLaunch] = []  # refilled in place by update()
        # other launch sets, built at their first call: (heads, without the cascade, ending with
        # the merge) -> (launches, the merge's sinks cell or None); the sinks need the merge
        self._variants: dict[tuple[int, bool, bool], tuple[list[Launch], Any]] = {}
        self._sink_cells: dict[int, Any] = {}  # per query-head count: the default launches' sinks cell
        # per query-head count: a decode cascade's launches (own parts, shared part, merge), whose
        # first two run side by side in a captured graph (`kvpager.launch.ForkJoin`)
        self._forked: dict[int, bool] = {}
        self._fork_join = ForkJoin(self.device)
        self._keep: list[Any] = []  # device buffers the launches point at
        self.splits = 1  # decode split-K count, chosen at the first attend
        self._write: Launch | None = None
        self._q_rows: dict[int, Any] = {}  # query heads -> dense query rows (`cupy_write.dense_q`)
        self._kv_shape = (self.num_tokens, spec.num_kv_heads, spec.head_dim)
        self._scale = check_scale(None, spec.head_dim) * _LOG2E
        self._last_scale: Any = None
        self._scale_given = self._scale
        self._torch_type, self._torch_dtype, self._stream = torch_kinds(spec.dtype)
        self._torch_f32 = torch_kinds("float32")[1]
        buffer.fill(self, tables, seq_lens, query_lens, slots)
        if num_q_heads is not None:
            self._prepare(int(num_q_heads))

    def _late_torch(self, x: Any) -> bool:
        """Whether ``x`` is a torch tensor this plan could not know when it was made
        (torch's CUDA came up after it: `torch_kinds`) and it knows torch's kinds now,
        as do its chunked views, so the hot path takes torch tensors from here on."""
        if self._torch_type is not None or not type(x).__module__.startswith("torch"):
            return False
        kinds = torch_kinds(self.spec.dtype)
        if kinds[0] is None:
            return False
        f32 = torch_kinds("float32")[1]
        for plan in {id(v): v for v in (self, *self.__dict__.get("_chunk_views", {}).values())}.values():
            plan._torch_type, plan._torch_dtype, plan._stream = kinds
            plan._torch_f32 = f32
        return True

    def update(self, tables: Any, seq_lens: Any, query_lens: Any = None, slots: Any = None) -> None:
        """Refill with another decode step that fits the capacities (at most
        ``num_rows`` sequences, tables at most ``width`` blocks wide), on the
        caller's stream: the buffers keep their addresses and the launches
        their grids, so a CUDA graph captured over this plan replays the new step.
        The split count chosen at the first ``attend`` stays, and so does the
        cascade's shape: the new step's shared prefixes are found again and
        refilled into it when they fit (else the step attends without them).
        Its chunked views (`chunked`) are refilled with it. Refilled from block
        tables alone, the plan no longer knows its sequences (`kvpager.plan_guard`):
        `KVPool.refill` refills it from sequence ids and keeps it checked."""
        if self.backend.closed:
            raise closed_pool()
        tables, seq_lens, query_lens, slots, views = self.view_steps(tables, seq_lens, query_lens, slots)
        buffer.update(self, tables, seq_lens, query_lens, slots)
        for view, step in views:  # (views share this plan's capacities: what fits it fits them)
            view.update(*step)
            view.guard_with(view_guard(self))
        self.guard_with(None)  # bare tables: `KVPool.refill` ties the plan to sequences again

    @property
    def num_tokens(self) -> int:
        return self._tokens

    @property
    def refillable(self) -> bool:  # type: ignore[override]
        """A decode plan of one item a row: `update` may refill it."""
        return self.decode and self.items == self.rows

    def view_options(self) -> dict[str, Any]:
        """A chunked view plans as this plan does; with this plan's capacities
        where this plan can be refilled (a decode step's view has its rows)."""
        options: dict[str, Any] = dict(num_splits=self.num_splits, cascade=self._cascade, config=self.config,
                                       host_bound=self.host_bound)
        if self.refillable:
            options.update(num_rows=self.rows, width=self.width)
        return options

    @property
    def shared_prefixes(self) -> Any:
        """The step's shared prefixes (`kvpager.cascade.SharedPrefixes`) when its
        attention cascades over them, else None (known after the first attend,
        or at construction with ``num_q_heads``)."""
        return self._shared

    # -- launches -------------------------------------------------------------------------
    def _prepare(self, num_q_heads: int) -> list[Launch]:
        """Kernel, layout and launch cells for ``num_q_heads`` query heads (once per plan)."""
        if self._cascade_ok and self._shared is None:
            # (a group the shared-prefix tiles cannot hold: a decode runs its plain launches, a
            # multi-token step's kernel refuses the group itself)
            group = num_q_heads // self.spec.num_kv_heads
            if cascade_holds(self.spec, group, self.config, kernels.compute_capability(self.device)):
                self._shared = choose_cascade(self, num_q_heads, bool(self._cascade), self.host_bound)
            self._cascade_ok = self._shared is not None
        launches, self.splits, keep, self._raw[num_q_heads], sink_cell = attention_launches(
            self, num_q_heads, self._shared)
        self._keep += keep
        self._sink_cells[num_q_heads] = sink_cell
        self._cascades += [x for x in keep if isinstance(x, CascadeLaunch)]
        self._attn[num_q_heads] = launches
        self._forked[num_q_heads] = (self.config.decode_cascade_fork and self.decode and self._shared is not None
                                     and len(launches) == 3)
        return launches

    def _variant(self, num_q_heads: int, plain: bool, merged: bool) -> tuple[list[Launch], Any]:
        """(launches, sinks cell) without the cascade (``plain``: it applies no window)
        and/or ending with the merge (``merged``: where the attention sinks apply),
        built at the first such call; the default launches where they already do."""
        key = (num_q_heads, plain and self._shared is not None, merged)
        if not key[1] and (not merged or self._sink_cells[num_q_heads] is not None):
            return self._attn[num_q_heads], self._sink_cells[num_q_heads]
        variant = self._variants.get(key)
        if variant is None:
            launches, _, keep, _, cell = attention_launches(self, num_q_heads, None if key[1] else self._shared,
                                                            merged)
            self._keep += keep
            self._cascades += [x for x in keep if isinstance(x, CascadeLaunch)]  # refilled by update()
            variant = self._variants[key] = (launches, cell)
        return variant

    def write(self, layer: int, k: Any, v: Any) -> None:
        spec = self.spec
        if self._seen != self._moves.count:
            self.recheck()
        if not self.has_slots:
            raise InvalidArgument("this plan has no slots: pass slots to plan() to write through it")
        if type(layer) is not int or not 0 <= layer < spec.num_layers:
            layer = validate.layer(layer, spec)
        shape = self._kv_shape
        kp, vp = fast_ptr(self, k, shape), fast_ptr(self, v, shape)
        if kp and vp:
            stream = self._stream(self.device)
        elif self._late_torch(k):
            return self.write(layer, k, v)
        else:
            kp, _ = device_tensor(k, "k", shape, self.backend, self.device)
            vp, _ = device_tensor(v, "v", shape, self.backend, self.device)
            stream = current_stream(self.device)
        launch_write(self, layer, kp, vp, stream)

    def write_attend(self, layer: int, q: Any, k: Any, v: Any, scale: float | None = None, *,
                     window: int | None = None, softcap: float | None = None, sinks: Any = None,
                     chunk: int | None = None) -> Any:
        """See `StepPlan.write_attend`. The hot path of a model's layer: torch
        tensors of the pool's dtype on its GPU, token-major, after the plan's
        launches for their query heads are built: two launches from their
        pointers (no view made, nothing checked twice); a layer of chunked
        attention writes through this plan and attends through its view
        (`chunked`) the same way. Anything else goes the checked way (`write`,
        `attend`)."""
        if self._seen != self._moves.count:
            self.recheck()
        target = self if chunk is None else self.chunked(chunk)
        spec = self.spec
        heads = q.shape[1] if type(q) is self._torch_type and q.dim() == 4 else 0
        launches = target._attn.get(heads)
        if launches and self.has_slots and type(layer) is int and 0 <= layer < spec.num_layers \
                and target._tokens == self._tokens:
            hkv = spec.num_kv_heads
            kp, kt, kh = token_layout(self, k, hkv)
            vp, vt, vh = token_layout(self, v, hkv) if kp else (0, 0, 0)
            qp, qt, qh = token_layout(self, q, heads) if vp else (0, 0, 0)
            if qp:
                options = target._options(launches, heads, scale, window, softcap, sinks)  # a refusal writes nothing
                out = q.new_empty((1, self._tokens, heads, spec.head_dim))
                if self._tokens:
                    stream = self._stream(self.device)
                    row = spec.head_dim * spec.compute_itemsize // 16
                    copy = (0, 0, 0, 0, 0)
                    if qh != row or qt != heads * row:  # not dense rows: the write copies them dense
                        dense = dense_q(self, heads).data_ptr()
                        copy, qp = (qp, qt, qh, dense, heads * row), dense
                    launch_write(self, layer, kp, vp, stream, (kt, kh, vt, vh), copy)
                    target._launch_attend(layer, qp, out.data_ptr(), options, stream)
                return out
        if self._late_torch(q):
            return self.write_attend(layer, q, k, v, scale, window=window, softcap=softcap, sinks=sinks,
                                     chunk=chunk)
        return super().write_attend(layer, q, k, v, scale, window=window, softcap=softcap, sinks=sinks,
                                    chunk=chunk)

    def check_query(self, q: Any, heads: int, sinks: Any) -> None:
        """See `StepPlan.check_query`: q's kind, device and dtype, and the sinks', as
        `attend` checks them (their values are read on the device, unchecked)."""
        check_device_kind(q, "q", self.backend, self.device)
        if sinks is not None:
            check_sinks_kind(sinks, heads, self.device)

    def attend(self, layer: int, q: Any, scale: float | None = None, out: Any = None, *,
               window: int | None = None, softcap: float | None = None, sinks: Any = None) -> Any:
        """See `StepPlan.attend`."""
        spec = self.spec
        if self._seen != self._moves.count:
            self.recheck(write=False)
        if type(layer) is not int or not 0 <= layer < spec.num_layers:
            layer = validate.layer(layer, spec)
        shape = q.shape if hasattr(q, "shape") else ()
        launches = self._attn.get(shape[1]) if len(shape) == 3 else None
        qp = fast_ptr(self, q, shape) if launches else 0
        if qp:  # a dense torch tensor of the right kind: the hot path
            if shape[0] != self._tokens:
                check_q_shape(tuple(shape), self._tokens, spec)
            if out is None:
                out = q.new_empty(shape)
            op = fast_ptr(self, out, shape)
            if not op:
                op, out = device_tensor(out, "out", tuple(shape), self.backend, self.device, writable=True)
            stream = self._stream(self.device)
        elif self._late_torch(q):
            return self.attend(layer, q, scale, out, window=window, softcap=softcap, sinks=sinks)
        else:
            num_q = check_q_shape(tuple(shape), self.num_tokens, spec)
            qp, q = device_tensor(q, "q", tuple(shape), self.backend, self.device)
            if out is None:
                out = q.new_empty(q.shape) if hasattr(q, "new_empty") else cupy_empty_like(q)
            op, out = device_tensor(out, "out", tuple(shape), self.backend, self.device, writable=True)
            launches = self._attn.get(num_q) or self._prepare(num_q)
            stream = current_stream(self.device)
        options = self._options(launches, shape[1], scale, window, softcap, sinks)
        if not shape[0]:
            return out
        self._launch_attend(layer, qp, op, options, stream)
        return out

    def _options(self, launches: list[Launch], heads: int, scale: Any, window: Any, softcap: Any,
                 sinks: Any = None) -> tuple[list[Launch], bool, float, int, float, Any, int]:
        """An attend's ``scale``, ``window``, ``softcap`` and ``sinks`` checked
        (InvalidArgument, before anything is launched; the window against released
        blocks too) and turned into what `_launch_attend` sets: (launches, forked, scale
        in log2 units, window or 0, soft cap in the kernel's score units or 0, the
        merge's sinks cell or None, the sinks' pointer or 0). ``launches``: those of
        ``heads`` query heads; a windowed call runs them without the cascade, a call
        with sinks through the merge."""
        if self.floor is not None:
            self.check_floor(window)
        if scale is None:
            s = self._scale
        elif scale == self._last_scale:
            s = self._scale_given
        else:
            s = self._set_scale(scale)
        if window is None and softcap is None:
            win, cap_units = 0, 0.0
        else:
            win = check_window(window) or 0
            cap = check_softcap(softcap)
            # in the kernel's score units: raw q . k (cap / scale), or log2 units (cap * log2 e)
            cap_units = 0.0 if cap is None else (cap * _LOG2E / s if self._raw[heads] else cap * _LOG2E)
        sp = 0 if sinks is None else sinks_ptr(self, sinks, heads)
        plain = window is not None and self._shared is not None
        if plain or sp:
            launches, cell = self._variant(heads, plain, bool(sp))
            return launches, self._forked[heads] and not plain, s, win, cap_units, cell, sp
        return launches, self._forked[heads], s, win, cap_units, self._sink_cells[heads], 0

    def _launch_attend(self, layer: int, qp: int, op: int,
                       options: tuple[list[Launch], bool, float, int, float, Any, int], stream: int) -> None:
        """The attention of ``layer`` from checked pointers with checked `_options`."""
        launches, forked, s, win, cap_units, sink_cell, sp = options
        # Cells shared by the launches (the merge reads the decode's out cell).
        first = launches[0].args
        first[0].value, first[5 if self.decode else 7].value = qp, op
        first[8].value, first[-1].value = layer, s
        first[-3].value, first[-2].value = win, cap_units
        if sink_cell is not None:
            sink_cell.value = sp
        if forked:  # own parts and the shared part side by side under a capture, then the merge
            self._fork_join(stream, launches[0], launches[1])
            launches[2](stream)
            return
        for launch in launches:
            launch(stream)

    def _set_scale(self, scale: Any) -> float:
        given = check_scale(scale, self.spec.head_dim) * _LOG2E  # a refused scale is not remembered
        self._last_scale, self._scale_given = scale, given
        return given

