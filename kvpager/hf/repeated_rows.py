"""A `PagedCache` prompt pass whose rows repeat each other runs each distinct row once.

transformers' ``generate`` repeats each prompt once a beam (``num_beams``) or
a returned sequence (``num_return_sequences``) before the prompt's pass. Rows
that are the same prompt (the same tokens, attention mask and positions)
give the same K/V and the same logits, so where the pass keeps only logits
(`cached_tail.kept_logits`) the model runs over the distinct rows alone; the
cache then forks each distinct row's sequence for its repeats (sharing every
block, copied on write as they diverge: `PagedCache.reorder_cache`) and the
logits are repeated back to the pass's rows. Beam search and sampled
``num_return_sequences`` prefill each prompt once, as `kvpager.hf.beam_search`
does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpager.hf.cached_tail import rows_of


@dataclass
class Repeats:
    """A first pass run over its distinct rows."""

    parents: list[int]  # per row of the pass, the distinct row (its index among them) it repeats
    index: torch.Tensor  # the same, on the pass's device (to repeat the outputs by)
    named: dict[str, Any]  # the pass's keywords for the distinct rows


def repeats(named: dict[str, Any], keep: int | None, config: Any) -> Repeats | None:
    """The pass of ``named`` keywords run over its distinct rows, where it has rows
    that repeat others and keeps only logits (``keep``, `cached_tail.kept_logits`;
    a model that returns its routers' logits per token runs whole); None where not."""
    ids = named.get("input_ids")
    if keep is None or not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] < 2 \
            or getattr(config, "output_router_logits", False):
        return None  # (a pass without 2-D input_ids: `PagedCache` refuses it)
    rows = ids.shape[0]
    mask, positions = named.get("attention_mask"), named.get("position_ids")
    parts = [ids]
    try:
        if mask is not None:
            parts.append(mask.to(ids.dtype))
        if positions is not None:  # [rows, T], or [axes, rows, T] (M-RoPE): each row's positions in a line
            positions = positions.expand(*positions.shape[:-2], rows, positions.shape[-1])
            parts.append(positions.movedim(-2, 0).reshape(rows, -1).to(ids.dtype))
        key = torch.cat(parts, 1).detach().cpu().numpy()
    except (AttributeError, TypeError, RuntimeError):
        return None  # (inputs of other shapes than the ids': what `PagedCache` refuses, or passes whole)
    seen: dict[bytes, int] = {}  # a row's bytes -> its distinct row (a dict: np.unique over rows sorts them)
    parents = [seen.setdefault(row.tobytes(), len(seen)) for row in key]
    if len(seen) == rows:
        return None
    first = np.unique(parents, return_index=True)[1]  # the distinct rows, each where it first comes
    distinct = torch.as_tensor(first, device=ids.device)
    return Repeats(parents, torch.as_tensor(parents, device=ids.device), rows_of(named, distinct))


def repeated(out: Any, index: torch.Tensor) -> Any:
    """A forward's output over the distinct rows with its logits repeated to the
    pass's rows (``index``: each row's distinct row)."""
    if isinstance(out, tuple):  # return_dict=False: the logits first (no loss: no labels are passed)
        return (out[0].index_select(0, index),) + out[1:]
    out.logits = out.logits.index_select(0, index)
    return out
