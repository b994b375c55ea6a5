"""Sampled and greedy generation under penalties and biases (`kvpager.hf.sampling`):
a repetition penalty gives transformers' greedy tokens (pipelined or not) and
its sampled second tokens follow transformers' penalized distribution;
presence and frequency penalties against a plain loop; a bias or ban past the
vocabulary refused. (Sampling's filters and draws: test_hf_sampling.py.)"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt, reference  # noqa: E402, F401
from test_hf_sampling import assert_draws_follow, warped  # noqa: E402
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import Sampling, generate, spec_for_model  # noqa: E402


@pytest.mark.parametrize("pipeline", [True, False])
def test_greedy_with_a_repetition_penalty_gives_transformers_tokens(pipeline):
    """transformers' ``generate(do_sample=False, repetition_penalty=...)``: its processor
    over the prompt and the tokens so far, then the argmax; the same tokens, alone and
    in a batch."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    ps = [prompt(20, seed=1), prompt(9, seed=2), prompt(33, seed=3)]
    want = []
    for p in ps:
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=16, do_sample=False, repetition_penalty=1.8)
        want.append(out[0, len(p):].tolist())
    assert want != [reference(model, p, 16) for p in ps]  # the penalty matters here
    s = Sampling(temperature=0, repetition_penalty=1.8)
    assert generate(model, pool, ps, 16, sampling=s, pipeline=pipeline) == want
    mixed = generate(model, pool, ps, 16, sampling=[s, None, s], pipeline=pipeline)
    assert mixed == [want[0], reference(model, ps[1], 16), want[2]]
    pool.check_integrity()


def penalized_greedy(model, p: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """A plain loop: the model's logits over the whole sequence each step, less the
    penalties of the tokens generated so far, then the argmax."""
    seq, out = list(p), []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        out.append(int((logits - frequency * counts - presence * (counts > 0)).argmax()))
        seq.append(out[-1])
    return out


def test_presence_and_frequency_penalties_against_a_plain_loop():
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    ps = [prompt(20, seed=4), prompt(9, seed=5)]
    for presence, frequency in ((0.5, 0.0), (0.0, 0.4), (0.3, 0.3)):
        s = Sampling(temperature=0, presence_penalty=presence, frequency_penalty=frequency)
        want = [penalized_greedy(model, p, 14, presence, frequency) for p in ps]
        assert generate(model, pool, ps, 14, sampling=s) == want
    # a presence penalty past any logit spread: no token is generated twice
    outs = generate(model, pool, ps, 24, sampling=Sampling(temperature=0.8, presence_penalty=1e4, seed=3))
    assert all(len(set(o)) == len(o) for o in outs)


def test_sampled_second_tokens_under_a_repetition_penalty_follow_transformers():
    model = make_model("llama")
    s = Sampling(temperature=1.3, top_k=30, repetition_penalty=1.4)
    p = prompt(21, seed=6)
    n = 4000
    pool = KVPool(spec_for_model(model, num_blocks=n + 64, block_size=8))
    outs = generate(model, pool, [p] * n, 2, eos_token_id=None,
                    sampling=[Sampling(s.temperature, s.top_k, repetition_penalty=1.4, seed=i) for i in range(n)])

    def reference_probs(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[:, -1]
        penalized = RepetitionPenaltyLogitsProcessor(1.4)(torch.tensor([tokens]), logits.float())
        return warped(penalized, s).softmax(-1)[0].double().numpy()

    assert_draws_follow(outs, p, reference_probs)


def test_a_bias_or_ban_past_the_vocabulary_is_refused():
    """A logit bias naming token 200 of a 128-token model was left out of the
    logits without a word (transformers refuses it); so was a config's ban."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with pytest.raises(ValueError, match="token 200, past the model's vocabulary of 128"):
        generate(model, pool, [prompt(9, 1)], 4, sampling=Sampling(temperature=0.7, logit_bias={200: 10.0}, seed=1))
    model.generation_config.bad_words_ids = [[300]]
    with pytest.raises(ValueError, match="token 300"):
        generate(model, pool, [prompt(9, 1)], 4, sampling="model")
    assert pool.stats().num_sequences == 0 and pool.stats().prefix_query_tokens == 0
