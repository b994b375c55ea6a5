"""Models with recurrent layers beside their attention layers (Qwen3.5, Qwen3-Next, Jamba, Bamba, ...).

Such a model's ``layer_types`` names layers of linear attention or of a
state-space (Mamba) mixer (``linear_attention``; LFM2's ``conv``:
`kvpager.sizing.NO_KV_KINDS`) beside its full-attention layers, or layers that
do both side by side (``hybrid``: Falcon-H1, whose K/V go to the pool too). Those layers keep a fixed-size state a
sequence (a convolution window and a recurrent state), not K/V: the pool holds
the attention layers alone (`kvpager.hf.model.layer_map`: pool layer -1 for the
others), and the states live in transformers' own cache layers for them
(``LinearAttentionLayer``), whose attention layers are replaced by ones that
keep nothing (`PassThrough`), so K/V go to kvpager only.

A recurrent layer mixes every token of its row in order, so the packed row of
`kvpager.hf.attention` (all sequences' new tokens in one row) cannot carry such
a model. `Recurrent` runs

- the prefill as rows of the prompts of one length (a forward pass per
  length, no padding; rows of as many tokens each, which the attention
  function packs as one row), then joins the passes' states into one cache
  (`join`), and
- each decode step as rows of one token each ([B, 1]), the attention layers
  attending through one step plan as a packed row would
  (`kvpager.hf.attention.kvpager_attention` takes such rows), the states
  gathered to the step's rows when sequences have ended.

The states live at fixed addresses (`States`: a tensor per state, rows for
as many sequences as the batch's graph bucket), so a decode step captured in a
CUDA graph (`kvpager.hf.graphs`, ``cuda_graphs=True``) reads and writes them in
place at each replay; when sequences end, the rows left are moved up in place
(`States.keep`). The decode steps pipeline as other models' do
(`kvpager.hf.pipeline`).

Nothing of a prompt can come from the prefix cache (its blocks carry K/V, not
the recurrent states at their end), so such generations allocate under a salt
of their own. transformers' linear-attention cache layers (5.24 and later) are
required.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kvpager.hf.attention import PagedBatch, capturing, paged_attention, run_pass
from kvpager.hf.model import RECURRENT_KINDS, has_recurrent_layers, text_config
from kvpager.sizing import NO_KV_KINDS

__all__ = ["Recurrent", "States", "has_recurrent_layers", "join", "new_cache"]


def _cache_classes() -> tuple[Any, Any, Any]:
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

        raise ValueError(f"models with recurrent layers (layer_types {sorted(RECURRENT_KINDS)}) need "
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
    dynamic_cache, dynamic_layer, linear = _cache_classes()
    cache = dynamic_cache(config=text_config(model))
    kinds = text_config(model).layer_types
    for i, layer in enumerate(cache.layers):
        recurrent, attends = kinds[i] in RECURRENT_KINDS, kinds[i] not in NO_KV_KINDS
        # (a hybrid layer's, both: transformers' LinearAttentionAndFullAttentionLayer)
        if isinstance(layer, linear) != recurrent or (attends and not isinstance(layer, dynamic_layer)):
            raise ValueError(f"{type(model).__name__}: layer {i} ({kinds[i]}) has a cache layer of kind "
                             f"{type(layer).__name__}; kvpager cannot tell where its state lives")
        if isinstance(layer, dynamic_layer):
            _pass_through(layer)
    return cache


def join(caches: Sequence[Any], model: Any) -> Any:
    """One cache whose rows are ``caches``' rows in order: each recurrent layer's
    states concatenated along the batch."""
    _, _, linear = _cache_classes()
    out = new_cache(model)
    for i, layer in enumerate(out.layers):
        if not isinstance(layer, linear):
            continue
        rows = [c.layers[i] for c in caches]
        first = rows[0]
        for k in range(layer.number_of_states):
            if first.is_conv_states_initialized[k]:
                layer.conv_states[k] = torch.cat([r.conv_states[k] for r in rows])
                layer.is_conv_states_initialized[k] = True
                layer.conv_kernel_size[k] = first.conv_kernel_size[k]
            if first.is_recurrent_states_initialized[k]:
                layer.recurrent_states[k] = torch.cat([r.recurrent_states[k] for r in rows])
                layer.is_recurrent_states_initialized[k] = True
            layer.has_previous_state[k] = first.has_previous_state[k]
        layer.device, layer.dtype = first.device, first.dtype
    return out


def _cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes its cache (``cache`` since
    transformers 5.24's deprecations, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class States:
    """The recurrent states of a batch's rows at fixed addresses: for each state of
    each recurrent layer, one tensor of ``capacity`` rows (the joined prefill's
    rows first), which caches made by `cache` see as views of their first rows.
    A CUDA graph captured over such a cache reads and writes those rows at every
    replay; `keep` moves the rows left up in place when sequences end."""

    def __init__(self, model: Any, joined: Any, rows: list[int], capacity: int):
        _, _, linear = _cache_classes()
        self.model, self.rows, self.n = model, list(rows), len(rows)
        self.layers: list[tuple[int, Any]] = []  # (layer index, the joined cache's layer: flags and kernel sizes)
        self.tensors: list[torch.Tensor] = []  # each state's rows, ``capacity`` of them
        self._where: list[tuple[int, str, int]] = []  # (layer index, "conv" / "recurrent", state index)
        for i, layer in enumerate(joined.layers):
            if not isinstance(layer, linear):
                continue
            self.layers.append((i, layer))
            for kind in ("conv", "recurrent"):
                states = getattr(layer, f"{kind}_states")
                for k in range(layer.number_of_states):
                    if not getattr(layer, f"is_{kind}_states_initialized")[k]:
                        continue
                    t = states[k]
                    full = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
                    full[: self.n].copy_(t)
                    self.tensors.append(full)
                    self._where.append((i, kind, k))
        self._caches: dict[int, Any] = {}

    def cache(self, rows: int) -> Any:
        """A transformers cache over the first ``rows`` rows of the states (kept, so a
        captured graph's cache stays the one it was captured with)."""
        cache = self._caches.get(rows)
        if cache is None:
            cache = self._caches[rows] = new_cache(self.model)
            for i, src in self.layers:
                dst = cache.layers[i]
                for k in range(src.number_of_states):
                    dst.is_conv_states_initialized[k] = src.is_conv_states_initialized[k]
                    dst.is_recurrent_states_initialized[k] = src.is_recurrent_states_initialized[k]
                    dst.conv_kernel_size[k] = src.conv_kernel_size[k]
                    dst.has_previous_state[k] = src.has_previous_state[k]
                dst.device, dst.dtype = src.device, src.dtype
            for (i, kind, k), full in zip(self._where, self.tensors):
                getattr(cache.layers[i], f"{kind}_states")[k] = full[:rows]
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
        for full in self.tensors:
            full[:m] = full[index]  # (the gather makes a copy first: rows may move onto rows read)
        self.rows, self.n = list(rows), m

    def snapshot(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.tensors]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip(self.tensors, saved):
            t.copy_(s)


class Recurrent:
    """The recurrent layers' states of one generation's sequences (see the module
    docstring): `prefill` a pass per prompt length, then `decode` steps over rows
    (or `graph_pass`, the step a CUDA graph captures). ``capacity(n)``: the rows
    the states keep for ``n`` sequences (default ``n``; the graph bucket of ``n``
    where steps are captured)."""

    def __init__(self, model: Any, make_batch: Any, capacity: Callable[[int], int] | None = None):
        self.model = model
        self.make_batch = make_batch  # plan -> PagedBatch
        self.capacity = capacity or (lambda n: n)
        self.arg = _cache_argument(model)
        new_cache(model)  # the model's cache layers are what kvpager can follow (ValueError)
        self.states: States | None = None

    def prefill(self, pool: Any, rows: list[int], seq_ids: list[int], tokens: list[Sequence[int]],
                positions: list[range], slots: np.ndarray, device: torch.device) -> list[int]:
        """The rows' prompts, those of one length together (a forward pass of rows of
        that many tokens: no padding), each other length a pass of its own; the first
        new token of each row."""
        starts = np.concatenate([[0], np.cumsum([len(t) for t in tokens])])
        by_length: dict[int, list[int]] = {}
        for k, toks in enumerate(tokens):
            by_length.setdefault(len(toks), []).append(k)
        heads = text_config(self.model).num_attention_heads
        caches, order, out = [], [], [0] * len(rows)
        for n, group in by_length.items():
            cut = np.concatenate([slots[starts[k] : starts[k + 1]] for k in group])
            plan = pool.plan([seq_ids[k] for k in group], [n] * len(group), cut, num_q_heads=heads)
            cache = new_cache(self.model)
            ids = torch.tensor([list(tokens[k]) for k in group], dtype=torch.long, device=device)
            where = torch.tensor([list(positions[k]) for k in group], dtype=torch.long, device=device)
            for k, t in zip(group, self._pass(plan, ids, where, cache).tolist()):
                out[k] = t
            caches.append(cache)
            order += [rows[k] for k in group]
        self.states = States(self.model, join(caches, self.model), order, self.capacity(len(order)))
        return out

    def keep(self, rows: list[int]) -> None:
        """The next pass is over ``rows``: the states of sequences that ended go."""
        self.states.keep(rows)

    def decode(self, plan: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One eager decode pass over the rows `keep` left (a token each: ``input_ids``
        / ``position_ids`` [1, n] as a packed row would take them); each row's greedy
        next token."""
        n = self.states.n
        return self._pass(plan, input_ids.view(-1, 1), position_ids.view(-1, 1), self.states.cache(n))

    def graph_pass(self, model: Any, batch: PagedBatch, input_ids: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
        """The decode step `kvpager.hf.graphs.DecodeGraphs` captures: a token for each of
        the bucket's rows (``input_ids`` [1, bucket]; rows past the live ones are
        padding, whose states are the unused rows'), over the first ``bucket`` rows of
        the states. Run outside a capture (the warm-up before one), it leaves the
        states as it found them, so the replay that follows advances them once."""
        rows = input_ids.shape[1]
        cache = self.states.cache(rows)
        saved = None if capturing() else self.states.snapshot()
        try:
            return self._run(batch, input_ids.view(-1, 1), position_ids.view(-1, 1), cache)
        finally:
            if saved is not None:
                self.states.restore(saved)

    def _pass(self, plan: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """A forward pass of rows over ``plan`` with the recurrent states in ``cache``;
        the greedy next token at each row's last position."""
        with torch.inference_mode(), paged_attention(self.model):
            return self._run(self.make_batch(plan), input_ids, position_ids, cache)

    def _run(self, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        arg = self.arg

        def forward(model: Any, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    logits_to_keep: Any) -> torch.Tensor:
            # A 4-D mask is taken as given (no mask is built for the attention layers), and
            # the recurrent layers take none: no row holds padding.
            mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
            out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                        logits_to_keep=1, kvpager=batch, **{arg: cache})
            return out.logits[:, -1].argmax(dim=-1)

        return run_pass(self.model, batch, forward, input_ids, position_ids)
