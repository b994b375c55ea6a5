"""Scoring the prompts of a model with recurrent layers (`kvpager.hf.score`).

A recurrent layer mixes the tokens of its row in order, so such a model's
prompts cannot share one packed row: they run as rows, a pass a length the rows
share (`kvpager.hf.pass_schedule`, no padding), their attention layers over the
pool as `kvpager.hf.recurrent`'s prefill runs them, their logits kept where
they score a token.

A prompt starts from the longest prefix of its cached blocks whose recurrent
state is held (`kvpager.hf.state_cache.StateCache`, the model's, as generation
holds and finds them), up to its hold point: the last block boundary before the
position its scoring starts at (from there on its logits are needed); from its
first token where none is (its attention layers then read the cached K/V and
write nothing there). A call runs in waves: a prompt that shares whole blocks
with an earlier one waits until that one has run to where they part, its state
held and its blocks committed there, and is then allocated over those blocks and
resumes from that state; each wave runs every allocated prompt to its next stop
(where a later prompt parts from it, its hold point, its end). So a few-shot
preamble shared by many questions runs once, each question's context once, and
each answer from its question's hold point; the states at the hold points stay
held for later calls. A model whose recurrent layers cannot continue a pass
from held states (`kvpager.hf.recurrent_states.continues`: Zamba) runs each
prompt whole, from its first token, in one pass (``tokens_per_pass`` does not
cut it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvpager.hf.attention import paged_attention, run_pass
from kvpager.hf.eager import EagerPasses
from kvpager.hf.logprobs import TokenLogprobs
from kvpager.hf.pass_schedule import schedule
from kvpager.hf.recurrent import recurrent_salt
from kvpager.hf.recurrent_states import (
    Layout,
    Rows,
    cache_argument,
    cache_over,
    check_layout,
    continues,
    layout_of,
    new_cache,
    rows_of,
    stacked,
)
from kvpager.hf.state_cache import PrefixKeys, StateCache, held_key

#: one prompt's share of the passes: (its index in the group, first token, end, its slots from
#: the first token (-1: cached), the states it starts from or None)
Segment = tuple[int, int, int, np.ndarray, Rows | None]
#: ``wanted(k, a, b)``: the positions ``[q0, q1)`` of prompt ``k`` whose logits a pass over its tokens
#: ``[a, b)`` keeps (empty where q0 >= q1)
Wanted = Callable[[int, int, int], tuple[int, int]]
#: ``take(picks, logits)``: the kept logits [len(picks), vocab] of positions ``picks`` ((prompt, position))
Take = Callable[[list[tuple[int, int]], torch.Tensor], None]


def logits_rows(model: Any, batch: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, logits_to_keep: int,
                *, cache: Any, arg: str, padding: torch.Tensor | None = None) -> torch.Tensor:
    """A pass of rows over the recurrent states in ``cache`` (the model's cache argument
    ``arg``): the logits of each row's last ``logits_to_keep`` positions [rows, keep,
    vocab]. Without ``padding`` a 4-D mask is taken as given (none is built; the
    recurrent layers take none); rows left-padded: the 2-D mask (as
    `kvpager.hf.recurrent_states.forward_rows`)."""
    mask = padding if padding is not None else torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                logits_to_keep=logits_to_keep, kvpager=batch, **{arg: cache})
    return out.logits


def within(passes: list[tuple[int, list[int]]], lens: list[int], budget: int,
           cut: bool = True) -> list[tuple[int, list[int]]]:
    """``passes`` (a length their rows share, or 0: each row's segment of ``lens``
    whole, left-padded to the longest) cut to at most ``budget`` tokens each, padding
    included: rows in chunks, a longer shared length in parts of the budget, each
    row's parts in order; a row whose whole segment is longer than the budget alone,
    in parts of the budget where ``cut`` (a model that continues from held states).
    A pass of rows from no state cut into chunks is still all from no state (each
    chunk from a new cache), so the rows' next passes find every state."""
    out: list[tuple[int, list[int]]] = []

    def whole(chunk: list[int]) -> None:  # (a row alone and too long: in parts, where it may be cut)
        n = lens[chunk[0]]
        if cut and len(chunk) == 1 and n > budget:
            out.extend((min(budget, n - b), chunk) for b in range(0, n, budget))
        else:
            out.append((0, chunk))

    for length, members in passes:
        if length == 0:
            chunk: list[int] = []
            for i in members:
                if chunk and (len(chunk) + 1) * max(lens[i], *(lens[j] for j in chunk)) > budget:
                    whole(chunk)
                    chunk = []
                chunk.append(i)
            whole(chunk)
            continue
        for done in range(0, length, budget):
            step = min(budget, length - done)
            per = max(1, budget // step)
            out += [(step, members[c : c + per]) for c in range(0, len(members), per)]
    return out


class RowPasses:
    """Passes of rows of a model with recurrent layers over a pool (the module
    docstring): segments of prompts from no state or from held states, each pass a
    length its rows share, the logits of the positions a caller wants handed to it;
    what `RowScorer` and `kvpager.hf.beams`' prefill run."""

    #: segments from no state in one pass, left-padded to the longest (as generation's prefill,
    #: `kvpager.hf.recurrent.Recurrent.pad_prompts`), or in parts of lengths their rows share (False).
    #: None: padded on a GPU, in parts on the CPU. A model that does not continue from held states
    #: always runs its prompts whole, padded.
    pad: bool | None = None

    def __init__(self, model: Any, pool: Any, salt: Any, budget: int):
        # (generation's salt for such a model: they find each other's blocks and states)
        self.model, self.pool, self.salt, self.budget = model, pool, recurrent_salt(salt, model), budget
        self.passes = EagerPasses(model, pool)
        self.arg = cache_argument(model)
        new_cache(model)  # the model's cache layers are what kvpager can follow (ValueError)
        self.store = StateCache.of(model)
        self.continues = continues(model)
        self.held = bool(self.continues and self.store.max_bytes)
        # (held under the weights' dtype too, as generation's: `kvpager.hf.recurrent.Recurrent.allocate`)
        self.held_as = held_key(self.salt, model, pool)
        self.layout: Layout | None = None

    def allocate(self, prompts: list[list[int]], which: list[int], ids: dict[int, int]) -> list[Any]:
        """Prompts ``which`` allocated whole (no sharing among them: they run side by
        side), their ids into ``ids``: (index, slots from the first token (-1 where
        cached), cached tokens) each."""
        allocs = self.pool.allocate([prompts[k] for k in which], self.salt, share_in_batch=False)
        out = []
        for k, a in zip(which, allocs):
            ids[k] = a.seq_id
            c = a.num_cached_tokens
            out.append((k, np.concatenate([np.full(c, -1, np.int64), np.asarray(a.slots, np.int64)]), c))
        return out

    def resume_at(self, keys: PrefixKeys, upto: int) -> tuple[int, Rows | None]:
        """Where a prompt whose prefix keys are ``keys`` starts: after the longest
        prefix of at most ``upto`` tokens whose state is held, with that state on the
        model's device; (0, None) where none is."""
        if not self.held or upto < self.pool.spec.block_size:
            return 0, None
        at, layout, held = self.store.best(keys, upto, self.pool.spec.block_size)
        self.layout = self.layout or layout
        return at, None if held is None else tuple(t.to(self.passes.device) for t in held)

    def run_segments(self, ids: dict[int, int], prompts: list[list[int]], segments: list[Segment],
                     wanted: Wanted, take: Take, final: dict[int, Rows]) -> None:
        """The segments as passes of rows: those from no state together first, then
        those resumed, each a length its rows share; the logits of the positions
        ``wanted(k, a, b)`` names (``[q0, q1)`` of prompt ``k``'s tokens ``[a, b)`` in a
        pass) to ``take``; a segment's states after its last part into ``final``."""
        for resumed in (False, True):
            group = [g for g in segments if (g[4] is not None) == resumed]
            if not group:
                continue
            at = {g[0]: g[1] for g in group}
            states = {g[0]: g[4] for g in group}
            for length, members in self._schedule([b - a for _, a, b, _, _ in group], fresh=not resumed):
                rows = [group[i] for i in members]
                # (a length its rows share, or each row's segment whole: left-padded to the longest)
                parts = [(at[g[0]], at[g[0]] + length if length else g[2]) for g in rows]
                if states[rows[0][0]] is None:  # (a first pass from no state: every row of it is)
                    cache = new_cache(self.model)
                else:
                    cache = cache_over(self.model, self.layout, stacked(self.layout, [states[g[0]] for g in rows]))
                self._pass(ids, prompts, rows, parts, cache, wanted, take)
                self.layout = self.layout or check_layout(self.model, layout_of(cache))
                for g, r, (_, b) in zip(rows, rows_of(cache, self.layout), parts):
                    at[g[0]], states[g[0]] = b, r
                    final[g[0]] = r

    def _schedule(self, lens: list[int], fresh: bool) -> list[tuple[int, list[int]]]:
        """The passes of segments of ``lens`` tokens: (a length the rows share, the
        rows), or (0, the rows) for one pass of each row's segment whole, left-padded
        (segments from no state where `pad` says, or where the model does not
        continue); `schedule`'s otherwise (every segment in the first where they start
        from no state); every pass within the budget (`within`: a lone segment in
        parts of it where the model continues)."""
        pad = self.pad if self.pad is not None else self.passes.device.type == "cuda"
        if not self.continues or (fresh and pad):
            return within([(0, list(range(len(lens))))], lens, self.budget, cut=self.continues)
        return within(schedule(lens, first_whole=fresh), lens, self.budget)

    def _pass(self, ids: dict[int, int], prompts: list[list[int]], rows: list[Segment], parts: list[tuple[int, int]],
              cache: Any, wanted: Wanted, take: Take) -> None:
        """One pass over tokens [a, b) of each row's prompt (rows of other lengths
        left-padded to the longest: the recurrent layers take the 2-D mask and zero
        the padding's inputs, the attention layers the tokens alone,
        `PagedBatch.real`), its logits kept from the first position any row wants,
        those wanted to ``take``."""
        lens = [b - a for a, b in parts]
        n = max(lens)
        pads = [n - m for m in lens]
        slots = np.concatenate([g[3][a - g[1] : b - g[1]] for g, (a, b) in zip(rows, parts)])
        plan = self.pool.plan([ids[g[0]] for g in rows], lens, slots, context_lens=[b for _, b in parts],
                              num_q_heads=self.passes.heads)
        spans = [wanted(g[0], a, b) for g, (a, b) in zip(rows, parts)]
        # (a row's position q is column z + q - a of the padded rows)
        first = min((z + q0 - a for (q0, q1), (a, _), z in zip(spans, parts, pads) if q0 < q1), default=n - 1)
        device = self.passes.device
        tokens = torch.tensor([[0] * z + prompts[g[0]][a:b] for g, (a, b), z in zip(rows, parts, pads)],
                              dtype=torch.long, device=device)
        where = torch.tensor([[0] * z + list(range(a, b)) for (a, b), z in zip(parts, pads)], dtype=torch.long,
                             device=device)
        batch = self.passes.batch(plan)
        mask = None
        if any(pads):
            mask = torch.tensor([[0] * z + [1] * m for z, m in zip(pads, lens)], dtype=torch.long, device=device)
            batch.real = torch.tensor([r * n + z + i for r, (z, m) in enumerate(zip(pads, lens)) for i in range(m)],
                                      dtype=torch.long, device=device)
        fn = functools.partial(logits_rows, cache=cache, arg=self.arg, padding=mask)
        with torch.inference_mode(), paged_attention(self.model):
            logits = run_pass(self.model, batch, fn, tokens, where, n - first)
            picks = [(r, g[0], q) for r, (g, (q0, q1)) in enumerate(zip(rows, spans)) for q in range(q0, q1)]
            if picks:
                at = torch.tensor([(r, pads[r] + q - parts[r][0] - first) for r, _, q in picks], dtype=torch.long,
                                  device=logits.device)
                take([(k, q) for _, k, q in picks], logits[at[:, 0], at[:, 1]])


class RowScorer(RowPasses):
    """The passes of one `score` call over a model with recurrent layers; `run` as
    `kvpager.hf.scoring`'s scorer's."""

    def __init__(self, model: Any, pool: Any, salt: Any, budget: int, top: int):
        super().__init__(model, pool, salt, budget)
        self.lp = TokenLogprobs(top, 0)  # (its kernel, kept across passes)

    def run(self, prompts: list[list[int]], starts: list[int], out: list[np.ndarray]) -> None:
        """One group, in waves (the module docstring): a prompt that shares whole
        blocks with an earlier one (to neither's hold point: the last block boundary
        before its start) waits until that one has run to where they part, its
        state held and its blocks committed there; it is then allocated over those
        blocks and resumes from that state. Each wave runs every allocated prompt
        to its next stop (where a later prompt parts from it, its hold point, or
        its end). Committed and freed."""
        bs = self.pool.spec.block_size
        n = len(prompts)
        hold = [(s - 1) // bs * bs if self.held else 0 for s in starts]
        keys = [PrefixKeys(self.held_as, p, bs, h) for p, h in zip(prompts, hold)]
        need, source = _sources(keys, hold, bs)
        # a prompt stops where a later one parts from it (that one resumes there) and at its hold point
        stops = [{h} - {0} for h in hold]
        for k in range(n):
            if source[k] is not None:
                stops[source[k]].add(need[k])

        def wanted(k: int, a: int, b: int) -> tuple[int, int]:  # (the positions that score a token)
            return max(a, starts[k] - 1), min(b, len(prompts[k]) - 1)

        def take(picks: list[tuple[int, int]], logits: torch.Tensor) -> None:
            targets = torch.tensor([prompts[k][q + 1] for k, q in picks], dtype=torch.long, device=logits.device)
            for (k, q), v in zip(picks, self.lp.of(logits, targets).cpu().numpy()):
                out[k][q + 1 - starts[k]] = v

        ids: dict[int, int] = {}
        slots: dict[int, np.ndarray] = {}
        at: dict[int, int] = {}  # an allocated prompt's next token
        final: dict[int, Rows | None] = {}
        waiting = list(range(n))
        try:
            while waiting or any(at[k] < len(prompts[k]) for k in at):
                ready = [k for k in waiting if source[k] is None or at.get(source[k], 0) >= need[k]]
                chosen = set(ready)
                waiting = [k for k in waiting if k not in chosen]
                for k, sl, c in self.allocate(prompts, ready, ids) if ready else ():
                    slots[k] = sl
                    at[k], final[k] = self.resume_at(keys[k], min(c, hold[k]))
                segments: list[Segment] = []
                for k in sorted(at):
                    if at[k] < len(prompts[k]):
                        stop = min((b for b in stops[k] if b > at[k]), default=len(prompts[k]))
                        segments.append((k, at[k], stop, slots[k][at[k] : stop], final[k]))
                self.run_segments(ids, prompts, segments, wanted, take, final)
                for k, _, stop, _, _ in segments:
                    at[k] = stop
                    if stop < len(prompts[k]):  # (a stop: its state held for the prompts that resume there)
                        self.store.put(keys[k][stop // bs - 1], self.layout, final[k])
                if waiting:  # (what the waves wrote, published for the prompts allocated next)
                    self.passes.commit([ids[k] for k in sorted(at)], [at[k] for k in sorted(at)])
            self.passes.commit(list(ids.values()))
        finally:
            if ids:
                self.pool.free(list(ids.values()))


def _sources(keys: list[PrefixKeys], hold: list[int], bs: int) -> tuple[list[int], list[int | None]]:
    """For each prompt, the longest prefix of whole blocks, to its hold point, that it
    shares with an earlier prompt (to that one's hold point), and the first prompt
    with that prefix: where it resumes, and whose run it waits for (0 and None: it
    shares none)."""
    first: dict[bytes, int] = {}
    need: list[int] = [0] * len(keys)
    source: list[int | None] = [None] * len(keys)
    for k, h in enumerate(hold):
        for b in range(bs, h + 1, bs):
            j = first.get(keys[k][b // bs - 1])
            if j is None:
                break
            need[k], source[k] = b, j
        for b in range(bs, h + 1, bs):
            first.setdefault(keys[k][b // bs - 1], k)
    return need, source
