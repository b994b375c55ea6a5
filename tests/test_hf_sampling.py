"""Sampled generation (`kvpager.hf.sampling`): the filters equal transformers'
warpers, the draws follow the filtered distribution of transformers' own logits
(first tokens and decode steps), and a prompt's tokens depend on its seed alone:
the same alone or in a batch, pipelined or not, prefilled in one pass or in parts.
(Penalties and biases: test_hf_sampling_penalties.py.)"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


transformers = pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt, reference  # noqa: E402, F401
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, Sampling, draws, generate, spec_for_model  # noqa: E402
from kvpager.hf.draws import uniforms  # noqa: E402


def warped(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """transformers' warpers, in the order its ``generate`` applies them."""
    scores = TemperatureLogitsWarper(s.temperature)(None, logits.clone().float())
    if s.top_k:
        scores = TopKLogitsWarper(s.top_k)(None, scores)
    if s.top_p < 1:
        scores = TopPLogitsWarper(s.top_p)(None, scores)
    if s.min_p > 0:
        scores = MinPLogitsWarper(s.min_p)(None, scores)
    return scores


def kept(logits: torch.Tensor, temperature, top_k, top_p, min_p) -> torch.Tensor:
    """bool [n, V]: what kvpager's filters keep of ``logits`` (each parameter [n]),
    and the tokens that weigh 0 (a probability under 2**-S of the most likely
    one's, never drawn) as transformers' filters take them."""
    s = draws.scores(logits.numpy(), np.asarray(temperature, np.float32))
    keep = draws.kept(s, np.asarray(top_k), np.asarray(top_p, np.float32), np.asarray(min_p, np.float32))[0]
    nothing = draws.exp_weights(s - s.max(axis=1, keepdims=True), draws.scale_bits(s.shape[1]))[1] == 0
    want = torch.isfinite(torch.stack([warped(logits[i : i + 1], Sampling(float(temperature[i]), int(top_k[i]),
                                                                             float(top_p[i]), float(min_p[i])))[0]
                                       for i in range(len(logits))])).numpy()
    return torch.from_numpy(np.where(nothing, want, keep))


def rows(s: Sampling, n: int) -> tuple[np.ndarray, ...]:
    return (np.full(n, s.temperature), np.full(n, s.top_k), np.full(n, s.top_p), np.full(n, s.min_p))


@pytest.mark.parametrize("seed", range(6))
def test_filters_keep_what_transformers_warpers_keep(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 300, generator=g) * (1 + seed)
    logits[1, 7] = logits[1, 9] = logits[1].max() + 1  # a tie at the top
    cases = [Sampling(), Sampling(temperature=0.7, top_k=40), Sampling(top_p=0.8), Sampling(top_p=0.05),
             Sampling(min_p=0.1), Sampling(temperature=1.3, top_k=100, top_p=0.9, min_p=0.02),
             Sampling(top_k=500), Sampling(top_k=1)]
    for s in cases:
        want = torch.isfinite(warped(logits, s))
        got = kept(logits, *rows(s, 4))
        if s.top_p == 0.05:
            # of two tokens tied at the top, transformers' top-p keeps whichever its unstable sort
            # puts last; kvpager keeps the lower id (as greedy takes the first most likely)
            assert want[1, [7, 9]].sum() == 1 and got[1, 7] and not got[1, 9]
            want[1, [7, 9]] = torch.tensor([True, False])
        assert torch.equal(got, want), s
    # rows of different settings in one call: each row as if alone
    mixed = [cases[1], cases[3], cases[4], cases[5]]
    got = kept(logits, *[np.array([getattr(s, f) for s in mixed]) for f in ("temperature", "top_k", "top_p", "min_p")])
    for i, s in enumerate(mixed):
        assert torch.equal(got[i], kept(logits[i : i + 1], *rows(s, 1))[0]), s


def within(counts: np.ndarray, probs: np.ndarray) -> None:
    """Each token's count within 5 standard deviations of its expectation (fixed seeds:
    deterministic), and no token of probability 0 drawn."""
    n = counts.sum()
    expected = probs * n
    assert (counts[probs == 0] == 0).all()
    assert (np.abs(counts - expected) <= 5 * np.sqrt(expected * (1 - probs)) + 1).all(), \
        np.stack([counts, expected]).T[np.abs(counts - expected) > 1]


