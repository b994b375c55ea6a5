"""A layer's q, k and v fitted to a pool of another geometry (`kvpager.layer_geometry`).

A model whose layers differ in K/V geometry (Gemma-4: head dim 512 and 4 K/V
heads on its full layers, 256 and 16 on its sliding ones on the 31B model) is
served by one pool of the widest head dim and the least common multiple of
the K/V head counts. Each layer's tensors are fitted to it as they come:
its K/V heads repeated (pool head j holds the layer's head j // r), its q, k
and v zero-padded to the pool's head dim, its scores scaled by its own head
dim, and its output cut back by the caller.
"""

from __future__ import annotations

import torch
from torch.nn.functional import pad


def fit_layer(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
              kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float | None]:
    """``query`` [1, Hq, T, Dq], ``key`` / ``value`` [1, Hkv, T, D] fitted to a pool of
    ``kv_heads`` K/V heads of ``head_dim`` values, and the scale of the layer's
    scores (``scaling``, or its query head dim's inverse square root where None,
    as the pool's would differ). A layer whose K/V head count does not divide
    the pool's is left as it is, for the plan to refuse by name."""
    d = query.shape[3]
    if d < head_dim and scaling is None:
        scaling = d ** -0.5
    heads = key.shape[1]
    if heads < kv_heads and kv_heads % heads == 0:
        key = key.repeat_interleave(kv_heads // heads, dim=1)
        value = value.repeat_interleave(kv_heads // heads, dim=1)
    if d < head_dim:
        query = pad(query, (0, head_dim - d))
    if key.shape[3] < head_dim:
        key = pad(key, (0, head_dim - key.shape[3]))
    if value.shape[3] < head_dim:
        value = pad(value, (0, head_dim - value.shape[3]))
    return query, key, value, scaling
