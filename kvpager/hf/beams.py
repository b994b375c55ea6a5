"""Beam search with the KV cache in a kvpager pool: each beam a sequence, forked from its parent.

``beam_search(model, pool, prompts, max_new_tokens, num_beams)`` keeps
``num_beams`` running beams a prompt, as transformers' ``generate(num_beams=...,
do_sample=False)`` does, and gives each prompt's best finished hypotheses with
their scores, the same tokens as transformers' (`tests/test_hf_beams.py`).

Where transformers keeps a cache row per beam and reorders every layer's K/V
after each step (a copy of each beam's whole cache), a beam here is a kvpager
sequence: a beam continued by several new beams is forked (`KVPool.fork`: its
blocks shared, nothing copied), the last block copied only when a child
appends to it (copy on write), and a beam continued by none is freed. The
prompt is prefilled once, not once a beam. So a step's KV work is one token a
beam, and KV memory grows with what the beams do not share.

Each step (all prompts' beams in one forward pass, a token each):
1. the log-softmax (float32) of each beam's logits plus its running score;
   the ``2 * num_beams`` best continuations of each prompt (``(1 + end tokens)
   * num_beams`` where there are several end tokens) over all its beams;
2. a continuation that ends (an end token, or ``max_new_tokens`` reached)
   among the ``num_beams`` best becomes a finished hypothesis, scored by its
   sum of log-probabilities over ``new tokens ** length_penalty``; the finished
   keep the ``num_beams`` best;
3. the ``num_beams`` best continuations that do not end run on;
4. a prompt is done once no running beam can beat its worst finished
   hypothesis (``early_stopping=False``: judged at the current length;
   ``"never"``: at ``max_new_tokens``), or, with ``early_stopping=True``, once
   it has ``num_beams`` finished. The search stops when every prompt is done,
   or no continuation can go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpager.batch_calls import free_all
from kvpager.errors import InvalidArgument
from kvpager.hf.beams_rows import RecurrentBeams
from kvpager.hf.captured_steps import CapturedSteps
from kvpager.hf.checks import check_model_and_pool, check_positions, end_tokens, model_eos
from kvpager.hf.eager import EagerPasses
from kvpager.hf.graphs import DecodeGraphs, check_graph_options, graph_width
from kvpager.hf.model import has_recurrent_layers
from kvpager.hf.padding import prompts_given, token_lists
from kvpager.hf.rope import rope_salt
from kvpager.hf.row_forks import continue_rows
from kvpager.hf.salt import call_salt
from kvpager.hf.windows import hit_window
from kvpager.validate import described, integer, real

__all__ = ["Beams", "beam_search", "check_beam_options"]

_FAR = -1.0e9  # a score no candidate can win with (transformers' own)


def _length_norm(length: int, penalty: float) -> float:
    """``length ** penalty``, a hypothesis' score's divisor, inf where that overflows (as
    transformers' float tensors give it) rather than OverflowError part-way."""
    try:
        return float(length) ** penalty
    except OverflowError:
        return math.inf


@dataclass
class Beams:
    """One prompt's best finished hypotheses, best first: each one's new tokens
    (an end token included where it ended on one) and its score (its tokens'
    summed log-probabilities over their count ** ``length_penalty``)."""

    tokens: list[list[int]]
    scores: list[float]


def beam_search(model: Any, pool: Any, prompts: Any = None, max_new_tokens: int = None,  # type: ignore[assignment]
                num_beams: int = 4, num_return_sequences: int = 1, length_penalty: float = 1.0,
                early_stopping: bool | str = False, eos_token_id: Any = "model", salt: str | bytes | None = None,
                *, input_ids: Any = None, attention_mask: Any = None, cuda_graphs: bool = False,
                compile: bool = False) -> list[Beams]:
    """Beam search of each prompt (the module docstring), ``num_beams`` beams a
    prompt; its ``num_return_sequences`` best hypotheses (`Beams`). ``prompts`` as
    `generate` takes them; ``eos_token_id`` defaults to the model's generation
    config ("model"); ``early_stopping``: False, True or "never", as transformers'.
    ``cuda_graphs``: each step after the prefill replays a captured step
    (`kvpager.hf.graphs.DecodeGraphs`: every beam of every prompt a row, the
    same rows each step; a model's recurrent states gathered to the beams'
    parents in place before each replay), ``compile`` that step compiled by
    ``torch.compile``, as `generate` takes them; a `kvpager.hf.CapturedSteps`
    keeps them across searches (a model with recurrent layers: its states with them).
    Sequences are freed before it returns; the prompts' blocks stay cached."""
    check_model_and_pool(model, pool)
    check_graph_options(model, pool, True if isinstance(cuda_graphs, CapturedSteps) else cuda_graphs, compile)
    prompts = token_lists(prompts_given(prompts, input_ids), model, attention_mask)
    # (counts as ints, NumPy integers or 0-d integer tensors: the ints they hold)
    most, beams, returned = integer(max_new_tokens), integer(num_beams), integer(num_return_sequences)
    if most is None or most < 1:
        raise InvalidArgument(f"max_new_tokens must be an int >= 1, got {described(max_new_tokens)}")
    if beams is None or beams < 1:
        raise InvalidArgument(f"num_beams must be an int >= 1, got {described(num_beams)}")
    if returned is None or not 1 <= returned <= beams:
        raise InvalidArgument(f"num_return_sequences must be an int from 1 to num_beams ({beams}), "
                              f"got {described(num_return_sequences)}")
    length_penalty = check_beam_options(length_penalty, early_stopping)
    eos_token_id = model_eos(model, eos_token_id)
    check_positions(model, max((len(p) for p in prompts), default=0) + most - 1, "beam_search")
    salt = rope_salt(model, call_salt(model, salt, "beam_search"), list(map(len, prompts)),
                     [len(p) + max(most - 1, 0) for p in prompts], "beam_search",  # (the last token: never fed)
                     1 if has_recurrent_layers(model) else None)
    search = _Search(model, pool, prompts, most, beams, length_penalty,
                     early_stopping, end_tokens(eos_token_id), salt, cuda_graphs, compile)
    try:
        search.run()
    finally:
        search.close()
    return [Beams([list(t) for t in toks[:returned]], [float(s) for s in scores[:returned]])
            for toks, scores in search.results()]


def check_beam_options(length_penalty: Any, early_stopping: Any) -> float:
    """``length_penalty`` as a float (a NumPy scalar or 0-d tensor too); InvalidArgument
    naming a beam option out of range. `generate` checks them with one beam too, where
    they change no token, as transformers checks ``early_stopping``."""
    penalty = real(length_penalty)
    if penalty is None or not np.isfinite(penalty):
        raise InvalidArgument(f"length_penalty must be a finite number, got {described(length_penalty)}")
    if early_stopping not in (False, True, "never") or early_stopping is None:
        raise InvalidArgument(f"early_stopping must be False, True or 'never', got {early_stopping!r}")
    return penalty


class _Search:
    """The state of one `beam_search`: per prompt its running beams (a sequence,
    tokens and score each) and its finished hypotheses, as tensors [B, K] where
    the step's selection needs them."""

    def __init__(self, model: Any, pool: Any, prompts: list[list[int]], most: int, beams: int, penalty: float,
                 early: bool | str, eos: set[int], salt: Any, cuda_graphs: bool = False, compile: bool = False):
        self.model, self.pool, self.prompts, self.most, self.k = model, pool, prompts, most, beams
        self.penalty, self.early, self.salt = penalty, early, salt
        self.eos = torch.tensor(sorted(eos), dtype=torch.long)
        self.keep = max(2, 1 + len(eos)) * beams  # continuations weighed a step
        # (a model with recurrent layers: its prompts as rows, its beams' states gathered to their parents'
        # each step: `kvpager.hf.beams_rows.RecurrentBeams`)
        self.rows = RecurrentBeams(model, pool, salt, prompts, beams) if has_recurrent_layers(model) else None
        self.passes = self.rows.passes if self.rows is not None else EagerPasses(model, pool)
        self.graphs = None  # captured steps (`_step`), the same rows each step: every beam of every prompt
        self._kept, self._closed = None, False  # a `CapturedSteps` this search holds
        width = graph_width(pool, max(map(len, prompts)) + most)
        if isinstance(cuda_graphs, CapturedSteps):
            compile = compile or cuda_graphs.compile
            self.graphs = cuda_graphs.take(self, model, pool, self.passes.batch, width, None, True, compile,
                                           kind="beams",
                                           forward=None if self.rows is None else self.rows.captured(compile))
            self._kept = cuda_graphs
        elif cuda_graphs:
            self.graphs = DecodeGraphs(model, pool, self.passes.batch, width, compile=compile,
                                       forward=None if self.rows is None else self.rows.captured(compile))
        if self.rows is not None:
            self.rows.graphs = self.graphs
        b = len(prompts)
        self.seqs: list[list[int | None]] = [[None] * beams for _ in range(b)]  # running beams' sequences
        self.tokens: list[list[list[int]]] = [[[] for _ in range(beams)] for _ in range(b)]
        self.scores = torch.zeros((b, beams))
        self.scores[:, 1:] = _FAR  # (the first step: every beam is the prompt; only the first counts)
        self.done_tokens: list[list[list[int]]] = [[[] for _ in range(beams)] for _ in range(b)]
        self.done_scores = torch.full((b, beams), _FAR)
        self.finished = torch.zeros((b, beams), dtype=torch.bool)
        self.open = torch.ones((b, 1), dtype=torch.bool)  # a running beam may still beat the worst finished
        self.held: set[int] = set()
        # every layer windowed: each step gives back the blocks no window reads again (as `generate` does)
        self.reach = hit_window(self.passes.windows, pool).get("window") if self.rows is None else None

    def run(self) -> None:
        logits = self._prefill()  # [B, V]: every beam of a prompt is the prompt itself
        logits = logits.repeat_interleave(self.k, dim=0)
        new = 0  # new tokens so far
        while True:
            parents, next_tokens, go_on = self._select(logits, new)
            new += 1
            if not go_on:
                return
            logits = self._step(parents, next_tokens, new)

    def _prefill(self) -> torch.Tensor:
        if self.rows is not None:
            return self.rows.prefill(self._took)
        allocs = self.pool.allocate(self.prompts, self.salt, share_in_batch=True,
                                    **hit_window(self.passes.windows, self.pool))
        for b, a in enumerate(allocs):
            self.seqs[b][0] = a.seq_id
            self.held.add(a.seq_id)
        tokens = [p[a.num_cached_tokens :] for p, a in zip(self.prompts, allocs)]
        positions = [range(a.num_cached_tokens, len(p)) for p, a in zip(self.prompts, allocs)]
        slots = np.concatenate([np.asarray(a.slots, dtype=np.int64) for a in allocs])
        lens = [len(t) for t in tokens]
        ends = torch.as_tensor(np.cumsum(lens) - 1, device=self.passes.device)
        ids = [a.seq_id for a in allocs]
        logits = self.passes.forward(ids, lens, [t for ts in tokens for t in ts], [q for qs in positions for q in qs],
                                     slots, ends)
        self.passes.commit(ids)
        return logits

    def _select(self, logits: torch.Tensor, new: int) -> tuple[list[list[int]], list[list[int]], bool]:
        """One step's choice from the running beams' ``logits`` [B * K, V] (``new``
        tokens generated before it): the finished hypotheses updated, each running
        beam's parent and token; whether the search goes on."""
        b, k = len(self.prompts), self.k
        lp = torch.log_softmax(logits.float(), dim=-1).view(b, k, -1)
        vocab = lp.shape[-1]
        total = (lp + self.scores.to(lp.device)[:, :, None]).view(b, -1)
        top, index = (t.cpu() for t in torch.topk(total, self.keep))  # [B, keep], chosen on the logits' device
        parent, token = index // vocab, index % vocab
        ends = torch.isin(token, self.eos) | (new + 1 >= self.most)
        # the running beams: the best continuations that do not end
        ranked = top + ends.float() * _FAR
        run_at = torch.topk(ranked, k)[1]
        # the finished: the best of those that end, among the k best, with what was finished
        scored = top / _length_norm(new + 1, self.penalty)
        full = self.finished.all(dim=-1, keepdim=True) & (self.early is True)
        just = ends & (torch.arange(self.keep) < k)[None, :]
        scored = scored + full.float() * _FAR + (~self.open).float() * _FAR + (~just).float() * _FAR
        merged = torch.cat([self.done_scores, scored], dim=1)
        keep_at = torch.topk(merged, k)[1]
        was_finished = torch.cat([self.finished, just], dim=1)
        for i in range(b):
            cand = [self.tokens[i][p] + [t] for p, t in zip(parent[i].tolist(), token[i].tolist())]
            pool = self.done_tokens[i] + cand
            self.done_tokens[i] = [pool[j] for j in keep_at[i].tolist()]
        self.done_scores = merged.gather(1, keep_at)
        self.finished = was_finished.gather(1, keep_at)
        self.scores = ranked.gather(1, run_at)
        parents = parent.gather(1, run_at).tolist()
        next_tokens = token.gather(1, run_at).tolist()
        for i in range(b):
            self.tokens[i] = [self.tokens[i][p] + [t] for p, t in zip(parents[i], next_tokens[i])]
        # can a running beam still beat the worst finished hypothesis?
        length = self.most if self.early == "never" and self.penalty > 0 else new + 1
        best = self.scores[:, :1] / _length_norm(length, self.penalty)
        worst = torch.where(self.finished, self.done_scores.min(dim=1, keepdim=True)[0], torch.tensor(_FAR))
        self.open = self.open & (best > worst).any(dim=-1, keepdim=True)
        go_on = bool(self.open.any()) and not (bool(self.finished.all()) and self.early is True) \
            and not bool(ends.all())
        return parents, next_tokens, go_on

    def _step(self, parents: list[list[int]], next_tokens: list[list[int]], new: int) -> torch.Tensor:
        """The running beams' sequences for this step (a parent continued by several
        beams forked, one continued by none freed), each fed its token: the pass's
        logits [B * K, V]."""
        # At the first step every beam is the prompt, whose sequence beam 0 holds: a beam chosen
        # from another (where a prompt has fewer continuations than beams: a vocabulary smaller
        # than num_beams) continues the prompt's sequence.
        parents = [[p if self.seqs[b][p] is not None else 0 for p in ps] for b, ps in enumerate(parents)]
        # a parent's first child is its own sequence, the others its forks (its blocks shared): one
        # fork a count of children over every prompt, one free of the parents continued by none
        # (each a round trip through a daemon)
        k = self.k
        flat, made, gone = continue_rows(self.pool, [s for row in self.seqs for s in row],
                                         [b * k + p for b, ps in enumerate(parents) for p in ps])
        self.held.update(made)
        self.seqs = seqs = [flat[b * k:(b + 1) * k] for b in range(len(parents))]
        self._free(gone)
        ids = [s for row in seqs for s in row]
        fed = [t for row in next_tokens for t in row]
        slots = self.pool.append_flat(ids, 1, [[t] for t in fed])
        positions = [len(self.prompts[b]) + new - 1 for b in range(len(seqs)) for _ in range(self.k)]
        if self.rows is not None:
            logits = self.rows.step(ids, [b * self.k + p for b, ps in enumerate(parents) for p in ps], fed,
                                    positions, slots, self.graphs)
        elif self.graphs is not None:
            device = self.passes.device
            logits = self.graphs.launch(ids, torch.tensor([fed], dtype=torch.long, device=device),
                                        torch.tensor([positions], dtype=torch.long, device=device), slots)
        else:
            logits = self.passes.forward(ids, [1] * len(ids), fed, positions, slots, 0)
        self.passes.commit(ids)
        if self.reach is not None:  # the next query of each beam sees positions after its position - reach + 1
            self.pool.release_before(ids, [max(0, q - self.reach + 1) for q in positions])
        return logits

    def _took(self, b: int, seq_id: int) -> None:
        """Prompt ``b``'s sequence, allocated (freed by `close` whatever follows)."""
        self.seqs[b][0] = seq_id
        self.held.add(seq_id)

    def _free(self, ids: list[int]) -> None:
        ids = [s for s in ids if s in self.held]
        if ids:
            free_all(self.pool, ids)
            self.held.difference_update(ids)

    def close(self) -> None:
        self.graphs = None  # (its plans' device buffers, where not kept)
        self._closed = True
        try:
            self._free(sorted(self.held))
        finally:
            if self._kept is not None:
                self._kept.release(self)

    def results(self) -> list[tuple[list[list[int]], list[float]]]:
        """Each prompt's finished hypotheses and scores, best first."""
        return [(self.done_tokens[b], self.done_scores[b].tolist()) for b in range(len(self.prompts))]
