"""Families the sweep of every causal-LM type (`tools/hf_families.py`) compared only once
given configs of their own: what it found, at its sizes (tiny random float32 models, 2
layers, the CPU backend). RoBERTa-likes as decoders generate as transformers does and
refuse `score` by name (transformers' own generate and forward pass number their
positions apart); a BERT decoder, DeepSeek-V2's
latent attention (V2-Lite's: queries projected whole, YaRN) are served as transformers runs them."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf_models import VOCAB, drawn, one_thread, prompt  # noqa: E402, F401

from kvpager import KVPool  # noqa: E402
from kvpager.errors import UnsupportedModel  # noqa: E402
from kvpager.hf import beam_search, generate, score, spec_for_model  # noqa: E402

#: the sweep's sizes (`tools/hf_families.py`'s COMMON) at 2 layers, a K/V head per query head
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=512, initializer_range=0.1, bos_token_id=1, eos_token_id=None, pad_token_id=0,
             tie_word_embeddings=False)


def build(model_type: str, **fields):
    """The type's tiny model as the sweep builds it (its constants drawn), or a skip where this
    transformers has no such type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type, **{**SIZES, **fields})
    except ValueError:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return drawn(model)


def transformers_tokens(model, prompts: list[list[int]], new: int, beams: int = 1) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, num_beams=beams)[0, len(p):]
                .tolist() for p in prompts]


def forward_logprobs(model, p: list[int]) -> np.ndarray:
    """Each token's log-prob from the second, from one plain forward pass (what `score` gives)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p])).logits[0].double(), dim=-1)
    return lp[torch.arange(len(p) - 1), torch.tensor(p[1:])].numpy()


@pytest.mark.parametrize("model_type", ["roberta", "xlm-roberta-xl", "data2vec-text"])
def test_decoders_that_number_positions_from_the_padding_index_generate_but_refuse_scoring(model_type):
    """RoBERTa and its kin as decoders (``is_decoder``): their embeddings number a pass's
    positions from the padding index on (padding_idx + 1 + i) when it is given none, as a
    plain forward pass is, but transformers' generate gives them position ids from 0, and
    the two disagree (here by up to 0.8 in a logit). kvpager numbers them as generate does:
    its tokens and beams are transformers'; `score` is refused by name (before: its scores
    were off the forward pass's log-probs by up to 1.3, with no error)."""
    model = build(model_type, is_decoder=True)
    p = prompt(21, 1)
    prompts = [p, prompt(9, 2)]
    with torch.no_grad():
        given = model(torch.tensor([p]), position_ids=torch.arange(len(p))[None]).logits
        own = model(torch.tensor([p])).logits
    assert not torch.allclose(given, own, atol=1e-3)  # the disagreement kvpager would hide
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    assert generate(model, pool, prompts, 4, eos_token_id=None) == transformers_tokens(model, prompts, 4)
    beams = [b.tokens[0] for b in beam_search(model, pool, prompts, 3, num_beams=2, eos_token_id=None)]
    assert beams == transformers_tokens(model, prompts, 3, beams=2)
    before = pool.stats()
    with pytest.raises(UnsupportedModel, match=r"numbers positions from its padding index"):
        score(model, pool, [p])
    after = pool.stats()
    assert after.num_sequences == 0 and after.used_blocks == before.used_blocks  # nothing left behind
    pool.check_integrity()


def test_a_bert_decoder_is_served_as_transformers_runs_it():
    """BERT as a decoder numbers its positions from 0 either way: served, its tokens, scores
    and beams transformers' (the refusal above is not of every BERT-like)."""
    model = build("bert", is_decoder=True)
    prompts = [prompt(21, 1), prompt(9, 2)]
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    assert generate(model, pool, prompts, 6, eos_token_id=None) == transformers_tokens(model, prompts, 6)
    for p, got in zip(prompts, score(model, pool, prompts)):
        np.testing.assert_allclose(got, forward_logprobs(model, p), atol=1e-3)
    beams = [b.tokens[0] for b in beam_search(model, pool, prompts, 4, num_beams=2, eos_token_id=None)]
    assert beams == transformers_tokens(model, prompts, 4, beams=2)


def test_deepseek_v2_lite_latent_attention_is_served_as_transformers_runs_it():
    """DeepSeek-V2-Lite's shape: latent attention (MLA) with its queries projected whole
    (``q_lora_rank`` None), YaRN past a short original context (positions 16 on), its router
    at the top 2 of 4 experts by group (transformers caches the latent; kvpager holds the K/V
    expanded per head)."""
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=16,
                beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)
    model = build("deepseek_v2", num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                  q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                  topk_method="group_limited_greedy", n_group=2, topk_group=1, rope_parameters=yarn)
    prompts = [prompt(21, 1), prompt(9, 2)]
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    want = transformers_tokens(model, prompts, 8)
    assert any(len(set(w)) > 1 for w in want)  # (not one token repeated: a wrong position would show)
    assert generate(model, pool, prompts, 8, eos_token_id=None) == want
    for p, got in zip(prompts, score(model, pool, prompts)):
        np.testing.assert_allclose(got, forward_logprobs(model, p), atol=1e-3)
