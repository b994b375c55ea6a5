"""Model coverage of kvpager.hf: for each family, float32 on the CPU
backend, tokens identical to transformers' greedy ``generate`` with prompts
longer than the sliding windows, in-batch prefix sharing and cache reuse;
what cannot be reproduced is refused by name."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")


transformers = pytest.importorskip("transformers")

from hf_versions import falcon_attends_through_the_interface, served_by_this_transformers  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.hf import (  # noqa: E402
    PagedGeneration,
    generate,
    layer_chunks,
    layer_map,
    layer_windows,
    spec_for_model,
)

VOCAB = 128


WINDOW = 6  # shorter than a block of 8 or 16 and than every prompt below


COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.1,
              bos_token_id=1, eos_token_id=None, pad_token_id=0)
#: for the families whose tiny random models otherwise repeat a prompt's last token (Gemma's scaled
#: embeddings tied to the head: the residual stream, mostly the input embedding, scores its own
#: token highest), where a wrong window or softcap would still give transformers' tokens


VARIED = dict(tie_word_embeddings=False, initializer_range=0.3)
#: Llama's and Qwen's, at 0.1, repeated one token for the prompts that share the system prompt below


LIVELY = dict(initializer_range=0.2)
SLIDING, FULL = "sliding_attention", "full_attention"


ALTERNATING = [SLIDING, FULL, SLIDING, FULL]


MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
           n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
           first_k_dense_replace=1)

GEMMA3N = dict(head_dim=16, sliding_window=WINDOW, num_hidden_layers=6, vocab_size_per_layer_input=VOCAB,
               hidden_size_per_layer_input=16, activation_sparsity_pattern=[0.0] * 6, laurel_rank=8)

# chunked attention on layers 0 and 2 (chunks of 16: the prompts below cross them), queries scaled
# by position on the NoPE layers 1 and 3 from position 15 on (floor_scale 16); a mixture of experts
LLAMA4 = dict(head_dim=16, intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1,
              attention_chunk_size=16, floor_scale=16, attn_scale=0.5, no_rope_layer_interval=2)

# layers of two geometries (transformers' per-layer configs): the full layers have head dim 32 and 2 K/V
# heads (keys as values), the sliding ones 16 and 4; one pool of 2 heads of 32 holds both, the sliding
# layers' K/V heads two by two side by side, each query head at its own head's place
GEMMA4 = dict(head_dim=16, global_head_dim=32, num_attention_heads=8, num_key_value_heads=4,
              num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=WINDOW,
              vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8)

# family: (config class, model class, extra config, the per-layer windows it must get)


FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LIVELY, [None] * 4),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW), [WINDOW] * 4),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2), [WINDOW] * 4),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=WINDOW, **VARIED), [WINDOW] * 4),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=WINDOW), [WINDOW] * 4),
    # Qwen2 configs carry sliding_window=4096 with use_sliding_window=False: full attention
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(sliding_window=WINDOW), [None] * 4),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2, **LIVELY),
                      [None, None, WINDOW, WINDOW]),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, **LIVELY), [None] * 4),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0, query_pre_attn_scalar=16,
                    layer_types=ALTERNATING, **VARIED),
               [WINDOW, None, WINDOW, None]),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING, **VARIED),
               [WINDOW, None, WINDOW, None]),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(sliding_window=WINDOW, layer_types=ALTERNATING, **VARIED),
                [WINDOW, None, WINDOW, None]),
    # its attention modules all keep sliding_window, full layers too: the layer types decide
    # their decoder layers do not pass keyword arguments on to attention: the current batch serves them
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", VARIED, [None] * 4),
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", {}, [None] * 4),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(sliding_window=WINDOW, layer_types=ALTERNATING),
                [WINDOW, None, WINDOW, None]),
    # learned attention sinks (s_aux: a logit per query head in the softmax denominator)
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(head_dim=16, sliding_window=WINDOW, layer_types=ALTERNATING, num_local_experts=4,
                     num_experts_per_tok=2), [WINDOW, None, WINDOW, None]),
    # multi-head latent attention: q and k of 16 + 16 dims, v of 16 (the pool's 32, v zero-padded;
    # K/V expanded to every query head, as transformers attends)
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(MLA, v_head_dim=16), [None] * 4),
    # mixture of attention heads: its 2 K/V heads tiled for each of 2 experts a token (4 K/V heads)
    "jetmoe": ("JetMoeConfig", "JetMoeForCausalLM", dict(kv_channels=16, num_local_experts=4, num_experts_per_tok=2),
               [None] * 4),
    # its last 3 layers reuse the K/V of the last earlier layer of their type (1: full, 2: sliding):
    # they write nothing and attend over those layers' pool K/V; the pool holds 3 layers, not 6
    "gemma3n": ("Gemma3nTextConfig", "Gemma3nForCausalLM",
                dict(GEMMA3N, num_kv_shared_layers=3, layer_types=[SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING]),
                [WINDOW, None, WINDOW, WINDOW, None, WINDOW]),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", LLAMA4, [None] * 4),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(GEMMA4, layer_types=ALTERNATING, **VARIED),
               [WINDOW, None, WINDOW, None]),
    # ... and its last 2 layers reuse the K/V of the last earlier layer of their kind (the pool holds 4)
    "gemma4-kv-shared": ("Gemma4TextConfig", "Gemma4ForCausalLM",
                         dict(GEMMA4, num_hidden_layers=6, num_kv_shared_layers=2, layer_types=ALTERNATING + [SLIDING, FULL],
                              **VARIED),
                         [WINDOW, None, WINDOW, None, WINDOW, None]),
    # Falcon (its attention through transformers' interface since transformers 5.25; refused before:
    # tests/test_hf_refusals.py): multi-query (one K/V head, Falcon-7B), multi-head with sequential
    # attention and MLP, and grouped (new_decoder_architecture: Falcon-40B/180B); the pool's K/V heads
    # by Falcon's rule, whatever num_key_value_heads (COMMON's 2) says
    "falcon": ("FalconConfig", "FalconForCausalLM", LIVELY, [None] * 4),
    "falcon-mha": ("FalconConfig", "FalconForCausalLM", dict(multi_query=False, parallel_attn=False, **LIVELY),
                   [None] * 4),
    "falcon-grouped": ("FalconConfig", "FalconForCausalLM",
                       dict(new_decoder_architecture=True, num_kv_heads=2, **LIVELY), [None] * 4),
    # Ergo (transformers 5.25): sliding layers with a rotary embedding, full ones without (NoPE) whose
    # queries and keys are scaled (global_attention_scale), q and k normed, one fused q/k/v projection
    "ergo": ("ErgoConfig", "ErgoForCausalLM",
             dict(global_attention_every_n_layers=2, sliding_window=WINDOW, global_attention_scale=2.0, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=32, shared_intermediate_size=32,
                  first_dense_intermediate_size=128, **VARIED),
             [WINDOW, None, WINDOW, None]),
    # MiMo-V2-Flash: its sliding layers have twice the K/V heads of its full ones (a rule of its attention
    # code: 4 against 2; one pool of 4 heads, the full layers' each stored twice) and learned sinks; v narrower
    # than q and k (8 against 16: v zero-padded) and scaled; experts past the first layer
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM",
                      dict(head_dim=16, v_head_dim=8, sliding_window=WINDOW, layer_types=ALTERNATING,
                           mlp_layer_types=["dense"] + ["sparse"] * 3, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=32, **VARIED),
                      [WINDOW, None, WINDOW, None]),
    # ... and v wider than q and k (8 + 8 dims against 32: q and k zero-padded)
    "deepseek_v3-wide-v": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                           dict(MLA, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=32, q_lora_rank=None),
                           [None] * 4),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Models this small run fastest on one thread, and much faster than on
    threads that contend with other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra, _ = FAMILIES[family]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers {transformers.__version__} has no {config_cls}")
    if family.startswith("falcon") and not falcon_attends_through_the_interface():
        pytest.skip(f"transformers {transformers.__version__}'s Falcon attends by itself (refused)")
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    if getattr(config, "attn_logit_softcapping", None) is not None:
        # the reference attends eagerly: SDPA has no soft cap, and some transformers releases
        # (5.17 among them) chose it for Gemma-2 anyway, dropping the cap (kvpager applies it)
        config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def drawn(model):
    """``model`` with every parameter it was built at one value throughout (zeros, ones:
    convolution and time-step biases, skip weights, norms) moved by normal noise, as
    training moves them: built as they are, a feature that a pass in parts gets wrong can
    be a no-op (Jamba's scan of several tokens from a zero state, whatever the cache
    holds, matched transformers at a zero convolution bias). The sweep's own draw (`tools/hf_families.py`'s `draw_constants`), so both draw alike."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "hf_families.py"
    spec = importlib.util.spec_from_file_location("kvpager_tools_hf_families", path)
    families = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(families)
    families.draw_constants(model)
    return model


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def reference(model, tokens: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens for one prompt, unpadded: the mask is given (without it,
    ``generate`` masks any token equal to the pad token id, as a generated 0 a next turn carries)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([tokens]), attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    return out[0, len(tokens) :].tolist()


def assert_tokens_vary(want: list[list[int]], model: str) -> None:
    """A test model whose greedy tokens repeat one token for its prompts would give the same
    tokens with a wrong window, cap, position or state: such a test could not fail. One
    prompt of a batch may (a short answer can); more may not."""
    repeating = [w for w in want if len(set(w)) < 2]
    assert len(repeating) <= 1, f"{model}'s test model repeats one token a prompt ({repeating}): draw it wider"


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "jetmoe"])  # (jetmoe's tokens repeat so)
def test_family_with_its_constants_drawn_matches_transformers(family):
    """Every family with the parameters it is built at one value throughout (biases,
    gates, norms) drawn as training moves them (`drawn`): built as they are, a feature
    kvpager did not follow could be a no-op (Doge's mask bias, Jamba's state in parts)."""
    model = drawn(make_model(family))
    system = prompt(35, seed=1)
    prompts = [system + prompt(5, seed=2), prompt(9, seed=3), system + prompt(13, seed=4), prompt(1, seed=5)]
    want = [reference(model, p, 12) for p in prompts]
    assert_tokens_vary(want, family)
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=8))
    with served_by_this_transformers(model):
        assert generate(model, pool, prompts, max_new_tokens=12) == want
    assert pool.stats().num_sequences == 0
    pool.check_integrity()


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(family, block_size):
    model = make_model(family)
    assert layer_windows(model) == FAMILIES[family][3]
    if family == "gemma2":
        assert model.config.attn_logit_softcapping == 1.0  # reaches the attention as softcap
    pool = KVPool(spec_for_model(model, num_blocks=96, block_size=block_size))
    if family == "gemma3n":  # the layers that store K/V, and which each layer attends over
        assert pool.spec.num_layers == 3
        assert layer_map(model) == [(0, True), (1, True), (2, True), (2, False), (1, False), (2, False)]
    if family == "mimo_v2_flash":  # the sliding layers' 4 K/V heads, not the config's 2
        assert (pool.spec.num_kv_heads, pool.spec.head_dim) == (4, 16)
    if family.startswith("gemma4"):  # one pool for both geometries
        assert (pool.spec.num_kv_heads, pool.spec.head_dim) == (2, 32)
        assert pool.spec.num_layers == 4
        if family == "gemma4-kv-shared":
            assert layer_map(model) == [(0, True), (1, True), (2, True), (3, True), (2, False), (3, False)]
    assert layer_chunks(model) == ([16, None, 16, None] if family == "llama4"
                                   else [None] * model.config.num_hidden_layers)
    system = prompt(35, seed=1)  # shared by two prompts of the batch: 2 blocks of 16, 4 of 8
    prompts = [system + prompt(5, seed=2), prompt(9, seed=3), system + prompt(13, seed=4), prompt(1, seed=5)]
    new = 12
    with served_by_this_transformers(model), PagedGeneration(model, pool, prompts, max_new_tokens=new) as gen:
        assert gen.num_cached_tokens == [0, 0, 32, 0]  # in-batch sharing of the system prompt
        while not gen.done:
            gen.step()
        outs = gen.outputs
    want = [reference(model, p, new) for p in prompts]
    assert_tokens_vary(want, family)
    assert outs == want
    # the next turn reuses the cached prompt and answer
    follow = prompts[2] + outs[2] + prompt(4, seed=6)
    with PagedGeneration(model, pool, [follow], max_new_tokens=8) as gen:
        assert gen.num_cached_tokens[0] >= len(prompts[2]) + new - 1 - block_size
        while not gen.done:
            gen.step()
        assert gen.outputs == [reference(model, follow, 8)]
    pool.check_integrity()


