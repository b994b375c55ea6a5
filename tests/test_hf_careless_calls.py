"""Careless calls of kvpager.hf answered by name before anything is allocated: a
salt that is no str or bytes (a per-prompt list), a generation config's
``num_return_sequences`` (sampled, greedy or beams), and a call that passes a
learned absolute position table (GPT-2's ``wpe``, OPT's offset table). Each
was answered wrongly before: a TypeError, one salt merged from the list, one
sequence where three were asked, an IndexError after passes had run. Float32
on the CPU backend."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import VOCAB, make_model, prompt  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.hf import beam_search, generate, score, spec_for_model  # noqa: E402


def _pool(model, blocks: int = 64) -> KVPool:
    return KVPool(spec_for_model(model, num_blocks=blocks, block_size=8))


def _assert_refused(pool: KVPool, call, needle: str) -> None:
    before = pool.stats()
    with pytest.raises(InvalidArgument, match=needle):
        call()
    assert pool.stats() == before
    pool.check_integrity()


@pytest.mark.parametrize("salt", [["a", "b"], ("a", "b"), 7, {"a": 1}])
def test_a_salt_that_is_no_str_or_bytes_is_refused_by_name(salt):
    model = make_model("llama")
    pool = _pool(model)
    ps = [prompt(5, 1), prompt(7, 2)]
    _assert_refused(pool, lambda: generate(model, pool, ps, 2, salt=salt), "generate: salt must be")
    _assert_refused(pool, lambda: score(model, pool, ps, salt=salt), "score: salt must be")
    _assert_refused(pool, lambda: beam_search(model, pool, ps, 2, num_beams=2, salt=salt), "beam_search: salt")
    assert generate(model, pool, ps, 2, salt=b"mine") == generate(model, pool, ps, 2, salt="mine")


def test_a_configs_num_return_sequences_is_refused_by_name():
    model = make_model("llama")
    pool = _pool(model)
    ps = [prompt(5, 1)]
    config = model.generation_config
    config.num_return_sequences = 3
    config.do_sample, config.temperature = True, 0.7
    _assert_refused(pool, lambda: generate(model, pool, ps, 2, sampling="model"), "num_return_sequences=3")
    config.do_sample, config.temperature = False, 1.0
    config.num_beams = 3
    _assert_refused(pool, lambda: generate(model, pool, ps, 2, sampling="model"), "num_return_sequences=3")
    config.num_return_sequences = 1  # (one a prompt: the best hypothesis, as before)
    assert len(generate(model, pool, ps, 2, sampling="model")) == 1


def _learned(family: str, positions: int):
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=positions,
                                         bos_token_id=1, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                        num_attention_heads=4, max_position_embeddings=positions,
                                        word_embed_proj_dim=64, bos_token_id=1, eos_token_id=None, pad_token_id=0)
        model = transformers.OPTForCausalLM(config)
    model.eval().config.num_key_value_heads = 4
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_a_call_past_a_learned_position_table_is_refused_before_allocating(family):
    from kvpager.hf.checks import position_limit

    model = _learned(family, 32)
    assert position_limit(model) == 32  # (OPT's table has 34 rows: its positions start at 2)
    assert position_limit(make_model("llama")) is None  # rotary: no table
    pool = _pool(model)
    _assert_refused(pool, lambda: generate(model, pool, [prompt(30, 1)], 10), "position table holds 32 positions")
    _assert_refused(pool, lambda: generate(model, pool, [prompt(40, 1)], 1), "feeds a sequence 40 tokens")
    _assert_refused(pool, lambda: generate(model, pool, [prompt(30, 1)], 4), "feeds a sequence 33 tokens")
    _assert_refused(pool, lambda: score(model, pool, [prompt(33, 1)]), "position table holds 32")
    _assert_refused(pool, lambda: beam_search(model, pool, [prompt(30, 1)], 4, num_beams=2), "holds 32")
    # a call that fills the table exactly runs, with transformers' tokens (the last new token is never fed)
    ids = prompt(30, 1)
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 30, dtype=torch.long),
                              max_new_tokens=3, do_sample=False, pad_token_id=0)[0, 30:].tolist()
    assert generate(model, pool, [ids], 3) == [want]
    assert len(beam_search(model, pool, [ids], 3, num_beams=2)[0].tokens) == 1
    assert len(score(model, pool, [prompt(32, 1)])[0]) == 31


def test_a_torch_module_that_is_no_transformers_model_is_refused_by_name():
    """A module without a config (``nn.Linear``) got an AttributeError from inside
    ('Linear' object has no attribute 'config'); so did `spec_for_model(None)`."""
    from kvpager.hf import PagedCache, PagedGeneration, default_salt

    model = make_model("llama")
    pool = _pool(model)
    linear = torch.nn.Linear(2, 2)
    calls = [lambda: generate(linear, pool, [prompt(4, 0)], 2), lambda: PagedCache(linear, pool),
             lambda: score(linear, pool, [prompt(4, 0)]), lambda: beam_search(linear, pool, [prompt(4, 0)], 2, num_beams=2),
             lambda: PagedGeneration(linear, pool), lambda: spec_for_model(linear, num_blocks=8),
             lambda: spec_for_model(None, num_blocks=8), lambda: default_salt(linear)]
    for call in calls:
        with pytest.raises(TypeError, match="must be a transformers causal LM"):
            call()
    assert pool.stats().used_blocks == 0
    pool.check_integrity()
