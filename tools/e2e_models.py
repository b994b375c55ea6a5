"""The random-weight models of the end-to-end benchmarks (`bench_e2e.py` and the
tools that take its ``--shape``): `SHAPES`, transformers configs of real models'
layouts, and `make_model`, one in bf16 on a GPU or float32 on the CPU
(`e2e_paths.DEVICE`)."""

from __future__ import annotations

from typing import Any

import e2e_paths
import torch
import transformers

SHAPES = {
    # a small model for the CPU backend (`--device cpu`): 8 layers, 8 q / 2 kv heads of 64
    "s": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=2, head_dim=64, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
    # Qwen2.5-1.5B's layout: 28 layers, 12 query heads over 2 K/V heads of 128 (a GQA group of 6,
    # not a power of two), q / k / v biases, a 151,936-token vocabulary
    "q15": dict(family="Qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    # StarCoderBase-3B's layout (GPTBigCode): 36 layers, 22 query heads of 128 over one K/V head
    # (multi-query: a group past 16, decoded as two chunks of heads sharing each K/V tile)
    "sc3": dict(family="GPTBigCode", n_embd=2816, n_inner=11264, n_layer=36, n_head=22, multi_query=True,
                vocab_size=49152),
    # Falcon-7B's layout: 32 layers, 71 query heads of 64 over one K/V head (multi-query: a group
    # of 71, decoded as five chunks of heads sharing each K/V tile, prefilled in tiles of 8 heads x
    # 16 tokens), attention and MLP side by side (parallel_attn), a 65,024-token vocabulary
    "f7": dict(family="Falcon", hidden_size=4544, num_hidden_layers=32, num_attention_heads=71,
               multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
               vocab_size=65024),
    # heads 512 wide, as Gemma-4's full-attention layers' (a Llama of the 1b shape's size
    # otherwise): kvpager decodes them on CUDA cores and prefills them with two warps a query row
    "w512": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=512, vocab_size=128256),
    # recurrent layers beside attention (`kvpager.hf.recurrent`): Qwen3.5's layout, three layers of
    # linear attention (Gated DeltaNet) to one of full attention, small enough for the CPU backend
    # (`--device cpu --shapes q35s`)
    "q35s": dict(family="Qwen3_5Text", model="Qwen3_5ForCausalLM", hidden_size=512, intermediate_size=1376,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                 linear_num_value_heads=8, linear_num_key_heads=4, linear_key_head_dim=64,
                 linear_value_head_dim=64, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 2,
                 vocab_size=32000),
    # the same layout at about 2B parameters (24 layers: 18 of Gated DeltaNet, 6 of full attention
    # with 16 query heads, 2 K/V heads of 256 dims), for a GPU
    "q35": dict(family="Qwen3_5Text", model="Qwen3_5ForCausalLM", hidden_size=2048, intermediate_size=6144,
                num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                linear_num_value_heads=32, linear_num_key_heads=16, linear_key_head_dim=128,
                linear_value_head_dim=128, layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 6,
                vocab_size=151936),
    # multi-head latent attention, DeepSeek-V2-Lite's attention (27 layers, 16 heads, a 512-value
    # latent, q and k of 128 + 64 dims, v of 128) with a dense MLP in every layer (its routed
    # experts left out: transformers' expert loop would dominate both sides' steps)
    "mla": dict(family="DeepseekV3", hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
                num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=27,
                vocab_size=102400),
}


def add_model_arguments(ap: Any) -> None:
    """``--device`` and ``--shape``, as the benchmarks of one model take them."""
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None, help="a bench_e2e.py shape (default 1b on a GPU, s on the CPU)")


def model_from(args: Any) -> tuple[str, torch.nn.Module]:
    """The shape ``args`` name (1b on a GPU, s on the CPU where none) and its model, on
    ``args.device`` (`e2e_paths.DEVICE` set to it)."""
    e2e_paths.DEVICE = args.device
    shape = args.shape or ("1b" if args.device == "cuda" else "s")
    return shape, make_model(shape)


def make_model(shape: str) -> torch.nn.Module:
    fields = dict(SHAPES[shape])
    family = fields.pop("family", "Llama")
    model_class = fields.pop("model", f"{family}ForCausalLM")
    config = getattr(transformers, f"{family}Config")(
        **fields, max_position_embeddings=8192, rope_theta=500000.0, initializer_range=0.02, bos_token_id=1,
        eos_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    # bf16 on a GPU; float32 on the CPU, where bf16 matmuls are slow and the NumPy pools compute in float32
    dtype = torch.bfloat16 if e2e_paths.DEVICE == "cuda" else torch.float32
    with torch.device(e2e_paths.DEVICE):
        model = getattr(transformers, model_class)(config).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
