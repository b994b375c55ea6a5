"""Rotary embeddings whose frequencies follow each pass's length (longrope,
dynamic NTK scaling; `kvpager.hf.rope`): calls kvpager reproduces give
transformers' tokens and scores, packed and cached, their long-factor blocks
apart from the short ones; calls it cannot reproduce are refused by name,
before anything is allocated. Float32 on the CPU, each reference a fresh
model running one prompt alone."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.hf import beam_search, generate, score, spec_for_model  # noqa: E402

VOCAB = 128
LIMIT = 16  # the original context: short factors up to it, long past it


def phi3_longrope(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=None, bos_token_id=1,
        original_max_position_embeddings=LIMIT, initializer_range=0.2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0 + 0.1 * i for i in range(8)],
                         "long_factor": [2.0 + 0.5 * i for i in range(8)],
                         "original_max_position_embeddings": LIMIT})
    model = transformers.Phi3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def llama_dynamic(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=LIMIT, pad_token_id=0, eos_token_id=None, bos_token_id=1,
        initializer_range=0.2, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def alone(make, tokens: list[int], new: int, **kw) -> list[int]:
    """transformers' greedy tokens (or best beam) for one prompt alone, on a fresh model."""
    with torch.no_grad():
        out = make().generate(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                              max_new_tokens=new, do_sample=False, **kw)
    return out[0, len(tokens):].tolist()


def pool_for(model) -> KVPool:
    return KVPool(spec_for_model(model, num_blocks=64, block_size=8))


def test_longrope_calls_within_the_limit_and_past_it_give_transformers_tokens():
    model = phi3_longrope()
    pool = pool_for(model)
    short = [prompt(5, 1), prompt(9, 2)]
    # (to the limit: a sequence's last new token is never fed, so its passes end at 9 + 8 - 1 positions)
    assert generate(model, pool, short, LIMIT - 8) == [alone(phi3_longrope, p, LIMIT - 8) for p in short]
    whole = prompt(LIMIT, 12)  # a prompt of the whole original context, and one new token
    assert generate(model, pool, [whole], 1) == [alone(phi3_longrope, whole, 1)]
    [one] = beam_search(model, pool, [whole], 1, num_beams=2, eos_token_id=None)
    assert one.tokens[0] == alone(phi3_longrope, whole, 1, num_beams=2)
    long = [prompt(20, 3), prompt(27, 4)]
    want = [alone(phi3_longrope, p, 10) for p in long]
    assert generate(model, pool, long, 10) == want  # packed in one pass each step
    assert generate(model, pool, long, 10) == want  # again, from the cache
    # a long prompt that begins with a short call's prompt: the short call's blocks (short factors)
    # are not its prefix; a long one's are
    turn = short[1] + prompt(14, 5)
    hits = pool.stats().prefix_hit_tokens
    assert generate(model, pool, [turn], 6) == [alone(phi3_longrope, turn, 6)]
    assert pool.stats().prefix_hit_tokens == hits  # (the short call's 8-token block not taken)
    turn2 = long[0] + prompt(5, 6)
    assert generate(model, pool, [turn2], 6) == [alone(phi3_longrope, turn2, 6)]
    assert pool.stats().prefix_hit_tokens > hits
    [beams] = beam_search(model, pool, [long[1]], 6, num_beams=3, eos_token_id=None)
    assert beams.tokens[0] == alone(phi3_longrope, long[1], 6, num_beams=3)
    pool.check_integrity()
    assert pool.stats().used_blocks == 0


def test_longrope_scores_are_a_plain_forward_pass_of_each_prompt():
    model = phi3_longrope()
    pool = pool_for(model)
    prompts = [prompt(24, 7), prompt(30, 8)]
    got = score(model, pool, prompts, start=1)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            logits = phi3_longrope()(torch.tensor([p])).logits[0].double().log_softmax(-1)
        want = logits[torch.arange(len(p) - 1), torch.tensor(p[1:])].numpy()
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(InvalidArgument, match="longrope.*parts of 8 tokens"):
        score(model, pool, prompts, tokens_per_pass=8)  # its first parts would take the short factors
    assert pool.stats().num_sequences == 0


@pytest.mark.parametrize("prompts, new, why", [
    ([10], 10, "would pass it as it generates"),
    ([10, 20], 2, "different factors"),
])
def test_longrope_calls_it_cannot_reproduce_are_refused_before_anything_is_allocated(prompts, new, why):
    """Crossing the limit (Phi-3's generation then computes the whole cache
    again with the long factors) or mixing the two: kvpager gave tokens that
    were not transformers' (from the first token past the limit, or from the
    first token of a short prompt packed with a long one)."""
    model = phi3_longrope()
    pool = pool_for(model)
    with pytest.raises(InvalidArgument, match=f"longrope.*{why}"):
        generate(model, pool, [prompt(n, n) for n in prompts], new)
    with pytest.raises(InvalidArgument, match="longrope"):
        beam_search(model, pool, [prompt(n, n) for n in prompts], new, num_beams=2)
    assert pool.stats().num_sequences == 0 and pool.stats().prefix_query_tokens == 0


def test_dynamic_scaling_within_its_context_and_refused_past_it():
    model = llama_dynamic()
    pool = pool_for(model)
    prompts = [prompt(6, 9), prompt(11, 10)]
    # (to the context: a sequence's last new token is never fed, so 11 + 6 - 1 positions)
    assert generate(model, pool, prompts, 6) == [alone(llama_dynamic, p, 6) for p in prompts]
    with pytest.raises(InvalidArgument, match="dynamic rotary scaling.*within 16"):
        generate(model, pool, prompts, 7)
    with pytest.raises(InvalidArgument, match="dynamic rotary scaling"):
        score(model, pool, [prompt(20, 11)])
    pool.check_integrity()
    assert pool.stats().used_blocks == 0
