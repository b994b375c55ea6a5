"""Where the recurrent layers' states of a kvpager generation live (`kvpager.hf.recurrent`).

transformers keeps them in its linear-attention cache layers, a tensor per
state (a convolution window, a recurrent state) with a row per sequence.
Here they are handled as

- a `Layout`: which states a model's cache holds (layer, kind, index) and
  each convolution's kernel size, read off a cache a pass has filled;
- rows: one sequence's states, a tensor of one row per state, taken out of a
  cache (`rows_of`) and put back together into one (`cache_over`), so passes
  over different groups of prompts (a pass per prompt length, and a pass that
  resumes from a cached state) join into one batch;
- the name a model's forward takes a cache under (`cache_argument`), and a
  forward pass of rows over the states in a cache (`forward_rows`);
- `States`: the batch's rows at fixed addresses for the decode steps (a CUDA
  graph reads and writes them in place), and their marks (each row's states at
  its last block boundary, held where its sequence ends).

The states held across generations, by the tokens before them, are
`kvpager.hf.state_cache`'s; which model types' recurrent layers continue a
pass from held states (`CONTINUING`, `continues`, re-exported here) is
`kvpager.hf.continuing`'s.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from kvpager.errors import UnsupportedModel
from kvpager.hf.attention import PagedBatch
from kvpager.hf.continuing import CONTINUING, MODULE_STATES, NOT_CONTINUING, continues  # noqa: F401 - re-exported
from kvpager.hf.model import RECURRENT_KINDS, text_config
from kvpager.sizing import NO_KV_KINDS

# (layer index, "conv" or "recurrent", state index, the convolution's kernel size or None)
Layout = tuple[tuple[int, str, int, Any], ...]
Rows = tuple[torch.Tensor, ...]  # one sequence's states, in its layout's order, a row each


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes its cache (``cache`` since
    transformers 5.24's deprecations, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_classes() -> tuple[Any, Any, Any]:
    """transformers' (DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin); ValueError
    where it has no linear-attention cache layers."""
    try:
        from transformers.cache_utils import (
            DynamicCache,
            DynamicLayer,
            LinearAttentionCacheLayerMixin,
        )
    except ImportError:
        import transformers

        raise UnsupportedModel(f"models with recurrent layers (layer_types {sorted(RECURRENT_KINDS)}) need "
                               f"transformers' linear-attention cache layers (transformers 5.24 or later); this is "
                               f"transformers {transformers.__version__}") from None
    return DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin


def _pass_through(layer: Any) -> Any:
    """``layer`` (an attention cache layer) made to keep nothing: its ``update`` gives
    back the step's K/V as they came (kvpager's attention stores and reads them)."""

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return key_states, value_states

    layer.update = update
    layer.reorder_cache = lambda *args, **kwargs: None
    layer.batch_select_indices = lambda *args, **kwargs: None
    return layer


def new_cache(model: Any) -> Any:
    """A transformers cache for ``model`` whose recurrent layers keep their states and
    whose attention layers keep nothing."""
    dynamic_cache, dynamic_layer, linear = cache_classes()
    cache = dynamic_cache(config=text_config(model))
    kinds = text_config(model).layer_types
    for i, layer in enumerate(cache.layers):
        recurrent, attends = kinds[i] in RECURRENT_KINDS, kinds[i] not in NO_KV_KINDS
        # (a hybrid layer's, both: transformers' LinearAttentionAndFullAttentionLayer); a layer
        # that neither attends nor recurs (an MLP or mixture of experts) touches no cache layer,
        # whichever kind transformers gives it (5.17 gives NemotronH's a linear-attention one)
        stateless = not recurrent and not attends
        if (isinstance(layer, linear) != recurrent and not stateless) \
                or (attends and not isinstance(layer, dynamic_layer)):
            raise UnsupportedModel(f"{type(model).__name__}: layer {i} ({kinds[i]}) has a cache layer of kind "
                                   f"{type(layer).__name__}; kvpager cannot tell where its state lives")
        if isinstance(layer, dynamic_layer):
            _pass_through(layer)
    return cache


def layout_of(cache: Any) -> Layout:
    """The states a pass left in ``cache``."""
    _, _, linear = cache_classes()
    out = []
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, linear):
            continue
        for kind in ("conv", "recurrent"):
            for k in range(layer.number_of_states):
                if getattr(layer, f"is_{kind}_states_initialized")[k]:
                    out.append((i, kind, k, layer.conv_kernel_size[k] if kind == "conv" else None))
    return tuple(out)


def check_layout(model: Any, layout: Layout) -> Layout:
    """``layout`` (`layout_of` a pass's cache), or ValueError where a recurrent layer of
    ``model`` left no state in the cache: it keeps its states elsewhere (RecurrentGemma,
    in its modules), where kvpager can neither gather a batch's rows as sequences end
    nor hold them for a later prompt. Served, such a model generated other tokens than
    transformers' without an error."""
    kinds = text_config(model).layer_types
    held = {i for i, _, _, _ in layout}
    missing = [i for i, kind in enumerate(kinds) if kind in RECURRENT_KINDS and i not in held]
    if missing:
        raise UnsupportedModel(f"{type(model).__name__}: its recurrent layers {missing[:8]} keep their states "
                               "outside transformers' cache (in their modules); kvpager moves each sequence's "
                               "states through the cache's linear-attention layers, so it cannot serve this model")
    return layout


def tensors_of(cache: Any, layout: Layout) -> list[torch.Tensor]:
    """The state tensors of ``cache``, in ``layout``'s order."""
    return [getattr(cache.layers[i], f"{kind}_states")[k] for i, kind, k, _ in layout]


def rows_of(cache: Any, layout: Layout) -> list[Rows]:
    """Each row's states in ``cache`` (views: the cache must not run again)."""
    tensors = tensors_of(cache, layout)
    n = tensors[0].shape[0] if tensors else 0
    return [tuple(t[r : r + 1] for t in tensors) for r in range(n)]


def cache_over(model: Any, layout: Layout, tensors: Sequence[torch.Tensor]) -> Any:
    """A cache whose states are ``tensors`` (in ``layout``'s order, used as they are)
    and that has seen tokens before: the next pass continues from them."""
    cache = new_cache(model)
    for (i, kind, k, kernel), t in zip(layout, tensors):
        layer = cache.layers[i]
        getattr(layer, f"{kind}_states")[k] = t
        getattr(layer, f"is_{kind}_states_initialized")[k] = True
        if kind == "conv":
            layer.conv_kernel_size[k] = kernel
        layer.has_previous_state[k] = True
        layer.device, layer.dtype = t.device, t.dtype
    return cache


def stacked(layout: Layout, rows: Sequence[Rows], capacity: int | None = None) -> list[torch.Tensor]:
    """``rows`` as one tensor per state (rows past theirs, up to ``capacity``, zero)."""
    out = []
    for j in range(len(layout)):
        parts = [r[j] for r in rows]
        pad = (capacity or len(rows)) - len(rows)
        if pad > 0:
            parts.append(parts[0].new_zeros((pad, *parts[0].shape[1:])))
        out.append(torch.cat(parts))
    return out


def empty_like_each(tensors: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """An uninitialised tensor like each of ``tensors``, of ``rows`` rows (`States.mark`'s
    second copy, whose rows are read only once marked: where a test makes the
    allocation fail)."""
    return [t.new_empty((rows, *t.shape[1:])) for t in tensors]


def by_dtype(src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor]
             ) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``src`` and ``dst`` (pairwise alike) as lists of one dtype and device each: what
    a multi-tensor copy takes in one fused launch (torch copies a list of mixed
    dtypes tensor by tensor, a launch each)."""
    groups: dict[Any, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for s, d in zip(src, dst):
        ss, dd = groups.setdefault((s.dtype, s.device), ([], []))
        ss.append(s)
        dd.append(d)
    return list(groups.values())


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """``rows`` (ascending) as runs of consecutive indices, [start, end) each."""
    runs: list[tuple[int, int]] = []
    start = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1:
            runs.append((start, prev + 1))
            start = r
        prev = r
    runs.append((start, prev + 1))
    return runs


class States:
    """The recurrent states of a batch's rows at fixed addresses: for each state of
    each recurrent layer, one tensor of ``capacity`` rows (``rows``' first), which
    caches made by `cache` see as views of their first rows. A CUDA graph captured
    over such a cache reads and writes those rows at every replay; `keep` moves the
    rows left up in place when sequences end.

    Marks: a row's states as they were at one moment (its last block boundary,
    `kvpager.hf.recurrent.Recurrent.stepped`), copied by `mark` into a second set of
    tensors made at the first mark, moved with the rows by `keep`; ``marked[k]``:
    the tokens row k had run at its mark (0: none)."""

    def __init__(self, model: Any, layout: Layout, states: Sequence[Rows] | None, rows: list[int], capacity: int,
                 mark_bytes: int | None = None, tensors: list[torch.Tensor] | None = None):
        """``states``: each row's (stacked into new tensors), or None and ``tensors``:
        the states' tensors of ``capacity`` rows, the rows' in order, taken as they are
        (a prefill's one pass over every row: its cache's, not copied)."""
        self.model, self.layout, self.rows, self.n = model, layout, list(rows), len(rows)
        # each state's rows, ``capacity`` of them
        self.tensors = stacked(layout, states, capacity) if tensors is None else list(tensors)
        self._caches: dict[int, Any] = {}
        self.marks: list[torch.Tensor] | None = None
        self.marked = [0] * self.n
        # Rows the marks hold: the first ``mark_rows`` (all without ``mark_bytes``), so the
        # second copy takes at most ``mark_bytes`` (what a state cache could hold of them)
        row_bytes = sum(t[0].numel() * t.element_size() for t in self.tensors)
        self.mark_rows = capacity if mark_bytes is None or not row_bytes else min(capacity, mark_bytes // row_bytes)
        # (src, dst) state tensors by dtype: `mark`'s copies, one multi-tensor copy a dtype
        self._pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] | None = None

    def fits(self, layout: Layout, n: int, like: Sequence[torch.Tensor]) -> bool:
        """Whether ``n`` rows of states in ``layout``, shaped and typed as ``like``'s rows
        (one tensor a state), fit these tensors (`load`)."""
        return (layout == self.layout and n <= self.capacity and len(like) == len(self.tensors) and all(
            t.shape[1:] == s.shape[1:] and t.dtype == s.dtype and t.device == s.device
            for t, s in zip(like, self.tensors)))

    @property
    def capacity(self) -> int:
        return self.tensors[0].shape[0] if self.tensors else 0

    def load(self, tensors: Sequence[torch.Tensor], n: int) -> None:
        """Another batch's ``n`` rows (the first rows of ``tensors``, one a state, as
        `fits`) copied into these tensors in place, the rows past them zeroed (a kept
        CUDA graph reads them where they are: `kvpager.hf.captured_steps.CapturedSteps`); the
        rows are that batch's from here on, none marked."""
        with torch.inference_mode():  # (the states may be a pass's own, made in inference mode)
            for full, src in zip(self.tensors, tensors):
                full[:n].copy_(src[:n])
                full[n:].zero_()
        self.rows, self.n, self.marked = list(range(n)), n, [0] * n

    def mark(self, rows: Sequence[int], at: Sequence[int]) -> None:
        """Copy the states of rows ``rows`` (ascending indices into the rows held) as
        their marks, taken when each had run ``at`` tokens; queued on the current
        stream, so after the passes queued before it. Rows past `mark_rows` are not
        marked."""
        if rows and rows[-1] >= self.mark_rows:  # (rows past the marks' hold none)
            at = [a for r, a in zip(rows, at) if r < self.mark_rows]
            rows = [r for r in rows if r < self.mark_rows]
        if not rows or not self.tensors:
            return
        if self._pairs is None:
            # (MemoryError where there is no room for them: nothing is marked then)
            try:
                marks = empty_like_each(self.tensors, self.mark_rows)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:  # (the CPU allocator's is a RuntimeError)
                raise MemoryError(f"no memory for a second copy of the batch's recurrent states: {e}") from e
            self.marks = marks
            self._pairs = by_dtype(self.tensors, marks)
        # Each run of consecutive rows is one slice a tensor, and each dtype one multi-tensor
        # copy (`by_dtype`; Qwen3.5's float32 recurrent and bf16 convolution states, 64 rows in
        # one list: 2,304 copies, 20 ms of host time a mark on an H200's host, now 0.5).
        runs = _runs(rows)
        for src, dst in self._pairs:
            torch._foreach_copy_([d[a:b] for d in dst for a, b in runs], [s[a:b] for s in src for a, b in runs])
        for r, a in zip(rows, at):
            self.marked[r] = a

    def marked_rows(self, k: int) -> Rows:
        """Row ``k``'s marked states (views: copy them before the row moves)."""
        return tuple(m[k : k + 1] for m in self.marks)

    def cache(self, rows: int) -> Any:
        """A transformers cache over the first ``rows`` rows of the states (kept, so a
        captured graph's cache stays the one it was captured with)."""
        cache = self._caches.get(rows)
        if cache is None:
            cache = self._caches[rows] = cache_over(self.model, self.layout, [t[:rows] for t in self.tensors])
        return cache

    def keep(self, rows: list[int]) -> None:
        """The states of ``rows`` (a subsequence of the rows held) in the first
        ``len(rows)`` rows, in that order, in place."""
        if rows is self.rows or rows == self.rows:
            return
        where = {r: k for k, r in enumerate(self.rows)}
        index = torch.tensor([where[r] for r in rows], dtype=torch.long)
        if self.tensors:
            index = index.to(self.tensors[0].device, non_blocking=True)
        m = len(rows)
        with torch.inference_mode():  # (the states may be a pass's own, made in inference mode)
            self._move(index, m)
        self.marked = [self.marked[where[r]] if j < self.mark_rows else 0 for j, r in enumerate(rows)]
        self.rows, self.n = list(rows), m

    def _move(self, index: torch.Tensor, m: int) -> None:
        for full in self.tensors:
            full[:m] = full[index]  # (the gather makes a copy first: rows may move onto rows read)
        # the marks of the rows that land within the marks' rows (a row from past them has none:
        # what its place holds is left unread, as its ``marked`` is 0)
        k = min(m, self.mark_rows)
        if self.marks and k:
            held = index[:k] if self.mark_rows >= len(self.marked) else index[:k].clamp(max=self.mark_rows - 1)
            for full in self.marks:
                full[:k] = full[held]

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.tensors]

    def restore(self, saved: list[torch.Tensor]) -> None:
        with torch.inference_mode():
            for t, s in zip(self.tensors, saved):
                t.copy_(s)



