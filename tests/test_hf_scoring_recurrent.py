"""Scoring the prompts of models with recurrent layers (`kvpager.hf.scoring_rows`):
each token's log-probability against the log-softmax of one plain forward pass
of the same model (transformers' own layers and cache); prompts as rows, in
parts, from held states; a multiple-choice context run once in a call and
resumed by the next; a model that cannot continue from held states run whole;
a daemon client; failures leave nothing held."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="needs transformers' cache layers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_models import one_thread  # noqa: E402, F401 (its autouse fixture: one torch thread)
from test_hf_recurrent import FAMILIES, SMALL, assert_nothing_held, drawn, make, prompts  # noqa: E402
from test_hf_scoring import reference  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import Scores, score, spec_for_model  # noqa: E402
from kvpager.hf import scoring_rows as rows_module  # noqa: E402
from kvpager.hf.state_cache import StateCache  # noqa: E402

#: (the state-space scans of Jamba / Bamba / Falcon-H1 sum in another order over parts than whole)
ATOL = 5e-4
CONTEXT = prompts(27, seed=3)[0]
#: three answers to one context (starting at the context's end), and two prompts scored whole
PROMPTS = [CONTEXT + a for a in prompts(5, 3, 9, seed=4)] + prompts(40, 1, seed=5)
STARTS = [len(CONTEXT)] * 3 + [1, 1]


class Counted:
    """The tokens each pass of the recurrent scorer runs."""

    def __init__(self, monkeypatch):
        self.passes: list[int] = []
        real = rows_module.RowPasses._pass

        def counted(runner, ids, prompts, rows, parts, *args):
            self.passes.append(sum(b - a for a, b in parts))
            return real(runner, ids, prompts, rows, parts, *args)

        monkeypatch.setattr(rows_module.RowPasses, "_pass", counted)


def _pool(model, blocks=64):
    return KVPool(spec_for_model(model, num_blocks=blocks, block_size=8))


def assert_scores(model, got, ps=PROMPTS, starts=STARTS):
    assert len(got) == len(ps)
    for g, p, s in zip(got, ps, starts):
        assert g.shape == (len(p) - s,)
        np.testing.assert_allclose(g, reference(model, p, s), rtol=0, atol=ATOL)


@pytest.mark.parametrize("pad", [None, True], ids=["default", "padded"])
@pytest.mark.parametrize("budget", [8, 2048])
@pytest.mark.parametrize("family", ["qwen3_5", "jamba", "bamba", "lfm2", "falcon_h1", "zamba", "lara_mini"])
def test_every_token_against_a_plain_forward_pass(family, budget, pad, monkeypatch):
    """Every family kind (linear attention, Mamba, short convolutions, attention beside
    a mixer, a shared attention block, sliding layers), in one group and a prompt a group
    (the 40-token prompt in parts of 8, where the model continues); the prompts from no
    state in parts (the CPU's default) and left-padded in one pass (a GPU's); twice (the
    second call from the states the first held); nothing left held."""
    monkeypatch.setattr(rows_module.RowPasses, "pad", pad)
    model = make(family)
    pool = _pool(model)
    for _ in range(2):
        assert_scores(model, score(model, pool, PROMPTS, STARTS, tokens_per_pass=budget))
        assert_nothing_held(pool)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trained_against_a_plain_forward_pass(family):
    """Every family with its built-in constants moved as training moves them (`drawn`):
    prompts in parts of 8 tokens, each part from the states the one before left (where
    the model continues: `CONTINUING`), give a plain forward pass's log-probabilities.
    Jamba's did not: transformers scans its several tokens from a zero state whatever
    the cache holds, which its built zero convolution bias had hidden (0.03 off, no
    error); it now runs each prompt whole, as Zamba does."""
    model = drawn(make(family))
    pool = _pool(model)
    assert_scores(model, score(model, pool, PROMPTS, STARTS, tokens_per_pass=8))
    assert_nothing_held(pool)


def test_a_multiple_choice_context_runs_once_and_is_found_again(monkeypatch):
    """Three answers to one 27-token context in one call: the first runs the context to
    its last block boundary before the answers (24), its state held and its blocks
    published there; the other two are allocated over those blocks and resume from that
    state. A later call with a fourth answer runs only from there."""
    model = make("qwen3_5")
    pool = _pool(model)
    store = StateCache.of(model)
    counted = Counted(monkeypatch)
    ps, starts = PROMPTS[:3], STARTS[:3]
    assert_scores(model, score(model, pool, ps, starts), ps, starts)
    assert sum(counted.passes) == 24 + sum(len(p) - 24 for p in ps)  # (the context's 24 tokens once)
    assert store.hits >= 2
    counted.passes.clear()
    more = CONTEXT + prompts(6, seed=9)[0]
    assert_scores(model, score(model, pool, [more], len(CONTEXT)), [more], [len(CONTEXT)])
    assert sum(counted.passes) == len(more) - 24
    assert_nothing_held(pool)


def test_answers_to_a_context_share_passes_within_the_budget(monkeypatch):
    """The budget counts the tokens a prompt runs: three answers to the 27-token
    context run 32 + 6 + 12 = 50 tokens (lengths 98), so a budget of 60 takes them in
    one call's waves, the answers' rows side by side in the same passes. Before, each
    went alone (lengths over the budget), a row a pass."""
    model = make("qwen3_5")
    pool = _pool(model)
    rows: list[int] = []
    real = rows_module.RowPasses._pass

    def counted(runner, ids, prompts, group, parts, *args):
        rows.append(len(group))
        return real(runner, ids, prompts, group, parts, *args)

    monkeypatch.setattr(rows_module.RowPasses, "_pass", counted)
    ps, starts = PROMPTS[:3], STARTS[:3]
    assert_scores(model, score(model, pool, ps, starts, tokens_per_pass=60), ps, starts)
    assert max(rows) == 3
    assert_nothing_held(pool)


@pytest.mark.parametrize("pad", [None, True], ids=["parts", "padded"])
def test_every_pass_keeps_to_the_budget_whatever_the_grouping_counted_on(pad, monkeypatch):
    """Where a group's rows run more than its grouping counted on (a held state the
    cache dropped; here the count is made too low: the whole call one group), each
    pass is still cut to the budget, padding included: rows in chunks, a shared
    length in parts of the budget, each row's parts in order."""
    from kvpager.hf import scoring

    monkeypatch.setattr(rows_module.RowPasses, "pad", pad)
    monkeypatch.setattr(scoring, "_run_lengths", lambda prompts, starts, bs: [1] * len(prompts))
    model = make("qwen3_5")
    pool = _pool(model)
    widths: list[int] = []
    real = rows_module.RowPasses._pass

    def counted(runner, ids, prompts, group, parts, *args):
        widths.append(len(group) * max(b - a for a, b in parts))  # (padded to the longest)
        return real(runner, ids, prompts, group, parts, *args)

    monkeypatch.setattr(rows_module.RowPasses, "_pass", counted)
    assert_scores(model, score(model, pool, PROMPTS, STARTS, tokens_per_pass=12))
    assert max(widths) <= 12
    assert_nothing_held(pool)


