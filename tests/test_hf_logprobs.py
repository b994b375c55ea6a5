"""Log-probabilities of generated tokens (`kvpager.hf.logprobs`): each token's, and
the top ones at its position, against the log-softmax of the same model's logits
from one plain forward pass over the prompt and the tokens generated (transformers'
own attention, no cache): greedy and sampled, pipelined or not, a model with
recurrent layers, through a daemon client; they never change the tokens."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import VOCAB, make_model, one_thread, prompt  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.hf import Completion, PagedGeneration, Sampling, generate, spec_for_model  # noqa: E402

PROMPTS = [prompt(21, seed=1), prompt(5, seed=2), prompt(16, seed=3)]


def full_forward(model, p: list[int], out: list[int]) -> torch.Tensor:
    """float64 [len(out), vocab]: the log-softmax at each generated token's position
    of one plain forward pass of the model over the prompt and the tokens before it."""
    ids = torch.tensor([p + out[:-1]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits[0, len(p) - 1 :]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def check(model, prompts: list[list[int]], done: list[Completion], k: int, tol: float = 2e-4) -> None:
    """Each completion's log-probabilities against `full_forward`: the chosen
    tokens' and, for k > 0, the k most likely tokens with theirs, most likely first."""
    for p, c in zip(prompts, done):
        assert c.tokens and len(c.logprobs) == len(c.tokens)
        ref = full_forward(model, p, c.tokens)
        want = ref[torch.arange(len(c.tokens)), torch.tensor(c.tokens)]
        np.testing.assert_allclose(c.logprobs, want.numpy(), rtol=0, atol=tol)
        if k == 0:
            assert c.top_logprobs is None
            continue
        assert len(c.top_logprobs) == len(c.tokens)
        best, ids = torch.topk(ref, k, dim=-1)
        for j, top in enumerate(c.top_logprobs):
            assert list(top) == ids[j].tolist()  # (random float32 logits: no ties)
            np.testing.assert_allclose(list(top.values()), best[j].numpy(), rtol=0, atol=tol)
            assert all(v <= 0 for v in top.values())


@pytest.mark.parametrize("pipeline", [True, False])
def test_greedy_logprobs_are_the_models(pipeline):
    """Greedy: each token is the most likely, its log-probability the first of the top."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    done = generate(model, pool, PROMPTS, 9, logprobs=4, pipeline=pipeline)
    check(model, PROMPTS, done, 4)
    for c in done:
        assert [next(iter(top)) for top in c.top_logprobs] == c.tokens
        assert [top[t] for top, t in zip(c.top_logprobs, c.tokens)] == c.logprobs
    assert [c.tokens for c in done] == generate(model, pool, PROMPTS, 9, pipeline=pipeline)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


@pytest.mark.parametrize("pipeline", [True, False])
def test_sampled_logprobs_are_the_raw_models(pipeline):
    """Sampled rows (temperature, top-k, a repetition penalty) and a greedy one: the
    log-probabilities are the model's raw distribution's, before any of them; the
    tokens are those drawn without logprobs."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    ss = [Sampling(temperature=1.4, top_k=40, seed=5), Sampling(top_p=0.9, repetition_penalty=1.3, seed=6), None]
    done = generate(model, pool, PROMPTS, 8, sampling=ss, logprobs=3, pipeline=pipeline)
    check(model, PROMPTS, done, 3)
    assert [c.tokens for c in done] == generate(model, pool, PROMPTS, 8, sampling=ss, pipeline=pipeline)
    # drawn at temperature 1.4 from 40 tokens: some token is not the most likely one
    assert any(t != next(iter(top)) for t, top in zip(done[0].tokens, done[0].top_logprobs))
    pool.check_integrity()


def test_logprobs_zero_keeps_the_tokens_alone():
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    done = generate(model, pool, PROMPTS, 5, logprobs=0)
    check(model, PROMPTS, done, 0)


def test_rows_that_end_early_keep_one_entry_a_token():
    """An end token ends a row passes before the others (pipelined: the pass after it
    ran ahead, its token dropped): as many log-probabilities as tokens, each right."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    free = generate(model, pool, PROMPTS, 8, eos_token_id=None)
    eos = free[1][2]
    with PagedGeneration(model, pool, PROMPTS, 8, eos_token_id=eos, logprobs=2) as gen:
        while not gen.done:
            gen.step()
        done = gen.completions()
        assert gen.token_logprobs == [c.logprobs for c in done]
        assert gen.top_logprobs == [c.top_logprobs for c in done]
    assert len(done[1].tokens) <= 3 and done[1].tokens[-1] == eos
    check(model, PROMPTS, done, 2)


def test_a_recurrent_models_logprobs():
    """Qwen3.5's layout (linear-attention and attention layers), prompts prefilled in
    parts: against its own plain forward pass."""
    pytest.importorskip("transformers.cache_utils")
    from test_hf_recurrent import make, prompts

    model = make("qwen3_5")
    ps = prompts(9, 7, 20)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    done = generate(model, pool, ps, 6, eos_token_id=None, logprobs=3,
                    sampling=[Sampling(temperature=1.2, seed=1), None, Sampling(top_k=5, seed=3)])
    check(model, ps, done, 3)
    pool.check_integrity()


def test_through_a_daemon_client_the_same_logprobs_as_embedded():
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    model = make_model("llama")
    ss = [Sampling(temperature=1.1, seed=21), None, Sampling(min_p=0.1, seed=23)]
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    want = generate(model, KVPool(spec), PROMPTS, 10, sampling=ss, logprobs=2)
    with running_server(spec) as server, Client(server.endpoint) as pool:
        assert generate(model, pool, PROMPTS, 10, sampling=ss, logprobs=2) == want
        assert pool.stats().num_sequences == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", VOCAB + 1])
def test_bad_logprobs_are_refused_before_anything_is_allocated(bad):
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with pytest.raises(ValueError, match="logprobs"):
        generate(model, pool, PROMPTS, 4, logprobs=bad)
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0


def test_completions_without_logprobs_is_refused():
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with PagedGeneration(model, pool, PROMPTS, 2) as gen:
        assert gen.token_logprobs is None and gen.top_logprobs is None
        with pytest.raises(ValueError, match="logprobs="):
            gen.completions()
