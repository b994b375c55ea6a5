"""What kvpager needs to know about a transformers model before it attends for it.

- the layer kinds (`FULL`, `SLIDING`, `CHUNKED`, the recurrent ones) and
  where a model's language layers are (`text_config`, `decoder_module`);
  which positions each layer attends to is `kvpager.hf.windows`;
- `check_call`: the keyword arguments transformers passes to an attention
  function, each honoured or refused by name: nothing is dropped silently;
- `model_geometry`, `spec_for_model`, `check_model`: the model's KV geometry
  as a `PoolSpec`, and a pool checked against it;
- `layer_map`: which pool layer each layer attends over, and whether it stores
  its K/V there (layers that reuse an earlier layer's K/V: Gemma-3n).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from kvpager.errors import InvalidArgument, UnsupportedModel
from kvpager.hf.salt import default_salt  # noqa: F401 (its home before kvpager.hf.salt: old imports still work)
from kvpager.layer_geometry import attribute_getter, fit, layer_getters
from kvpager.sizing import (
    attention_dims,
    kv_heads_field,
    kv_sources,
    layer_fields,
    pool_layers,
)
from kvpager.spec import PoolSpec, dtype_name

FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"
#: ``layer_types`` kinds whose layers keep a recurrent state a sequence (`kvpager.hf.recurrent`)
#: (``hybrid``: a layer that attends and keeps a state, side by side: Falcon-H1)
HYBRID = "hybrid"
RECURRENT_KINDS = frozenset({"linear_attention", "conv", HYBRID})
ABSENT: Any = object()  # an attention argument transformers did not pass

# Keyword arguments of transformers' attention call that change nothing here:
# positions come from the plan (the rotary embedding is already applied to q
# and k), the cache is kvpager's, router outputs are the MoE block's business,
# and which logits to keep the LM head's (some multimodal wrappers pass it down).
IGNORED = frozenset({"position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value",
                     "output_router_logits", "output_hidden_states", "return_dict", "logits_to_keep"})


def text_config(model: Any) -> Any:
    """The config of ``model``'s language model: its own config, or a multimodal
    wrapper's text sub-config (Gemma-3 4B+, ...: `get_text_config`), where the
    layers, heads, head dims and windows kvpager attends with are."""
    config = model.config
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def decoder_module(model: Any) -> Any:
    """The module that holds ``model``'s language layers (`get_decoder`; the whole
    model where it has none): a multimodal wrapper's vision tower is not kvpager's."""
    get = getattr(model, "get_decoder", None)
    try:
        decoder = get() if callable(get) else None
    except Exception:  # noqa: BLE001 - a model without one says so its own way
        decoder = None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def modules_of(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module under ``root``, ``root`` first, each once, in ``root.modules()``'s
    order: a walk over the modules' own dicts, without the nested generators
    ``modules()`` resumes at every level of nesting for every module (a generation's
    model checks, two walks and a look at each module: 4.2 ms for a 386-module model
    on a 2-core VM, 1.3-1.6 ms with this walk)."""
    out, seen, stack = [], set(), [root]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        children = m._modules
        if children:
            stack.extend(c for c in reversed(children.values()) if c is not None)
    return out


def has_recurrent_layers(model: Any) -> bool:
    """Whether ``model``'s ``layer_types`` name layers that keep a recurrent state
    (linear attention, state-space mixers, short convolutions: `kvpager.hf.recurrent`)."""
    config = text_config(model)
    kinds = getattr(config, "layer_types", None) or legacy_layer_types(config) or ()
    return not RECURRENT_KINDS.isdisjoint(kinds)


def config_getter(config: Any) -> Any:
    """A getter of ``config``'s fields (None where unset; `attribute_getter`) whose
    ``layer_types`` are the old names' (`legacy_layer_types`) where the config has none."""
    get = attribute_getter(config)

    def field(name: str) -> Any:
        value = get(name)
        return legacy_layer_types(config) if value is None and name == "layer_types" else value

    return field


def legacy_layer_types(config: Any) -> list[str] | None:
    """The ``layer_types`` a config of an older transformers gives under another name
    only (RecurrentGemma's ``block_types`` before transformers named its layers' kinds),
    as `kvpager.sizing.layer_fields` reads them; None where it names none."""
    if getattr(config, "block_types", None) is None:
        return None
    return layer_fields({"num_hidden_layers": getattr(config, "num_hidden_layers", None),
                         "block_types": list(config.block_types)}, type(config).__name__).get("layer_types")


