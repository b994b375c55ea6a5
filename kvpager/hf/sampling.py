"""Sampled decoding: temperature, top-k, top-p and min-p, each prompt from its own seed.

`Sampling` is what a prompt is sampled with; `PagedGeneration` / `generate`
take one for every prompt or a list of one per prompt (None: that prompt
greedy). A pass's logits are filtered as transformers' warpers filter them
(``do_sample=True`` with the same ``temperature``, ``top_k``, ``top_p``,
``min_p``, in that order), then a token is drawn from what is left.

The draw is the inverse of the distribution function at one uniform number per
row, and that number is a hash of the prompt's seed and the index of the token
drawn (its first new token, its second, ...). So a prompt's tokens depend on
its seed, its tokens and the model alone: the same in a batch of any other
prompts as alone, pipelined or not, eager or in a captured CUDA graph, and
prefilled in one pass or in parts. (transformers' ``generate`` draws from one
generator for the whole batch, so its samples change with the batch; the
distributions are the same.) All of it runs on the device: no pass waits
for the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument
from kvpager.hf import draw_kernel
from kvpager.hf.checks import end_tokens
from kvpager.hf.draws import penalize, sample, uniforms
from kvpager.hf.passes import array_to_device, to_device
from kvpager.hf.sampling_config import config_adjustments
from kvpager.validate import integer, real

_MASK64 = (1 << 64) - 1
#: float32's largest, smallest normal and smallest positive values: the settings apply in float32
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)
F32_SUB = float(np.finfo(np.float32).smallest_subnormal)
#: a temperature below this is greedy (as vLLM takes one): divided by it, float32 logits overflow,
#: and the draw is the most likely token anyway
GREEDY_BELOW = 1e-5


def _bias_pairs(bias: Any) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` ({id: bias}, (id, bias) pairs or None) as sorted pairs, one a
    token; ValueError naming what is wrong."""
    if bias is None:
        return ()
    try:
        items = list(bias.items()) if isinstance(bias, Mapping) else [tuple(p) for p in bias]
    except TypeError:
        items = None
    if items is None or isinstance(bias, (str, bytes)) or any(len(p) != 2 for p in items):
        raise InvalidArgument(f"logit_bias must be a {{token id: bias}} dict or (id, bias) pairs, got {bias!r}")
    out: dict[int, float] = {}
    for given, b in items:
        t, value = integer(given), real(b)  # (NumPy scalars and 0-d tensors: the numbers they hold)
        if t is None or t < 0:
            raise InvalidArgument(f"logit_bias: token ids must be ints >= 0, got {given!r}")
        if value is None or math.isnan(value) or (value != -math.inf and abs(value) > F32_MAX):
            raise InvalidArgument(f"logit_bias of token {t} must be a number within float32's range, where it is "
                                  f"added (-inf: never chosen), got {b!r}")
        if t in out:
            raise InvalidArgument(f"logit_bias names token {t} twice")
        out[t] = value
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class Sampling:
    """How one prompt's new tokens are drawn.

    ``temperature``: the logits are divided by it (0, or any below
    `GREEDY_BELOW`: greedy, the most likely token); ``top_k``: only the k most likely tokens are drawn from (0: all);
    ``top_p``: only the most likely tokens whose probabilities add up to at
    least p (1.0: all); ``min_p``: only tokens at least this fraction as likely
    as the most likely one (0.0: all); ``seed``: the prompt's draws (an int in
    [0, 2**64)); None takes one from torch's default generator when the
    generation starts, so ``torch.manual_seed`` makes a run repeatable.

    Penalties, applied to the logits first (greedy rows too, as transformers'
    processors are): ``repetition_penalty`` (transformers' and CTRL's: the
    logit of every token of the prompt or generated so far divided by it where
    positive, multiplied where negative; 1.0: none), ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's: subtracted from the logit of each token
    generated so far, once, and once for each time it was; 0.0: none).

    Before them, as transformers' processors come: ``logit_bias`` ({token id:
    bias}, or (id, bias) pairs; OpenAI's, transformers' ``sequence_bias`` of
    single tokens): added to those tokens' logits (-inf: never chosen);
    ``min_tokens`` (transformers' ``min_new_tokens``, vLLM's): no end token
    (the generation's ``eos_token_id``) among the first that many new tokens."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: kept as ((id, bias), ...) sorted by id, so a Sampling stays hashable
    logit_bias: Any = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        least, k, t, p, m, r = (self._take(name, kind) for name, kind in (
            ("min_tokens", integer), ("top_k", integer), ("temperature", real), ("top_p", real), ("min_p", real),
            ("repetition_penalty", real)))
        if least is None or not 0 <= least < 1 << 63:
            raise InvalidArgument(f"min_tokens must be an int in [0, 2**63) (0: none), got {self.min_tokens!r}")
        if t is None or not math.isfinite(t) or t < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if k is None or k < 0:
            raise InvalidArgument(f"top_k must be an int >= 0 (0: no limit), got {self.top_k!r}")
        if p is None or not 0.0 < p <= 1.0:
            raise InvalidArgument(f"top_p must be a number in (0, 1] (1: no limit), got {self.top_p!r}")
        if m is None or not 0.0 <= m <= 1.0:
            raise InvalidArgument(f"min_p must be a number in [0, 1] (0: no limit), got {self.min_p!r}")
        if self.seed is not None and (self._take("seed", integer) is None or not 0 <= self.seed <= _MASK64):
            raise InvalidArgument(f"seed must be None or an int in [0, 2**64), got {self.seed!r}")
        # (the penalties apply in float32: a value past its range, or one it rounds to 0, would make
        # every logit inf or NaN, and the row's token another than asked for)
        if r is None or not F32_TINY <= r <= F32_MAX:
            raise InvalidArgument(f"repetition_penalty must be a number > 0 within float32's normal range "
                                  f"({F32_TINY:.3g} to {F32_MAX:.3g}; 1: none), got {self.repetition_penalty!r}")
        for name, given in (("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)):
            if (v := self._take(name, real)) is None or not abs(v) <= F32_MAX:
                raise InvalidArgument(f"{name} must be a number within float32's range (0: none), got {given!r}")

    def _take(self, name: str, kind: Any) -> Any:
        """Setting ``name`` as ``kind`` (`real`, `integer`: a NumPy scalar's or 0-d tensor's number), kept so."""
        value = kind(getattr(self, name))
        if value is not None:
            object.__setattr__(self, name, value)
        return value

    @property
    def greedy(self) -> bool:
        """Whether this takes the most likely token always (a temperature below
        `GREEDY_BELOW`, 0 among them, or top-k 1), after any penalty."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @classmethod
    def from_model(cls, model: Any, seed: int | None = None, eos_token_id: Any = "model",
                   num_beams: int | None = None) -> Sampling | None:
        """What ``model``'s generation config asks of transformers' ``generate``: a
        `Sampling` of its temperature, top-k, top-p, min-p and repetition penalty
        where it samples (``do_sample``); where it is greedy, None, or a greedy
        `Sampling` of its repetition penalty; both with its single tokens' biases
        (``sequence_bias``, ``suppress_tokens``, ``bad_words_ids``: -inf, but for a
        banned word that is one of the generation's end tokens, ``eos_token_id``: the
        config's by default) and ``min_new_tokens``. Other settings that change the
        distribution (typical, epsilon, eta or top-h sampling, beams, n-gram bans,
        biases or bans of sequences of several tokens, ``min_length``, forced or
        begin-suppressed tokens, a length penalty's decay) are refused by name, not
        left out; its beams too, unless the call's ``num_beams`` (1) overrides them."""
        config = getattr(model, "generation_config", None)
        if config is None:
            return None
        penalty = getattr(config, "repetition_penalty", None)
        penalty = 1.0 if penalty is None else float(penalty)
        if isinstance(eos_token_id, str) and eos_token_id == "model":
            eos_token_id = getattr(config, "eos_token_id", None)
        bias, least = config_adjustments(config, end_tokens(eos_token_id))
        if not getattr(config, "do_sample", False):
            if penalty == 1.0 and not bias and not least:
                return None
            return cls(temperature=0, repetition_penalty=penalty, logit_bias=bias, min_tokens=least, seed=seed)
        for name, neutral in (("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("top_h", None),
                              ("eta_cutoff", 0.0), ("num_beams", 1)):
            value = num_beams if name == "num_beams" and num_beams is not None else getattr(config, name, None)
            if value is not None and value != neutral:
                raise InvalidArgument(f"the model's generation config sets {name}={value!r}, which kvpager's "
                                      "sampling does not apply (it applies temperature, top_k, top_p, min_p and "
                                      "penalties): pass a Sampling of your own to take the others alone")
        def get(name: str, default: Any) -> Any:
            value = getattr(config, name, None)
            return default if value is None else value

        # (transformers' values for those its config leaves unset: top-k 50)
        return cls(temperature=float(get("temperature", 1.0)), top_k=int(get("top_k", 50)),
                   top_p=float(get("top_p", 1.0)), min_p=float(get("min_p", 0.0)), seed=seed,
                   repetition_penalty=penalty, logit_bias=bias, min_tokens=least)


def _refuse_nothing_to_draw(on: Sequence[Sampling], greedy: np.ndarray, min_tokens: np.ndarray, eos: set[int],
                            vocab: int) -> None:
    """InvalidArgument for a sampled prompt whose settings leave no token to draw:
    a logit bias of -inf on every token of the vocabulary (or on every one but the
    end tokens, which ``min_tokens`` holds off). It drew token 0, banned, with no
    word (transformers' sampling raises there; its greedy search, as kvpager's,
    takes the first token)."""
    for i, s in enumerate(on):
        if greedy[i] or len(s.logit_bias) + (len(eos) if min_tokens[i] else 0) < vocab:
            continue
        banned = {t for t, b in s.logit_bias if b == -math.inf}
        if min_tokens[i]:
            banned |= eos
        if len(banned) >= vocab:
            held = ", and min_tokens holding off the end tokens" if min_tokens[i] else ""
            raise InvalidArgument(f"sampling of prompt {i} bans every token of the vocabulary of {vocab} (logit_bias "
                                  f"of -inf{held}): there is nothing to draw")


class Sampler:
    """The sampling of one generation's prompts: a `Sampling` (or None: greedy) per
    prompt, seeds drawn where None, the parameters kept on the host to be sent
    with each pass's rows; where any prompt is penalized, what each prompt has
    seen (its tokens, and how often it generated each) on the device, updated
    by each decode pass's draw there (`choose`) and by the prefill's first
    tokens (`note`). ``plain``: every prompt greedy and none penalized (passes
    give their greedy tokens, not logits)."""

    def __init__(self, sampling: Sampling | Sequence[Sampling | None] | None, n: int,
                 prompts: Sequence[Sequence[int]] | None = None, eos: set[int] | None = None,
                 vocab: int | None = None):
        if isinstance(sampling, Sampling) or sampling is None:
            per = [sampling] * n
        elif isinstance(sampling, (str, bytes)) or not isinstance(sampling, Sequence):
            raise InvalidArgument(f"sampling must be a kvpager.hf.Sampling, None or a list of them (one a prompt), "
                                  f"got {type(sampling).__name__}")
        else:
            per = list(sampling)
            if len(per) != n or not all(s is None or isinstance(s, Sampling) for s in per):
                raise InvalidArgument(f"sampling as a list must hold a Sampling or None for each of the {n} prompts, "
                                      f"got {len(per)} items ({sorted({type(s).__name__ for s in per})})")
        self.greedy = np.array([s is None or s.greedy for s in per])
        on = [s if s is not None else Sampling(temperature=0) for s in per]
        # temperature, top-k, top-p, min-p, repetition, presence and frequency penalties
        # (a top-p float32 rounds to 0 keeps what the smallest positive one keeps: the most likely token)
        self.params = np.array([(s.temperature, s.top_k, max(s.top_p, F32_SUB), s.min_p, s.repetition_penalty,
                                 s.presence_penalty, s.frequency_penalty) for s in on], dtype=np.float64)
        self.repeats = bool((self.params[:, 4] != 1).any())  # prompt and output tokens seen, per prompt
        self.counts = bool((self.params[:, 5:7] != 0).any())  # output tokens counted, per prompt
        # logits changed first (`_adjusted`): each row's bias entries, flat; its end tokens held off
        self.bias = [(i, t, b) for i, s in enumerate(on) for t, b in s.logit_bias]
        past = [t for _, t, _ in self.bias if vocab is not None and t >= vocab]
        if past:  # (left out of the logits without a word before; transformers and servers refuse them)
            raise InvalidArgument(f"a logit bias (or a banned token) names token {past[0]}, past the model's "
                                  f"vocabulary of {vocab}")
        self.min_tokens = np.array([s.min_tokens for s in on], dtype=np.int64)
        self.eos = np.array(sorted(eos or ()), dtype=np.int64)
        if not len(self.eos):
            self.min_tokens[:] = 0  # (no end token to hold off)
        if vocab is not None:
            _refuse_nothing_to_draw(on, self.greedy, self.min_tokens, set(self.eos.tolist()), vocab)
        self.plain = bool(self.greedy.all()) and not (self.repeats or self.counts or self.bias
                                                      or self.min_tokens.any())
        if self.repeats and prompts is None:
            raise InvalidArgument("a repetition penalty needs the prompts (Sampler(..., prompts=))")
        self.prompts = prompts
        unseeded = [i for i, s in enumerate(per) if s is not None and s.seed is None]
        drawn = torch.randint(0, 1 << 62, (len(unseeded),), dtype=torch.int64).tolist() if unseeded else []
        seeds = np.zeros(n, dtype=np.uint64)
        for i, s in enumerate(per):
            if s is not None and s.seed is not None:
                seeds[i] = s.seed
        seeds[unseeded] = drawn
        self.seeds = seeds
        self._seen: torch.Tensor | None = None  # bool [prompts, vocab]
        self._generated: torch.Tensor | None = None  # int32 [prompts, vocab]
        self._kernel: draw_kernel.RowSampler | None = None

    def choose(self, logits: torch.Tensor, rows: Sequence[int], draws: Sequence[int],
               record: bool = True) -> torch.Tensor:
        """int64 [n] tokens of a pass's ``logits`` [>= n, vocab] (its first n rows:
        the prompts ``rows``, each drawing its token number ``draws``), on the
        logits' device; greedy rows get their most likely token (after any
        penalty). ``record``: the tokens are the rows' next outputs (a decode
        pass's), which the penalties then count; a prefill's are told by `note`.
        On a GPU one kernel does it all, without waiting for the device
        (`kvpager.hf.draw_kernel`); on the CPU its twin (`kvpager.hf.draws`)."""
        n = len(rows)
        logits = logits[:n]
        if self.plain:
            return logits.argmax(dim=1)
        index = np.asarray(rows, dtype=np.int64)
        logits = self._adjusted(logits, index, np.asarray(draws, dtype=np.int64))
        params = self.params[index]
        greedy = self.greedy[index]
        temperature = np.where(greedy | (params[:, 0] <= 0), 1.0, params[:, 0])
        floats = np.stack([temperature, params[:, 2], params[:, 3], greedy, *params[:, 4:7].T],
                          axis=1).astype(np.float32)
        ints = np.stack([params[:, 1], index], axis=1).astype(np.int64)
        u = uniforms(self.seeds[index], np.asarray(draws, dtype=np.int64))
        seen, counts = self._tables(logits)
        if draw_kernel.usable(logits):
            if self._kernel is None:
                self._kernel = draw_kernel.RowSampler(logits.device)
            return self._kernel(logits, u, ints, floats, seen, counts, record)
        at = torch.from_numpy(index)
        y = penalize(logits.detach().float().cpu().numpy(),
                     None if seen is None else seen[at.to(seen.device)].cpu().numpy(),
                     None if counts is None else counts[at.to(counts.device)].cpu().numpy(),
                     floats[:, 4], floats[:, 5], floats[:, 6])
        tokens = torch.from_numpy(sample(y, floats[:, 0], ints[:, 0], floats[:, 1], floats[:, 2], greedy, u))
        tokens = tokens.to(logits.device)
        if record:
            self._record(at.to(logits.device), tokens)
        return tokens

    def _adjusted(self, logits: torch.Tensor, index: np.ndarray, draws: np.ndarray) -> torch.Tensor:
        """``logits`` of the rows ``index`` (each drawing its token number ``draws``)
        with their biases added and their end tokens at -inf where they are held off
        (``min_tokens``): a float32 copy, where any row of the pass has either; else
        ``logits`` themselves (the pass's raw logits stay as they are)."""
        held = np.flatnonzero(draws < self.min_tokens[index]) if self.min_tokens.any() else ()
        at = {r: k for k, r in enumerate(index.tolist())} if self.bias else {}
        bias = [(at[i], t, b) for i, t, b in self.bias if i in at and t < logits.shape[1]]
        if not bias and not len(held):
            return logits
        out = logits.to(torch.float32, copy=True)
        if bias:
            rows, ids, values = zip(*bias)
            where = to_device(list(rows) + list(ids), out.device)[0].view(2, -1)
            vals = array_to_device(np.asarray(values, dtype=np.float32), out.device)
            out.index_put_((where[0], where[1]), vals, accumulate=True)
        if len(held):
            eos = self.eos[(self.eos >= 0) & (self.eos < logits.shape[1])]  # (others are never generated)
            cells = to_device(np.repeat(held, len(eos)).tolist() + np.tile(eos, len(held)).tolist(), out.device)
            cells = cells[0].view(2, -1)
            out[cells[0], cells[1]] = float("-inf")
        return out

    def note(self, rows: Sequence[int], tokens: Sequence[int], device: torch.device) -> None:
        """The prefill's first new tokens of prompts ``rows``, for the penalties."""
        if self._seen is not None or self._generated is not None:
            self._record(to_device(list(rows), device)[0], to_device(list(tokens), device)[0])

    def _record(self, at: torch.Tensor, tokens: torch.Tensor) -> None:
        if self._seen is not None:
            self._seen[at, tokens] = True
        if self._generated is not None:
            self._generated.index_put_((at, tokens), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def _tables(self, logits: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the prompts have seen (bool [prompts, vocab]: their tokens and those
        generated, where any has a repetition penalty) and how often each token was
        generated (int32, where any has a presence or frequency penalty), made at
        the first pass on its device."""
        vocab = logits.shape[1]
        if self._seen is None and self.repeats:
            seen = torch.zeros((len(self.seeds), vocab), dtype=torch.bool)
            lens = [len(p) for p in self.prompts]
            seen[torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)),
                 torch.tensor([t for p in self.prompts for t in p], dtype=torch.long)] = True
            self._seen = seen.to(logits.device)
        if self._generated is None and self.counts:
            self._generated = torch.zeros((len(self.seeds), vocab), dtype=torch.int32, device=logits.device)
        return self._seen, self._generated
