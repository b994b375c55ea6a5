"""Each model type's tiny config for the families sweep (`hf_families.py`).

The sweep builds every causal-LM type transformers registers at one small
size (`COMMON`: 64 hidden, 2 layers, 4 heads, a 128-token vocabulary) so that
a sweep over all of them stays cheap, and compares its tokens with
transformers'. Many types cannot be built from their defaults at that size,
or would not exercise their own kind of attention within the sweep's short
prompts: each such type's extra fields are here (`OVERRIDES`), with why, beside the rules
that shrink a multimodal model's other towers (`TINY_TOWER`, `TOWERS`) and
keep a hybrid model's attention layers within its first layers
(`hybrid_layers`). `tiny_config` puts them together. They grow with every
family transformers adds; the sweep's running and comparing do not.
"""

from __future__ import annotations

VOCAB = 128
# (the head untied from the embeddings: tied, as Gemma's scaled embeddings are, a tiny random model
# scores the token it was given highest and repeats it, and any attention gives those tokens)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, initializer_range=0.1,
              bos_token_id=1, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
#: an override's value for a field the type's config must not be given (one of `COMMON`'s or `TINY_TOWER`'s)
LEAVE = object()
#: the other sub-configs of a multimodal model (vision, audio, ...), shrunk where they take these
#: names: text generation never runs them, but at their full default sizes they only cost time
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2,
                  num_heads=2, num_key_value_heads=2, head_dim=16, image_size=28, patch_size=14, out_hidden_size=64)


#: per type, more fields on its (text) config: what transformers needs to build it at these
#: sizes, or what makes its own kind of attention act within the sweep's prompts
SHARED_KV = dict(num_hidden_layers=4, num_kv_shared_layers=2, activation_sparsity_pattern=[0.0] * 4,
                 layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8)
CHUNKED = dict(attention_chunk_size=16, floor_scale=16)  # chunks and query scaling from position 15
HEAD_DIM = dict(head_dim=16)  # configs whose head_dim defaults to None and is not derived
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
              mamba_chunk_size=16)
QSA = dict(head_dim=16, num_hidden_layers=2, layer_types=["linear_attention", "indexed_attention"], num_experts=4,
           num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32, indexer_n_heads=2,
           indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4)
#: the decoder of an encoder-decoder model run alone (its ForCausalLM): the sweep's sizes on the
#: decoder's own fields (`num_hidden_layers` & co. alias the encoder's, which builds the cache: at the
#: decoder's default depth its layers past the encoder's have none)
DECODER = dict(decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_attention_heads=4,
               encoder_ffn_dim=128)
DOTS3 = dict(num_key_value_heads=4, use_dsa=False, layer_types=["full_attention", "sliding_attention"],
             sliding_window=8, head_dim=24, kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
             v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_experts_intermediate_size=32, mlp_layer_types=["dense", "sparse"], swa_num_attention_heads=4,
             swa_num_key_value_heads=4, swa_q_lora_rank=32, swa_kv_lora_rank=16, swa_head_dim=16,
             swa_qk_nope_head_dim=8, swa_v_head_dim=8)
