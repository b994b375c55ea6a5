"""Models with recurrent layers beside their attention layers (Qwen3.5, Qwen3-Next, Jamba, Bamba, ...).

Such a model's ``layer_types`` names layers of linear attention or of a
state-space (Mamba) mixer (``linear_attention``; LFM2's ``conv``:
`kvpager.sizing.NO_KV_KINDS`) beside its full-attention layers, or layers that
do both side by side (``hybrid``: Falcon-H1, whose K/V go to the pool too). Those layers keep a fixed-size state a
sequence (a convolution window and a recurrent state), not K/V: the pool holds
the attention layers alone (`kvpager.hf.model.layer_map`: pool layer -1 for the
others), and the states live in transformers' own cache layers for them
(``LinearAttentionLayer``), whose attention layers are replaced by ones that
keep nothing (`PassThrough`), so K/V go to kvpager only.

A recurrent layer mixes every token of its row in order, so the packed row of
`kvpager.hf.attention` (all sequences' new tokens in one row) cannot carry such
a model. `Recurrent` runs

- the prefill as rows: on a GPU the prompts that start from no state in one
  pass, left-padded to the longest (the recurrent layers take the 2-D mask and
  zero the padding's inputs; the attention function takes the tokens alone,
  `PagedBatch.real`); the prompts resumed from held states (and on the CPU
  those from no state: `Recurrent.pad_prompts`) in parts, each pass a length its
  rows share (`kvpager.hf.pass_schedule`: a batch of next turns of distinct
  lengths in a few passes, no padding, each over its prompts' first tokens:
  ``context_lens``); the attention function packs a pass's tokens as one row,
  and the passes' states are then taken row by row into one batch
  (`kvpager.hf.recurrent_states`), and
- each decode step as rows of one token each ([B, 1]), the attention layers
  attending through one step plan as a packed row would
  (`kvpager.hf.attention.kvpager_attention` takes such rows), the states
  gathered to the step's rows when sequences have ended.

The states live at fixed addresses (`States`: a tensor per state, rows for
as many sequences as the batch's graph bucket), so a decode step captured in a
CUDA graph (`kvpager.hf.graphs`, ``cuda_graphs=True``) reads and writes them in
place at each replay; when sequences end, the rows left are moved up in place
(`States.keep`). The decode steps pipeline as other models' do
(`kvpager.hf.pipeline`).

Prefix reuse. A cached block holds K/V, not the recurrent state at its end,
so a prompt can start after its cached blocks only where that state is held
too (`StateCache`, one a model: states at block boundaries, by the tokens
before them). A prompt finds the longest such prefix within its cached tokens
and runs from there: its attention layers over the cached K/V (nothing
written where blocks were cached), its recurrent layers from the held state.
A prompt whose cached blocks reach past the longest held state runs to them
first, its state is held there, then the rest runs (one allocation, the
passes' plans over as much of it as they reach): the next prompt that finds
those blocks (the same system prompt, the next turn of a conversation) resumes
at their end. Blocks are published as every model's.
Where a sequence ends, its states at the last block boundary it ran are held
too (marked as its passes fill blocks: `stepped`; `kvpager.hf.recurrent_ends`),
so a conversation's next turn resumes after the answer.
transformers' linear-attention cache layers (5.24 and later) are required.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from kvpager.hf.attention import PagedBatch, paged_attention, run_pass
from kvpager.hf.checks import capturing
from kvpager.hf.compiled import compiled_fn
from kvpager.hf.continuing import CONTINUING, NOT_CONTINUING, continues, decode_states_apart  # noqa: F401 - the first two re-exported
from kvpager.hf.fed_positions import own_salt
from kvpager.hf.model import has_recurrent_layers, text_config
from kvpager.hf.pass_schedule import schedule
from kvpager.hf.recurrent_ends import HeldEnds
from kvpager.hf.recurrent_states import (
    Layout,
    Rows,
    States,
    cache_argument,
    cache_over,
    check_layout,
    fixed_states,
    forward_rows,
    layout_of,
    new_cache,
    rows_of,
    stacked,
    tensors_of,
)
from kvpager.hf.state_cache import PrefixKeys, StateCache, held_key

__all__ = ["Recurrent", "StateCache", "States", "has_recurrent_layers", "new_cache", "recurrent_salt"]


def recurrent_salt(salt: Any, model: Any = None) -> str:
    """The prefix-cache salt of a model with recurrent layers under ``salt``: its
    blocks are matched only by the passes that hold or remake their recurrent
    states too (generation, `kvpager.hf.score`, `kvpager.hf.beam_search`), not by a
    packed pass of the same salt, which would take cached K/V without them. A
    ``model`` whose decode steps leave other K/V than its passes of several tokens
    (`DECODE_STATES_APART`) gets a salt of the call's own: no later call matches
    the blocks its decode steps filled."""
    base = f"{salt}|recurrent"
    return own_salt(base) if model is not None and decode_states_apart(model) else base

#: one pass's share of a prompt: (first token, end, its slots (-1: cached), the states it starts from or None)
Segment = tuple[int, int, np.ndarray, Rows | None]
#: a prefill pass run: (the prompts it ran, as rows in order; its cache, holding their states after)
Ran = tuple[list[int], Any]


class Recurrent(HeldEnds):
    """The recurrent layers' states of one generation's sequences (see the module
    docstring): `allocate` and `prefill` the prompts (resuming from held states
    where their leading blocks are cached), then `decode` steps over rows (or
    `graph_pass`, the step a CUDA graph captures). ``capacity(n)``: the rows the
    states keep for ``n`` sequences (default ``n``; the graph bucket of ``n``
    where steps are captured). ``history(i)``: prompt ``i``'s tokens and those
    generated for it so far, which key the states held where its sequence ends
    (none held without it)."""

    #: prompts that start from no state prefill in one pass, left-padded to the longest (their
    #: recurrent layers zero the padding's inputs, as in transformers' padded batches), or in parts of
    #: lengths their rows share (False; `kvpager.hf.pass_schedule`). None: padded on a GPU, whose passes
    #: of a few rows leave it idle (32 prompts of 256-768 tokens: 4.1x sooner than a pass per length),
    #: in parts on the CPU, where the padding's tokens cost as much as any (the same 8 prompts of
    #: 128-384 tokens: 1.23x sooner a pass per length than padded)
    pad_prompts: bool | None = None
    #: the decode passes (`decode`, `graph_pass`) compiled by ``torch.compile`` with this backend
    #: (`kvpager.hf.compiled`: the recurrent layers' and the model's small kernels fused), or not
    #: (None); ``fullgraph``: refuse a graph break instead of running the rest eagerly
    compile: str | None = None
    fullgraph: bool = False
    #: whether the model's recurrent layers continue a pass of several tokens from held states (its
    #: prompts then run in parts and resume from states held for them); None: by its model type
    #: (`CONTINUING`). False runs each prompt whole from no state, one pass left-padded, and holds none
    continues: bool | None = None
    #: ``choose(logits, rows)``: the prefill's first new tokens of prompts ``rows`` from their logits,
    #: where the passes give logits (`PagedBatch.logits`: a sampled generation); None: greedy tokens
    choose: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None

    def __init__(self, model: Any, make_batch: Any, capacity: Callable[[int], int] | None = None,
                 history: Callable[[int], list[int]] | None = None):
        self.model = model
        self.make_batch = make_batch  # plan -> PagedBatch
        self.capacity = capacity or (lambda n: n)
        self.history = history
        self.arg = cache_argument(model)
        new_cache(model)  # the model's cache layers are what kvpager can follow (ValueError)
        self.store = StateCache.of(model)
        self._continues = continues(model) if self.continues is None else bool(self.continues)
        self.states: States | None = None
        #: the captured decode steps (`kvpager.hf.graphs.DecodeGraphs`), where the states must be those
        #: they read (a `CapturedSteps`' kept from an earlier call: `fixed_states`)
        self.graphs: Any = None
        #: a decode pass failed part-way: transformers had advanced some states in place already
        self.broken = False
        self._split: list[int | None] = []  # per prompt: where its allocation ends short of it
        self._keys: list[Sequence[bytes]] = []  # per prompt: its whole-block prefixes' keys (`PrefixKeys`)
        self._layout: Layout | None = None  # the states' layout, once a pass or a held state shows it
        self._held_as: str | None = None  # what keys this generation's held states: the salt and the dtype
        self._block_size = 0
        self._ends = False  # whether the states where sequences end are held (`stepped`, `keep`, `close`)

    def allocate(self, pool: Any, prompts: list[list[int]], salt: Any) -> list[Any]:
        """Allocate the prompts whole (no sharing within the batch: its passes are
        several; the pool hashes each prompt once, a daemon answers once). A prompt
        whose leading blocks are cached past the longest prefix whose state is held
        is marked split there: `prefill` runs it to its cached tokens first (its
        plans over that much of it: ``context_lens``), holds the state, then runs
        the rest, so the next prompt with those blocks resumes there."""
        bs = self._block_size = pool.spec.block_size
        self._split = [None] * len(prompts)
        self._keys = [[] for _ in prompts]  # (none without a state cache: nothing is held or looked up)
        held = self._continues and self.store.max_bytes  # (states held and looked up)
        self._ends = bool(held and self.store.hold_ends and self.history is not None)
        allocs = pool.allocate(prompts, salt, share_in_batch=False)
        if not held:
            return allocs
        # (the weights' dtype too: a salt given by the caller need not change when the model's does)
        held_as = self._held_as = held_key(salt, self.model, pool)
        for k, a in enumerate(allocs):
            c = a.num_cached_tokens
            # (keys as far as its cached blocks: no state past them can serve it)
            self._keys[k] = PrefixKeys(held_as, prompts[k], bs, min(c, len(prompts[k]) - 1))
            if c > self.store.longest(self._keys[k], c, bs):
                self._split[k] = c
        return allocs

    def prefill(self, pool: Any, prompts: list[list[int]], allocs: list[Any], device: torch.device) -> list[int]:
        """The prompts `allocate` allocated, as passes of rows: each prompt from the
        longest prefix of its cached tokens whose state is held (from its first token
        where none is); a prompt split at its cached tokens runs to them first, its
        state is held, and the rest runs from there (`_passes`). The first new token
        of each prompt."""
        bs = pool.spec.block_size
        n = len(prompts)
        ids = [a.seq_id for a in allocs]
        self._layout = None
        first: dict[int, Segment] = {}
        rest: dict[int, Segment] = {}
        for k, a in enumerate(allocs):
            split = self._split[k]
            end = len(prompts[k]) if split is None else split
            start, layout, held = self.store.best(self._keys[k], min(a.num_cached_tokens, end - 1), bs)
            self._layout = self._layout or layout
            # slots from the start: none (-1) where its blocks were cached
            slots = np.concatenate([np.full(a.num_cached_tokens - start, -1, np.int64), np.asarray(a.slots, np.int64)])
            # (a state held where the model was then: it may have moved since)
            first[k] = (start, end, slots[: end - start], None if held is None else tuple(t.to(device) for t in held))
            if split is not None:
                rest[k] = (split, len(prompts[k]), slots[split - start :], None)
        out: list[int] = [0] * n
        final: list[Rows | None] = [None] * n
        ran = self._passes(pool, ids, prompts, first, out, final, device)
        for k in rest:  # their states at the blocks they found cached, for the prompts after them
            self.store.put(self._keys[k][self._split[k] // bs - 1], self._layout, final[k])
        if rest:
            ran += self._passes(pool, ids, prompts, {k: (*seg[:3], final[k]) for k, seg in rest.items()}, out,
                                final, device)
        # (the marks' copy of the states within what the state cache could hold of them; one pass
        # over every row in order, as many as the states keep: its cache's tensors, not copied)
        whole = len(ran) == 1 and ran[0][0] == list(range(n)) and self.capacity(n) == n
        self.states = fixed_states(self.graphs, self.model, self._layout, None if whole else final, n,
                                   self.capacity(n), mark_bytes=self.store.max_bytes,
                                   tensors=tensors_of(ran[0][1], self._layout) if whole else None)
        self.stepped([len(p) - 1 for p in prompts])  # a prompt of whole blocks: its state is its end's
        return out

    def _passes(self, pool: Any, ids: list[int], prompts: list[list[int]], segments: dict[int, Segment],
                out: list[int], final: list[Rows | None], device: torch.device) -> list[Ran]:
        """The segments (tokens ``[start, end)`` at ``slots``, from nothing or from the
        states held there) as passes: on a GPU those from no state in one pass,
        left-padded to the longest (`pad_prompts`); the others in parts, each pass a
        length its rows share (`kvpager.hf.pass_schedule`: 32 resumed segments of
        distinct lengths in 6 to 10 passes, not 32). Each prompt's next token into
        ``out``, its states after into ``final`` (the layout of states into
        ``_layout``, once known). The passes run: their rows and caches."""
        pad = not self._continues or (self.pad_prompts if self.pad_prompts is not None else device.type == "cuda")
        groups: dict[str, list[int]] = {}
        for k, (_, _, _, held) in segments.items():
            groups.setdefault("resumed" if held is not None else "padded" if pad else "fresh", []).append(k)
        ran: list[Ran] = []
        for kind, group in groups.items():
            if kind == "padded":  # (segments from no state: one pass, left-padded to the longest)
                ran.append(self._padded_pass(pool, ids, prompts, group, segments, out, final, device))
                continue
            at = {k: segments[k][0] for k in group}
            states = {k: segments[k][3] for k in group}
            for length, members in schedule([segments[k][1] - segments[k][0] for k in group],
                                            first_whole=kind == "fresh"):
                rows = [group[i] for i in members]
                parts = [(at[k], at[k] + length) for k in rows]
                slots = np.concatenate([segments[k][2][a - segments[k][0] : b - segments[k][0]]
                                        for k, (a, b) in zip(rows, parts)])
                tokens = torch.tensor([prompts[k][a:b] for k, (a, b) in zip(rows, parts)], dtype=torch.long,
                                      device=device)
                where = torch.tensor([list(range(a, b)) for a, b in parts], dtype=torch.long, device=device)
                plan = self._plan(pool, [ids[k] for k in rows], [length] * len(rows), slots, [b for _, b in parts])
                if states[rows[0]] is None:  # (a first pass from no state: every row of it is)
                    cache = new_cache(self.model)
                else:
                    cache = cache_over(self.model, self._layout, stacked(self._layout, [states[k] for k in rows]))
                ran.append(self._collect(rows, self._pass(plan, tokens, where, cache), cache, out, final))
                for k, (_, b) in zip(rows, parts):
                    at[k], states[k] = b, final[k]
        return ran

    def _padded_pass(self, pool: Any, ids: list[int], prompts: list[list[int]], group: list[int],
                     segments: dict[int, Segment], out: list[int], final: list[Rows | None],
                     device: torch.device) -> Ran:
        """Segments from no state in one pass, left-padded to the longest: the
        recurrent layers take the 2-D mask and zero the padding's inputs, the
        attention function the tokens alone (`PagedBatch.real`)."""
        segs = [segments[k] for k in group]
        lens = [b - a for a, b, _, _ in segs]
        plan = self._plan(pool, [ids[k] for k in group], lens, np.concatenate([g[2] for g in segs]),
                          [b for _, b, _, _ in segs])
        n = max(lens)
        pads = [n - m for m in lens]
        tokens = torch.tensor([[0] * z + prompts[k][a:b] for k, z, (a, b, _, _) in zip(group, pads, segs)],
                              dtype=torch.long, device=device)
        where = torch.tensor([[0] * z + list(range(a, b)) for z, (a, b, _, _) in zip(pads, segs)],
                             dtype=torch.long, device=device)
        mask = real = None
        if any(pads):
            mask = torch.tensor([[0] * z + [1] * m for z, m in zip(pads, lens)], dtype=torch.long, device=device)
            real = torch.tensor([r * n + z + i for r, (z, m) in enumerate(zip(pads, lens)) for i in range(m)],
                                dtype=torch.long, device=device)
        cache = new_cache(self.model)
        return self._collect(group, self._pass(plan, tokens, where, cache, mask, real), cache, out, final)

    def _plan(self, pool: Any, ids: list[int], lens: list[int], slots: np.ndarray, ends: list[int]) -> Any:
        """A pass's step plan: ``lens`` tokens of each sequence, the last of its first
        ``ends`` (its prompt is allocated whole)."""
        heads = text_config(self.model).num_attention_heads
        return pool.plan(ids, lens, slots, context_lens=ends, num_q_heads=heads)

    def _collect(self, rows: list[int], tokens: torch.Tensor, cache: Any, out: list[int],
                 final: list[Rows | None]) -> Ran:
        """A pass's next tokens into ``out`` and its rows' states into ``final``; the pass."""
        if self.choose is not None:  # (logits: a sampled generation's)
            tokens = self.choose(tokens, rows)
        for k, t in zip(rows, tokens.tolist()):
            out[k] = t
        self._layout = self._layout or check_layout(self.model, layout_of(cache))
        for k, r in zip(rows, rows_of(cache, self._layout)):
            final[k] = r
        return rows, cache

    def decode(self, plan: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One eager decode pass over the rows `keep` left (a token each: ``input_ids``
        / ``position_ids`` [1, n] as a packed row would take them); each row's greedy
        next token. A pass that fails leaves this `broken`: the recurrent layers it
        ran had updated their states in place, so the same tokens fed again would
        advance them twice."""
        n = self.states.n
        try:
            return self._pass(plan, input_ids.view(-1, 1), position_ids.view(-1, 1), self.states.cache(n),
                              compiled=True)
        except BaseException:
            self.broken = True  # the layers before the failure wrote their new states in place
            raise

    def graph_pass(self, model: Any, batch: PagedBatch, input_ids: torch.Tensor,
                   position_ids: torch.Tensor) -> torch.Tensor:
        """The decode step `kvpager.hf.graphs.DecodeGraphs` captures (`captured_pass`
        over this generation's states)."""
        return captured_pass(model, batch, input_ids, position_ids, self.states, self.arg,
                             self.compile, self.fullgraph)

    def _pass(self, plan: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any,
              mask: torch.Tensor | None = None, real: torch.Tensor | None = None,
              compiled: bool = False) -> torch.Tensor:
        """A forward pass of rows over ``plan`` with the recurrent states in ``cache``;
        the greedy next token at each row's last position. Rows left-padded to one
        length: ``mask`` [rows, tokens] (1 for a token, 0 for padding) and ``real``,
        the flat indices of their tokens (`PagedBatch.real`)."""
        with torch.inference_mode(), paged_attention(self.model):
            batch = self.make_batch(plan)
            batch.real = real
            return self._run(batch, input_ids, position_ids, cache, mask, compiled)

    def _run(self, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any,
             padding: torch.Tensor | None = None, compiled: bool = False) -> torch.Tensor:
        """`forward_rows` through `run_pass` (compiled by ``torch.compile`` where
        ``compiled`` and `compile` is set: `kvpager.hf.compiled.compiled_fn`)."""
        fn = forward_rows if not (compiled and self.compile) else compiled_fn(forward_rows, self.compile,
                                                                                self.fullgraph)
        return run_pass(self.model, batch, functools.partial(fn, cache=cache, arg=self.arg, padding=padding),
                        input_ids, position_ids)


def captured_pass(model: Any, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  states: States, arg: str, compile: str | None = None, fullgraph: bool = False) -> torch.Tensor:
    """A decode step for `kvpager.hf.graphs.DecodeGraphs` to capture: a token for each
    of the bucket's rows (``input_ids`` [1, bucket]; rows past the live ones are
    padding, whose states are the unused rows'), over the first ``bucket`` rows of
    ``states`` (the model's cache argument ``arg``; compiled by ``torch.compile``
    with backend ``compile`` where given). Run outside a capture (the warm-up before
    one), it leaves the states as it found them, so the replay that follows
    advances them once."""
    cache = states.cache(input_ids.shape[1])
    saved = None if capturing() else states.snapshot()
    fn = forward_rows if compile is None else compiled_fn(forward_rows, compile, fullgraph)
    try:
        return run_pass(model, batch, functools.partial(fn, cache=cache, arg=arg, padding=None),
                        input_ids.view(-1, 1), position_ids.view(-1, 1))
    finally:
        if saved is not None:
            states.restore(saved)
