"""Scoring prompts: the log-probability of each of their tokens given the tokens before it.

``score(model, pool, prompts, start)`` gives, for each prompt, the model's
log-probability of every token from ``start`` on (the first has no tokens
before it, so ``start`` >= 1): what an evaluation's log-likelihood, a
perplexity, or a reference model's log-probabilities of sampled answers need.
The values are the log-softmax (float32) of the model's raw logits at the
position before each token (`kvpager.hf.logprobs`: one kernel a pass on a GPU).

The KV cache does the work it does for generation. A prompt shares the longest
committed prefix of full blocks in the cache under its salt, as far as the
position before its ``start`` (the positions whose logits are needed run
through the model), and prompts of one pass share the blocks an earlier one
fills: the context of a multiple-choice question, scored with each of its
answers (``start`` = the context's length), runs once. Blocks are committed as
a generation's are, so later calls and generations find them.

With ``top=k``, each position's k most likely tokens come too (`Scores`):
``top_ids[:, 0] == tokens`` says where a token was the model's greedy choice
(an evaluation's "is greedy").

Passes are bounded by ``tokens_per_pass`` (tokens run and logits kept): prompts
go in groups whose tokens to run fit one pass, one pass a group (the blocks a
group shares are then written in its own pass); a prompt longer than that runs
alone, in parts, each over the K/V of the parts before it. A prompt's tokens to
run leave out the whole blocks, to the block boundary before its start, that an
earlier prompt of the call begins with too (`_run_lengths`): those run once, with
the first, so a call of many answers to a few long contexts goes in few passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument
from kvpager.hf.checks import check_model_and_pool, check_position_numbering, check_positions
from kvpager.hf.eager import EagerPasses
from kvpager.hf.logprobs import TokenLogprobs
from kvpager.hf.model import has_recurrent_layers, text_config
from kvpager.hf.padding import prompts_given, token_lists
from kvpager.hf.rope import rope_salt
from kvpager.hf.salt import call_salt
from kvpager.hf.scoring_rows import RowScorer
from kvpager.hf.windows import hit_window
from kvpager.validate import is_int

__all__ = ["Scores", "score"]



@dataclass
class Scores:
    """One prompt's scored tokens with the most likely at each position (`score`
    with ``top``): ``logprobs`` [n] float64, as `score` gives them alone;
    ``top_ids`` [n, k] int64 and ``top_logprobs`` [n, k] float64, most likely first."""

    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def score(model: Any, pool: Any, prompts: Any = None, start: int | Sequence[int] = 1,
          salt: str | bytes | None = None, *, input_ids: Any = None, attention_mask: Any = None,
          top: int = 0, tokens_per_pass: int = 2048) -> list[np.ndarray] | list[Scores]:
    """Each prompt's tokens from ``start`` on (an int for all, or one a prompt; 1 to
    the prompt's length), scored: a float64 array of each one's log-probability
    under ``model`` given the tokens before it (empty where ``start`` is the
    prompt's length). ``prompts`` as `generate` takes them (lists, tensors, a
    tokenizer's output with ``attention_mask``, or ``input_ids=``); ``salt``: the
    prefix cache's (default: the model's, as `generate`'s); ``tokens_per_pass``:
    the most tokens a forward pass runs (module docstring); ``top`` > 0: a `Scores`
    a prompt instead, with each position's ``top`` most likely tokens. Sequences are
    freed before it returns; what it wrote stays cached for later calls."""
    check_model_and_pool(model, pool)
    prompts = token_lists(prompts_given(prompts, input_ids), model, attention_mask)
    starts = _starts(start, prompts)
    if not is_int(tokens_per_pass) or tokens_per_pass < 1:
        raise InvalidArgument(f"tokens_per_pass must be an int >= 1, got {tokens_per_pass!r}")
    vocab = getattr(text_config(model), "vocab_size", None)
    if not is_int(top) or not 0 <= top <= (vocab if is_int(vocab) else top):
        raise InvalidArgument(f"top must be an int from 0 to the model's vocabulary size ({vocab}), got {top!r}")
    k = int(top)
    # (a model with recurrent layers: its prompts as rows, from held states: `kvpager.hf.scoring_rows`)
    kind = RowScorer if has_recurrent_layers(model) else _Scorer
    sizes = [len(p) for p in prompts]  # (a lone prompt over tokens_per_pass runs in parts)
    parts = 1 if kind is RowScorer else int(tokens_per_pass) if max(sizes, default=0) > tokens_per_pass else None
    check_positions(model, max(sizes, default=0), "score")
    salt = rope_salt(model, call_salt(model, salt, "score"), sizes, sizes, "score", parts)
    scorer = kind(model, pool, salt, int(tokens_per_pass), k)  # (checks the model: a bidirectional one refused first)
    check_position_numbering(model)
    out = [np.zeros((len(p) - s, 1 + 2 * k)) for p, s in zip(prompts, starts)]  # (`TokenLogprobs.of` rows)
    # (a model that runs every prompt whole, holding no states: each prompt's every token)
    shares = getattr(scorer, "held", True)
    lens = _run_lengths(prompts, starts, pool.spec.block_size) if shares else [len(p) for p in prompts]
    for group in _groups(lens, tokens_per_pass):
        scorer.run([prompts[i] for i in group], [starts[i] for i in group], [out[i] for i in group])
    if not k:
        return [o[:, 0].copy() for o in out]
    return [Scores(o[:, 0].copy(), o[:, 1 + k :].astype(np.int64), o[:, 1 : 1 + k].copy()) for o in out]


def _starts(start: Any, prompts: list[list[int]]) -> list[int]:
    """Each prompt's first scored token: ValueError naming the prompt where it is no
    int from 1 to the prompt's length."""
    n = len(prompts)
    if is_int(start):
        starts = [int(start)] * n
    elif hasattr(start, "__len__") and getattr(start, "ndim", 1) == 1 and not isinstance(start, (str, bytes, dict)):
        starts = start.tolist() if hasattr(start, "tolist") else list(start)
        if len(starts) != n:
            raise InvalidArgument(f"start as a list must hold one int a prompt ({n}), got {len(starts)}")
    else:
        raise InvalidArgument(f"start must be an int >= 1 or a list of one a prompt, got {start!r}")
    for i, (s, p) in enumerate(zip(starts, prompts)):
        if not is_int(s) or not 1 <= s <= len(p):
            raise InvalidArgument(f"start of prompt {i} must be an int from 1 (its first token has nothing before it "
                                  f"to score it by) to its length {len(p)}, got {s!r}")
    return [int(s) for s in starts]


def _run_lengths(prompts: list[list[int]], starts: list[int], bs: int) -> list[int]:
    """The tokens each prompt runs at most: all but the whole blocks, up to the block
    boundary before its start, that an earlier prompt begins with too (up to that
    one's boundary): they run once, with the first (or come from the cache)."""
    seen: set[int] = set()
    out = []
    for p, s in zip(prompts, starts):
        hold = (s - 1) // bs * bs
        key, shared, matching = 0, 0, True
        for b in range(0, hold, bs):
            key = hash((key, tuple(p[b : b + bs])))
            if matching and key in seen:
                shared = b + bs
            else:
                matching = False
            seen.add(key)
        out.append(len(p) - shared)
    return out


def _groups(lens: list[int], budget: int) -> list[list[int]]:
    """Consecutive prompts whose tokens fit ``budget`` together; a longer one alone."""
    groups: list[list[int]] = []
    total = budget + 1
    for i, n in enumerate(lens):
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


class _Scorer:
    """The passes of one `score` call over its pool."""

    def __init__(self, model: Any, pool: Any, salt: Any, budget: int, top: int):
        self.pool, self.salt, self.budget = pool, salt, budget
        self.passes = EagerPasses(model, pool)
        self.lp = TokenLogprobs(top, 0)  # (its kernel, kept across passes)

    def run(self, prompts: list[list[int]], starts: list[int], out: list[np.ndarray]) -> None:
        """One group: allocated up to the position before each start (what the cache
        may give), the rest appended, run (one pass; more where the cache gave less
        than the grouping counted on, each within the budget; a lone prompt's parts),
        committed and freed."""
        cuts = [max(1, s - 1) for s in starts]
        allocs = self.pool.allocate([p[:c] for p, c in zip(prompts, cuts)], self.salt, share_in_batch=True,
                                    **hit_window(self.passes.windows, self.pool))
        ids = [a.seq_id for a in allocs]
        try:
            rest = [len(p) - c for p, c in zip(prompts, cuts)]
            more = (self.pool.append_flat(ids, rest, [p[c:] for p, c in zip(prompts, cuts)]) if any(rest)
                    else np.zeros(0, np.int64))
            ends = np.cumsum(rest)
            slots = [np.concatenate([np.asarray(a.slots, np.int64), more[e - r : e]])
                     for a, r, e in zip(allocs, rest, ends)]
            firsts = [a.num_cached_tokens for a in allocs]
            # (the group was cut by the tokens it would run; where the cache gave less, in more passes)
            for part in _groups([len(p) - a for a, p in zip(firsts, prompts)], self.budget):
                if len(part) == 1:  # alone: in parts of at most the budget
                    [k] = part
                    p, a = prompts[k], firsts[k]
                    for b in range(a, len(p), self.budget):
                        e = min(b + self.budget, len(p))
                        self._pass([ids[k]], [p], [starts[k]], [(b, e)], [slots[k][b - a : e - a]], [out[k]])
                else:
                    self._pass([ids[k] for k in part], [prompts[k] for k in part], [starts[k] for k in part],
                               [(firsts[k], len(prompts[k])) for k in part], [slots[k] for k in part],
                               [out[k] for k in part])
            self.passes.commit(ids)
        finally:
            self.pool.free(ids)

    def _pass(self, ids: list[int], prompts: list[list[int]], starts: list[int], spans: list[tuple[int, int]],
              slots: list[np.ndarray], out: list[np.ndarray]) -> None:
        """One forward pass over tokens [a, b) of each prompt (over the K/V of those
        before them), its logits kept where they score a token (positions
        start - 1 .. len - 2) and those tokens' log-probabilities put in ``out``."""
        keep, targets, where = [], [], []
        offset = 0
        for k, ((a, b), p, s) in enumerate(zip(spans, prompts, starts)):
            for q in range(max(a, s - 1), min(b, len(p) - 1)):
                keep.append(offset + q - a)
                targets.append(p[q + 1])
                where.append((k, q + 1 - s))
            offset += b - a
        flat = [t for (a, b), p in zip(spans, prompts) for t in p[a:b]]
        pos = [q for a, b in spans for q in range(a, b)]
        kept = torch.tensor(keep or [0], dtype=torch.long, device=self.passes.device)
        logits = self.passes.forward(ids, [b - a for a, b in spans], flat, pos, np.concatenate(slots), kept,
                                     context_lens=[b for _, b in spans])
        if not keep:  # (a part with no token to score: its K/V written, nothing kept)
            return
        with torch.inference_mode():
            values = self.lp.of(logits, torch.tensor(targets, dtype=torch.long, device=logits.device))
        for (k, j), v in zip(where, values.cpu().numpy()):
            out[k][j] = v
