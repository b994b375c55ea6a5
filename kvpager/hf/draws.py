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
4. The draw: ``u`` the row's uniform (`uniforms`: a hash of its seed and its
   draw index), ``T = floor(u * Z')`` (Z': the integer weights of the tokens kept),
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

#: SplitMix64's increment (the golden ratio's 64-bit fraction)
_GOLDEN = 0x9E3779B97F4A7C15

def scale_bits(vocab: int) -> int:
    """S of the integer weights: ``vocab * 2**S <= 2**53``."""
    return 53 - max(0, math.ceil(math.log2(max(vocab, 1))))


def exp_weights(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 w, int64 W) of float32 ``x <= 0``: ``w`` ~ exp(x) (relative error
    about 1e-7) as a fixed sequence of float32 operations (Cody-Waite reduction
    by ln 2, a degree-7 polynomial, an exact power of 2), ``W = floor(w * 2**bits)``;
    both 0 where ``x < CUT`` or NaN."""
    x = np.asarray(x, dtype=_F)
    with np.errstate(invalid="ignore"):
        live = x >= CUT
    xs = np.where(live, x, _F(0))
    n = np.rint(xs * LOG2E)
    r = n * LN2_HI
    np.subtract(xs, r, out=r)
    r -= n * LN2_LO
    p = np.full_like(r, POLY[0])  # (in place: one rounding an operation, as a new array's)
    for c in POLY[1:]:
        p *= r
        p += c
    two_n = n.astype(np.int32)
    two_n += 127
    two_n <<= 23
    p *= two_n.view(_F)
    p[~live] = 0
    big = p * _F(2.0**bits)
    np.floor(big, out=big)
    return p, big.astype(np.int64)


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


def _row(s: np.ndarray, k: int, p: np.float32, m: np.float32, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(token ids in vocabulary order, their integer weights, all > 0) of the tokens
    one row's filters keep (module docstring); None where its best score is not
    finite. Weights are evaluated only for what top-k keeps within `zero_below`
    of the best: the others weigh 0."""
    vocab = len(s)
    best = s.max() if vocab else _F(-np.inf)
    if not np.isfinite(best):
        return None
    x = s - best
    live = x >= zero_below(bits)
    if 0 < k < vocab:
        live &= s >= np.partition(s, vocab - k)[vocab - k]  # every token tied with the k-th
    ids = np.flatnonzero(live)
    w, big = exp_weights(x[ids], bits)
    out = big > 0
    if p < 1:
        out &= _nucleus(s[ids], big, math.ceil(float(p) * float(big.sum())))
    if m > 0:
        out &= w >= m
    return ids[out], big[out]


def zero_below(bits: int) -> np.float32:
    """A score this far under the best, or farther, weighs 0 (exp(x) * 2**bits < 1,
    with `exp_weights`' error well inside the margin)."""
    return _F(-bits * math.log(2) - 0.01)


def _nucleus(s: np.ndarray, big: np.ndarray, bound: int) -> np.ndarray:
    """bool: top-p over tokens of scores ``s`` and integer weights ``big``: in order of
    score, ties by id (``s`` is in id order), those whose weights before them sum
    under ``bound``. Only a prefix in that order is sorted: the most likely
    few thousand (and every token tied with the last of them), more while
    they weigh less than ``bound``."""
    n = len(s)
    take = 4096
    while True:
        if take >= n:
            head = np.arange(n)
        else:
            head = np.flatnonzero(s >= np.partition(s, n - take)[n - take])
        order = head[np.lexsort((head, -s[head]))]
        run = np.cumsum(big[order])
        if len(head) == n or run[-1] >= bound:
            break
        take *= 4
    out = np.zeros(n, dtype=bool)
    out[order[run - big[order] < bound]] = True
    return out


def kept(s: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
         bits: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bool [n, V] the tokens of nonzero weight each row's filters keep, int64 [n, V]
    their integer weights, 0 elsewhere) of scores ``s`` (`scores`); ``top_k`` 0 or
    >= V: none, ``top_p`` 1: none, ``min_p`` 0: none. A row whose best score is not
    finite keeps none."""
    n, vocab = s.shape
    bits = scale_bits(vocab) if bits is None else bits
    keep = np.zeros((n, vocab), dtype=bool)
    big = np.zeros((n, vocab), dtype=np.int64)
    for i in range(n):
        got = _row(s[i], int(top_k[i]), _F(top_p[i]), _F(min_p[i]), bits)
        if got is not None:
            keep[i, got[0]] = True
            big[i, got[0]] = got[1]
    return keep, big


def _draw(ids: np.ndarray, big: np.ndarray, u: float) -> int:
    """The token at uniform ``u`` among ``ids`` of weights ``big`` (module docstring, 4)."""
    run = np.cumsum(big)
    return int(ids[np.searchsorted(run, math.floor(float(u) * float(run[-1])), side="right")])


def greedy_tokens(y: np.ndarray) -> np.ndarray:
    """int64 [n]: each row's first most likely token of penalized logits ``y``, NaN as -inf."""
    return np.where(np.isnan(y), -np.inf, y).argmax(axis=1)


def sample(y: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray, min_p: np.ndarray,
           greedy: np.ndarray, u: np.ndarray) -> np.ndarray:
    """int64 [n] tokens of penalized logits ``y`` [n, V] (float32), each row by its
    parameters (greedy rows: `greedy_tokens`; their other parameters unread)."""
    greedy = np.asarray(greedy, dtype=bool)
    out = np.zeros(len(y), dtype=np.int64)
    if greedy.any():
        out[greedy] = greedy_tokens(y[greedy])
    rows = np.flatnonzero(~greedy)
    if len(rows):
        s = scores(y[rows], np.asarray(temperature, dtype=_F)[rows])
        bits = scale_bits(s.shape[1])
        for j, i in enumerate(rows):
            got = _row(s[j], int(top_k[i]), _F(top_p[i]), _F(min_p[i]), bits)
            out[i] = _draw(*got, u[i]) if got is not None else int(np.argmax(s[j]))
    return out


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function of uint64 ``x`` (a bijection that mixes every bit)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(_GOLDEN)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(seeds: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """float64 in [0, 1 - 2**-52], one per row: a hash of the row's seed and its draw
    index (52 bits: ``u * total`` stays below ``total`` in float64, `draw`)."""
    with np.errstate(over="ignore"):
        x = splitmix64(splitmix64(seeds.astype(np.uint64)) ^ (draws.astype(np.uint64) * np.uint64(_GOLDEN)))
    return (x >> np.uint64(12)).astype(np.float64) * (1.0 / (1 << 52))
