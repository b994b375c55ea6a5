"""How a `PagedGeneration` (`kvpager.hf.generation`) is made ready for its
first pass, before it allocates anything: its call's arguments checked and
resolved (`GenerationSetup._resolve`), then the machinery its passes run on
(`GenerationSetup._prepare_passes`).

Resolving refuses a bad call by name before the pool is touched: the prompts
as token lists (padding stripped by an ``attention_mask``), each prompt's
limit, end tokens, stop sequences, sampling and log-probabilities, the model
checked against the pool (its windows, shared K/V layers, chunks, layers of
other geometry), the positions a learned table holds, and the salt (the
call's, changed for rotary frequencies that follow each pass's length and
for a model with recurrent layers, whose states `kvpager.hf.recurrent`
holds). The passes' machinery: the devices and dtypes, whether passes are
pipelined (`kvpager.hf.pipeline`: where the pool, or a client's daemon, has
``record_tokens``), batched in one round trip and owed a block's worth at a
time, the pinned host buffers, the width of a sequence's tables, the reused
step plans (`kvpager.hf.decode_plans`) and the captured steps
(`kvpager.hf.graphs`, or a `CapturedSteps` kept across calls).
"""

from __future__ import annotations

from typing import Any

import torch

from kvpager.hf.captured_steps import CapturedSteps
from kvpager.hf.checks import (
    check_model,
    check_model_and_pool,
    check_positions,
    end_tokens,
    model_eos,
)
from kvpager.hf.decode_plans import DecodePlans
from kvpager.hf.eager import TORCH_DTYPES
from kvpager.hf.graphs import DecodeGraphs, bucket_for, check_graph_options, graph_width
from kvpager.hf.logprobs import TokenLogprobs, check_logprobs
from kvpager.hf.model import layer_fit, layer_map, text_config
from kvpager.hf.padding import new_token_limits, prompts_given, stop_sequences, token_lists
from kvpager.hf.passes import HostBuffers, Owed, Pass
from kvpager.hf.recurrent import Recurrent, has_recurrent_layers, recurrent_salt
from kvpager.hf.rope import rope_salt
from kvpager.hf.salt import call_salt
from kvpager.hf.sampling import Sampler
from kvpager.hf.windows import layer_chunks
from kvpager.spec import dtype_name