def assert_draws_follow(outs: list[list[int]], p: list[int], reference_probs) -> None:
    """Prompt ``p``'s first tokens drawn (``outs``: its many samples of 2 tokens) follow
    ``reference_probs(p)``, and the second tokens after the most common first one follow
    ``reference_probs(p + [that token]``)."""
    first = np.array([o[0] for o in outs])
    want = reference_probs(p)
    assert (want > 0).sum() >= 5  # a distribution worth testing
    within(np.bincount(first, minlength=len(want)), want)
    top = np.bincount(first).argmax()
    second = np.array([o[1] for o in outs if o[0] == top])
    assert len(second) > 300  # enough draws to tell a distribution
    within(np.bincount(second, minlength=len(want)), reference_probs(p + [int(top)]))


def _draw(logits: np.ndarray, u: np.ndarray) -> np.ndarray:
    n = len(u)
    return draws.sample(np.broadcast_to(logits, (n, len(logits))).astype(np.float32), np.ones(n), np.zeros(n, int),
                        np.ones(n), np.zeros(n), np.zeros(n, bool), u)


def test_draws_follow_the_distribution():
    probs = np.array([0.5, 0.0, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    n = 20000
    with np.errstate(divide="ignore"):
        logits = np.log(probs)
    u = uniforms(np.full(n, 11, np.uint64), np.arange(n))
    within(np.bincount(_draw(logits, u), minlength=len(probs)), probs)
    # seeds apart, the same draw index
    u = uniforms(np.arange(n, dtype=np.uint64), np.zeros(n, np.int64))
    within(np.bincount(_draw(logits, u), minlength=7), probs)
    assert u.min() >= 0 and u.max() < 1


@pytest.mark.parametrize("s", [Sampling(temperature=1.5, top_k=20, top_p=0.95),
                               Sampling(temperature=1.2, top_p=0.9, min_p=0.02)],
                         ids=["top-k", "no-top-k"])
def test_sampled_first_and_second_tokens_follow_transformers_distribution(s):
    """4,000 prompts alike, each its own seed (one forward pass: they share their
    blocks): the first tokens drawn follow transformers' warped softmax of its own
    logits, and the second tokens after the most common first one (a decode step)
    follow its distribution after that token."""
    model = make_model("llama")
    p = prompt(21, seed=3)
    n = 4000
    pool = KVPool(spec_for_model(model, num_blocks=n + 64, block_size=8))
    outs = generate(model, pool, [p] * n, 2, eos_token_id=None,
                    sampling=[Sampling(s.temperature, s.top_k, s.top_p, s.min_p, seed=i) for i in range(n)])

    def reference_probs(tokens: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[:, -1]
        return warped(logits, s).softmax(-1)[0].double().numpy()

    assert_draws_follow(outs, p, reference_probs)
    pool.check_integrity()


def test_a_prompts_tokens_depend_on_its_seed_alone():
    """The same prompt and seed: the same tokens alone, in a batch of others (in
    any order), pipelined or not; another seed, other tokens."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=160, block_size=8))
    ps = [prompt(n, seed=40 + n) for n in (5, 17, 30, 9)]
    ss = [Sampling(temperature=1.2, top_p=0.9, seed=100 + i) for i in range(4)]
    alone = [generate(model, pool, [p], 12, sampling=[s])[0] for p, s in zip(ps, ss)]
    assert generate(model, pool, ps, 12, sampling=ss) == alone
    assert generate(model, pool, ps, 12, sampling=ss, pipeline=False) == alone
    assert generate(model, pool, ps[::-1], 12, sampling=ss[::-1]) == alone[::-1]
    other = generate(model, pool, ps, 12, sampling=[Sampling(temperature=1.2, top_p=0.9, seed=7)] * 4)
    assert other != alone
    # rows of a top-k beside a row without one: the same tokens as alone
    topk = [Sampling(temperature=1.2, top_k=30, top_p=0.9, seed=300 + i) for i in range(3)]
    alone_k = [generate(model, pool, [p], 12, sampling=[s])[0] for p, s in zip(ps, topk)]
    assert generate(model, pool, ps, 12, sampling=topk + [ss[3]]) == alone_k + [alone[3]]
    assert len({tuple(o) for o in alone}) == 4
    pool.check_integrity()


def test_greedy_settings_and_greedy_rows_give_greedy_tokens():
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    ps = [prompt(20, seed=1), prompt(9, seed=2)]
    want = [reference(model, p, 10) for p in ps]
    assert generate(model, pool, ps, 10, sampling=Sampling(temperature=0)) == want
    assert generate(model, pool, ps, 10, sampling=Sampling(top_k=1, seed=5)) == want
    mixed = generate(model, pool, ps, 10, sampling=[None, Sampling(temperature=2.0, seed=3)])
    assert mixed[0] == want[0] and mixed[1] != want[1]


def test_unseeded_sampling_follows_torch_manual_seed():
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    ps = [prompt(20, seed=1), prompt(20, seed=1)]
    torch.manual_seed(5)
    a = generate(model, pool, ps, 10, sampling=Sampling(temperature=1.5))
    torch.manual_seed(5)
    assert generate(model, pool, ps, 10, sampling=Sampling(temperature=1.5)) == a
    assert a[0] != a[1]  # one prompt twice: two seeds, two samples


def test_an_end_token_ends_a_sampled_sequence():
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    p = prompt(20, seed=1)
    s = Sampling(temperature=1.5, seed=9)
    free = generate(model, pool, [p], 12, sampling=s, eos_token_id=None)[0]
    eos = free[4]
    assert generate(model, pool, [p], 12, sampling=s, eos_token_id=eos)[0] == free[: free.index(eos) + 1]
    assert pool.stats().num_sequences == 0


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(temperature=float("nan")), dict(temperature="1"), dict(top_k=-1), dict(top_k=2.5),
    dict(top_p=0), dict(top_p=1.5), dict(min_p=-0.1), dict(min_p=2), dict(seed=-1), dict(seed=1 << 64),
    dict(seed=1.5), dict(top_p=True), dict(repetition_penalty=0), dict(repetition_penalty=float("inf")),
    dict(presence_penalty=float("nan")), dict(frequency_penalty="1"),
    # (they apply in float32, where these are inf or 0: every logit inf or NaN, another token than asked)
    dict(frequency_penalty=1e39), dict(presence_penalty=-1e39), dict(repetition_penalty=1e-40),
    dict(repetition_penalty=1e39),
])
def test_bad_settings_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Sampling(**bad)


@pytest.mark.parametrize("setting", [dict(temperature=1e-50), dict(temperature=1e-6), dict(top_p=1e-46),
                                     dict(temperature=0.8, top_p=1e-40)])
def test_settings_float32_rounds_to_nothing_give_the_greedy_tokens(setting):
    """A temperature below `GREEDY_BELOW` is greedy (before, 1e-50 divided the float32
    logits to inf and gave token 0); a top-p float32 rounds to 0 keeps the most likely
    token (before: an IndexError after the prompts were allocated)."""
    from kvpager.hf.sampling import GREEDY_BELOW

    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    p = prompt(10, seed=1)
    greedy = generate(model, pool, [p], 4, eos_token_id=None)[0]
    assert generate(model, pool, [p], 4, eos_token_id=None, sampling=Sampling(seed=3, **setting))[0] == greedy
    assert Sampling(temperature=GREEDY_BELOW / 2).greedy and not Sampling(temperature=GREEDY_BELOW).greedy
    assert pool.stats().num_sequences == 0


@pytest.mark.parametrize("bad", ["greedy", 0.7, [Sampling()], [Sampling(), 3], {"temperature": 1.0}])
def test_bad_sampling_arguments_are_refused_before_anything_is_allocated(bad):
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    with pytest.raises(ValueError, match="sampling"):
        PagedGeneration(model, pool, [prompt(9, 1), prompt(9, 2)], 4, sampling=bad)
    stats = pool.stats()
    assert stats.num_sequences == 0 and stats.used_blocks == 0
    pool.check_integrity()


def test_the_models_generation_config():
    model = make_model("llama")
    assert Sampling.from_model(model) is None  # greedy
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.6
    model.generation_config.top_p = 0.9
    assert Sampling.from_model(model, seed=4) == Sampling(temperature=0.6, top_k=50, top_p=0.9, seed=4)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    torch.manual_seed(1)
    a = generate(model, pool, [prompt(9, 1)], 8, sampling="model")
    torch.manual_seed(1)
    assert generate(model, pool, [prompt(9, 1)], 8, sampling=Sampling(temperature=0.6, top_k=50, top_p=0.9)) == a
    model.generation_config.repetition_penalty = 1.2
    assert Sampling.from_model(model).repetition_penalty == 1.2
    model.generation_config.typical_p = 0.5
    with pytest.raises(ValueError, match="typical_p"):
        Sampling.from_model(model)
    model.generation_config.do_sample = False  # greedy with a penalty: a greedy Sampling of it
    assert Sampling.from_model(model) == Sampling(temperature=0, repetition_penalty=1.2)
    model.generation_config.repetition_penalty = None
    assert Sampling.from_model(model) is None


@pytest.mark.parametrize("name, value", [("no_repeat_ngram_size", 2), ("guidance_scale", 1.5),
                                         ("encoder_repetition_penalty", 1.3), ("encoder_no_repeat_ngram_size", 2),
                                         ("watermarking_config", {"greenlist_ratio": 0.25})])
@pytest.mark.parametrize("how", ["greedy", "sampled", "beams"])
def test_a_processor_of_the_generation_config_is_refused_by_name_not_left_out(name, value, how):
    """``sampling="model"``: transformers applies these in greedy decoding and
    beam search too (an n-gram ban changes its greedy tokens); the greedy and
    beam paths returned before the refusals and generated as if the setting
    were not there."""

    model = make_model("llama")
    config = model.generation_config
    setattr(config, name, value)
    if how == "sampled":
        config.do_sample = True
    elif how == "beams":
        config.num_beams = 3
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    with pytest.raises(ValueError, match=name):
        generate(model, pool, [prompt(9, 1)], 8, sampling="model")
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    generate(model, pool, [prompt(9, 1)], 8)  # (greedy by default: the config is not read)


def test_a_recurrent_models_sampled_tokens_depend_on_its_seed_alone(monkeypatch):
    """A model with recurrent layers (Qwen3.5's layout): prompts of distinct lengths
    prefilled in parts and left-padded in one pass, alone and in a batch: the same
    tokens from the same seeds."""
    pytest.importorskip("transformers.cache_utils")
    from test_hf_recurrent import make, prompts

    from kvpager.hf.recurrent import Recurrent

    model = make("qwen3_5")
    ps = prompts(9, 7, 40, 16)
    ss = [Sampling(temperature=1.3, top_k=30, seed=i) for i in range(4)]
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    alone = [generate(model, pool, [p], 6, sampling=[s], eos_token_id=None)[0] for p, s in zip(ps, ss)]
    for pad in (False, True):
        monkeypatch.setattr(Recurrent, "pad_prompts", pad)
        assert generate(model, pool, ps, 6, sampling=ss, eos_token_id=None) == alone
    assert len({tuple(a) for a in alone}) == 4
    pool.check_integrity()


def test_through_a_daemon_client_the_same_tokens_as_embedded():
    """A worker on a daemon `Client` (its decode pipelined, its calls batched) draws the
    tokens an embedded pool's generation draws from the same seeds."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    model = make_model("llama")
    ps = [prompt(30, seed=10), prompt(17, seed=11), prompt(3, seed=12)]
    ss = [Sampling(temperature=1.1, top_k=40, seed=21), Sampling(top_p=0.8, seed=22), None]
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    want = generate(model, KVPool(spec), ps, 10, sampling=ss)
    with running_server(spec) as server, Client(server.endpoint) as pool:
        assert generate(model, pool, ps, 10, sampling=ss) == want
        assert pool.stats().num_sequences == 0
    assert want[2] == reference(model, ps[2], 10)  # the greedy row