def shared_attention(module: Any) -> int | None:
    """Where ``module`` is an attention module shared by several layers, which is told
    its layer at each call (Zamba's and Zamba2's: ``layer_idx`` None or -1, its
    ``forward`` taking ``layer_idx``), the position of that argument in ``forward``'s signature; None
    for any other module. `kvpager.hf.switching.paged_attention` has each such call
    pass its layer on to kvpager's attention (``kvpager_layer``)."""
    if getattr(module, "layer_idx", 0) not in (-1, None) or not hasattr(module, "is_causal"):
        return None
    names = list(inspect.signature(type(module).forward).parameters)
    return names.index("layer_idx") - 1 if "layer_idx" in names else None  # (less self)


def temperature_tuned(module: Any) -> bool:
    """Whether ``module`` scales its queries by their positions itself (Llama-4's
    NoPE layers: ``attn_temperature_tuning``), from positions it counts from its
    cache, which are wrong in kvpager's packed row (`paged_attention` switches
    it off and kvpager applies it: `kvpager.hf.attention.write_attend`)."""
    return bool(getattr(module, "attn_temperature_tuning", False)) and not getattr(module, "use_rope", True)


def layer_map(model: Any) -> list[tuple[int, bool]] | None:
    """For each layer of ``model``, (the pool layer it attends over, whether it stores
    its K/V there), where some layers reuse an earlier layer's K/V (Gemma-3n:
    `kvpager.sizing.kv_sources`): such a layer writes nothing and attends over
    the K/V its source stored, as transformers' shared layers do, and the pool
    holds only the layers that store; (-1, False) for a layer without attention
    (`kvpager.sizing.NO_KV_KINDS`: the recurrent layers of Qwen3.5, Jamba, ...).
    None where every layer stores its own (pool layer = layer). ValueError for
    sharing kvpager cannot follow."""
    sources = _kv_sources(text_config(model))
    if sources == list(range(len(sources))):
        return None
    return [(p, s == i) for i, (s, p) in enumerate(zip(sources, pool_layers(sources)))]


def _kv_sources(config: Any) -> list[int]:
    """`kvpager.sizing.kv_sources` of a transformers config, its refusal a ValueError as the others here."""
    try:
        return kv_sources(config_getter(config), config.num_hidden_layers)
    except InvalidArgument as e:
        raise UnsupportedModel(str(e)) from e


def check_call(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
               sliding_window: Any, window: Any, kwargs: dict[str, Any]) -> None:
    """Refuse, by name, what kvpager's attention would not reproduce: any
    keyword argument it does not honour (``head_mask``, ``position_bias``,
    ``dropout`` > 0, ...), cross-attention, k of another head dim than q (v
    may differ: `kvpager.hf.attention` pads), or a ``sliding_window`` transformers passes that
    differs from the window planned for the layer."""
    for name, val in kwargs.items():
        if val is None or name in IGNORED:
            continue
        if (name == "output_attentions" and val is False) or (name == "is_causal" and val is True):
            continue
        raise UnsupportedModel(
            f"kvpager attention does not support the attention argument {name}={_show(val)} "
            f"(layer {layer}); run this model with another attn_implementation")
    if dropout:
        raise UnsupportedModel(f"kvpager attention applies no dropout, got dropout={dropout} "
                               "(put the model in eval mode)")
    if key.shape[2] != query.shape[2]:
        raise UnsupportedModel(f"kvpager attention is self-attention over the new tokens: {query.shape[2]} queries "
                               f"but {key.shape[2]} keys (cross-attention?) at layer {layer}")
    if query.shape[3] != key.shape[3] or key.shape[:3] != value.shape[:3]:
        raise UnsupportedModel(f"kvpager attention needs q and k of one head dim and k and v of the same heads and "
                               f"tokens, got q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)} "
                               f"at layer {layer}")
    if sliding_window is not ABSENT and sliding_window != window:
        planned = f"window {window}" if window is not None else "no window (its masks are full causal)"
        raise UnsupportedModel(f"transformers passes sliding_window={sliding_window} to layer {layer}, planned with "
                               f"{planned}; refusing rather than guessing")


def _show(val: Any) -> str:
    return f"<tensor {tuple(val.shape)}>" if isinstance(val, torch.Tensor) else repr(val)[:40]


