"""`kvpager.hf.draws`, the twin of the sampling kernel and the CPU's sampler:
its exponential against NumPy's, and every row's kept tokens and draw against
a plain reference (a whole sort of the vocabulary, each filter walked in
order) over many random rows, ties included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvpager.hf import draws
from kvpager.hf.draws import uniforms


def test_the_exponential_is_close_to_numpys_and_exact_at_0():
    x = np.linspace(-40, 0, 200001, dtype=np.float32)
    w, big = draws.exp_weights(x, 35)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(w / ref - 1)) < 3e-7
    assert draws.exp_weights(np.float32([0.0, -0.0]), 35)[0].tolist() == [1.0, 1.0]
    assert (big == np.floor(w.astype(np.float64) * 2.0**35)).all()
    assert (np.diff(w) >= 0).all()  # monotone over the grid
    w, big = draws.exp_weights(np.float32([-40.5, -np.inf, np.nan]), 35)
    assert (w == 0).all() and (big == 0).all()


def test_the_integer_weights_of_a_row_sum_within_53_bits():
    for vocab in (1, 2, 3, 1000, 128256, 262144, 300000):
        assert vocab * 2 ** draws.scale_bits(vocab) <= 2**53


def reference_row(y: np.ndarray, t: float, k: int, p: float, m: float, greedy: bool,
                  u: float) -> tuple[int, set[int]]:
    """(token, kept tokens of nonzero weight) of one row, the long way."""
    y = np.where(np.isnan(y), -np.inf, y).astype(np.float32)
    if greedy:
        return int(np.argmax(y)), set()
    s = draws.scores(y[None], np.float32([t]))[0]
    vocab = len(s)
    best = s.max()
    if not np.isfinite(best):
        return int(np.argmax(s)), set()
    w, big = draws.exp_weights(s - best, draws.scale_bits(vocab))
    order = sorted(range(vocab), key=lambda i: (-float(s[i]), i))
    keep = np.ones(vocab, bool)
    if 0 < k < vocab:
        kth = s[order[k - 1]]
        keep &= s >= kth
    if p < 1:
        total = sum(int(big[i]) for i in order if keep[i])
        bound = math.ceil(float(np.float32(p)) * total)
        before, nucleus = 0, np.zeros(vocab, bool)
        for i in order:
            if keep[i]:
                nucleus[i] = before < bound
                before += int(big[i])
        keep &= nucleus
    if m > 0:
        keep &= w >= np.float32(m)
    kept = {i for i in range(vocab) if keep[i] and big[i] > 0}
    total = sum(int(big[i]) for i in kept)
    target = math.floor(float(u) * total)
    run = 0
    for i in range(vocab):
        if i in kept:
            run += int(big[i])
            if run > target:
                return i, kept
    raise AssertionError("no token drawn")


def random_rows(rng: np.random.Generator, n: int, vocab: int, ties: bool) -> dict[str, np.ndarray]:
    """Logits and parameters of ``n`` rows; ``ties``: logits rounded to 4 bits of
    mantissa (many tokens tied, at every boundary)."""
    y = (rng.standard_normal((n, vocab)) * rng.uniform(0.5, 6, (n, 1))).astype(np.float32)
    if ties:
        y = np.round(y * 4) / 4
    return dict(
        y=y.astype(np.float32),
        temperature=rng.choice([0.3, 0.7, 1.0, 1.6], n),
        top_k=np.where(rng.random(n) < 0.5, rng.integers(1, vocab + 2, n), 0),
        top_p=np.where(rng.random(n) < 0.6, rng.uniform(0.01, 0.999, n), 1.0),
        min_p=np.where(rng.random(n) < 0.3, rng.uniform(0.0, 0.3, n), 0.0),
        greedy=rng.random(n) < 0.15,
        u=uniforms(rng.integers(0, 2**62, n).astype(np.uint64), np.zeros(n, np.int64)),
    )


@pytest.mark.parametrize("vocab,ties", [(1, False), (2, True), (7, True), (300, False), (300, True), (2000, True)])
def test_the_twin_keeps_and_draws_what_the_reference_does(vocab, ties):
    rng = np.random.default_rng(vocab + ties)
    n = 60
    r = random_rows(rng, n, vocab, ties)
    got = draws.sample(r["y"], r["temperature"], r["top_k"], r["top_p"], r["min_p"], r["greedy"], r["u"])
    s = draws.scores(r["y"], r["temperature"])
    keep, big = draws.kept(s, r["top_k"], r["top_p"].astype(np.float32), r["min_p"].astype(np.float32))
    for i in range(n):
        token, kept = reference_row(r["y"][i], r["temperature"][i], r["top_k"][i], r["top_p"][i], r["min_p"][i],
                                    r["greedy"][i], r["u"][i])
        assert got[i] == token, i
        if not r["greedy"][i]:
            assert set(np.flatnonzero(keep[i] & (big[i] > 0)).tolist()) == kept, i


def test_a_tie_at_the_top_p_boundary_keeps_the_lowest_ids():
    y = np.zeros((1, 10), np.float32)
    y[0, [2, 5, 8]] = 3.0  # three tokens alike hold nearly all the mass
    s = draws.scores(y, np.float32([1.0]))
    keep, _ = draws.kept(s, np.array([0]), np.float32([0.5]), np.float32([0.0]))
    assert np.flatnonzero(keep[0]).tolist() == [2, 5]  # 0.30 of it each: the third starts past one half
    keep, _ = draws.kept(s, np.array([0]), np.float32([0.25]), np.float32([0.0]))
    assert np.flatnonzero(keep[0]).tolist() == [2]


def test_top_k_keeps_every_token_tied_with_the_kth():
    y = np.float32([[1, 5, 3, 3, 3, 0]])
    keep, _ = draws.kept(draws.scores(y, np.float32([1])), np.array([2]), np.float32([1]), np.float32([0]))
    assert np.flatnonzero(keep[0]).tolist() == [1, 2, 3, 4]


def test_rows_of_nan_or_infinite_logits_still_give_a_token_of_the_vocabulary():
    y = np.float32([[np.nan] * 4, [-np.inf] * 4, [0, np.inf, 1, np.inf], [np.nan, 2, np.nan, 1]])
    n = len(y)
    got = draws.sample(y, np.ones(n), np.zeros(n, int), np.full(n, 0.9), np.zeros(n), np.zeros(n, bool),
                       np.full(n, 0.5))
    assert got.tolist()[:3] == [0, 0, 1]
    assert got[3] in (1, 3)
    assert draws.greedy_tokens(y).tolist() == [0, 0, 1, 1]


def test_penalties():
    y = np.float32([[2.0, -2.0, 1.0, 0.5]])
    seen = np.array([[True, True, False, False]])
    counts = np.array([[0, 3, 1, 0]], np.int32)
    got = draws.penalize(y, seen, counts, np.float32([2.0]), np.float32([0.5]), np.float32([0.25]))
    assert got.tolist() == [[1.0, -4.0 - 0.75 - 0.5, 1.0 - 0.25 - 0.5, 0.5]]


def test_no_rows():
    empty = np.zeros((0, 50), np.float32)
    got = draws.sample(empty, np.ones(0), np.zeros(0, int), np.ones(0), np.zeros(0), np.zeros(0, bool), np.ones(0))
    assert got.shape == (0,) and got.dtype == np.int64
