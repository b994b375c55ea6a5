"""`kvpager.hf.generate` called as transformers' ``model.generate`` is called: the
generation config's settings and the beam options, against transformers' own
``generate`` on the same tiny model (its greedy tokens), and nothing left held."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import make_model, one_thread, prompt  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.hf import Sampling, generate, spec_for_model  # noqa: E402

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


def test_the_calls_one_beam_overrides_a_sampling_configs_beams():
    """A sampling config of 3 beams, the call's ``num_beams=1``: transformers samples
    with one beam; kvpager refused the config's num_beams=3 as sampled beams."""
    model = make_model("llama")
    pool = _pool(model)
    config = model.generation_config
    config.do_sample, config.top_k, config.num_beams = True, 1, 3  # (top-k 1: the draws are greedy)
    want = hf_generate(model, 8, num_beams=1)
    assert generate(model, pool, PROMPTS, 8, sampling="model", num_beams=1) == want
    with pytest.raises(InvalidArgument, match="num_beams=3"):  # (without the call's, still refused by name)
        generate(model, pool, PROMPTS, 8, sampling="model")
    _nothing_held(pool)


def test_the_calls_num_beams_runs_a_beam_search_on_a_greedy_config():
    """``sampling="model"`` with the call's ``num_beams=4`` on a plain greedy config:
    transformers runs a 4-beam search; kvpager refused it ("takes no sampling"), the
    config's greedy reading being no sampling at all. A ``num_beams`` spelled as a
    NumPy integer or a 0-d tensor is the same count."""
    model = make_model("llama")
    pool = _pool(model)
    want = hf_generate(model, 8, num_beams=4, do_sample=False)
    assert want != hf_generate(model, 8)  # (the beams give other tokens than greedy here)
    for beams in (4, np.int64(4), torch.tensor(4)):
        assert generate(model, pool, PROMPTS, 8, sampling="model", num_beams=beams) == want
    # the config's own beam options apply to the call's beams, as in transformers
    model.generation_config.length_penalty, model.generation_config.early_stopping = -1.0, True
    want = hf_generate(model, 8, num_beams=3, do_sample=False)
    assert generate(model, pool, PROMPTS, 8, sampling="model", num_beams=3) == want
    _nothing_held(pool)


