"""Hugging Face transformers on kvpager: generation (greedy or sampled) of a causal LM whose KV cache lives in a kvpager pool.

`PagedGeneration` is one batch's generation, step by step; `generate`
(`kvpager.hf.generate_call`: a call's arguments resolved against the model's
generation config, beams or not) runs one to its end.

The pool is any object with `KVPool`'s methods: an embedded `kvpager.KVPool`
or a daemon client. Sequences are allocated with their prompt ids, so a
prompt whose leading blocks another worker already computed (under the same
salt) starts from them: only the uncached tail goes through the model. Each
forward pass runs on one step plan (`kvpager.hf.attention`: the attention
function, the packed forward pass).

Usage::

    pool = KVPool(spec_for_model(model, num_blocks=4096))
    outputs = generate(model, pool, [prompt_ids, ...], max_new_tokens=64)

Supported: decoder-only models whose attention goes through transformers'
``AttentionInterface`` (docs/hf.md lists the families), greedy or sampled
(`kvpager.hf.sampling`), with log-probabilities (`kvpager.hf.logprobs`). This
module also gives the names of `kvpager.hf.attention` and `kvpager.hf.model`,
and `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import Any

import numpy as np
import torch

# Re-exported: this module was their home, and `clients/kvpager_hf.py` is this module object.
from kvpager.batch_calls import free_all
from kvpager.errors import InvalidArgument, RequestTimeout
from kvpager.hf.attention import (  # noqa: F401
    ATTN_IMPLEMENTATION,
    PagedBatch,
    _no_mask,
    _set_attn,
    _to_pool,
    kvpager_attention,
    paged_attention,
    paged_forward,
    register,
)
from kvpager.hf.captured_steps import CapturedSteps
from kvpager.hf.checks import (  # noqa: F401
    check_model,
    check_model_and_pool,
    check_positions,
    end_tokens,
    model_eos,
)
from kvpager.hf.decode_plans import DecodePlans
from kvpager.hf.eager import TORCH_DTYPES
from kvpager.hf.graphs import DecodeGraphs, bucket_for, check_graph_options, graph_width
from kvpager.hf.logprobs import Completion, KeptLogprobs, TokenLogprobs, check_logprobs
from kvpager.hf.model import (  # noqa: F401
    ABSENT,
    check_call,
    layer_fit,
    layer_map,
    model_geometry,
    spec_for_model,
    text_config,
)
from kvpager.hf.padding import new_token_limits, prompts_given, stop_sequences, token_lists
from kvpager.hf.passes import HostBuffers, Owed, Pass
from kvpager.hf.pipeline import DecodePasses
from kvpager.hf.recurrent import Recurrent, has_recurrent_layers, recurrent_salt
from kvpager.hf.rope import rope_salt
from kvpager.hf.salt import call_salt, default_salt
from kvpager.hf.sampling import Sampler, Sampling  # noqa: F401
from kvpager.hf.windows import hit_window, layer_chunks, layer_windows
from kvpager.spec import PoolSpec, dtype_name  # noqa: F401

# (``generate`` lives in `kvpager.hf.generate_call`, answered here by `__getattr__`)
__all__ = ["Completion", "PagedBatch", "PagedGeneration", "default_salt", "generate",  # noqa: F822
           "layer_windows", "spec_for_model"]


@dataclass
class PagedGeneration(DecodePasses, KeptLogprobs):
    """Generation of one batch of prompts with its KV in ``pool``, greedy or sampled (``sampling``).

    Construction allocates the prompts (sharing any cached prefix) and runs the
    prefill, which yields each sequence's first new token; each `step` runs one
    decode pass for the unfinished sequences; `close` frees them. Several can be
    alive at once over one pool (several workers, or one scheduler's batches).
    """

    model: Any
    pool: Any
    #: the prompts' token ids (lists, 1-D tensors or a 2-D tensor); after construction, lists of each
    #: prompt's own tokens (its padding stripped where an ``attention_mask`` was given)
    prompts: Any = None
    #: the most new tokens of every prompt, or a list of one a prompt
    max_new_tokens: int | Sequence[int] = None  # type: ignore[assignment] - required: None is refused by name
    salt: str | bytes | None = None
    #: the end-of-sequence ids: "model" (the default, as `generate`'s and transformers'): the model's
    #: generation config's; None: none (only ``max_new_tokens`` and ``stop_sequences`` end a prompt)
    eos_token_id: int | Sequence[int] | str | None = "model"
    #: capture each decode step in a CUDA graph per batch-size bucket (`kvpager.hf.graphs`), this
    #: generation's own (True), or replaying those kept across calls by a `CapturedSteps`
    cuda_graphs: bool | CapturedSteps = False
    #: in a model whose every layer has a sliding window, give back each step the
    #: blocks no window will read again (`KVPool.release_before`): KV memory per
    #: sequence stays about one window, however long it generates
    release_windowed: bool = True
    #: shared-prefix (cascade) attention in decode and multi-token steps: None where it pays
    #: (`kvpager.cascade.worth_it` / `multi_token_worth_it`; an eager decode step, paced by the
    #: model's Python, from `kvpager.cascade.HOST_BOUND_MIN_SAVED`), True / False to force it on or off
    cascade: bool | None = None
    #: launch each decode pass before the last one's tokens reach the host
    #: (`kvpager.hf.pipeline`; where the pool, or a client's daemon, has `record_tokens`): the host's work
    #: overlaps the device's, and `outputs` trail the device by one pass until `done`
    pipeline: bool = True
    #: with ``cuda_graphs``: capture the decode step compiled by ``torch.compile`` (`kvpager.hf.compiled`:
    #: the model's small kernels fused; compiling an 8B model takes tens of seconds, once per process)
    compile: bool = False
    _: KW_ONLY
    #: how each prompt's tokens are drawn (`kvpager.hf.sampling.Sampling`: temperature, top-k, top-p,
    #: min-p, a seed), one for all or a list of one per prompt (None there: greedy); None: greedy
    sampling: Any = None
    #: token-id sequences that end a prompt's generation where its new tokens end with one
    #: (included, as an end token is); None: none
    stop_sequences: Sequence[Sequence[int]] | None = None
    #: keep each new token's log-probability (`kvpager.hf.logprobs`: under the model's raw logits) and,
    #: where > 0, that many most likely tokens' at each position (`token_logprobs`, `top_logprobs`,
    #: `completions`); None: none kept
    logprobs: int | None = None
    #: the prompts under a tokenizer's name (``PagedGeneration(model, pool, **enc, max_new_tokens=n)``);
    #: give them as ``prompts`` or as ``input_ids``, not both
    input_ids: InitVar[Any] = None
    #: 1 for a prompt's tokens, 0 for padding, of the prompts' shape (a tokenizer's ``attention_mask``):
    #: each prompt becomes the run of its tokens where the mask is 1 (left or right padding stripped)
    attention_mask: InitVar[Any] = None
    seq_ids: list[int] = field(init=False, default_factory=list)
    num_cached_tokens: list[int] = field(init=False, default_factory=list)
    outputs: list[list[int]] = field(init=False, default_factory=list)
    finished: list[bool] = field(init=False, default_factory=list)

    def __post_init__(self, input_ids: Any = None, attention_mask: Any = None) -> None:
        self._closed = self._timed_out = False
        self._kept = None  # a `CapturedSteps` this generation holds
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
            self.salt = recurrent_salt(self.salt)
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
        # One forward pass writes every layer's K/V for the whole batch before it
        # attends, so prompts of the batch may share the blocks an earlier one fills.
        try:
            if self._recurrent is not None:
                allocs = self._recurrent.allocate(self.pool, self.prompts, self.salt)
            else:
                allocs = self.pool.allocate(self.prompts, self.salt, share_in_batch=True,
                                            **hit_window(self._windows, self.pool))
        except BaseException:
            if self._kept is not None:  # (nothing to close: the kept steps are free for the next call)
                self._kept.release(self)
            raise
        self.seq_ids = [a.seq_id for a in allocs]
        self.num_cached_tokens = [a.num_cached_tokens for a in allocs]
        self.outputs = [[] for _ in allocs]
        self.finished = [False] * len(allocs)
        self._held = set(self.seq_ids)  # not freed yet
        try:
            rows = list(range(len(allocs)))
            if self._recurrent is not None:  # passes of rows, resumed where states are held
                first = self._recurrent.prefill(self.pool, self.prompts, allocs, self._device)
            else:
                tokens = [p[a.num_cached_tokens :] for p, a in zip(self.prompts, allocs)]
                positions = [range(a.num_cached_tokens, len(p)) for p, a in zip(self.prompts, allocs)]
                slots = np.concatenate([np.asarray(a.slots, dtype=np.int64) for a in allocs])
                first = self._run(rows, tokens, positions, slots)
            self._sampler.note(rows, first, self._device)  # (penalties count each prompt's first token)
            self._record(rows, self.seq_ids, first, None if self._lp is None else self._lp.first)
        except BaseException:
            self.close()
            raise

    @property
    def done(self) -> bool:
        return all(self.finished) and self._inflight is None

    def step(self) -> None:
        """One decode pass: feed each unfinished sequence its last new token.
        Pipelined, launch the next pass, then complete the one before it (its
        tokens reach `outputs`); the last call only completes. Unpipelined, the
        same pass is launched and completed at once. ValueError once `close`d
        (its sequences are freed; before, the pool's UnknownSequence said only
        that an id was unknown)."""
        if self._closed:
            raise InvalidArgument("step: this PagedGeneration is closed (its sequences were freed); make a new one")
        if self._recurrent is not None and self._recurrent.broken:
            raise ValueError("step: a decode pass of this model failed part-way through its recurrent layers, "
                             "which had already advanced their states in place; the generation cannot go on "
                             "(close it and generate again)")
        if self._timed_out:
            raise InvalidArgument("step: a call to the daemon timed out during an earlier step, and which of that "
                                  "step's calls ran is not known (the client sends it again, so it runs once, "
                                  "later); the generation cannot go on: close it (its sequences are freed) and "
                                  "generate again")
        try:
            if self._pipelined:
                prev, self._inflight = self._inflight, self._launch()
            else:
                prev = self._launch()  # nothing in flight: fed from `outputs`, ids given with the slots
            if prev is not None:
                self._complete(prev)
        except RequestTimeout:
            # A step after it appended a slot the daemon may already hold (its tokens then one
            # position off from here on, without a word) or sent ids for slots it no longer
            # knows: refused, and `close` frees alone.
            self._timed_out = True
            raise

    def position(self, i: int) -> int:
        """Position of sequence i's last new token (the next one to feed)."""
        return len(self.prompts[i]) + len(self.outputs[i]) - 1

    def _run(
        self,
        rows: list[int],
        tokens: list[Sequence[int]],
        positions: list[range],
        slots: np.ndarray,
    ) -> list[int]:
        """One forward pass over the packed new tokens of ``rows``: each row's next
        token (`_record` commits them: the K/V is written once the logits are)."""
        lens = [len(t) for t in tokens]
        flat = [t for ts in tokens for t in ts]
        input_ids = torch.tensor([flat], dtype=torch.long, device=self._device)
        position_ids = torch.tensor(
            [[p for ps in positions for p in ps]], dtype=torch.long, device=self._device
        )
        ids = [self.seq_ids[i] for i in rows]
        if self._graphs is not None and max(lens) == 1:
            out = self._graphs.launch(ids, input_ids, position_ids, slots)
        else:
            ends = torch.as_tensor(np.cumsum(lens) - 1, device=self._device)
            plan = self._plans.plan(ids, np.asarray(lens), slots, max(p[-1] for p in positions) + 1)
            out = self._forward(plan, input_ids, position_ids, ends)
        return self._first_tokens(out, rows).tolist()

    def _first_tokens(self, out: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """A prefill pass's first new tokens of prompts ``rows`` (their log-probabilities
        kept for `_record`, where asked)."""
        tokens = self._choose(out, rows, [0] * len(rows), record=False)
        if self._lp is not None:
            self._lp.first[rows] = self._lp.of(out, tokens).cpu().numpy()
        return tokens

    def _choose(self, out: torch.Tensor, rows: list[int], draws: list[int], record: bool = True) -> torch.Tensor:
        """A pass's tokens for ``rows``: its output where it gave greedy tokens, else
        chosen from its logits (`kvpager.hf.sampling`: drawn, or the most likely),
        each row its new token number ``draws`` (``record``: a decode pass's, counted
        by the penalties at once)."""
        return self._sampler.choose(out, rows, draws, record) if self._logits else out

    def _forward(self, plan: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_to_keep: Any = 0) -> torch.Tensor:
        """One eager forward pass over ``plan``: each kept position's greedy next token (its
        logits, sampled), on the device."""
        with torch.inference_mode(), paged_attention(self.model):
            return paged_forward(self.model, self._batch(plan), input_ids, position_ids, logits_to_keep)

    def _batch(self, plan: Any) -> PagedBatch:
        return PagedBatch(plan, self._pool_dtype, self._pool_device, self._windows, layers=self._layers,
                          chunks=self._chunks, fit=self._fit, logits=self._logits)

    def close(self) -> None:
        """Free the sequences still held (their committed full blocks stay matchable)
        and drop the reused plan (its device buffers). A pass still in flight is
        completed first (its writes must land before its blocks go back): its
        tokens reach `outputs` and what it wrote is committed, so a loop that
        stops stepping early loses none of the tokens computed."""
        prev, self._inflight = self._inflight, None
        if self._timed_out:  # nothing more is told the daemon of an uncertain step: its sequences freed alone
            self._closed = True
            self._deferred, self._owed = [], None
            try:
                if prev is not None and hasattr(self.pool, "synchronize"):
                    self.pool.synchronize()  # (the pass in flight writes into blocks about to go back)
                free_all(self.pool, [s for s in self.seq_ids if s in self._held])
                self._held.clear()
                self._plans.drop()
            finally:
                if self._kept is not None:
                    self._kept.release(self)
            return
        try:
            if prev is not None:
                self._complete(prev)
        finally:
            try:
                if self._recurrent is not None:
                    self._recurrent.close()  # the states where its sequences end, held
                self._settle()  # what steady passes owe, before their sequences go
            finally:
                self._closed = True
                try:
                    self._free(self.seq_ids)
                    self._plans.drop()
                    self._flush()
                finally:
                    if self._kept is not None:
                        self._kept.release(self)

    def __enter__(self) -> PagedGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def __getattr__(name: str) -> Any:
    """`generate`, which moved to `kvpager.hf.generate_call` (it builds a `PagedGeneration`,
    so this module cannot import it back at load): still answered here, for the code
    that reaches it as this module's (``clients/kvpager_hf.py`` is this module object)."""
    if name == "generate":
        from kvpager.hf.generate_call import generate

        return generate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
