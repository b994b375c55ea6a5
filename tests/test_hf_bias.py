"""Logits changed before the penalties (`Sampling.logit_bias`, `Sampling.min_tokens`):
greedy tokens against transformers' ``generate`` with ``sequence_bias`` and
``min_new_tokens``, pipelined or not; banned tokens never drawn; end tokens held
off; the raw log-probabilities untouched; a generation config's settings taken or
refused by name; bad values refused."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_logprobs import check  # noqa: E402
from test_hf_models import make_model, one_thread, prompt  # noqa: E402, F401

from kvpager import InvalidArgument, KVPool  # noqa: E402
from kvpager.hf import Sampling, generate, spec_for_model  # noqa: E402

PROMPTS = [prompt(21, seed=1), prompt(5, seed=2), prompt(16, seed=3)]


def _pool(model):
    return KVPool(spec_for_model(model, num_blocks=64, block_size=8))


def hf_greedy(model, p: list[int], n: int, **kwargs) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, num_beams=1, **kwargs)
    return out[0, len(p) :].tolist()


@pytest.mark.parametrize("pipeline", [True, False])
def test_greedy_bias_gives_transformers_sequence_bias_tokens(pipeline):
    model = make_model("llama")
    pool = _pool(model)
    free = generate(model, pool, PROMPTS, 8, eos_token_id=None)
    favoured, banned = 7, free[0][0]
    bias = {favoured: 2.5, banned: float("-inf"), 40: -1.0}
    got = generate(model, pool, PROMPTS, 8, eos_token_id=None, pipeline=pipeline,
                   sampling=Sampling(temperature=0, logit_bias=bias))
    want = [hf_greedy(model, p, 8, sequence_bias={(t,): b for t, b in bias.items()}) for p in PROMPTS]
    assert got == want and got != free
    assert all(banned not in g for g in got)
    pool.check_integrity()


@pytest.mark.parametrize("pipeline", [True, False])
def test_min_tokens_holds_end_tokens_off_as_transformers_min_new_tokens(pipeline):
    """The end token is each row's first greedy token: without min_tokens every row
    would end at once."""
    model = make_model("llama")
    pool = _pool(model)
    free = generate(model, pool, PROMPTS, 8, eos_token_id=None)
    eos = free[0][0]
    assert generate(model, pool, PROMPTS[:1], 8, eos_token_id=eos) == [[eos]]
    got = generate(model, pool, PROMPTS, 8, eos_token_id=eos, pipeline=pipeline,
                   sampling=Sampling(temperature=0, min_tokens=4))
    want = [hf_greedy(model, p, 8, eos_token_id=eos, min_new_tokens=4, pad_token_id=0) for p in PROMPTS]
    assert got == want
    assert all(len(g) >= 4 and eos not in g[:4] for g in got)
    pool.check_integrity()


def test_sampled_rows_never_draw_banned_tokens_and_hold_end_tokens_off():
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=600, block_size=8))
    p = PROMPTS[1]
    n = 200
    free = generate(model, pool, [p] * n, 1, eos_token_id=None,
                    sampling=[Sampling(temperature=1.5, seed=i) for i in range(n)])
    counts = np.bincount([f[0] for f in free], minlength=128)
    banned = [int(t) for t in np.argsort(-counts)[:3]]  # the three drawn most
    got = generate(model, pool, [p] * n, 3, eos_token_id=banned[0],
                   sampling=[Sampling(temperature=1.5, seed=i, logit_bias={t: float("-inf") for t in banned[1:]},
                                      min_tokens=2) for i in range(n)])
    assert not {t for g in got for t in g} & set(banned[1:])
    assert all(banned[0] not in g[:2] for g in got)
    pool.check_integrity()


def test_raw_logprobs_are_the_models_whatever_the_bias():
    model = make_model("llama")
    pool = _pool(model)
    done = generate(model, pool, PROMPTS, 6, eos_token_id=None, logprobs=2,
                    sampling=Sampling(temperature=0, logit_bias={7: 3.0, 9: float("-inf")}))
    check(model, PROMPTS, done, 2)
    assert any(t == 7 for c in done for t in c.tokens)


def test_a_generation_configs_settings():
    model = make_model("llama")
    c = model.generation_config
    c.do_sample, c.min_new_tokens, c.sequence_bias, c.suppress_tokens = False, 3, {(5,): 1.5}, [9]
    assert Sampling.from_model(model) == Sampling(temperature=0, logit_bias={5: 1.5, 9: float("-inf")},
                                                  min_tokens=3)
    c.do_sample, c.top_k = True, 20
    s = Sampling.from_model(model)
    assert s.top_k == 20 and s.logit_bias == ((5, 1.5), (9, float("-inf"))) and s.min_tokens == 3
    c.bad_words_ids = [[11], [12, 13]]
    with pytest.raises(ValueError, match=r"bans the sequence \[12, 13\]"):
        Sampling.from_model(model)
    c.bad_words_ids, c.sequence_bias = [[11]], {(5, 6): 1.0}
    with pytest.raises(ValueError, match=r"biases the sequence \(5, 6\)"):
        Sampling.from_model(model)
    c.sequence_bias, c.min_length = None, 30
    with pytest.raises(ValueError, match="min_length=30"):
        Sampling.from_model(model)
    c.min_length = 0
    assert Sampling.from_model(model).logit_bias == ((9, float("-inf")), (11, float("-inf")))


@pytest.mark.parametrize("bad, needle", [
    (dict(logit_bias="ab"), "logit_bias must be"),
    (dict(logit_bias={1.5: 1.0}), "token ids must be ints"),
    (dict(logit_bias={-1: 1.0}), "token ids must be ints >= 0"),
    (dict(logit_bias={3: float("nan")}), "logit_bias of token 3 must be a number"),
    (dict(logit_bias={3: float("inf")}), "logit_bias of token 3 must be a number"),
    (dict(logit_bias={3: True}), "logit_bias of token 3 must be a number"),
    (dict(logit_bias=[(3, 1.0), (3, 2.0)]), "names token 3 twice"),
    (dict(logit_bias=[(3, 1.0, 2.0)]), "logit_bias must be"),
    (dict(min_tokens=-1), "min_tokens must be an int in"),
    (dict(min_tokens=1.5), "min_tokens must be an int in"),
    # (past int64, or a bias float32 makes inf: untyped errors or every logit inf before)
    (dict(min_tokens=10**30), "min_tokens must be an int in"),
    (dict(logit_bias={3: 1e39}), "logit_bias of token 3 must be a number within float32's range"),
])
def test_bad_settings_are_refused_by_name(bad, needle):
    with pytest.raises(ValueError, match=needle):
        Sampling(**bad)


def test_a_sampling_stays_hashable_and_equal_by_its_bias():
    a = Sampling(logit_bias={3: 1.0, 2: -1.0})
    assert a == Sampling(logit_bias=[(2, -1.0), (3, 1.0)]) and hash(a) == hash(Sampling(logit_bias={2: -1, 3: 1}))


def test_a_negative_end_token_is_never_generated_and_bans_nothing():
    """An end id below 0 (transformers warns and takes it: no token is one) with
    ``min_tokens``: before, holding the end tokens off wrote -inf at logits[row, -1],
    banning the vocabulary's last token, and the tokens were not transformers'."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    p = prompt(10, seed=1)
    last = model.config.vocab_size - 1
    with torch.no_grad():
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=3, do_sample=False, eos_token_id=[-1, 5], min_new_tokens=2,
                             sequence_bias={(last,): 50.0}, pad_token_id=0)
    want = out[0, len(p):].tolist()
    assert want[0] == last  # (the bias makes it the greedy choice)
    got = generate(model, pool, [p], 3, eos_token_id=[-1, 5],
                   sampling=Sampling(temperature=0, logit_bias={last: 50.0}, min_tokens=2))[0]
    assert got == want
    assert pool.stats().num_sequences == 0


