"""A pass's sampled tokens in NumPy: the CPU's path and the twin of
``cuda/sample_rows.cu`` (`kvpager.hf.draw_kernel`), token for token.

What a row's token is, exactly (every step in float32 IEEE operations, one
rounding each, or in integers, so that NumPy and the kernel agree bit for bit):

1. Penalties (`penalize`), then the scores ``s = logit / temperature``
   (NaN taken as -inf, -0 as +0). A greedy row takes the first most likely
   token of its penalized logits, NaN as -inf.
2. Weights: ``w = exp(s - max s)`` by `exp_weights`' own exponential (a fixed
   sequence of float32 operations, not the platform's ``exp``), and integer
   weights ``W = floor(w * 2**S)``, S = `scale_bits` (every row's sum of
   them fits in 53 bits, so it is exact in float64 too).
3. Filters, in transformers' order, each a threshold or a prefix:
   top-k keeps the tokens at least as likely as the k-th most likely (ties
   kept); top-p orders what top-k kept by score, ties by token id (the
   lowest first, as a greedy row's first most likely token), and
   keeps a token where the integer weights before it sum to less than
   ``ceil(p * Z)`` (Z: those of every token top-k kept); min-p keeps ``w >=
   min_p`` (the most likely token's w is 1).
4. The draw: ``T = floor(u * Z')`` (Z': the integer weights of the tokens kept),
   the first token in vocabulary order whose running sum of kept integer
   weights passes T. A token of weight 0 is never drawn; a row left with none
   (scores of NaN or infinities: a broken model's) takes its first most likely
   score.

No sort over the vocabulary: the kernel finds the k-th score and the top-p
boundary by radix selection, and the twin sorts only the tokens of nonzero
weight that top-k kept.
"""

from __future__ import annotations

import math

import numpy as np

_F = np.float32
LOG2E = _F(1.4426950408889634)
LN2_HI = _F(0.693145751953125)  # few bits: n * LN2_HI is exact for the n here
LN2_LO = _F(1.4286068203094172e-06)
#: 1/k! for k = 7 .. 0, Horner's order
POLY = tuple(_F(1.0 / math.factorial(k)) for k in range(7, -1, -1))
#: below this, exp(x) * 2**53 < 1: every integer weight is 0 (the exponential is not evaluated)
CUT = _F(-40.0)


def scale_bits(vocab: int) -> int:
    """S of the integer weights: ``vocab * 2**S <= 2**53``."""
    return 53 - max(0, math.ceil(math.log2(max(vocab, 1))))


