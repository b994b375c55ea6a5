"""Eager forward passes of a model over a kvpager pool, its logits kept: what
`kvpager.hf.score` and `kvpager.hf.beam_search` run (`PagedGeneration` has its
own, with plans kept across steps and CUDA graphs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvpager.hf.attention import PagedBatch, paged_attention, paged_forward
from kvpager.hf.checks import check_model
from kvpager.hf.model import layer_fit, layer_map, text_config
from kvpager.hf.windows import layer_chunks
from kvpager.spec import dtype_name

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class EagerPasses:
    """A model's attention settings for ``pool``, read once (`check_model`: its
    windows; shared K/V layers, chunks, fitted geometry), and its passes."""

    def __init__(self, model: Any, pool: Any):
        self.model, self.pool = model, pool
        self.windows = check_model(model, pool)
        self.layers = layer_map(model)
        self.chunks = layer_chunks(model, pool.spec.block_size)
        self.fit = layer_fit(model)
        self.heads = text_config(model).num_attention_heads
        self.device = next(model.parameters()).device
        self.pool_dtype = TORCH_DTYPES[dtype_name(pool.spec.dtype)]
        self.pool_device = torch.device(str(getattr(pool, "device", "cpu")))

    def forward(self, ids: list[int], lens: list[int], tokens: Sequence[int], positions: Sequence[int],
                slots: np.ndarray, keep: Any, context_lens: list[int] | None = None) -> torch.Tensor:
        """One pass over ``lens`` new tokens of each of ``ids`` (``tokens`` and their
        ``positions``, packed; their K/V to ``slots``; the last of each sequence's
        first ``context_lens`` tokens where given): the logits of the positions
        ``keep`` selects (`paged_forward`'s ``logits_to_keep``)."""
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([list(positions)], dtype=torch.long, device=self.device)
        plan = self.pool.plan(ids, lens, slots, context_lens=context_lens, num_q_heads=self.heads)
        with torch.inference_mode(), paged_attention(self.model):
            return paged_forward(self.model, self.batch(plan), input_ids, position_ids, keep)

    def batch(self, plan: Any) -> PagedBatch:
        """A pass's `PagedBatch` over ``plan``, its logits kept."""
        return PagedBatch(plan, self.pool_dtype, self.pool_device, self.windows, layers=self.layers,
                          chunks=self.chunks, fit=self.fit, logits=True)

    def commit(self, ids: list[int], upto: list[int] | None = None) -> None:
        """What the passes over ``ids`` wrote (each to ``upto`` where given), committed
        (its writes landed first)."""
        if hasattr(self.pool, "synchronize"):
            self.pool.synchronize()
        self.pool.commit(ids, upto)