class GenerationSetup:
    """What `PagedGeneration.__post_init__` runs before it allocates (mixed into
    it): reads its fields (``model``, ``pool``, ``prompts``, ``max_new_tokens``,
    ``eos_token_id``, ``sampling``, ``logprobs``, ``stop_sequences``, ``salt``,
    ``cuda_graphs``, ``compile``, ``cascade``, ``pipeline``) and sets what its
    passes read; calls its ``_batch``, ``_first_tokens`` and ``_releases_windows``."""

    def _resolve(self, input_ids: Any, attention_mask: Any) -> None:
        """The call's arguments checked and resolved (nothing allocated)."""
        check_model_and_pool(self.model, self.pool)
        self.prompts = token_lists(prompts_given(self.prompts, input_ids), self.model, attention_mask)
        self._most = new_token_limits(self.max_new_tokens, len(self.prompts))  # each prompt's
        # (before, the default was None: a PagedGeneration made directly ran past the model's end token,
        # where generate and transformers' own stop)
        self.eos_token_id = model_eos(self.model, self.eos_token_id)
        self._eos = end_tokens(self.eos_token_id)
        vocab = getattr(text_config(self.model), "vocab_size", None)
        self._sampler = Sampler(self.sampling, len(self.prompts), self.prompts, self._eos, vocab)
        self.logprobs = check_logprobs(self.logprobs, vocab)
        self._lp = None if self.logprobs is None else TokenLogprobs(self.logprobs, len(self.prompts))
        # passes give logits (not greedy tokens) where a row draws, is penalized, or logprobs are kept
        self._logits = not self._sampler.plain or self._lp is not None
        self._windows = check_model(self.model, self.pool)
        self._layers = layer_map(self.model)  # layers that reuse an earlier layer's K/V (Gemma-3n)
        self._chunks = layer_chunks(self.model, self.pool.spec.block_size)  # chunked layers (Llama-4)
        self._fit = layer_fit(self.model)  # layers of other geometry than the pool's (Gemma-4)
        self._stops = stop_sequences(self.stop_sequences)  # by last token
        self.salt = call_salt(self.model, self.salt, "generate")
        # (a sequence's last new token is never fed back: it reaches position len(p) + m - 2)
        check_positions(self.model, max((len(p) + m - 1 for p, m in zip(self.prompts, self._most)), default=0),
                        "generate")
        recurrent = has_recurrent_layers(self.model)
        # (a rotary embedding that follows each pass's length: the call checked, long-factor blocks apart;
        # a model with recurrent layers prefills in parts)
        self.salt = rope_salt(self.model, self.salt, list(map(len, self.prompts)),
                              [len(p) + max(m - 1, 0) for p, m in zip(self.prompts, self._most)], "generate",
                              1 if recurrent else None)
        self._recurrent = None  # a model with recurrent layers: their states (`kvpager.hf.recurrent`)
        if recurrent:
            # captured steps read the states of a bucket's rows (`kvpager.hf.graphs.bucket_for`)
            # (each sequence's states where it ends held, keyed by its prompt and tokens so far)
            self._recurrent = Recurrent(self.model, self._batch, capacity=bucket_for if self.cuda_graphs else None,
                                        history=lambda i: self.prompts[i] + self.outputs[i])
            if self._logits:  # (the prefill's tokens: each prompt's first draw)
                self._recurrent.choose = self._first_tokens
            if self.compile or getattr(self.cuda_graphs, "compile", False):
                self._recurrent.compile = "inductor"  # (captured steps compiled: the recurrent layers' code fused)
            # (their blocks are matched only by generations that also hold or remake the states)
            self.salt = recurrent_salt(self.salt, self.model)

    def _prepare_passes(self) -> None:
        """The devices, the pipelining, the host buffers, the tables' width, the
        plans and the captured steps (a `CapturedSteps`' taken as ``_kept``: given
        back at `close`, or where the allocate that follows fails)."""
        self._device = next(self.model.parameters()).device
        self._pool_dtype = TORCH_DTYPES[dtype_name(self.pool.spec.dtype)]
        pool_device = str(getattr(self.pool, "device", "cpu"))
        self._pool_device = torch.device(pool_device)
        self._graphs = None
        # a daemon client pipelines only where its daemon answers `record_tokens` (`Client.ops`)
        ops = getattr(self.pool, "ops", None)
        self._pipelined = (self.pipeline and hasattr(self.pool, "record_tokens")
                           and (ops is None or "record_tokens" in ops))
        self._inflight: Pass | None = None  # the decode pass launched and not yet completed
        # a daemon that batches takes a pipelined step's calls in one round trip (`DecodePasses._later`)
        self._batched = self._pipelined and ops is not None and "batch" in ops
        self._deferred: list[tuple[Any, ...]] = []
        # steady passes' ids and commits told the pool a block's worth at a time (`DecodePasses._owe`);
        # not where every step releases windows' blocks (a block would go before it was published)
        self._may_owe = self._pipelined and not self._releases_windows()
        self._owed: Owed | None = None
        self._host_tokens = HostBuffers(self._device)
        self._host_logprobs = HostBuffers(self._device, torch.float64)
        # Blocks a sequence can reach: the width of a reused decode plan's tables (`_plan`) and of
        # captured steps' (`DecodeGraphs`), at most the pool's blocks. A max_new_tokens past what the
        # pool holds ends in OutOfBlocks, not in tables sized for it (on a GPU, 10**9 tokens took 477
        # MiB of tables for two sequences and 40 s; 10**12 ran out of device memory). A sequence whose
        # windows gave blocks back may outgrow it: its plans grow then, as a graph's do.
        longest = max(len(p) + m for p, m in zip(self.prompts, self._most))
        self._width = graph_width(self.pool, longest)
        # Decode steps on a GPU pool refill the last step's plan in place while the batch
        # keeps its sequences; the CPU backend's plans are made anew each step.
        self._plans = DecodePlans(self.pool, text_config(self.model).num_attention_heads, cascade=self.cascade,
                                  width=self._width)
        kept = self.cuda_graphs if isinstance(self.cuda_graphs, CapturedSteps) else None
        check_graph_options(self.model, self.pool, True if kept is not None else self.cuda_graphs, self.compile)
        if kept is not None:
            self._graphs = kept.take(self, self.model, self.pool, self._batch, self._width, self.cascade,
                                     self._logits, self.compile,
                                     forward=self._recurrent.graph_pass if self._recurrent is not None else None)
            self._kept = kept
        elif self.cuda_graphs:
            self._graphs = DecodeGraphs(self.model, self.pool, self._batch, self._width, cascade=self.cascade,
                                       compile=self.compile,
                                       forward=self._recurrent.graph_pass if self._recurrent is not None else None)
        if self._recurrent is not None:
            self._recurrent.graphs = self._graphs  # (its states where the graphs keep theirs: `fixed_states`)
