"""Where a prompt's generation ends: a limit of new tokens a prompt
(``max_new_tokens`` as a list: each prompt's tokens those it gets alone with its
own limit, pipelined or not, greedy or sampled, with log-probabilities and for a
model with recurrent layers) and stop sequences (the new tokens end with one);
bad limits and stop sequences are refused before anything is allocated."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.hf import Sampling, generate, spec_for_model  # noqa: E402

PROMPTS = [prompt(21, seed=1), prompt(5, seed=2), prompt(16, seed=3), prompt(9, seed=4)]
LIMITS = [3, 9, 1, 6]


def _pool(model):
    return KVPool(spec_for_model(model, num_blocks=64, block_size=8))


@pytest.mark.parametrize("pipeline", [True, False])
def test_each_prompt_gets_its_own_limit(pipeline):
    model = make_model("llama")
    pool = _pool(model)
    got = generate(model, pool, PROMPTS, LIMITS, eos_token_id=None, pipeline=pipeline)
    assert [len(g) for g in got] == LIMITS
    alone = [generate(model, pool, [p], m, eos_token_id=None)[0] for p, m in zip(PROMPTS, LIMITS)]
    assert got == alone
    longest = generate(model, pool, PROMPTS, max(LIMITS), eos_token_id=None, pipeline=pipeline)
    assert got == [g[:m] for g, m in zip(longest, LIMITS)]
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_sampled_limits_with_an_end_token_and_logprobs():
    """Sampled rows keep their seeds' tokens; an end token still ends a row before its
    limit; log-probabilities come one a token."""
    model = make_model("llama")
    pool = _pool(model)
    ss = [Sampling(temperature=1.2, seed=10 + i) for i in range(4)]
    free = generate(model, pool, PROMPTS, LIMITS, eos_token_id=None, sampling=ss)
    assert [len(g) for g in free] == LIMITS
    alone = [generate(model, pool, [p], m, eos_token_id=None, sampling=[s])[0]
             for p, m, s in zip(PROMPTS, LIMITS, ss)]
    assert free == alone
    eos = free[1][2]  # row 1 ends at its third token, well before its limit of 9
    done = generate(model, pool, PROMPTS, np.array(LIMITS), eos_token_id=eos, sampling=ss, logprobs=1)
    assert done[1].tokens == free[1][:3]
    for c, m in zip(done, LIMITS):
        assert len(c.tokens) <= m and len(c.logprobs) == len(c.tokens) == len(c.top_logprobs)
    pool.check_integrity()


def test_a_recurrent_models_limits():
    pytest.importorskip("transformers.cache_utils")
    from test_hf_recurrent import make, prompts

    model = make("qwen3_5")
    ps = prompts(9, 7, 20)
    pool = _pool(model)
    got = generate(model, pool, ps, torch.tensor([4, 1, 6]), eos_token_id=None)
    assert got == [generate(model, pool, [p], m, eos_token_id=None)[0] for p, m in zip(ps, (4, 1, 6))]
    pool.check_integrity()


@pytest.mark.parametrize("bad, needle", [
    ([3, 9, 1], "for each of the 4 prompts"),
    ([3, 9, 1, 0], "for each of the 4 prompts"),
    ([3, 9, 1, 1.5], "for each of the 4 prompts"),
    ([3, 9, 1, True], "for each of the 4 prompts"),
    ([[3], [9], [1], [6]], "for each of the 4 prompts"),
    (np.zeros((4, 1), dtype=int), "an int >= 1"),
    ("3", "an int >= 1"),
    ({0: 3}, "an int >= 1"),
    (0, "an int >= 1, got 0"),
])
def test_bad_limits_are_refused_before_anything_is_allocated(bad, needle):
    model = make_model("llama")
    pool = _pool(model)
    before = pool.stats()
    with pytest.raises(ValueError, match=f"max_new_tokens.*{needle}"):
        generate(model, pool, PROMPTS, bad)
    assert pool.stats() == before
    pool.check_integrity()


@pytest.mark.parametrize("pipeline", [True, False])
def test_stop_sequences_end_a_prompt_where_its_tokens_end_with_one(pipeline):
    """Two-token stop sequences taken from the free run's tokens: each row ends at
    the first place its new tokens end with any of them (the sequence included), as
    a plain scan of the free run says; the others run to their limit."""
    model = make_model("llama")
    pool = _pool(model)
    free = generate(model, pool, PROMPTS, 12, eos_token_id=None, pipeline=pipeline)
    stops = [free[0][3:5], free[2][6:8], [free[1][0]] * 5]  # the last: five of one token, unlikely to come

    def cut(out):
        for n in range(1, len(out) + 1):
            if any(n >= len(s) and out[n - len(s) : n] == s for s in stops):
                return out[:n]
        return out

    got = generate(model, pool, PROMPTS, 12, eos_token_id=None, stop_sequences=stops, pipeline=pipeline)
    assert got == [cut(f) for f in free]
    assert len(got[0]) <= 5 and len(got[2]) <= 8
    assert generate(model, pool, PROMPTS, 12, eos_token_id=None, stop_sequences=[]) == free
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


@pytest.mark.parametrize("bad, needle", [
    ("12", "must be a list of token-id lists"),
    ([3, 4], r"stop_sequences\[0\] must be a list of token ids"),
    ([[3, 4], []], r"stop_sequences\[1\] must be a non-empty list"),
    ([[3, 1.5]], r"stop_sequences\[0\] must be a non-empty list"),
    ([[3, -1]], r"stop_sequences\[0\] must be a non-empty list"),
    ([[True]], r"stop_sequences\[0\] must be a non-empty list"),
])
def test_bad_stop_sequences_are_refused_before_anything_is_allocated(bad, needle):
    model = make_model("llama")
    pool = _pool(model)
    before = pool.stats()
    with pytest.raises(ValueError, match=needle):
        generate(model, pool, PROMPTS, 4, stop_sequences=bad)
    assert pool.stats() == before