def test_windows_matter_here():
    """The windows of these tests change the tokens: the same weights without
    the window generate others."""
    tokens = prompt(30, seed=7)
    windowed = make_model("mistral")
    assert reference(windowed, tokens, 12) != reference(make_model("mistral", sliding_window=None), tokens, 12)
    pool = KVPool(spec_for_model(windowed, num_blocks=64, block_size=8))
    assert generate(windowed, pool, [tokens], 12) == [reference(windowed, tokens, 12)]


def test_softcap_matters_here():
    tokens = prompt(30, seed=8)
    capped = make_model("gemma2")
    assert reference(capped, tokens, 12) != reference(make_model("gemma2", attn_logit_softcapping=None), tokens, 12)


def test_chunks_and_position_scaling_matter_here():
    """Llama-4's chunked layers and its NoPE layers' query scaling by position
    each change these tokens (the same weights without either generate others),
    and kvpager gives transformers' tokens with both."""
    tokens = prompt(40, seed=9)
    model = make_model("llama4")
    want = reference(model, tokens, 12)
    assert want != reference(make_model("llama4", attention_chunk_size=4096), tokens, 12)
    assert want != reference(make_model("llama4", attn_temperature_tuning=False), tokens, 12)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    # with a prompt of another sequence packed before it: the packed row's positions are not its
    assert generate(model, pool, [prompt(30, seed=10), tokens], 12)[1] == want
    assert model.model.layers[1].self_attn.attn_temperature_tuning is True  # switched back after


