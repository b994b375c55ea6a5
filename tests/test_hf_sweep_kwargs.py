"""`kvpager.hf.generate` called as transformers' ``model.generate`` is called: the
generation config's settings and the beam options, against transformers' own
``generate`` on the same tiny model (its greedy tokens), and nothing left held."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402

PROMPTS = [prompt(21, seed=1), prompt(5, seed=2), prompt(16, seed=3)]


def _pool(model):
    return KVPool(spec_for_model(model, num_blocks=64, block_size=8))


def hf_generate(model, n: int, **kwargs) -> list[list[int]]:
    """transformers' ``generate`` of each prompt alone, its generation config as it is
    unless ``kwargs`` say otherwise."""
    out = []
    for p in PROMPTS:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=n, **kwargs)
        out.append(ids[0, len(p) :].tolist())
    return out


def _nothing_held(pool) -> None:
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


@pytest.mark.parametrize("where", ["config", "call"])
def test_a_configs_bad_word_that_is_an_end_token_is_not_banned(where):
    """transformers' ``NoBadWordsLogitsProcessor`` leaves out a banned word that is one
    of the generation's end tokens (the config's, or the call's), so the end token still
    ends the generation; kvpager banned it, and gave other tokens without a word."""
    model = make_model("llama")
    pool = _pool(model)
    first = generate(model, pool, PROMPTS, 8, eos_token_id=None)
    eos, other = first[0][0], first[1][0]
    config = model.generation_config
    config.bad_words_ids = [[eos], [other]]
    call = {}
    if where == "config":
        config.eos_token_id = eos
    else:
        call = dict(eos_token_id=eos)
    want = hf_generate(model, 8, **call)
    assert want[0] == [eos]  # (the end token is the first prompt's first token: it ends at once)
    assert generate(model, pool, PROMPTS, 8, sampling="model", **call) == want
    _nothing_held(pool)


@pytest.mark.parametrize("options", [dict(length_penalty=2.0, early_stopping="never"),
                                     dict(early_stopping="never"), dict(length_penalty=0.5, early_stopping=True)])
def test_beam_options_without_beams_change_no_token_as_in_transformers(options):
    """``length_penalty`` and ``early_stopping`` are beam-search settings: transformers'
    ``generate`` with one beam is greedy whatever they say. kvpager ran a search of one
    beam, which with ``early_stopping="never"`` runs past an end token."""
    model = make_model("llama")
    pool = _pool(model)
    eos = generate(model, pool, PROMPTS, 8, eos_token_id=None)[0][0]
    want = hf_generate(model, 8, do_sample=False, eos_token_id=eos, **options)
    assert want == hf_generate(model, 8, do_sample=False, eos_token_id=eos)
    assert generate(model, pool, PROMPTS, 8, eos_token_id=eos, **options) == want
    with pytest.raises(InvalidArgument, match="early_stopping must be"):  # (transformers refuses it too)
        generate(model, pool, PROMPTS, 8, eos_token_id=eos, early_stopping="sometimes")
    _nothing_held(pool)


def test_beam_options_without_beams_leave_a_configs_sampling_as_it_is():
    """A sampling config with a ``length_penalty`` in the call: transformers samples (one
    beam); kvpager refused it as a beam search of one beam given a sampling."""
    model = make_model("llama")
    pool = _pool(model)
    model.generation_config.do_sample, model.generation_config.top_k = True, 1  # (top-k 1: greedy)
    want = hf_generate(model, 8, length_penalty=1.5)
    assert generate(model, pool, PROMPTS, 8, sampling="model", length_penalty=1.5) == want
    _nothing_held(pool)


def test_the_calls_num_beams_and_beam_options_override_the_configs():
    """As in transformers, a call's ``num_beams=1`` overrides a config's beam search
    (greedy; kvpager ran the config's beams), and a call's ``length_penalty`` replaces
    the config's in its beam search (kvpager ran one beam, refused with a sampling)."""
    model = make_model("llama")
    pool = _pool(model)
    model.generation_config.num_beams = 3
    want = hf_generate(model, 8, num_beams=1)
    assert want != hf_generate(model, 8)  # (the config's beams give other tokens)
    assert generate(model, pool, PROMPTS, 8, sampling="model", num_beams=1) == want
    assert generate(model, pool, PROMPTS, 8, sampling="model", length_penalty=-1.0, early_stopping=True) == \
        hf_generate(model, 8, length_penalty=-1.0, early_stopping=True)
    _nothing_held(pool)
