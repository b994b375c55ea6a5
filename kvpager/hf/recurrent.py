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

Nothing of a prompt can come from the prefix cache (its blocks carry K/V, not
the recurrent states at their end), so such generations allocate under a salt
of their own. They run eager passes, unpipelined; CUDA graphs are refused.
transformers' linear-attention cache layers (5.24 and later) are required.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvpager.hf.attention import PagedBatch, paged_attention, run_pass
from kvpager.hf.model import RECURRENT_KINDS, has_recurrent_layers, text_config
from kvpager.sizing import NO_KV_KINDS

__all__ = ["Recurrent", "has_recurrent_layers", "join", "new_cache"]


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


class Recurrent:
    """The recurrent layers' states of one generation's sequences (see the module
    docstring): `prefill` a pass per prompt length, then `decode` steps over rows."""

    def __init__(self, model: Any, make_batch: Any):
        self.model = model
        self.make_batch = make_batch  # plan -> PagedBatch
        self.arg = _cache_argument(model)
        new_cache(model)  # the model's cache layers are what kvpager can follow (ValueError)
        self.cache: Any = None
        self.rows: list[int] = []  # the generation's rows the cache holds, in its order

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
        self.cache, self.rows = join(caches, self.model), order
        return out

    def decode(self, plan: Any, rows: list[int], input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One decode pass over ``rows`` (a token each: ``input_ids`` / ``position_ids``
        [1, n] as a packed row would take them); each row's greedy next token."""
        if rows != self.rows:  # sequences ended: their states go
            where = {r: k for k, r in enumerate(self.rows)}
            index = torch.tensor([where[r] for r in rows], dtype=torch.long)
            self.cache.reorder_cache(index)
            self.rows = list(rows)
        return self._pass(plan, input_ids.view(-1, 1), position_ids.view(-1, 1), self.cache)

    def _pass(self, plan: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any) -> torch.Tensor:
        """A forward pass of rows over ``plan`` with the recurrent states in ``cache``;
        the greedy next token at each row's last position."""
        batch: PagedBatch = self.make_batch(plan)
        arg = self.arg

        def forward(model: Any, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    logits_to_keep: Any) -> torch.Tensor:
            # A 4-D mask is taken as given (no mask is built for the attention layers), and
            # the recurrent layers take none: no row holds padding.
            mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
            out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                        logits_to_keep=1, kvpager=batch, **{arg: cache})
            return out.logits[:, -1].argmax(dim=-1)

        with torch.inference_mode(), paged_attention(self.model):
            return run_pass(self.model, batch, forward, input_ids, position_ids)
