"""cuda/sample_rows.cu against its NumPy twin (`kvpager.hf.draws`): the same
token on every row, bit for bit, over logits of each dtype, vocabularies from
1 token to 262,144, heavy ties at every boundary, every filter and penalty,
greedy rows beside sampled ones, broken rows (NaN, infinities), logits with a
row stride; the seen / generated tables counted as the twin's. Skips without
CUDA."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_torch_or_skip

_, torch = cupy_torch_or_skip()

from test_hf_draws import random_rows  # noqa: E402

from kvpager.hf import draws  # noqa: E402
from kvpager.hf.draw_kernel import THREADS, RowSampler  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda:0")


def kernel_and_twin(r: dict, dtype: torch.dtype, penalties: bool, rng: np.random.Generator,
                    record: bool = True, stride: int = 0, threads: int = THREADS) -> tuple[np.ndarray, np.ndarray, tuple]:
    n, vocab = r["y"].shape
    logits = torch.from_numpy(r["y"]).to(dtype)
    y = logits.float().numpy()  # what the kernel reads, as float32
    if stride:
        wide = torch.full((n, vocab + stride), float("nan"), dtype=dtype)
        wide[:, :vocab] = logits
        on_device = wide.to(DEVICE)[:, :vocab]
    else:
        on_device = logits.to(DEVICE)
    prompts = n + 3
    at = rng.permutation(prompts)[:n]  # each row's own place in the tables
    seen = counts = None
    rep = pres = freq = np.zeros(n, np.float32)
    if penalties:
        seen = rng.random((prompts, vocab)) < 0.3
        counts = (rng.random((prompts, vocab)) < 0.2) * rng.integers(1, 4, (prompts, vocab))
        counts = counts.astype(np.int32)
        rep = rng.uniform(0.7, 1.8, n).astype(np.float32)
        pres = rng.uniform(-0.5, 1.0, n).astype(np.float32)
        freq = rng.uniform(-0.5, 1.0, n).astype(np.float32)
    greedy = r["greedy"]
    temperature = np.where(greedy, 1.0, r["temperature"])
    floats = np.stack([temperature, r["top_p"], r["min_p"], greedy, rep, pres, freq], axis=1).astype(np.float32)
    ints = np.stack([r["top_k"], at], axis=1).astype(np.int64)
    seen_d = torch.from_numpy(seen).to(DEVICE) if seen is not None else None
    counts_d = torch.from_numpy(counts).to(DEVICE) if counts is not None else None
    got = RowSampler(DEVICE, threads)(on_device, r["u"], ints, floats, seen_d, counts_d, record).cpu().numpy()
    yp = draws.penalize(y, None if seen is None else seen[at], None if counts is None else counts[at],
                        floats[:, 4], floats[:, 5], floats[:, 6])
    want = draws.sample(yp, floats[:, 0], ints[:, 0], floats[:, 1], floats[:, 2], greedy, r["u"])
    tables = ()
    if penalties:
        if record:
            seen[at, want] = True
            np.add.at(counts, (at, want), 1)
        tables = (seen_d.cpu().numpy(), seen, counts_d.cpu().numpy(), counts)
    return got, want, tables


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("vocab,ties", [(1, False), (5, True), (1000, False), (1000, True), (4097, True),
                                        (50257, False), (128256, True)])
def test_the_kernel_draws_the_twins_tokens(dtype, vocab, ties):
    rng = np.random.default_rng(vocab + 7 * ties)
    n = 40
    r = random_rows(rng, n, vocab, ties)
    got, want, _ = kernel_and_twin(r, dtype, penalties=False, rng=rng)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("record", [True, False])
def test_penalties_and_their_tables_as_the_twin(record):
    rng = np.random.default_rng(3 + record)
    r = random_rows(rng, 48, 3001, ties=True)
    got, want, (seen, seen_want, counts, counts_want) = kernel_and_twin(r, torch.bfloat16, True, rng, record)
    assert got.tolist() == want.tolist()
    assert (seen == seen_want).all() and (counts == counts_want).all()


def test_a_large_vocabulary_and_a_row_stride():
    rng = np.random.default_rng(11)
    r = random_rows(rng, 24, 262144, ties=True)
    got, want, _ = kernel_and_twin(r, torch.bfloat16, False, rng, stride=40)
    assert got.tolist() == want.tolist()


def test_top_p_ties_on_the_boundary_and_many_draws():
    """One row of a few hundred tied tokens on the top-p boundary, drawn at many
    uniforms: which of the ties stay, and every draw."""
    rng = np.random.default_rng(5)
    vocab, n = 20000, 64
    y = np.zeros((n, vocab), np.float32)
    y[:, rng.choice(vocab, 300, replace=False)] = 2.0
    y[:, :50] = 4.0
    r = dict(y=y, temperature=np.ones(n), top_k=np.where(np.arange(n) % 2, 0, 120), top_p=np.linspace(0.05, 0.95, n),
             min_p=np.zeros(n), greedy=np.zeros(n, bool),
             u=np.linspace(0, 1 - 2.0**-52, n))
    got, want, _ = kernel_and_twin(r, torch.float32, False, rng)
    assert got.tolist() == want.tolist()


def test_broken_rows_give_the_twins_tokens():
    rng = np.random.default_rng(2)
    y = np.float32([[np.nan] * 6, [-np.inf] * 6, [0, np.inf, 1, np.inf, 2, 0], [np.nan, 2, np.nan, 1, 2, 0]])
    n = len(y)
    for greedy in (np.zeros(n, bool), np.ones(n, bool)):
        r = dict(y=y, temperature=np.ones(n), top_k=np.array([0, 2, 0, 3]), top_p=np.full(n, 0.9), min_p=np.zeros(n),
                 greedy=greedy, u=np.full(n, 0.5))
        got, want, _ = kernel_and_twin(r, torch.float32, False, rng)
        assert got.tolist() == want.tolist()


@pytest.mark.parametrize("threads", [256, 512])
def test_other_block_sizes_draw_the_same(threads):
    rng = np.random.default_rng(threads)
    r = random_rows(rng, 32, 9000, ties=True)
    got, want, _ = kernel_and_twin(r, torch.bfloat16, True, rng, threads=threads)
    assert got.tolist() == want.tolist()


def test_no_rows_launch_nothing():
    logits = torch.zeros((0, 100), dtype=torch.bfloat16, device=DEVICE)
    got = RowSampler(DEVICE)(logits, np.zeros(0), np.zeros((0, 2), np.int64), np.zeros((0, 7), np.float32),
                             None, None, False)
    assert got.shape == (0,) and got.device == logits.device