def test_a_preamble_shared_by_several_contexts_runs_once(monkeypatch):
    """Two levels: a 16-token preamble shared by two questions, each with an 11-token
    context and two answers. The preamble runs once (the first prompt stops where the
    second question parts from it), each question's context once to its hold point
    (24), each answer from there: waves of the call, each prompt allocated over the
    blocks of the one it resumes from."""
    model = make("bamba")
    pool = _pool(model)
    counted = Counted(monkeypatch)
    pre = prompts(16, seed=31)[0]
    ps = [pre + c + a for c in prompts(11, 11, seed=32) for a in prompts(4, 7, seed=33)]
    starts = [27] * 4
    assert_scores(model, score(model, pool, ps, starts), ps, starts)
    assert sum(counted.passes) == 16 + 2 * 8 + sum(len(p) - 24 for p in ps)
    assert pool.stats().prefix_hit_tokens == 16 + 2 * 24  # (allocated over the blocks of those before)
    assert_nothing_held(pool)


def test_without_held_states_every_prompt_runs_whole(monkeypatch):
    """A state cache of no bytes holds nothing: each prompt runs from its first token
    (its cached blocks read, not written), the scores the same."""
    model = make("qwen3_5")
    StateCache.of(model).max_bytes = 0
    pool = _pool(model)
    counted = Counted(monkeypatch)
    assert_scores(model, score(model, pool, PROMPTS, STARTS))
    assert_scores(model, score(model, pool, PROMPTS, STARTS))
    assert sum(counted.passes) == 2 * sum(map(len, PROMPTS))
    assert_nothing_held(pool)


def test_a_model_that_does_not_continue_runs_each_prompt_whole(monkeypatch):
    """Zamba's layers cannot continue a pass from held states: each prompt runs whole,
    from its first token, in one pass whatever ``tokens_per_pass`` says."""
    model = make("zamba")
    pool = _pool(model)
    counted = Counted(monkeypatch)
    assert_scores(model, score(model, pool, PROMPTS, STARTS, tokens_per_pass=8))
    assert sorted(counted.passes) == sorted(map(len, PROMPTS))
    assert_nothing_held(pool)