def model_geometry(config: Any) -> dict[str, int]:
    """Layers, KV heads and head dim of a transformers config, as `PoolSpec` names
    them. Where v's head dim differs from q's and k's
    (`kvpager.sizing.attention_dims`, the rule `kvpager serve --model` sizes by
    too), the pool holds the wider, the narrower side zero-padded
    (`kvpager.hf.attention`); latent attention (``kv_lora_rank``) attends with
    K/V expanded to every query head, as transformers' does, and JetMoE with K/V
    tiled to them (`kvpager.sizing.KV_PER_QUERY_HEAD`). Where layers differ in
    geometry (transformers' per-layer configs: Gemma-4), one pool fitted to all
    (`kvpager.layer_geometry`). The layers are those that store K/V
    (`layer_map`: Gemma-3n's shared layers store none)."""
    sources = _kv_sources(config)
    stored = len({s for s in sources if s >= 0})
    if not stored:
        raise UnsupportedModel(f"{type(config).__name__}: no layer attends; kvpager holds attention layers' K/V")
    getters = layer_getters(config, config_getter(config), config.num_hidden_layers)
    if getters is None:
        kv_heads, head_dim = _layer_dims(config, config_getter(config))
    else:
        heads = {getters[i]("num_attention_heads") for i, s in enumerate(sources) if s == i}
        if len(heads) != 1:  # (where they differ, transformers refuses the config's own count)
            raise UnsupportedModel(f"{type(config).__name__}: layers of {sorted(heads)} query heads; kvpager "
                                   "serves models whose layers have one count of query heads")
        dims = [_layer_dims(config, getters[i]) for i, s in enumerate(sources) if s == i]
        try:
            kv_heads, head_dim = fit(dims, heads.pop(), type(config).__name__)
        except InvalidArgument as e:
            raise UnsupportedModel(str(e)) from e
    return dict(num_layers=stored, num_kv_heads=kv_heads, head_dim=head_dim)


def layer_fit(model: Any) -> tuple[int, int] | None:
    """(K/V heads, head dim) of the pool every layer of ``model`` is fitted to where
    its layers differ in geometry (`PagedBatch.fit`); None where they do not."""
    config = text_config(model)
    if layer_getters(config, config_getter(config), config.num_hidden_layers) is None:
        return None
    geometry = model_geometry(config)
    return geometry["num_kv_heads"], geometry["head_dim"]


def _layer_dims(config: Any, get: Any) -> tuple[int, int]:
    """(K/V heads, head dim) of a layer whose fields ``get`` reads; UnsupportedModel
    where they give no such attention (no count of query heads: xLSTM's; K/V heads
    that do not divide them)."""
    heads = get("num_attention_heads")
    if type(heads) is not int or heads < 1:
        raise UnsupportedModel(f"{type(config).__name__}: num_attention_heads {heads!r}; kvpager holds the K/V "
                               "of attention layers with a count of query heads")
    qk, v, per_query_head = attention_dims(get)
    qk = qk or get("hidden_size") // heads
    kv_heads = heads if per_query_head else kv_heads_field(get) or heads
    if type(kv_heads) is not int or kv_heads < 1 or heads % kv_heads:
        raise UnsupportedModel(f"{type(config).__name__}: {kv_heads!r} K/V heads for {heads} query heads; "
                               "kvpager serves groups of query heads sharing a K/V head")
    return kv_heads, max(qk, v) if type(v) is int and v > 0 else qk


def spec_for_model(
    model: Any, num_blocks: int, block_size: int = 16, dtype: Any = None, num_host_blocks: int = 0,
    kv_dtype: str | None = None, kv_scales: Any = None,
) -> PoolSpec:
    """A `PoolSpec` matching ``model``'s KV geometry (dtype: the model's unless given).
    ``kv_dtype`` "float8_e4m3" / "float8_e5m2": an FP8 pool, its ``kv_scales`` given
    (e.g. from `kvpager.hf.calibrate_kv_scales`) or all 1.0."""
    from kvpager.hf.checks import check_is_model

    check_is_model(model)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return PoolSpec(
        **model_geometry(text_config(model)),
        num_blocks=num_blocks,
        block_size=block_size,
        dtype=dtype_name(dtype),
        num_host_blocks=num_host_blocks,
        kv_dtype=kv_dtype,
        kv_scales=kv_scales,
    )


#: names that moved to other modules, still answered here (old imports, `clients/kvpager_hf_model`)
_MOVED = {**dict.fromkeys(("check_model", "check_head", "check_position_bias", "check_eval_mode",
                           "check_model_and_pool", "end_tokens"), "checks"),
          **dict.fromkeys(("layer_windows", "layer_chunks", "layer_chunk", "hit_window"), "windows")}


def __getattr__(name: str) -> Any:
    home = _MOVED.get(name)
    if home is not None:
        import importlib

        return getattr(importlib.import_module(f"kvpager.hf.{home}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
