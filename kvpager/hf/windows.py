"""Which positions each layer of a transformers model attends to, as its masks apply them.

- `layer_windows`: each layer's sliding window (None: full attention), or an
  UnsupportedModel for attention kvpager cannot reproduce (bidirectional
  layers, layer kinds other than full, sliding and chunked attention);
- `layer_chunks` / `layer_chunk`: Llama-4's chunked layers' attention chunk;
- `hit_window`: what a fully windowed model passes `allocate` for prefix hits
  past its released leading blocks.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from kvpager.errors import InvalidArgument, UnsupportedModel
from kvpager.hf.model import (
    CHUNKED,
    FULL,
    HYBRID,
    SLIDING,
    decoder_module,
    modules_of,
    shared_attention,
    text_config,
)
from kvpager.sizing import NO_KV_KINDS


def hit_window(windows: Sequence[int | None] | None, pool: Any) -> dict[str, int]:
    """`allocate`'s keyword arguments for a model of per-layer ``windows``
    (`layer_windows`): ``window``, the widest, where every layer has one (a
    prompt then hits past evicted leading blocks, as far as the blocks its
    first new token's window reads are cached; `KVPool.allocate`), none
    otherwise or for a pool whose sequences cannot hold released entries."""
    if windows and None not in windows and hasattr(pool, "release_before"):
        return {"window": max(windows)}
    return {}


def layer_windows(model: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as transformers'
    masks apply it: ``config.sliding_window`` on the ``sliding_attention``
    layers of ``config.layer_types`` (Qwen2/3, Gemma-2/3, Cohere2, ...), else
    on every layer (Mistral, Mixtral, Phi-3, Starcoder2), none where
    ``use_sliding_window`` is False (Qwen2/3 configs). ValueError for what
    kvpager cannot attend.

    Not read: the attention modules' own ``sliding_window`` attributes, which
    some families set on every layer (Exaone4) whatever the layer's type. At
    call time, the ``sliding_window`` transformers passes to the attention
    function (what its flash-attention path applies) must equal this, or the
    call is refused (`check_call`). A multimodal wrapper's text config and
    language layers are read (`text_config`)."""
    config = text_config(model)
    if any(getattr(c, "is_encoder_decoder", False) for c in (model.config, config)):
        raise UnsupportedModel("kvpager attends for decoder-only models; this one is encoder-decoder (cross-attention)")
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    kinds = getattr(config, "layer_types", None)
    if kinds:
        other = sorted(set(kinds) - {FULL, SLIDING, CHUNKED, HYBRID} - NO_KV_KINDS)
        if other:
            raise UnsupportedModel(f"kvpager attends full, sliding-window and chunked layers (beside layers without "
                                   f"attention: {sorted(NO_KV_KINDS)}) only; layer_types here: {other}")
        if SLIDING in kinds and window is None:
            raise UnsupportedModel("layer_types has sliding_attention layers but config.sliding_window is not set")
        windows = [window if kind == SLIDING else None for kind in kinds]
    else:
        windows = [window] * n
        if window is not None and not _reads_windows(model):
            warnings.warn(f"{type(model).__name__}: config.sliding_window is {window}, but its transformers code "
                          "never reads a sliding window (its masks are full causal whatever the config says): "
                          "kvpager attends in full, as its forward pass does", UserWarning, stacklevel=3)
            windows = [None] * n
    for module in modules_of(decoder_module(model)):
        idx = getattr(module, "layer_idx", None)
        if (idx is None or idx == -1) and module.__dict__.get("is_causal", getattr(type(module), "is_causal", None)) \
                is True and shared_attention(module) is not None:
            continue  # a causal module shared by layers, told its layer at each call (`kvpager.hf.switching`)
        if not isinstance(idx, int) or not hasattr(module, "is_causal"):
            continue  # not an attention module
        if not 0 <= idx < n:
            raise UnsupportedModel(
                f"an attention module ({type(module).__name__}) has layer_idx {idx}, not one of the model's {n} "
                "layers, and its forward is not told a layer at each call as a module shared across layers is "
                "(Zamba's); kvpager holds a layer's K/V by its index")
        if module.is_causal is False:
            raise UnsupportedModel(f"layer {idx} has an attention module ({type(module).__name__}) that is not "
                                   "causal (is_causal=False: it attends bidirectionally, or across to an encoder's "
                                   "states); kvpager attends causally over the model's own tokens")
        if kinds and idx < len(kinds) and kinds[idx] in NO_KV_KINDS:
            raise UnsupportedModel(f"layer {idx} has an attention module ({type(module).__name__}) but layer_types "
                                   f"says it is {kinds[idx]!r}, a layer without K/V; refusing rather than guessing")
    for i, w in enumerate(windows):
        if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
            raise UnsupportedModel(f"layer {i} has sliding window {w!r}; kvpager needs a positive int")
    return windows


_READS_WINDOWS: dict[tuple[type, ...], bool] = {}


#: What a modeling file calls where its masks apply a sliding window: transformers'
#: mask functions, and the older mask helpers that take one (read as windowing).
_WINDOWED_MASKS = ("create_sliding_window_causal_mask", "sliding_window_causal_mask_function",
                   "sliding_window_overlay", "_prepare_4d_causal_attention_mask")


def _reads_windows(model: Any) -> bool:
    """Whether the code of ``model``'s classes (the model's and its decoder's modules)
    builds masks with a sliding window: a config without ``layer_types`` may carry
    ``sliding_window`` for a family whose masks never apply one (a Llama: its
    forward pass is full causal whatever the field says). A file naming
    ``sliding_window`` is not enough: Moshi's keeps it as an unused attribute (its
    masks full causal; kvpager windowed it, wrong logits past the window), and
    OLMoE's passes it to the attention function, which only flash-attention
    reads (its sdpa and eager passes full causal; kvpager refuses the call, as
    it refuses any window passed that its plan does not hold). True where a
    module's source cannot be read (nothing is assumed away)."""
    classes = tuple(dict.fromkeys((type(model), type(decoder_module(model)))))
    known = _READS_WINDOWS.get(classes)
    if known is None:
        known = False
        for cls in classes:
            try:
                source = inspect.getsource(sys.modules[cls.__module__])
            except (OSError, TypeError, KeyError):
                known = True
                break
            if any(name in source for name in _WINDOWED_MASKS):
                known = True
                break
        _READS_WINDOWS[classes] = known
    return known


def layer_chunks(model: Any, block_size: int | None = None) -> list[int | None]:
    """Each layer's attention chunk (None: not chunked): ``config.attention_chunk_size``
    on the ``chunked_attention`` layers of ``config.layer_types`` (Llama-4: the
    query at position p attends to positions [p - p % chunk, p]). ValueError
    for a chunk size that is not a positive int, or (``block_size`` given) one
    that the pool's block size does not divide."""
    config = text_config(model)
    kinds = getattr(config, "layer_types", None) or []
    if CHUNKED not in kinds:
        return [None] * config.num_hidden_layers
    chunk = getattr(config, "attention_chunk_size", None)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise UnsupportedModel(f"layer_types has chunked_attention layers but attention_chunk_size is {chunk!r}; "
                               "kvpager needs a positive int")
    if block_size is not None and chunk % block_size:
        raise InvalidArgument(f"chunked attention over {chunk}-token chunks needs a pool block size that divides "
                              f"{chunk}; this pool's is {block_size}")
    return [chunk if kind == CHUNKED else None for kind in kinds]


def layer_chunk(module: Any, layer: int) -> int | None:
    """The attention chunk of ``module`` (layer ``layer``) as its config gives it
    (`layer_chunks`), read at call time: None for a layer not chunked."""
    config = getattr(module, "config", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is None or layer >= len(kinds) or kinds[layer] != CHUNKED:
        return None
    return config.attention_chunk_size