def test_the_top_tokens():
    model = make("jamba")
    pool = _pool(model)
    got = score(model, pool, PROMPTS[:2], 1, top=4)
    for s, p in zip(got, PROMPTS[:2]):
        assert isinstance(s, Scores) and s.top_ids.shape == (len(p) - 1, 4)
        ids = torch.tensor([p])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)[:-1]
        want = lp.topk(4, dim=-1)
        np.testing.assert_array_equal(s.top_ids, want.indices.numpy())
        np.testing.assert_allclose(s.top_logprobs, want.values.numpy(), rtol=0, atol=ATOL)
        np.testing.assert_allclose(s.logprobs, reference(model, p), rtol=0, atol=ATOL)
    assert_nothing_held(pool)


def test_a_failing_pass_leaves_nothing_behind(monkeypatch):
    """A pass that fails part-way (the second, after the leaders' blocks were
    committed and the followers allocated): its error comes out, every sequence of
    the call is freed, and the pool serves the next call."""
    model = make("qwen3_5")
    pool = _pool(model)
    real = rows_module.RowPasses._pass
    calls = []

    def failing(scorer, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a pass failed")
        return real(scorer, *args)

    monkeypatch.setattr(rows_module.RowPasses, "_pass", failing)
    with pytest.raises(RuntimeError, match="a pass failed"):
        score(model, pool, PROMPTS[:3], STARTS[:3])
    assert_nothing_held(pool)
    monkeypatch.setattr(rows_module.RowPasses, "_pass", real)
    assert_scores(model, score(model, pool, PROMPTS, STARTS))


def test_states_outside_the_cache_are_refused_with_nothing_held():
    """RecurrentGemma keeps its states in its own modules: refused at its first pass
    (as generation refuses it), nothing left held."""
    config = transformers.RecurrentGemmaConfig(**SMALL, num_hidden_layers=3, attention_window_size=16, lru_width=64)
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaForCausalLM(config).eval()
    pool = _pool(model)
    with pytest.raises(ValueError, match="keep their states outside transformers' cache"):
        score(model, pool, PROMPTS[:3], STARTS[:3])
    assert_nothing_held(pool)


def test_through_a_daemon_client_the_embedded_scores():
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    model = make("qwen3_5")
    spec = spec_for_model(model, num_blocks=64, block_size=8)
    want = score(model, KVPool(spec), PROMPTS, STARTS, tokens_per_pass=16)
    StateCache.of(model).clear()
    with running_server(spec) as server, Client(server.endpoint) as pool:
        for _ in range(2):  # (the second from the states the first held)
            got = score(model, pool, PROMPTS, STARTS, tokens_per_pass=16)
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert_nothing_held(pool)


def test_a_generations_answer_is_scored_over_its_blocks(monkeypatch):
    """A reference model's log-probabilities of generated answers: scoring finds the
    generation's blocks (the same salt), runs the prompt to its last block boundary
    before the answer (its logits from there on are needed) and holds the state
    there, so the next answer to the same prompt runs only from there."""
    from kvpager.hf import generate

    model = make("qwen3_5")
    pool = _pool(model)
    [answer] = generate(model, pool, [CONTEXT], 9, eos_token_id=None)  # (36 tokens: 4 blocks cached)
    hit = pool.stats().prefix_hit_tokens
    store = StateCache.of(model)
    counted = Counted(monkeypatch)
    p = CONTEXT + answer
    assert_scores(model, score(model, pool, [p], len(CONTEXT)), [p], [len(CONTEXT)])
    assert pool.stats().prefix_hit_tokens == hit + 32  # the generation's blocks found
    assert sum(counted.passes) == len(p)  # (no state held before the answer: from the first token, read only)
    hits = store.hits
    counted.passes.clear()
    other = CONTEXT + answer[:2] + prompts(5, seed=21)[0]
    assert_scores(model, score(model, pool, [other], len(CONTEXT)), [other], [len(CONTEXT)])
    assert store.hits == hits + 1 and sum(counted.passes) == len(other) - 24
    assert_nothing_held(pool)


def test_a_pool_too_small_for_the_later_waves_leaves_nothing_behind():
    """The first answer of a context fits the pool; the others, allocated after it ran
    to the context's hold point, do not: the pool's typed error, every sequence of the
    call freed (the first's too), and the pool serves the next call."""
    from kvpager.errors import OutOfBlocks

    model = make("qwen3_5")
    pool = _pool(model, blocks=8)  # 64 tokens: one 36-token prompt, not two more beside it
    ctx = prompts(30, seed=41)[0]
    ps = [ctx + a for a in prompts(6, 9, 12, seed=42)]
    with pytest.raises(OutOfBlocks):
        score(model, pool, ps, len(ctx))
    assert_nothing_held(pool)
    assert_scores(model, score(model, pool, ps[:1], len(ctx)), ps[:1], [len(ctx)])
    assert_nothing_held(pool)
