"""A `PagedCache`'s decode passes replayed from CUDA graphs (``PagedCache(..., cuda_graphs=True)``).

transformers' ``generate`` runs a decode pass as eager Python: at a 1B
model's size the host's launches, not the GPU, set the pace. A `PagedCache`
made with ``cuda_graphs`` runs each pass of one new token a row (what
``generate`` feeds after the prompt's, keeping the last logits) as
`PagedGeneration`'s captured decode step does (`kvpager.hf.graphs`): the
rows packed into one, the step captured once a batch-size bucket and replayed
after its plan and inputs are refilled; the logits are the pass's, copied out
of the graph's memory. Any other pass runs eagerly. ``cuda_graphs`` may be a
`CapturedSteps`, kept across caches (and ``generate`` calls): a cache replays
the steps an earlier one captured, one cache at a time.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvpager.errors import InvalidArgument
from kvpager.hf.attention import PagedBatch
from kvpager.hf.captured_steps import CapturedSteps
from kvpager.hf.graphs import DecodeGraphs, graph_width


class CacheGraphs:
    """The captured decode steps of ``cache`` (a `PagedCache`): made at its first
    replayed pass, with tables for twice its longest row then (they grow as
    `DecodeGraphs` grows them)."""

    def __init__(self, cache: Any, cuda_graphs: Any) -> None:
        if isinstance(cuda_graphs, CapturedSteps):  # (said now, not at the first decode pass)
            if cuda_graphs.model is not cache.model or cuda_graphs.pool is not cache.pool:
                raise InvalidArgument("cuda_graphs: these CapturedSteps were made for another model or pool; "
                                      "make them for this one")
            if cuda_graphs.compile:
                raise InvalidArgument("PagedCache replays uncompiled steps: pass CapturedSteps made without compile")
            if cuda_graphs.closed:
                raise InvalidArgument("cuda_graphs: these CapturedSteps are closed; make new ones")
        self._cache = weakref.ref(cache)  # (held strongly, the cache lived until a cycle collection)
        self._kept = cuda_graphs if isinstance(cuda_graphs, CapturedSteps) else None
        self._graphs: DecodeGraphs | None = None

    @property
    def cache(self) -> Any:
        return self._cache()

    def _batch(self, plan: Any) -> PagedBatch:
        """A captured step's batch: the cache's layers, the pass's logits kept."""
        c = self.cache
        return PagedBatch(plan, c._dtype, c._device, c._windows, chunks=c._chunks, layers=c._layer_map, fit=c._fit,
                          logits=True)

    def prepare(self, seq_ids: list[int], slots: Any) -> Any:
        """The captured step of a decode pass of ``seq_ids`` (their K/V to ``slots``) with
        its plan refilled ahead of `run` (`DecodeGraphs.prepare`); None where `run` must
        do more (no step captured yet)."""
        return None if self._graphs is None else self._graphs.prepare(seq_ids, slots)

    def run(self, seq_ids: list[int], input_ids: torch.Tensor, position_ids: torch.Tensor, slots: Any,
            longest: int, ready: Any = None) -> Any:
        """A decode pass of ``seq_ids`` (``input_ids`` and ``position_ids`` [rows, 1],
        their K/V to ``slots``; the longest row then ``longest`` tokens) replayed: the
        model's output, its logits [rows, 1, vocab]. ``ready``: what `prepare` gave
        for these sequences and slots."""
        c = self.cache
        if self._graphs is None:
            width = graph_width(c.pool, 2 * longest)
            self._graphs = (DecodeGraphs(c.model, c.pool, self._batch, width) if self._kept is None else
                            self._kept.take(c, c.model, c.pool, self._batch, width, None, True, False,
                                            kind="PagedCache"))
        rows = len(seq_ids)
        logits = self._graphs.launch(seq_ids, input_ids.reshape(1, rows), position_ids.reshape(1, rows), slots,
                                     ready)
        return CausalLMOutputWithPast(logits=logits.unsqueeze(1).clone(), past_key_values=c)

    def close(self) -> None:
        """Let the steps go (kept ones back to their `CapturedSteps`)."""
        self._graphs = None
        if self._kept is not None:
            self._kept.release(self.cache)
