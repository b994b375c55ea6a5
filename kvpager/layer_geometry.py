"""Models whose layers differ in K/V geometry, served by one pool.

A kvpager pool holds one geometry (K/V heads, head dim) for every layer.
Gemma-4's full-attention layers have another head dim than its sliding ones
(512 against 256), and may have fewer K/V heads (say 4 against 16). Such a
model is served by one pool whose head dim is the widest of its layers', each
layer's tensors fitted to it as they come (`kvpager.hf.fitting`):

- a narrower layer stores ``p`` of its K/V heads side by side in one pool
  head (`pack`: the most that divide its head count and fit the width; Gemma-4
  sliding layers two heads of 256 in one of 512), and a query head's
  values go to its own K/V head's place in it, zeros elsewhere: its scores are
  its own head's (zeros add nothing), and its output is its own head's place
  of the pool head's; what is left of the width is zero-padded;
- the pool's K/V heads are the least common multiple of the layers' packed
  head counts: a layer of fewer stores each of them repeated (pool head j
  holds the layer's packed head j // r), so that every query head attends over
  its own group's K/V head, as it does in the model (pool head q // G of query
  head q holds its K/V head q // g: G r = g p). The multiple divides the query
  heads, as every packed count does.

The price is memory only where a layer is repeated or padded: a Gemma-4
shape of 16 K/V heads of 256 on its sliding layers (5 in 6) and 4 of 512 on
its full ones gets a pool of 8 heads of 512, exact on the sliding layers,
twice the full ones (1.09x what the model stores, where 16 heads of 512 were
2.18x). The layers' geometry comes from transformers' per-layer configs
(``per_layer_config``: a transformers config's view, or a ``config.json``'s
sparse ``{"5": {"head_dim": 512}}``) or, in a Gemma-4 ``config.json`` saved
without them, from ``global_head_dim`` and ``num_global_key_value_heads`` on its
``full_attention`` layers, as transformers reads them; MiMo-V2-Flash's sliding
layers have twice its full layers' K/V heads (`SLIDING_KV_FACTOR`).
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
#: model types whose ``sliding_attention`` layers have this many times ``num_key_value_heads`` (MiMo-V2-Flash:
#: its sliding layers double the K/V heads of its full ones, a rule in its attention code, not a config field)
SLIDING_KV_FACTOR = {"mimo_v2_flash": 2}


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
        return _sliding_layers(get, layers) or \
            _global_layers(get, layers, GLOBAL_HEAD_DIM if get("model_type") in GLOBAL_LAYER_TYPES else None)
    view = getattr(config, "per_layer_config", None)
    if getattr(config, "is_heterogeneous", 0) is True and view is not None:
        return [attribute_getter(view[i]) for i in range(layers)]  # transformers' per-layer configs: the layers' own
    return _sliding_layers(get, layers) or (None if view is not None else _global_layers(get, layers, None))


def _sliding_layers(get: Getter, layers: int) -> list[Getter] | None:
    """`SLIDING_KV_FACTOR`'s rule: the ``sliding_attention`` layers of ``layer_types``
    with that many times ``num_key_value_heads``; None for other model types.
    (Sized from the config alone, such a model's pool held its full layers' K/V
    heads and every sliding layer was refused at its first pass.)"""
    factor = SLIDING_KV_FACTOR.get(get("model_type"))
    if factor is None:
        return None
    kinds, kv = get("layer_types"), get("num_key_value_heads")
    if not isinstance(kinds, (list, tuple)) or len(kinds) != layers or type(kv) is not int:
        raise InvalidArgument(f"{get('model_type')}: its sliding layers' K/V heads follow layer_types (one a layer, "
                              f"{layers}) and num_key_value_heads; got {kinds!r:.60} and {kv!r}")
    sliding = _over({"num_key_value_heads": kv * factor}, get)
    return [sliding if kind == "sliding_attention" else get for kind in kinds]


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


def attribute_getter(config: Any) -> Getter:
    """A getter of ``config``'s attributes (None where unset): a transformers config's fields."""
    return lambda name: getattr(config, name, None)


def pack(kv_heads: int, head_dim: int, width: int) -> int:
    """How many of a layer's ``kv_heads`` K/V heads of ``head_dim`` values one pool
    head of ``width`` values holds side by side: the most that divide its head
    count and fit the width (1 where one head fills it)."""
    return max(p for p in range(1, max(1, min(kv_heads, width // head_dim)) + 1) if kv_heads % p == 0)


def fit(dims: list[tuple[int, int]], heads: int, where: str = "the model") -> tuple[int, int]:
    """(K/V heads, head dim) of the pool that holds layers of (K/V heads, head dim)
    ``dims`` (module docstring): the widest head dim, and the least common
    multiple of the layers' packed head counts. InvalidArgument where that does
    not divide the ``heads`` query heads (a layer whose K/V heads do not)."""
    width = max(d for _, d in dims)
    kv = math.lcm(*(k // pack(k, d, width) for k, d in dims))
    if heads % kv:
        counts = sorted({k for k, _ in dims})
        raise InvalidArgument(f"{where}: its layers have {counts} K/V heads; one pool holds them as {kv}, "
                              f"which does not divide its {heads} query heads")
    return kv, width
