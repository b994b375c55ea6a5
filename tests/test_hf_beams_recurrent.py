"""Beam search over models with recurrent layers (`kvpager.hf.beams`): transformers'
hypotheses and scores (its cache reorders each layer's states by beam; here each
beam's states are gathered from its parent's and its K/V forked in the pool), a
batch the same as each prompt alone, end tokens, prompts resumed from held states,
a daemon client, a pool too small; nothing left held."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="needs transformers' cache layers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_beams import assert_a_daemon_gives_the_embedded_beams, transformers_beams  # noqa: E402
from test_hf_models import one_thread  # noqa: E402, F401 (its autouse fixture: one torch thread)
from test_hf_recurrent import assert_nothing_held, make, prompts  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import beam_search, generate, spec_for_model  # noqa: E402
from kvpager.hf.state_cache import StateCache  # noqa: E402

PROMPTS = prompts(13, 5, 22, 1, seed=2)
FAMILIES = ["qwen3_5", "jamba", "bamba", "lfm2", "falcon_h1", "zamba", "lara_mini"]


def _pool(model):
    return KVPool(spec_for_model(model, num_blocks=128, block_size=8))


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_hypotheses_and_scores(family):
    """Three beams, all returned, 7 new tokens, without and with an end token (one
    transformers' best hypothesis takes at its third step): transformers' tokens and
    scores for each prompt, in a batch and alone."""
    model = make(family)
    pool = _pool(model)
    free, _ = transformers_beams(model, PROMPTS[0], 7, 1, None, num_beams=3)
    for eos in (None, free[0][2]):
        batch = beam_search(model, pool, PROMPTS, 7, num_beams=3, num_return_sequences=3, eos_token_id=eos)
        for p, got in zip(PROMPTS, batch):
            want, scores = transformers_beams(model, p, 7, 3, eos, num_beams=3)
            assert got.tokens == want
            assert got.scores == pytest.approx(scores, abs=1e-4)
        alone = beam_search(model, pool, PROMPTS[2:3], 7, num_beams=3, num_return_sequences=3, eos_token_id=eos)[0]
        assert alone.tokens == batch[2].tokens and alone.scores == pytest.approx(batch[2].scores, abs=1e-4)
        assert_nothing_held(pool)


def test_length_penalty_and_early_stopping():
    model = make("qwen3_5")
    pool = _pool(model)
    free, _ = transformers_beams(model, PROMPTS[0], 8, 1, None, num_beams=4)
    eos = free[0][1]
    for settings in (dict(num_beams=4, length_penalty=0.5, early_stopping=True),
                     dict(num_beams=2, length_penalty=2.0, early_stopping="never")):
        got = beam_search(model, pool, PROMPTS, 8, num_return_sequences=2, eos_token_id=eos, **settings)
        for p, g in zip(PROMPTS, got):
            want, scores = transformers_beams(model, p, 8, 2, eos, **settings)
            assert g.tokens == want and g.scores == pytest.approx(scores, abs=1e-4)
    assert_nothing_held(pool)


def test_a_prompt_resumes_from_a_held_state(monkeypatch):
    """A prompt a generation ran before (its blocks cached, its state held at a block
    boundary) is prefilled from that state: fewer tokens run, the same beams."""
    from kvpager.hf import scoring_rows

    model = make("qwen3_5")
    pool = _pool(model)
    p = prompts(30, seed=7)[0]
    want = beam_search(model, pool, [p], 6, num_beams=3, eos_token_id=None)[0]
    generate(model, pool, [p], 3, eos_token_id=None)  # (its end state held: block 24 of 30 + 3 tokens)
    hits = StateCache.of(model).hits
    ran = []
    real = scoring_rows.RowPasses._pass

    def counted(runner, ids, ps, rows, parts, *args):
        ran.append(sum(b - a for a, b in parts))
        return real(runner, ids, ps, rows, parts, *args)

    monkeypatch.setattr(scoring_rows.RowPasses, "_pass", counted)
    got = beam_search(model, pool, [p], 6, num_beams=3, eos_token_id=None)[0]
    assert got.tokens == want.tokens and got.scores == pytest.approx(want.scores, abs=1e-5)
    assert StateCache.of(model).hits > hits and sum(ran) < len(p)
    assert_nothing_held(pool)


def test_generate_with_num_beams():
    model = make("jamba")
    pool = _pool(model)
    got = generate(model, pool, PROMPTS, 6, num_beams=3, eos_token_id=None)
    for p, g in zip(PROMPTS, got):
        want, _ = transformers_beams(model, p, 6, 1, None, num_beams=3)
        assert g == want[0]
    assert_nothing_held(pool)


def test_a_pool_too_small_leaves_nothing_behind():
    from kvpager.errors import OutOfBlocks

    model = make("qwen3_5")
    pool = KVPool(spec_for_model(model, num_blocks=10, block_size=8))
    with pytest.raises(OutOfBlocks):
        beam_search(model, pool, prompts(60, seed=3), 30, eos_token_id=None, num_beams=4)
    assert_nothing_held(pool)
    got = beam_search(model, pool, PROMPTS[:1], 4, eos_token_id=None, num_beams=2)  # the pool still serves
    assert got[0].tokens == transformers_beams(model, PROMPTS[0], 4, 1, None, num_beams=2)[0]


def test_through_a_daemon_client_the_embedded_beams():
    model = make("qwen3_5")
    assert_a_daemon_gives_the_embedded_beams(model, spec_for_model(model, num_blocks=128, block_size=8), PROMPTS, 6,
                                             assert_nothing_held)


@pytest.mark.parametrize("family", ["qwen3_5", "falcon_h1"])
def test_a_padded_prefill_gives_transformers_beams(family, monkeypatch):
    """The prompts prefilled in one left-padded pass (a GPU's default) as in parts
    (the CPU's): transformers' hypotheses and scores."""
    from kvpager.hf import scoring_rows

    monkeypatch.setattr(scoring_rows.RowPasses, "pad", True)
    model = make(family)
    pool = _pool(model)
    batch = beam_search(model, pool, PROMPTS, 7, num_beams=3, num_return_sequences=3, eos_token_id=None)
    for p, got in zip(PROMPTS, batch):
        want, scores = transformers_beams(model, p, 7, 3, None, num_beams=3)
        assert got.tokens == want and got.scores == pytest.approx(scores, abs=1e-4)
    assert_nothing_held(pool)
