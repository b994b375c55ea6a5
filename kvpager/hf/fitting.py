"""A layer's q, k and v fitted to a pool of another geometry (`kvpager.layer_geometry`).

A model whose layers differ in K/V geometry (Gemma-4: head dim 512 and 4 K/V
heads on its full layers, 256 and 16 on its sliding ones, say) is
served by one pool of the widest head dim and the least common multiple of
the layers' packed K/V head counts. Each layer's tensors are fitted to it as
they come: ``p`` of its K/V heads side by side in one pool head
(`kvpager.layer_geometry.pack`), each query head's values at its own K/V
head's place in it and zeros elsewhere, the packed heads repeated (pool head j
holds packed head j // r), what is left of the width zero-padded, its scores
scaled by its own head dim; `Fitted.output` takes each query head's own place
of the output back. A layer whose K/V fit no pool geometry it was given (the
pool sized from a config the attention does not follow) is named by
`pool_mismatch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import pad

from kvpager.layer_geometry import pack
from kvpager.spec import PoolSpec


@dataclass
class Fitted:
    """A layer's tensors fitted to the pool, and how to take its output back."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float | None
    width: int  # the layer's value head dim
    packed: int  # its K/V heads side by side in a pool head
    place: torch.Tensor | None  # [heads]: each query head's place in its pool head (packed > 1)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The layer's output [1, T, Hq, width] from the pool's [1, T, Hq, pool width]."""
        if self.packed == 1:
            return out if out.shape[3] == self.width else out[..., : self.width]
        n, t, h, _ = out.shape
        places = out[..., : self.packed * self.width].reshape(n, t, h, self.packed, self.width)
        index = self.place.to(out.device).view(1, 1, h, 1, 1).expand(n, t, h, 1, self.width)
        return places.gather(3, index).squeeze(3)


def fit_layer(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None,
              kv_heads: int, head_dim: int) -> Fitted:
    """``query`` [1, Hq, T, Dq], ``key`` / ``value`` [1, Hkv, T, D] fitted to a pool of
    ``kv_heads`` K/V heads of ``head_dim`` values (module docstring), with the
    scale of the layer's scores (``scaling``, or its query head dim's inverse
    square root where None, as the pool's would differ). K/V heads are packed
    only where q, k and v have one head dim; a layer whose packed K/V head count
    does not divide the pool's is left unrepeated, for the plan to refuse by name."""
    d, width = query.shape[3], value.shape[3]
    if d < head_dim and scaling is None:
        scaling = d ** -0.5
    heads, qheads = key.shape[1], query.shape[1]
    same = d == key.shape[3] == width and qheads % heads == 0
    p = pack(heads, d, head_dim) if same else 1
    place = None
    if p > 1:
        # K/V: heads p at a time side by side; q: each query head at its K/V head's place
        n, _, t, _ = key.shape
        key = key.reshape(n, heads // p, p, t, d).transpose(2, 3).reshape(n, heads // p, t, p * d)
        value = value.reshape(n, heads // p, p, t, d).transpose(2, 3).reshape(n, heads // p, t, p * d)
        place = (torch.arange(qheads, device=query.device) // (qheads // heads)) % p
        onehot = torch.nn.functional.one_hot(place, p).to(query.dtype).view(1, qheads, 1, p, 1)
        query = (query.unsqueeze(3) * onehot).reshape(n, qheads, t, p * d)
        heads //= p
    if heads < kv_heads and kv_heads % heads == 0:
        key = key.repeat_interleave(kv_heads // heads, dim=1)
        value = value.repeat_interleave(kv_heads // heads, dim=1)
    if query.shape[3] < head_dim:
        query = pad(query, (0, head_dim - query.shape[3]))
    if key.shape[3] < head_dim:
        key = pad(key, (0, head_dim - key.shape[3]))
    if value.shape[3] < head_dim:
        value = pad(value, (0, head_dim - value.shape[3]))
    return Fitted(query, key, value, scaling, width, p, place)


def pool_mismatch(spec: PoolSpec, layer: int, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """What is wrong where layer ``layer``'s K/V ([1, heads, tokens, dims]) are not of
    the pool's geometry (None where they are): the pool was sized from the model's
    config, which its attention does not follow."""
    heads, dims = key.shape[1], (key.shape[-1], value.shape[-1])
    if heads == spec.num_kv_heads and max(dims) <= spec.head_dim:
        return None
    shown = f"{dims[0]}" if dims[0] == dims[1] else f"{dims[0]} (k) / {dims[1]} (v)"
    return (f"layer {layer}'s attention makes K/V of {heads} heads x {shown} dims, where the pool holds "
            f"{spec.num_kv_heads} heads x {spec.head_dim} a layer: the pool was sized from the model's config "
            f"(spec_for_model: num_key_value_heads, head_dim), which this model's attention does not follow (a "
            f"family that ignores num_key_value_heads, as GPT-2, OPT and GPT-NeoX attend with a K/V head per "
            f"query head; or a config changed after the pool was made): make the pool from a config the "
            f"attention follows (here {heads} K/V heads)")