OVERRIDES = {
    "gemma3n": SHARED_KV, "gemma3n_text": SHARED_KV, "llama4": CHUNKED, "llama4_text": CHUNKED,
    "ministral": HEAD_DIM, "helium": HEAD_DIM, "hunyuan_v1_dense": HEAD_DIM, "hunyuan_v1_moe": HEAD_DIM, "nemotron": HEAD_DIM,
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=1)),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_layers=2, num_heads=4, window_size=8),
    "dots1": dict(head_dim=16, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1),
    "codegen": dict(rotary_dim=8), "gptj": dict(rotary_dim=8),  # rotary dims within the 16-dim heads
    "cohere_compass_text": dict(head_dim=16, rope_parameters={"full_attention": {"rope_type": "default",
                                                                                  "rope_theta": 10000.0}}),
    # hybrid layers calling one shared attention block: layer kinds for 6 layers (their defaults
    # list more), attention on some of them
    "zamba": dict(num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=1, attention_hidden_size=128,
                  attention_head_dim=32, mamba_d_state=8, mamba_dt_rank=8, n_mamba_heads=2, use_mamba_kernels=False),
    "zamba2": dict(num_hidden_layers=6,
                   layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid", "hybrid",
                                      "linear_attention"],
                   mamba_d_state=8, n_mamba_heads=2, mamba_headdim=64, attention_head_dim=32,
                   attention_hidden_size=128, num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=8,
                   use_mem_rope=True),
    # hybrid layer layouts their configs derive from other fields (others: `hybrid_layers`)
    "bamba": dict(num_hidden_layers=2, attn_layer_indices=[1], **MAMBA2),
    # (weights of the model's own range: at the sweep's 0.1 transformers' own Jamba, run in two parts from its
    # cache, differs from its whole pass by up to 1.15 in a logit, 2e-4 at 0.02: its scan's rounding, through
    # the experts' routing; kvpager's passes of rows run prompts in parts)
    "jamba": dict(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, num_experts=2, mamba_d_state=8,
                  mamba_dt_rank=8, use_mamba_kernels=False, initializer_range=0.02),
    "granitemoehybrid": dict(num_hidden_layers=2, layer_types=["mamba", "attention"], num_local_experts=2,
                             num_experts_per_tok=1, shared_intermediate_size=32, **MAMBA2),
    "lfm2": dict(num_hidden_layers=2, layer_types=["conv", "full_attention"]),
    "lfm2_moe": dict(num_hidden_layers=3, num_dense_layers=1, layer_types=["conv", "full_attention", "conv"],
                     num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "recurrent_gemma": dict(num_hidden_layers=3, attention_window_size=8, lru_width=64),
    # indexed-attention layers (refused by name) at 5 layers, its first indexer's; an indexer scores
    # with the query heads of one K/V head (2 here)
    "kolibri1_1": dict(num_hidden_layers=5, index_num_heads=2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=32, mlp_only_intermediate_size=128,
                       sliding_window=8, index_topk=8, index_pool_size=16, index_compression=4,
                       index_num_local_tokens=4, index_num_sink_tokens=2),
    # a sliding layer and a full one (no rotary embedding, its logits scaled) at 2 layers, the window within the prompts
    "ergo": dict(global_attention_every_n_layers=2, sliding_window=8, global_attention_scale=2.0),
    # its full layers are indexed (sparse) ones, refused by name; its indexer's fields have no defaults
    "qwen4_exp": QSA, "qwen4_exp_text": QSA,
    # its router's top-k has no default (DeepSeek-V2-Lite's: 6 of 64); MLA at small ranks, the queries
    # through their own low rank (V2's; V2-Lite projects them whole)
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16),
    **{t: DECODER for t in ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart",
                            "pegasus", "plbart", "mvp", "whisper")},
    # BERT-likes' causal LM heads as they are meant to run: as decoders (causal self-attention; by default
    # they attend bidirectionally, which kvpager refuses)
    **{t: dict(is_decoder=True) for t in ("bert", "bert-generation", "big_bird", "camembert", "data2vec-text",
                                          "electra", "ernie", "megatron-bert", "rembert", "roberta",
                                          "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta",
                                          "xlm-roberta-xl")},
    "xmod": dict(is_decoder=True, default_language="en_XX"),  # (and the adapters of one of its languages)
    # its fields have names of their own, and it refuses `num_hidden_layers`
    "prophetnet": dict(num_hidden_layers=LEAVE, num_encoder_layers=2, num_decoder_layers=2,
                       num_encoder_attention_heads=4, num_decoder_attention_heads=4, encoder_ffn_dim=128,
                       decoder_ffn_dim=128, ngram=2),
    # no text config: its four sub-models (patcher, local encoder and decoder, global transformer) take
    # the sizes, each of its own fields (at their defaults, 1B parameters and a 500k-row hash embedding)
    "blt": dict(encoder_hash_byte_group_vocab=64,
                patcher_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                encoder_config=dict(hidden_size=32, hidden_size_global=64, num_attention_heads=2, num_hidden_layers=1,
                                    intermediate_size=64),
                decoder_config=dict(hidden_size=32, hidden_size_global=64, num_attention_heads=2, num_hidden_layers=1,
                                    intermediate_size=64),
                global_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)),
    # MLA whose sliding layers have their own geometry (their `swa_*` fields, 64 heads by default) and whose full
    # layers are indexed (sparse) ones unless `use_dsa` is off: a full and a sliding layer, the window within the
    # prompts; K/V heads must equal query heads (the gqa variant's 2 set to 4; mha's default, 128, cannot be built);
    # the multimodal one's text config takes the padding token (its default is past the vocabulary)
    "dots3_note_text": DOTS3, "dots3_note": dict(DOTS3, pad_token_id=0),
    # a draft model of Gemma-4's, for its target's K/V and hidden states (transformers runs it only so): the
    # fields its checks want
    "gemma4_assistant": dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0),
    # no attention (refused): 4 heads, q and k as wide as v (transformers' own chunked kernel fails on narrower
    # ones), chunks within the prompts
    "xlstm": dict(num_heads=4, chunk_size=16, qk_dim_factor=1.0),
    # a decoder (its LM head's condition) of local attention layers in chunks within the prompts
    "reformer": dict(is_decoder=True, attn_layers=["local", "local"], attention_head_size=16, feed_forward_size=128,
                     axial_pos_embds=False, local_attn_chunk_length=8),
    # (it takes no such limit: relative positions; its head dim is derived from its defaults' sizes, not these)
    "xlnet": dict(max_position_embeddings=LEAVE, n_head=4, d_head=16, d_inner=128),
    "emu3": dict(pad_token_id=0),  # (its text config's default is past the vocabulary)
    # a sliding layer and a full one (their `hybrid*` kinds: attention with a relative position bias and
    # convolved K/V), the sliding heads of their own fields, the head's own vocabulary, the window and
    # the bias's reach within the prompts, a block of attention residuals a layer
    **{t: dict(layer_types=["hybrid_sliding", "hybrid"], head_dim=16, swa_num_attention_heads=4,
               swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=8, rel_extent=16, d_rel=8,
               unpadded_vocab_size=VOCAB, n_routed_experts=4, num_experts_per_tok=2, n_layers_per_attn_res_block=1)
       for t in ("inkling2_text", "inkling2_loop_text")},
    # no attention (refused by name): its heads times their dim must be its inner width (2 x 64)
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, state_size=8, chunk_size=16),
    "mllama": dict(pad_token_id=0),  # (its text config's default is past the vocabulary)
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16),
}
#: per multimodal type, more fields on its other sub-configs (over `TINY_TOWER`): what their own checks need
TOWERS = {
    # a vision tower of dense layers (its default lists 42 layers' experts) and adapters of the towers' and the
    # text model's widths
    "dots3_note": dict(vision_config=dict(mlp_layer_types=["dense"], adapter_in_dim=32, adapter_out_dim=64),
                       audio_config=dict(adapter_input_size=32, adapter_out_dim=64)),
    # its image tokenizer (a VQ-VAE), small; not its fields, `head_dim` and `num_heads`, whose product configs
    # must match their `embed_dim` (its codes' 4 dims)
    "emu3": dict(vq_config=dict(head_dim=LEAVE, num_heads=LEAVE, base_channels=32, channel_multiplier=[1, 2],
                                num_res_blocks=1, codebook_size=64)),
}
#: the kinds of recurrent layers (`kvpager.hf.model.RECURRENT_KINDS`)
RECURRENT = {"linear_attention", "conv", "hybrid"}
#: the kinds of layers without K/V (`kvpager.sizing.NO_KV_KINDS`)
NO_KV = {"linear_attention", "conv", "mlp", "moe"}