def test_a_chunk_the_block_size_does_not_divide_is_refused():
    model = make_model("llama4", attention_chunk_size=24)
    with pytest.raises(InvalidArgument, match="block size that divides"):
        generate(model, KVPool(spec_for_model(model, num_blocks=16, block_size=16)), [prompt(4, 1)], 2)
    tokens = prompt(40, 1)  # past two chunk starts, neither on a 16-token block's boundary
    assert generate(model, KVPool(spec_for_model(model, num_blocks=16, block_size=8)), [tokens], 12) == \
        [reference(model, tokens, 12)]


# A worker of the daemon plans from its own mirror over the mapped pool: what each family
# needs of a plan holds there too (family: what it checks, the pool layers the daemon holds).


def pool_for(spec, through_daemon: bool, stack: contextlib.ExitStack):
    """An embedded pool of ``spec``, or a client of a daemon serving it (stopped with ``stack``)."""
    if not through_daemon:
        return KVPool(spec)
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    server = stack.enter_context(running_server(spec))
    return stack.enter_context(Client(server.endpoint))


def test_attention_sinks_change_the_tokens():
    """GPT-OSS's sinks (``s_aux``) are applied, not ignored: with the sinks made
    large (they take most of each softmax), transformers' tokens change, and
    kvpager's follow them (the families test checks the model as initialised)."""
    model = make_model("gpt_oss")
    prompts = [prompt(11, 1), prompt(5, 2)]
    plain = _hf_tokens(model, prompts, 6)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 4.0, layer.self_attn.sinks.numel()))
    sunk = _hf_tokens(model, prompts, 6)
    assert sunk != plain, "the sinks should change transformers' tokens"
    assert generate(model, KVPool(spec_for_model(model, num_blocks=64)), prompts, 6, eos_token_id=None) == sunk


def _hf_tokens(model, prompts, n):
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out