@pytest.mark.parametrize("setting, needle", [
    (dict(repetition_penalty=1.3), "repetition_penalty=1.3"),
    (dict(sequence_bias={(5,): 2.0}), "sequence_bias"),
    (dict(suppress_tokens=[7]), "suppress_tokens"),
    (dict(min_new_tokens=2), "min_new_tokens=2"),
    (dict(do_sample=True), "do_sample"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
])
def test_the_calls_beams_refuse_by_name_what_the_config_asks_besides(setting, needle):
    """A greedy config that asks for what kvpager's beams do not apply (a penalty, a
    bias, ``min_new_tokens``), or a sampling one (beam sampling), with the call's
    ``num_beams=4``: refused, naming the setting, before anything is allocated."""
    model = make_model("llama")
    pool = _pool(model)
    eos = generate(model, pool, PROMPTS, 2, eos_token_id=None)[0][0]
    model.generation_config.eos_token_id = eos  # (min_new_tokens holds an end token off)
    for name, value in setting.items():
        setattr(model.generation_config, name, value)
    with pytest.raises(InvalidArgument, match=needle):
        generate(model, pool, PROMPTS, 8, sampling="model", num_beams=4)
    _nothing_held(pool)


NUMPY_FLOATS = [np.float16, np.float32, np.float64, lambda v: torch.tensor(v), lambda v: torch.tensor(v).double()]


@pytest.mark.parametrize("spell", NUMPY_FLOATS)
def test_sampling_takes_numpy_and_0d_tensor_numbers(spell):
    """``Sampling(temperature=np.float32(0.7))``: a NumPy floating scalar or a 0-d float
    tensor is a number (a config or an array hands them out); kvpager refused all but
    float64, a float subclass. Integers: NumPy integers and 0-d integer tensors. The
    tokens are those of the same settings as Python numbers (as float32 holds them)."""
    model = make_model("llama")
    pool = _pool(model)
    given = dict(temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.25, presence_penalty=0.5,
                 frequency_penalty=0.25)
    spelled = Sampling(**{k: spell(v) for k, v in given.items()}, top_k=np.int32(20), seed=torch.tensor(7),
                       min_tokens=np.uint8(1), logit_bias={np.int64(3): spell(1.5)})
    plain = Sampling(**{k: float(spell(v)) for k, v in given.items()}, top_k=20, seed=7, min_tokens=1,
                     logit_bias={3: float(spell(1.5))})
    assert spelled == plain and all(type(getattr(spelled, k)) is float for k in given)
    assert generate(model, pool, PROMPTS, 8, sampling=spelled) == generate(model, pool, PROMPTS, 8, sampling=plain)
    for bad in (dict(top_k=np.bool_(True)), dict(temperature=torch.tensor(True)), dict(top_k=np.float32(2.0)),
                dict(temperature=torch.tensor([0.7])), dict(temperature=np.complex64(1))):
        with pytest.raises(InvalidArgument, match=next(iter(bad))):
            Sampling(**bad)
    _nothing_held(pool)


@pytest.mark.parametrize("spell", [np.int64, np.int32, torch.tensor, np.array])
def test_eos_and_max_new_tokens_as_numpy_integers_or_0d_tensors(spell):
    """A tokenizer's ``eos_token_id`` or a count given as a 0-d tensor or array: kvpager
    refused them ("must be None, a token id or a list of them, got tensor(5)"); they
    are the int they hold, as transformers takes them."""
    model = make_model("llama")
    pool = _pool(model)
    eos = generate(model, pool, PROMPTS, 3, eos_token_id=None)[1][2]
    want = hf_generate(model, 6, eos_token_id=int(eos))
    assert generate(model, pool, PROMPTS, spell(6), eos_token_id=spell(eos)) == want
    assert generate(model, pool, PROMPTS, spell(6), eos_token_id=[spell(eos)]) == want
    assert generate(model, pool, PROMPTS, spell(6), eos_token_id=spell(eos), num_beams=spell(2)) == \
        hf_generate(model, 6, eos_token_id=int(eos), num_beams=2, do_sample=False)
    with pytest.raises(InvalidArgument, match=r"max_new_tokens must be an int >= 1, got .*float"):
        generate(model, pool, PROMPTS, torch.tensor(6.0))
    with pytest.raises(InvalidArgument, match=r"eos_token_id must be None, a token id .*got .*bool"):
        generate(model, pool, PROMPTS, 6, eos_token_id=torch.tensor(True))
    _nothing_held(pool)


@pytest.mark.parametrize("prompts, kind", [
    ([set(PROMPTS[0])], "set"), ([frozenset(PROMPTS[0])], "frozenset"),
    ([dict.fromkeys(PROMPTS[0]).keys()], "dict_keys"), ([dict.fromkeys(PROMPTS[0])], "dict"),
    ({tuple(p) for p in PROMPTS}, "set"), (dict.fromkeys(tuple(p) for p in PROMPTS).keys(), "dict_keys"),
])
@pytest.mark.parametrize("beams", [None, 2])
def test_unordered_prompts_are_refused_naming_their_type(prompts, kind, beams):
    """A prompt (or the prompts) given as a set or a dict's keys: kvpager took them in
    their iteration order (a set's: no prompt's, its repeated tokens gone). Refused
    with InvalidArgument naming the type; a generator, in order, is taken."""
    model = make_model("llama")
    pool = _pool(model)
    with pytest.raises(InvalidArgument, match=rf"\b{kind}\b"):
        generate(model, pool, prompts, 4, num_beams=beams)
    _nothing_held(pool)
    assert generate(model, pool, ((t for t in p) for p in PROMPTS), 4, num_beams=beams) == \
        hf_generate(model, 4, **({} if beams is None else dict(num_beams=beams, do_sample=False)))
    with pytest.raises(InvalidArgument, match=r"stop_sequences\[0\].*set"):
        generate(model, pool, PROMPTS, 4, stop_sequences=[{13, 14}])
    _nothing_held(pool)


def test_transformers_own_arguments_are_a_type_error_naming_kvpagers():
    """``generate(model, pool, **enc, max_new_tokens=8, do_sample=False,
    pad_token_id=0)``, as one calls ``model.generate``: still Python's TypeError (an
    argument kvpager does not take), now saying what it takes instead; each named is
    an argument or generation-config setting of transformers' ``generate`` (or of the
    model's forward, which it passes on) and none of
    kvpager's; nothing allocated."""
    import inspect

    from kvpager.hf.generate_call import TRANSFORMERS_ONLY

    model = make_model("llama")
    pool = _pool(model)
    ours = inspect.signature(generate).parameters
    theirs = {*inspect.signature(model.generate).parameters, *vars(transformers.GenerationConfig()),
              *inspect.signature(model.forward).parameters}  # (generate passes the model's own on)
    for name, instead in TRANSFORMERS_ONLY.items():
        assert name in theirs and name not in ours, name
        with pytest.raises(TypeError) as e:
            generate(model, pool, PROMPTS, 4, **{name: 1})
        assert repr(name) in str(e.value) and instead in str(e.value)
        _nothing_held(pool)
    with pytest.raises(TypeError, match="'max_new_token'") as e:  # (a misspelling: Python's message alone)
        generate(model, pool, PROMPTS, max_new_token=4)
    assert "for " not in str(e.value)
    assert generate(model, pool, PROMPTS, 4) == hf_generate(model, 4, do_sample=False)
