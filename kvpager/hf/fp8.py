"""FP8 K/V for transformers models: scales calibrated from a sample prompt.

An FP8 pool stores ``x / scale`` per (layer, K or V, kv head) and its scales
are given (`PoolSpec.kv_scales`; all 1.0 when none are, as vLLM assumes for
checkpoints without scales). `calibrate_kv_scales` finds scales for a model:
it runs the model once on a sample prompt through kvpager's own attention
over a temporary pool of the model's dtype, and takes, per layer and kv head,
the largest magnitude of the K and of the V each layer stores (after the
rotary embedding; for latent attention the K/V expanded per head, as the pool
holds them, not transformers' compressed cache), times ``margin``, divided by
the FP8 format's largest finite value (448 for e4m3, 57344 for e5m2).
`spec_for_model(..., kv_dtype="float8_e4m3", kv_scales=scales)` puts them in
the pool's spec.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument
from kvpager.spec import FP8_DTYPES, kv_dtype_name

__all__ = ["calibrate_kv_scales"]


def calibrate_kv_scales(model: Any, input_ids: Any, kv_dtype: str = "float8_e4m3",
                        margin: float = 1.25, *, attention_mask: Any = None) -> list[list[list[float]]]:
    """Scales [num_layers (the pool's: layers that store K/V)][2 (K, V)][num_kv_heads] for an FP8 pool of ``model``:
    per (layer, kv head), amax(|K|) and amax(|V|) over ``input_ids`` (a list of
    token ids, a [batch, tokens] tensor, or prompts of any lengths as `generate`
    takes them) times ``margin``, over the format's
    largest finite value; a head whose values are all zero gets 1.0. A padded
    batch (a tokenizer's output: ``calibrate_kv_scales(model, **enc)``) is
    calibrated on each row's tokens where ``attention_mask`` is 1, its padding
    stripped (`kvpager.hf.padding.strip_padding`)."""
    name = kv_dtype_name(kv_dtype)
    if name not in FP8_DTYPES:
        raise InvalidArgument(f"kv_dtype must be one of {sorted(FP8_DTYPES)}, got {kv_dtype!r}")
    if not isinstance(margin, (int, float)) or not np.isfinite(margin) or margin < 1:
        raise InvalidArgument(f"margin must be a finite number >= 1, got {margin!r}")
    device = next(model.parameters()).device
    rows = _rows(model, input_ids, attention_mask)
    fmax = FP8_DTYPES[name][1]
    peaks = _stored_peaks(model, rows, device)
    return [[[float(p) * margin / fmax if p > 0 else 1.0 for p in peak.tolist()] for peak in layer]
            for layer in peaks]


def _rows(model: Any, input_ids: Any, attention_mask: Any) -> list[list[int]]:
    """``input_ids`` as token lists: one flat prompt (a list of ids or a 1-D tensor,
    with a flat mask if any), or prompts of any lengths as `generate` takes them
    (a [batch, tokens] tensor, lists of lists: a tokenizer's unpadded output
    too), each cut to its tokens where ``attention_mask`` is 1."""
    from kvpager.hf.padding import token_lists

    if _ndim(input_ids) == 1 and not isinstance(input_ids, (str, bytes)):
        flat = attention_mask is not None and _ndim(attention_mask) == 1
        try:
            return token_lists([input_ids], model, [attention_mask] if flat else attention_mask)
        except ValueError as e:
            raise InvalidArgument(str(e).replace("prompts[0]", "input_ids")) from None
    try:
        return token_lists(input_ids, model, attention_mask)
    except InvalidArgument:
        raise
    except ValueError as e:
        raise InvalidArgument(f"input_ids: {e}") from None


def _ndim(x: Any) -> int | None:
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return x.ndim
    try:
        return np.ndim(x)
    except (ValueError, TypeError):  # ragged
        return None


def _stored_peaks(model: Any, rows: list[list[int]], device: torch.device) -> list[list[torch.Tensor]]:
    """Per layer, (amax |K|, amax |V|) per kv head of what a kvpager pool stores for
    ``rows`` (token-id lists): one pass over a temporary pool of the model's dtype."""
    from kvpager import KVPool
    from kvpager.hf.attention import PagedBatch, paged_attention, paged_forward
    from kvpager.hf.model import (
        has_recurrent_layers,
        layer_fit,
        layer_map,
        spec_for_model,
        text_config,
    )
    from kvpager.hf.windows import layer_windows

    dtype = next(model.parameters()).dtype
    block = 16
    spec = spec_for_model(model, num_blocks=sum(-(-len(r) // block) for r in rows) + 1, block_size=block,
                          dtype=dtype)
    pool = KVPool(spec, device="cpu" if device.type == "cpu" else f"cuda:{device.index or 0}")
    peaks: list[list[torch.Tensor | None]] = [[None, None] for _ in range(spec.num_layers)]

    def observe(layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        for i, x in enumerate((key, value)):  # [1, kv heads, tokens, head dim]
            amax = x.detach().abs().amax(dim=(0, 2, 3)).float()
            old = peaks[layer][i]
            peaks[layer][i] = amax if old is None else torch.maximum(old, amax)

    # one packed row; a pass per prompt for a model with recurrent layers (`kvpager.hf.recurrent`:
    # one packed row would run its prompts through those layers as one sequence)
    passes = [[r] for r in rows] if has_recurrent_layers(model) else [rows]
    try:
        for part in passes:
            allocs = pool.allocate(part)  # (nothing is committed, so nothing is shared between passes)
            lens = [len(r) for r in part]
            slots = np.concatenate([np.asarray(a.slots, dtype=np.int64) for a in allocs])
            plan = pool.plan([a.seq_id for a in allocs], lens, slots,
                             num_q_heads=text_config(model).num_attention_heads)
            batch = PagedBatch(plan, dtype, device, layer_windows(model), observe=observe, layers=layer_map(model),
                               fit=layer_fit(model))
            flat = torch.tensor([[t for r in part for t in r]], dtype=torch.long, device=device)
            pos = torch.tensor([[p for r in part for p in range(len(r))]], dtype=torch.long, device=device)
            with torch.inference_mode(), paged_attention(model):
                paged_forward(model, batch, flat, pos, 1)
            pool.free([a.seq_id for a in allocs])
    finally:
        pool.close()
    return [[p.cpu() for p in layer] for layer in peaks]  # type: ignore[union-attr]
