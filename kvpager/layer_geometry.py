"""Models whose layers differ in K/V geometry, served by one pool.

A kvpager pool holds one geometry (K/V heads, head dim) for every layer.
Gemma-4's full-attention layers have another head dim than its sliding ones
(512 against 256), and fewer K/V heads (4 against 16 on the 31B model). Such a
model is served by a pool of

- the widest head dim of its layers: a narrower layer stores its q, k and v
  zero-padded to it (zeros add nothing to a score nor to an output, which is
  cut back to the layer's width), its scores scaled by its own head dim;
- the least common multiple of its layers' K/V head counts: a layer of fewer
  K/V heads stores each of them repeated (pool head j holds the layer's head
  j // r, r = pool heads / layer heads), so that every query head attends over
  its own group's K/V head, as it does in the model. The multiple must divide
  the query heads.

The price is memory: a layer stores pool heads x pool head dim values a token
whatever it needs (Gemma-4 31B: 2x on its sliding layers, 4x on its full
ones). The layers' geometry comes from transformers' per-layer configs
(``per_layer_config``: a transformers config's view, or a ``config.json``'s
sparse ``{"5": {"head_dim": 512}}``) or, in a Gemma-4 ``config.json`` saved
without them, from ``global_head_dim`` and ``num_global_key_value_heads`` on its
``full_attention`` layers, as transformers reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from kvpager.errors import InvalidArgument

Getter = Callable[[str], Any]

#: model types whose full-attention layers take ``global_head_dim`` (512 where unset) and, under
#: ``attention_k_eq_v``, ``num_global_key_value_heads`` (transformers' Gemma-4 configs)
GLOBAL_LAYER_TYPES = ("gemma4", "gemma4_text", "gemma4_unified_text")
GLOBAL_HEAD_DIM = 512


def layer_getters(config: Any, get: Getter, layers: int) -> list[Getter] | None:
    """A getter of each layer's attention fields, or None where every layer reads
    the config's own (one geometry). ``config``: a transformers config (its
    ``per_layer_config`` view where ``is_heterogeneous``) or a ``config.json``
    dict; ``get`` its field getter. InvalidArgument for per-layer fields
    kvpager cannot read."""
    if isinstance(config, dict):
        per = config.get("per_layer_config")
        if per is not None:
            return _sparse(per, get, layers)
        return _global_layers(get, layers, GLOBAL_HEAD_DIM if get("model_type") in GLOBAL_LAYER_TYPES else None)
    view = getattr(config, "per_layer_config", None)
    if view is not None:  # transformers' per-layer configs: the layers' own where they differ
        return [_attributes(view[i]) for i in range(layers)] if getattr(config, "is_heterogeneous", 0) is True \
            else None
    return _global_layers(get, layers, None)


def _sparse(per: Any, get: Getter, layers: int) -> list[Getter] | None:
    """Getters over a config.json's ``per_layer_config``: {layer index: fields that differ}."""
    if not isinstance(per, dict):
        raise InvalidArgument(f"per_layer_config must map layer indices to fields, got {per!r:.60}")
    fields: list[dict[str, Any]] = [{} for _ in range(layers)]
    for key, value in per.items():
        index = int(key) if isinstance(key, (str, int)) and str(key).isdigit() else -1
        if not 0 <= index < layers or not isinstance(value, dict):
            raise InvalidArgument(f"per_layer_config: {key!r:.20} -> {value!r:.40} is not a layer index of "
                                  f"0 to {layers - 1} with its fields")
        fields[index] = value
    return [_over(f, get) for f in fields] if any(fields) else None


def _global_layers(get: Getter, layers: int, default: int | None) -> list[Getter] | None:
    """Gemma-4's rule for configs without per-layer fields: its ``full_attention``
    layers take ``global_head_dim`` (``default`` where unset: transformers reads
    512 for a Gemma-4 ``config.json`` without it) and, under ``attention_k_eq_v``,
    ``num_global_key_value_heads`` (where set). None where neither applies."""
    dim = get("global_head_dim")
    if dim is None:
        dim = default
        if dim is None:
            return None
    kinds = get("layer_types")
    if kinds is None and get("model_type") in GLOBAL_LAYER_TYPES:  # transformers' default: 5 sliding, 1 full
        kinds = ["full_attention" if (i + 1) % 6 == 0 or i == layers - 1 else "sliding_attention"
                 for i in range(layers)]
    if not isinstance(kinds, (list, tuple)) or len(kinds) != layers:
        raise InvalidArgument(f"global_head_dim applies to the full_attention layers of layer_types, one a layer "
                              f"({layers}); got {kinds!r:.60}")
    full: dict[str, Any] = {"head_dim": dim}
    kv = get("num_global_key_value_heads")
    if kv is not None and get("attention_k_eq_v"):
        full["num_key_value_heads"] = kv
    return [_over(full, get) if kind == "full_attention" else get for kind in kinds]


def _over(fields: dict[str, Any], get: Getter) -> Getter:
    return lambda name: fields[name] if name in fields else get(name)


def _attributes(config: Any) -> Getter:
    return lambda name: getattr(config, name, None)


def fit(dims: list[tuple[int, int]], heads: int, where: str = "the model") -> tuple[int, int]:
    """(K/V heads, head dim) of the pool that holds layers of (K/V heads, head dim)
    ``dims`` (module docstring). InvalidArgument where the least common multiple of
    their K/V heads does not divide the ``heads`` query heads."""
    kv = math.lcm(*(k for k, _ in dims))
    if heads % kv:
        counts = sorted({k for k, _ in dims})
        raise InvalidArgument(f"{where}: its layers have {counts} K/V heads; one pool holds them as {kv} "
                              f"(their least common multiple), which does not divide its {heads} query heads")
    return kv, max(d for _, d in dims)
