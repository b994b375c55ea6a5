"""Scoring prompts (`kvpager.hf.score`): each token's log-probability given the
tokens before it, against the log-softmax of one plain forward pass of the same
model (transformers' own attention, no cache); in one pass, in groups and in
parts; a shared context run once and found again by a later call; sliding
windows and a soft cap; a padded batch; a daemon client; bad arguments refused
before anything is allocated."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.hf import Scores, eager, generate, score, spec_for_model  # noqa: E402

PROMPTS = [prompt(21, seed=1), prompt(5, seed=2), prompt(1, seed=3), prompt(40, seed=4), prompt(16, seed=5)]


def reference(model, p: list[int], start: int = 1) -> np.ndarray:
    """log P(p[j] | p[:j]) for j >= start, from one plain forward pass."""
    ids = torch.tensor([p])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids, attention_mask=torch.ones_like(ids)).logits[0].double(), dim=-1)
    j = torch.arange(start, len(p), dtype=torch.long)
    return lp[j - 1, torch.tensor(p, dtype=torch.long)[j]].numpy()


def _pool(model, blocks=96):
    return KVPool(spec_for_model(model, num_blocks=blocks, block_size=8))


class Counted:
    """The tokens each forward pass of `score` runs (`kvpager.hf.eager`)."""

    def __init__(self, monkeypatch):
        self.passes: list[int] = []
        real = eager.paged_forward

        def counted(model, batch, input_ids, *args):
            self.passes.append(input_ids.shape[1])
            return real(model, batch, input_ids, *args)

        monkeypatch.setattr(eager, "paged_forward", counted)


@pytest.mark.parametrize("budget", [3, 16, 4096])
def test_every_token_against_a_plain_forward_pass(budget, monkeypatch):
    """One pass (4096), groups of prompts (16) and prompts run in parts of 3 tokens."""
    model = make_model("llama")
    pool = _pool(model)
    counted = Counted(monkeypatch)
    got = score(model, pool, PROMPTS, tokens_per_pass=budget)
    for p, g in zip(PROMPTS, got):
        assert g.shape == (len(p) - 1,)
        np.testing.assert_allclose(g, reference(model, p), rtol=0, atol=2e-5)
    # 16: 21 alone in parts (16 + 5), 5 and 1 together, 40 alone (16 + 16 + 8), 16 alone
    want = {4096: [sum(map(len, PROMPTS))], 16: [16, 5, 6, 16, 16, 8, 16], 3: [len(range(b, min(b + 3, len(p))))
                                                          for p in PROMPTS for b in range(0, len(p), 3)]}
    assert counted.passes == want[budget]
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


def test_a_shared_context_runs_once_and_is_found_again(monkeypatch):
    """A multiple-choice question: a 30-token context scored with each of four
    answers (start: the context's length). Its three full blocks run once in the
    pass; a second call finds them (and the answers' blocks) committed."""
    model = make_model("llama")
    pool = _pool(model)
    context = prompt(30, seed=7)
    answers = [prompt(n, seed=20 + n) for n in (3, 6, 4, 5)]
    ps = [context + a for a in answers]
    counted = Counted(monkeypatch)
    got = score(model, pool, ps, len(context))
    for p, a, g in zip(ps, answers, got):
        assert g.shape == (len(a),)
        np.testing.assert_allclose(g, reference(model, p, len(context)), rtol=0, atol=2e-5)
    # the first prompt whole; the others from the context's last full block on (24 of its 30 tokens shared)
    assert counted.passes == [len(ps[0]) + sum(len(p) - 24 for p in ps[1:])]
    again = score(model, pool, ps, len(context))
    assert all(np.array_equal(a, b) for a, b in zip(again, got))
    # (each prompt allocated to the position before its start: 29 tokens, 3 full blocks cached)
    assert counted.passes[1] == sum(len(p) - 24 for p in ps)
    pool.check_integrity()


def test_answers_to_a_shared_context_fit_a_pass_by_the_tokens_they_run(monkeypatch):
    """The budget counts the tokens a prompt runs, not its length: four answers to a
    30-token context, 66 tokens to run (its 24 shared tokens once), fit a budget of
    70 in one pass though their lengths sum to 138; a second context's answers in the
    next. Before, a group was cut by lengths: a pass a prompt."""
    model = make_model("llama")
    pool = _pool(model)
    contexts = [prompt(30, seed=7), prompt(30, seed=8)]
    answers = [prompt(n, seed=20 + n) for n in (3, 6, 4, 5)]
    ps = [c + a for c in contexts for a in answers]
    counted = Counted(monkeypatch)
    got = score(model, pool, ps, 30, tokens_per_pass=70)
    for p, g in zip(ps, got):
        np.testing.assert_allclose(g, reference(model, p, 30), rtol=0, atol=2e-5)
    per_context = len(ps[0]) + sum(len(p) - 24 for p in ps[1:4])
    assert per_context <= 70 < sum(map(len, ps[:4]))
    assert counted.passes == [per_context, per_context]
    pool.check_integrity()


def test_a_group_the_cache_gives_less_than_counted_still_keeps_to_the_budget(monkeypatch):
    """Where a group's prompts run more tokens than its grouping counted on (blocks
    the cache dropped meanwhile; here the count is made too low), its passes are
    cut again within the budget, in order, each prompt whole or in parts."""
    from kvpager.hf import scoring

    monkeypatch.setattr(scoring, "_run_lengths", lambda prompts, starts, bs: [1] * len(prompts))
    model = make_model("llama")
    pool = _pool(model)
    counted = Counted(monkeypatch)
    got = score(model, pool, PROMPTS, tokens_per_pass=16)
    for p, g in zip(PROMPTS, got):
        np.testing.assert_allclose(g, reference(model, p), rtol=0, atol=2e-5)
    assert max(counted.passes) <= 16 and sum(counted.passes) == sum(map(len, PROMPTS))
    pool.check_integrity()


def test_the_top_tokens_and_is_greedy():
    """``top=k``: each position's k most likely tokens and theirs (the plain forward
    pass's top-k), most likely first; ``top_ids[:, 0] == tokens`` is an evaluation's
    "is greedy", true for tokens that are the model's own greedy continuation."""
    model = make_model("llama")
    pool = _pool(model)
    greedy = generate(model, pool, [PROMPTS[0]], 6, eos_token_id=None)[0]
    ps = [PROMPTS[0] + greedy, PROMPTS[3]]
    got = score(model, pool, ps, [len(PROMPTS[0]), 1], top=3, tokens_per_pass=11)
    for p, s, g in zip(ps, [len(PROMPTS[0]), 1], got):
        assert isinstance(g, Scores) and g.top_ids.shape == g.top_logprobs.shape == (len(p) - s, 3)
        np.testing.assert_allclose(g.logprobs, reference(model, p, s), rtol=0, atol=2e-5)
        ids = torch.tensor([p])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, s - 1 : len(p) - 1].double(), dim=-1)
        best, which = torch.topk(lp, 3, dim=-1)
        np.testing.assert_array_equal(g.top_ids, which.numpy())
        np.testing.assert_allclose(g.top_logprobs, best.numpy(), rtol=0, atol=2e-5)
    assert (got[0].top_ids[:, 0] == greedy).all()  # the greedy continuation: greedy everywhere
    assert not (got[1].top_ids[:, 0] == PROMPTS[3][1:]).all()  # random tokens are not