def hybrid_layers(default) -> dict:
    """For a config whose ``layer_types`` mix recurrent layers with others: the fewest
    leading layers that hold every kind it has (at least 2), so a model of the sweep's
    size has its attention layers too (its first 2 alone are often all recurrent, and
    transformers' own run then fails)."""
    kinds = list(getattr(default, "layer_types", None) or [])
    if not RECURRENT & set(kinds) or not set(kinds) - NO_KV:  # (no attention at all: Mamba's, refused)
        return {}
    want = set(kinds)
    n = next(i for i in range(1, len(kinds) + 1) if set(kinds[:i]) == want)
    n = max(2, n)
    return dict(num_hidden_layers=n, layer_types=kinds[:n])


def tiny_config(model_type: str, common: dict):
    """The type's config at the sweep's sizes: ``common`` on the config itself, or, for a
    multimodal model (one with a text sub-config), on its text config, the other
    sub-configs shrunk (`TINY_TOWER`, `TOWERS`)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if model_type in OVERRIDES:  # (its default need not build: Gemma-4's assistant's fails its own checks)
        default, layers = CONFIG_MAPPING[model_type], {}
    else:
        default = AutoConfig.for_model(model_type)
        layers = hybrid_layers(getattr(default, "text_config", None) or default)
    subs = dict(getattr(default, "sub_configs", None) or {})
    common = {**common, **layers}
    if "text_config" not in subs:
        return AutoConfig.for_model(model_type, **common)
    own = OVERRIDES.get(model_type, {})
    text = {k: v for k, v in common.items() if k not in ("bos_token_id", "eos_token_id", "pad_token_id") or k in own}
    towers = {name: {k: v for k, v in {**TINY_TOWER, **TOWERS.get(model_type, {}).get(name, {})}.items()
                     if v is not LEAVE} for name in subs if name != "text_config"}
    return AutoConfig.for_model(model_type, text_config=text, **towers)
