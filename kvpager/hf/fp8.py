"""FP8 K/V for transformers models: scales calibrated from a sample prompt.

An FP8 pool stores ``x / scale`` per (layer, K or V, kv head) and its scales
are given (`PoolSpec.kv_scales`; all 1.0 when none are, as vLLM assumes for
checkpoints without scales). `calibrate_kv_scales` finds scales for a model:
it runs the model once on a sample prompt with transformers' own cache and
takes, per layer and kv head, the largest magnitude of K and of V (after the
rotary embedding: what the pool stores) over the prompt, times ``margin``,
divided by the FP8 format's largest finite value (448 for e4m3, 57344 for
e5m2). `spec_for_model(..., kv_dtype="float8_e4m3", kv_scales=scales)` puts
them in the pool's spec.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument
from kvpager.spec import FP8_DTYPES, kv_dtype_name

__all__ = ["calibrate_kv_scales"]


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers cache, each [batch, kv heads, tokens, head_dim]."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]  # the legacy tuple of tuples


def _output_cache(out: Any) -> Any:
    """The cache a forward returned: ``out.cache`` where transformers names it so
    (5.x, which deprecates the ``past_key_values`` alias), else ``out.past_key_values``."""
    cache = getattr(out, "cache", None)
    return out.past_key_values if cache is None else cache


def calibrate_kv_scales(model: Any, input_ids: Any, kv_dtype: str = "float8_e4m3",
                        margin: float = 1.25) -> list[list[list[float]]]:
    """Scales [num_layers][2 (K, V)][num_kv_heads] for an FP8 pool of ``model``:
    per (layer, kv head), amax(|K|) and amax(|V|) over ``input_ids`` (a list of
    token ids or a [batch, tokens] tensor) times ``margin``, over the format's
    largest finite value; a head whose values are all zero gets 1.0."""
    name = kv_dtype_name(kv_dtype)
    if name not in FP8_DTYPES:
        raise InvalidArgument(f"kv_dtype must be one of {sorted(FP8_DTYPES)}, got {kv_dtype!r}")
    if not isinstance(margin, (int, float)) or not np.isfinite(margin) or margin < 1:
        raise InvalidArgument(f"margin must be a finite number >= 1, got {margin!r}")
    device = next(model.parameters()).device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise InvalidArgument(f"input_ids must be a non-empty token list or a [batch, tokens] tensor, "
                              f"got shape {tuple(ids.shape)}")
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
    fmax = FP8_DTYPES[name][1]
    scales = []
    for keys, values in _cache_layers(_output_cache(out)):
        per_kv = []
        for x in (keys, values):
            amax = x.detach().abs().float().amax(dim=(0, 2, 3)).cpu().numpy()  # [kv heads]
            s = np.where(amax > 0, amax.astype(np.float64) * margin / fmax, 1.0)
            per_kv.append([float(v) for v in s])
        scales.append(per_kv)
    return scales