def test_starts_a_prompt_and_nothing_to_score():
    model = make_model("llama")
    pool = _pool(model)
    starts = [21, 2, 1, 17, 9]  # the first: its length, nothing scored
    got = score(model, pool, PROMPTS, np.array(starts), tokens_per_pass=12)
    assert got[0].shape == (0,) and got[2].shape == (0,)
    for p, s, g in zip(PROMPTS, starts, got):
        np.testing.assert_allclose(g, reference(model, p, s), rtol=0, atol=2e-5)
    pool.check_integrity()


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gpt_oss", "deepseek_v3", "gemma3n", "llama4"])
def test_families_attention_arguments(family):
    """Sliding windows shorter than the prompts (Mistral), with Gemma-2's soft cap and
    GPT-OSS's sinks; DeepSeek-V3's latent attention (v narrower than q and k);
    Gemma-3n's layers that attend over an earlier layer's K/V; Llama-4's chunked
    layers and queries scaled by position: in parts and in one pass."""
    model = make_model(family)
    pool = _pool(model)
    for budget in (7, 4096):
        got = score(model, pool, PROMPTS, tokens_per_pass=budget)
        for p, g in zip(PROMPTS, got):
            np.testing.assert_allclose(g, reference(model, p), rtol=0, atol=2e-5)
    pool.check_integrity()


def test_a_padded_batch_scores_each_prompts_own_tokens():
    model = make_model("llama")
    pool = _pool(model)
    ps = PROMPTS[:2]
    width = max(map(len, ps))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
    got = score(model, pool, input_ids=ids, attention_mask=mask)
    want = score(model, pool, ps)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_through_a_daemon_client_the_embedded_scores():
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    model = make_model("llama")
    spec = spec_for_model(model, num_blocks=96, block_size=8)
    want = score(model, KVPool(spec), PROMPTS, tokens_per_pass=16)
    with running_server(spec) as server, Client(server.endpoint) as pool:
        got = score(model, pool, PROMPTS, tokens_per_pass=16)
        assert pool.stats().num_sequences == 0
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(start=0), "start of prompt 0 must be an int from 1"),
    (dict(start=[1, 2, 1, 41, 1]), "start of prompt 3 .* its length 40, got 41"),
    (dict(start=[1, 2]), "one int a prompt"),
    (dict(start=1.5), "start must be an int"),
    (dict(start=[1, 1, 1, True, 1]), "start of prompt 3"),
    (dict(tokens_per_pass=0), "tokens_per_pass must be an int >= 1"),
    (dict(tokens_per_pass=2.0), "tokens_per_pass must be an int >= 1"),
    (dict(top=-1), "top must be an int from 0"),
    (dict(top=True), "top must be an int from 0"),
    (dict(top=10**6), "top must be an int from 0 to the model's vocabulary size"),
])
def test_bad_arguments_are_refused_before_anything_is_allocated(kwargs, needle):
    model = make_model("llama")
    pool = _pool(model)
    before = pool.stats()
    with pytest.raises(ValueError, match=needle):
        score(model, pool, PROMPTS, **kwargs)
    assert pool.stats() == before


def test_a_pool_too_small_leaves_nothing_behind():
    """A group that needs more blocks than the pool holds: its allocation (or append)
    fails with the pool's typed error, and what the groups before it held is back."""
    from kvpager.errors import OutOfBlocks

    model = make_model("llama")
    pool = _pool(model, blocks=4)  # 32 tokens: the 40-token prompt cannot be held
    with pytest.raises(OutOfBlocks):
        score(model, pool, PROMPTS, tokens_per_pass=16)
    assert pool.stats().num_sequences == 0
    pool.check_integrity()
    got = score(model, pool, PROMPTS[:3], tokens_per_pass=16)  # the pool still serves
    np.testing.assert_allclose(got[0], reference(model, PROMPTS[0]), rtol=0, atol=2e-5)