def test_a_sampled_prompt_with_nothing_left_to_draw_is_refused():
    """A logit bias of -inf on every token (or on every one but the end tokens,
    held off by ``min_tokens``) left a sampled row nothing to draw: it drew token
    0, banned, with no word, where transformers' sampling raises. Refused before
    anything is allocated; greedy search takes the first token, as transformers'."""
    model = make_model("llama")
    vocab = model.config.vocab_size
    pool = _pool(model)
    every = {t: float("-inf") for t in range(vocab)}
    with pytest.raises(InvalidArgument, match="prompt 1 bans every token of the vocabulary"):
        generate(model, pool, PROMPTS[:2], 2, eos_token_id=None,
                 sampling=[None, Sampling(seed=1, logit_bias=every)])
    but_end = {t: float("-inf") for t in range(vocab) if t != 3}
    with pytest.raises(InvalidArgument, match="min_tokens holding off the end tokens"):
        generate(model, pool, PROMPTS[:1], 2, eos_token_id=3, sampling=Sampling(seed=1, logit_bias=but_end,
                                                                                 min_tokens=1))
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    assert generate(model, pool, PROMPTS[:1], 2, eos_token_id=3,
                    sampling=Sampling(seed=1, logit_bias=but_end)) == [[3]]  # the end token drawn, then done
    greedy = generate(model, pool, PROMPTS[:1], 2, eos_token_id=None, sampling=Sampling(temperature=0,
                                                                                        logit_bias=every))
    assert greedy == [hf_greedy(model, PROMPTS[0], 2, sequence_bias={(t,): b for t, b in every.items()})]
    pool.check_integrity()