def fixed_states(graphs: Any, model: Any, layout: Layout, rows: Sequence[Rows] | None, n: int, capacity: int,
                 mark_bytes: int | None = None, tensors: list[torch.Tensor] | None = None) -> States:
    """A batch's `States` of ``n`` rows (``rows``, each row's states, or ``tensors``: a
    pass's own, its rows in order) for decode steps captured by ``graphs``
    (`kvpager.hf.graphs.DecodeGraphs`, or None). Where ``graphs`` keeps the states its
    graphs were captured over (``graphs.states``: a `CapturedSteps`' from an earlier
    call) and they fit, the rows are loaded into them in place, so the graphs replay
    as they are; else new states of ``capacity`` rows, which ``graphs`` keeps from
    here on, its graphs (over the old ones) dropped."""
    kept = getattr(graphs, "states", None)
    if kept is not None:
        src = tensors if tensors is not None else stacked(layout, rows)
        if kept.fits(layout, n, src):
            kept.load(src, n)
            return kept
        capacity = max(capacity, kept.capacity)  # (a smaller batch later fits the larger states)
    if tensors is not None and capacity == n:  # (a pass's own tensors, taken as they are)
        states = States(model, layout, None, list(range(n)), capacity, mark_bytes=mark_bytes, tensors=tensors)
    else:
        if rows is None:
            rows = [tuple(t[r : r + 1] for t in tensors) for r in range(n)]
        states = States(model, layout, rows, list(range(n)), capacity, mark_bytes=mark_bytes)
    if graphs is not None and kept is not None:
        graphs.drop()  # (captured over the states replaced)
    if graphs is not None:
        graphs.states = states
    return states


def forward_rows(model: Any, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_to_keep: Any, *, cache: Any, arg: str, padding: torch.Tensor | None) -> torch.Tensor:
    """A pass of rows over the recurrent states in ``cache`` (the model's cache argument
    ``arg``): each row's greedy next token. Without padding, a 4-D mask is taken as given
    (no mask is built for the attention layers), and the recurrent layers take none. Rows
    left-padded: the 2-D mask, with which the recurrent layers zero the padding's inputs,
    so states from nothing stay nothing through it (the attention layers' plan holds the
    tokens alone)."""
    mask = padding if padding is not None else torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                logits_to_keep=1, kvpager=batch, **{arg: cache})
    return out.logits[:, -1] if batch.logits else out.logits[:, -1].argmax(dim=-1)
