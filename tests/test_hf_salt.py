"""The default prefix-cache salt of a transformers model (`kvpager.hf.default_salt`):
a model with one layer changed, or rescaled rotary frequencies (a buffer), gets
another salt, so no cached K/V crosses between them; edits after caching are
seen (or `refresh=True`); a rotary embedding that rewrites its frequencies each
pass (dynamic, longrope) keeps its salt, and the cached salt holds across
passes. Float32 on the CPU backend, tokens against transformers' own."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import VOCAB, make_model, one_thread, prompt, reference  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, default_salt, generate, spec_for_model  # noqa: E402


def test_salt_tells_a_changed_middle_layer_apart():
    """A copy of the model with one middle layer's weights changed (as a merged
    adapter does) gets another salt: no cached K/V crosses between the two."""
    base = make_model("llama")
    merged = make_model("llama")
    assert default_salt(base) == default_salt(merged)  # same weights: workers share
    with torch.no_grad():
        w = merged.model.layers[2].self_attn.k_proj.weight
        w += 0.05 * torch.randn_like(w)
    first, last = list(base.parameters())[0], list(base.parameters())[-1]
    assert torch.equal(first, list(merged.parameters())[0]) and torch.equal(last, list(merged.parameters())[-1])
    assert default_salt(base) != default_salt(merged)
    pool = KVPool(spec_for_model(base, num_blocks=64, block_size=8))
    tokens = prompt(30, seed=9)
    generate(base, pool, [tokens], 4)
    with PagedGeneration(merged, pool, [tokens], max_new_tokens=12) as gen:
        assert gen.num_cached_tokens == [0]
        while not gen.done:
            gen.step()
        assert gen.outputs == [reference(merged, tokens, 12)]
    assert gen.outputs != reference(base, tokens, 12)
    pool.check_integrity()


def test_salt_follows_edits_after_caching():
    model = make_model("llama")
    before = default_salt(model)
    with torch.no_grad():  # behind the version counter: seen through the sampled entries
        model.model.layers[1].mlp.up_proj.weight.data += 0.01
    after = default_salt(model)
    assert after != before
    model.model.layers[1].mlp.up_proj.weight.data[0, 1] += 1.0  # one entry, not sampled: a stale cache ...
    assert default_salt(model) == after
    assert default_salt(model, refresh=True) != after  # ... that refresh recomputes
    model.load_state_dict(make_model("llama").state_dict())
    assert default_salt(model) == before


def test_salt_tells_changed_buffers_apart():
    """Buffers shape K/V too (the rotary embedding's frequencies; a quantized
    layer's weights are buffers): rescaled frequencies, in place or replaced in
    inference mode, get another salt (cached and refreshed), so the pool's blocks of
    the model before are not matched and the tokens are those of the model as it
    is; the same frequencies back give the first salt again."""
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    tokens = prompt(30, seed=12)
    before = default_salt(model)
    generate(model, pool, [tokens], 4, eos_token_id=None)
    rotary = model.model.rotary_emb
    original = rotary.inv_freq.clone()
    rotary.inv_freq.mul_(0.25)
    assert default_salt(model) != before and default_salt(model, refresh=True) != before
    quartered = default_salt(model)
    with PagedGeneration(model, pool, [tokens], max_new_tokens=8, eos_token_id=None) as gen:
        assert gen.num_cached_tokens == [0]
        while not gen.done:
            gen.step()
        assert gen.outputs == [reference(model, tokens, 8)]
    with torch.inference_mode():  # replaced by a tensor without a version counter
        rotary.inv_freq = original * 0.5
    halved = default_salt(model)
    assert halved not in (before, quartered) and default_salt(model, refresh=True) == halved
    assert generate(model, pool, [tokens], 8, eos_token_id=None) == [reference(model, tokens, 8)]
    rotary.inv_freq = original.clone()
    assert default_salt(model) == before
    pool.check_integrity()


@pytest.mark.parametrize("family, rope", [
    ("Phi3", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
              "original_max_position_embeddings": 32}),
    ("Llama", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 32}),
], ids=["longrope", "dynamic"])
def test_salt_holds_across_passes_that_rewrite_the_rotary_frequencies(family, rope, monkeypatch):
    """A dynamic or longrope rotary embedding rewrites its frequencies by each pass's
    length (from its original ones, which are hashed): with them in the salt, the
    same weights got another salt after a long pass, and every call hashed every
    weight again (their version counters moved at each pass)."""
    import kvpager.hf.salt as salt_module

    config = getattr(transformers, family + "Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=32, pad_token_id=0, rope_parameters=rope)
    torch.manual_seed(0)
    model = getattr(transformers, family + "ForCausalLM")(config).eval()
    first = default_salt(model)
    hashed = []
    real = salt_module._tensor_digest
    monkeypatch.setattr(salt_module, "_tensor_digest", lambda t: hashed.append(1) or real(t))
    for n in (8, 200, 8):
        with torch.no_grad():
            model(torch.randint(1, VOCAB, (1, n)))
        assert default_salt(model) == first
    assert len(hashed) <= 3  # (the cache key's samples, one digest a call: no weight hashed again)
    assert default_salt(model, refresh=True) == first