def exp_weights(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 w, int64 W) of float32 ``x <= 0``: ``w`` ~ exp(x) (relative error
    about 1e-7) as a fixed sequence of float32 operations (Cody-Waite reduction
    by ln 2, a degree-7 polynomial, an exact power of 2), ``W = floor(w * 2**bits)``;
    both 0 where ``x < CUT`` or NaN."""
    x = np.asarray(x, dtype=_F)
    live = x >= CUT
    xs = np.where(live, x, _F(0))
    n = np.rint(xs * LOG2E)
    r = (xs - n * LN2_HI) - n * LN2_LO
    p = np.full_like(r, POLY[0])
    for c in POLY[1:]:
        p = p * r + c
    two_n = ((n.astype(np.int32) + 127) << 23).view(_F)
    w = np.where(live, p * two_n, _F(0))
    return w, np.floor(w * _F(2.0**bits)).astype(np.int64)


def scores(logits: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """float32 [n, V] logits / temperature (one per row, > 0), NaN as -inf, -0 as +0."""
    s = np.asarray(logits, dtype=_F) / np.asarray(temperature, dtype=_F)[:, None]
    s[np.isnan(s)] = -np.inf
    s[s == 0] = _F(0)
    return s


def penalize(logits: np.ndarray, seen: np.ndarray | None, counts: np.ndarray | None, repetition: np.ndarray,
             presence: np.ndarray, frequency: np.ndarray) -> np.ndarray:
    """float32 [n, V] logits after each row's penalties: where ``seen`` (bool [n, V])
    divided by its repetition penalty (multiplied where negative); then less
    ``frequency * count`` and, where ``counts`` (int32 [n, V]) is above 0,
    ``presence``."""
    y = np.array(logits, dtype=_F)
    if seen is not None:
        rp = np.asarray(repetition, dtype=_F)[:, None]
        y = np.where(seen, np.where(y < 0, y * rp, y / rp), y)
    if counts is not None:
        c = counts.astype(_F)
        y = (y - np.asarray(frequency, dtype=_F)[:, None] * c) - np.asarray(presence, dtype=_F)[:, None] * (c > 0)
    return y.astype(_F, copy=False)


def kept(s: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
         bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bool [n, V] the tokens each row's filters keep, int64 [n, V] integer weights)
    of scores ``s`` (`scores`); ``top_k`` 0 or >= V: none, ``top_p`` 1: none,
    ``min_p`` 0: none. Where a row's best score is not finite its weights are all 0."""
    n, vocab = s.shape
    bits = scale_bits(vocab) if bits is None else bits
    best = s.max(axis=1, initial=-np.inf, keepdims=True) if vocab else np.zeros((n, 1), _F)
    with np.errstate(invalid="ignore"):
        w, big = exp_weights(s - best, bits)
    keep = np.ones((n, vocab), dtype=bool)
    top_k = np.asarray(top_k, dtype=np.int64)
    top_p = np.asarray(top_p, dtype=_F)
    min_p = np.asarray(min_p, dtype=_F)
    for i in range(n):
        if 0 < top_k[i] < vocab:
            kth = np.partition(s[i], vocab - top_k[i])[vocab - top_k[i]]
            keep[i] &= s[i] >= kth
        if top_p[i] < 1:
            keep[i] &= _nucleus(s[i], big[i], keep[i], top_p[i])
        if min_p[i] > 0:
            keep[i] &= w[i] >= min_p[i]
    return keep, big


def _nucleus(s: np.ndarray, big: np.ndarray, keep: np.ndarray, p: np.float32) -> np.ndarray:
    """Top-p over the tokens ``keep`` holds (module docstring): only those of nonzero
    weight are ordered (the others add nothing to any sum, and are never drawn)."""
    total = int(big[keep].sum())
    bound = math.ceil(float(p) * float(total))
    ids = np.flatnonzero(keep & (big > 0))
    order = ids[np.lexsort((ids, -s[ids]))]  # score descending, then id ascending
    before = np.cumsum(big[order]) - big[order]
    out = np.zeros_like(keep)
    out[order[before < bound]] = True
    return out


def draw(keep: np.ndarray, big: np.ndarray, u: np.ndarray, s: np.ndarray) -> np.ndarray:
    """int64 [n]: each row's token at uniform ``u`` [n] in [0, 1 - 2**-52]
    among its ``keep`` tokens of integer weights ``big`` (module docstring, 4)."""
    cdf = np.cumsum(np.where(keep, big, 0), axis=1)
    out = np.empty(len(u), dtype=np.int64)
    for i in range(len(u)):
        total = int(cdf[i, -1]) if cdf.shape[1] else 0
        if total == 0:
            out[i] = int(np.argmax(s[i])) if s.shape[1] else 0
            continue
        t = math.floor(float(u[i]) * float(total))
        out[i] = int(np.searchsorted(cdf[i], t, side="right"))
    return out


def greedy_tokens(y: np.ndarray) -> np.ndarray:
    """int64 [n]: each row's first most likely token of penalized logits ``y``, NaN as -inf."""
    return np.where(np.isnan(y), -np.inf, y).argmax(axis=1)


def sample(y: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
           greedy: np.ndarray, u: np.ndarray) -> np.ndarray:
    """int64 [n] tokens of penalized logits ``y`` [n, V] (float32), each row by its
    parameters (greedy rows: `greedy_tokens`; their other parameters unread)."""
    greedy = np.asarray(greedy, dtype=bool)
    out = greedy_tokens(y)
    rows = np.flatnonzero(~greedy)
    if len(rows):
        s = scores(y[rows], np.asarray(temperature, dtype=_F)[rows])
        keep, big = kept(s, np.asarray(top_k)[rows], np.asarray(top_p)[rows], np.asarray(min_p)[rows])
        out[rows] = draw(keep, big, np.asarray(u, dtype=np.float64)[rows], s)
    return out
