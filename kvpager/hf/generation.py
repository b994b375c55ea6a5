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

import weakref
from collections.abc import Sequence
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import Any

import numpy as np
import torch

# Re-exported: this module was their home, and `clients/kvpager_hf.py` is this module object; so
# are the names `PagedGeneration`'s construction used here before `kvpager.hf.generation_setup`.
from kvpager.batch_calls import free_all
from kvpager.errors import InvalidArgument, RequestTimeout, SessionLost
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
from kvpager.hf.decode_plans import DecodePlans  # noqa: F401
from kvpager.hf.eager import TORCH_DTYPES  # noqa: F401
from kvpager.hf.generation_setup import GenerationSetup
from kvpager.hf.graphs import DecodeGraphs, bucket_for, check_graph_options, graph_width  # noqa: F401
from kvpager.hf.held_session import check_session, free_dropped, pool_session, sequences_gone
from kvpager.hf.logprobs import Completion, KeptLogprobs, TokenLogprobs, check_logprobs  # noqa: F401
from kvpager.hf.model import (  # noqa: F401
    ABSENT,
    check_call,
    layer_fit,
    layer_map,
    model_geometry,
    spec_for_model,
    text_config,
)
from kvpager.hf.padding import new_token_limits, prompts_given, stop_sequences, token_lists  # noqa: F401
from kvpager.hf.passes import HostBuffers, Owed, Pass  # noqa: F401
from kvpager.hf.pipeline import DecodePasses
from kvpager.hf.recurrent import Recurrent, has_recurrent_layers, recurrent_salt  # noqa: F401
from kvpager.hf.rope import rope_salt  # noqa: F401
from kvpager.hf.salt import call_salt, default_salt  # noqa: F401
from kvpager.hf.sampling import Sampler, Sampling  # noqa: F401
from kvpager.hf.windows import hit_window, layer_chunks, layer_windows  # noqa: F401
from kvpager.spec import PoolSpec, dtype_name  # noqa: F401

# (``generate`` lives in `kvpager.hf.generate_call`, answered here by `__getattr__`)
__all__ = ["Completion", "PagedBatch", "PagedGeneration", "default_salt", "generate",  # noqa: F822
           "layer_windows", "spec_for_model"]


@dataclass
class PagedGeneration(GenerationSetup, DecodePasses, KeptLogprobs):
    """Generation of one batch of prompts with its KV in ``pool``, greedy or sampled (``sampling``).

    Construction checks the call (`GenerationSetup`, `kvpager.hf.generation_setup`:
    before anything is allocated), allocates the prompts (sharing any cached prefix) and runs the
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
        self._finalizer: weakref.finalize | None = None  # (made once its sequences are: `free_dropped`)
        self._kept = None  # a `CapturedSteps` this generation holds
        self._session = pool_session(self.pool)  # (the one its sequences are held in: `held_session`)
        self._resolve(input_ids, attention_mask)  # (`kvpager.hf.generation_setup`)
        self._prepare_passes()
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
        # one dropped without `close` (a loop that stops stepping, an exception between steps): its
        # sequences freed at the pool's next call (ids only grow: those freed already are not live)
        self._finalizer = weakref.finalize(self, free_dropped, self.pool, list(self.seq_ids), self._session)
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
        check_session(self.pool, self._session, "step", "PagedGeneration")
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
        stops stepping early loses none of the tokens computed. Where its client's
        session was lost (closed, expired, a restarted daemon), its sequences went
        with it: nothing more is asked of the daemon."""
        try:
            self._close()
        except SessionLost:  # (the daemon freed them when the session ended)
            self._closed = True
            self._held.clear()

    def _close(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
        if sequences_gone(self.pool, self._session):
            self._timed_out = True  # (the path that frees alone, freeing none of them here)
            self._held.clear()
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
