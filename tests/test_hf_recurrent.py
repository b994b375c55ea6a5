"""Models with recurrent layers beside their attention layers (`kvpager.hf.recurrent`):
linear attention (Qwen3.5, Qwen3.5-MoE, Qwen3-Next, OLMo-hybrid; Kimi-Linear and
Bailing-hybrid with latent attention in their attention layers), state-space
mixers (Jamba, Bamba, Granite-4.0-H, Nemotron-H; beside attention in every layer:
Falcon-H1) and short convolutions (LFM2),
tiny random models in float32 on the CPU backend. kvpager's greedy tokens
against transformers' own generate of each prompt alone; sequences ending at
different steps (their states dropped from the batch); the pool holding the
attention layers alone, nothing left held; prompts seen before resuming from
held states (a daemon's client, packed rows and other edges:
`test_hf_recurrent_edges`)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.cache_utils", reason="needs transformers' cache layers")
if not hasattr(__import__("transformers.cache_utils").cache_utils, "LinearAttentionCacheLayerMixin"):
    pytest.skip("transformers without linear-attention cache layers", allow_module_level=True)

from test_hf_models import assert_tokens_vary, drawn  # noqa: E402, F401 (drawn: for the recurrent tests)

from kvpager import KVPool  # noqa: E402
from kvpager.errors import UnsupportedModel  # noqa: E402
from kvpager.hf import generate, spec_for_model  # noqa: E402
from kvpager.hf.recurrent import has_recurrent_layers  # noqa: E402
from kvpager.sizing import NO_KV_KINDS  # noqa: E402

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, pad_token_id=0)
#: weights drawn wider for the families whose tiny random models, at their default initializer
#: range, give each prompt one token repeated (a test of their decode steps could not fail there)
WIDE = dict(initializer_range=0.2)
LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
              mamba_chunk_size=16)
THREE_ONE = ["linear_attention"] * 3 + ["full_attention"]
# multi-head latent attention in the attention layers, Kimi Delta Attention in the others
MLA_KDA = dict(num_hidden_layers=4, layer_types=THREE_ONE, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
               qk_nope_head_dim=8, v_head_dim=16, linear_head_dim=16, linear_num_heads=4, num_experts=4,
               num_experts_per_token=2, moe_intermediate_size=32, num_key_value_heads=4)

# family: (config class prefix, model class, config fields)
FAMILIES = {
    "qwen3_5": ("Qwen3_5Text", "Qwen3_5ForCausalLM", dict(num_hidden_layers=4, layer_types=THREE_ONE, **LINEAR)),
    "qwen3_5_moe": ("Qwen3_5MoeText", "Qwen3_5MoeForCausalLM",
                    dict(num_hidden_layers=4, layer_types=THREE_ONE, **LINEAR, **MOE)),
    "qwen3_next": ("Qwen3Next", "Qwen3NextForCausalLM", dict(num_hidden_layers=4, layer_types=THREE_ONE, **LINEAR,
                                                             **MOE)),
    "olmo_hybrid": ("OlmoHybrid", "OlmoHybridForCausalLM", dict(num_hidden_layers=4)),
    "jamba": ("Jamba", "JambaForCausalLM", dict(num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=3,
                                                expert_layer_period=2, expert_layer_offset=1, num_experts=2,
                                                mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                                                use_mamba_kernels=False)),
    "bamba": ("Bamba", "BambaForCausalLM", dict(num_hidden_layers=4, attn_layer_indices=[3], **MAMBA2)),
    "granitemoehybrid": ("GraniteMoeHybrid", "GraniteMoeHybridForCausalLM",
                         dict(num_hidden_layers=4, layer_types=["mamba", "mamba", "mamba", "attention"],
                              num_local_experts=2, num_experts_per_tok=1, shared_intermediate_size=32, **MAMBA2)),
    "nemotron_h": ("NemotronH", "NemotronHForCausalLM", dict(num_hidden_layers=4)),
    "lfm2": ("Lfm2", "Lfm2ForCausalLM", dict(num_hidden_layers=4, full_attn_idxs=[2], **WIDE)),
    # attention and a Mamba mixer side by side in every layer ("hybrid")
    "falcon_h1": ("FalconH1", "FalconH1ForCausalLM", dict(num_hidden_layers=3, mamba_d_ssm=64, mamba_n_heads=8,
                                                          mamba_d_head=8, mamba_d_state=8, mamba_chunk_size=16, **WIDE)),
    # one attention block shared by the hybrid layers (Zamba2: two, with per-layer adapters), told its
    # layer at each call
    "zamba": ("Zamba", "ZambaForCausalLM", dict(num_hidden_layers=6, attn_layer_period=3, attn_layer_offset=1,
                                              attention_hidden_size=128, attention_head_dim=32, mamba_d_state=8,
                                              mamba_dt_rank=8, n_mamba_heads=2, use_mamba_kernels=False, **WIDE)),
    "zamba2": ("Zamba2", "Zamba2ForCausalLM",
               dict(num_hidden_layers=6, layers_block_type=["linear_attention", "hybrid", "linear_attention",
                                                            "hybrid", "hybrid", "linear_attention"],
                    mamba_d_state=8, n_mamba_heads=2, mamba_headdim=64, attention_head_dim=32,
                    attention_hidden_size=128, num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=8,
                    use_mem_rope=True, num_key_value_heads=4, **WIDE)),  # (its adapters assume as many K/V heads as q)
    # sliding-window attention layers beside the full ones and the recurrent ones
    "lara_mini": ("LaraMini", "LaraMiniForCausalLM",
                  dict(num_hidden_layers=4, layer_types=["linear_attention", "sliding_attention", "linear_attention",
                                                         "full_attention"], sliding_window=8, **LINEAR, **WIDE)),
    "lfm3": ("Lfm3", "Lfm3ForCausalLM", dict(num_hidden_layers=6, sliding_window=8,
                                             layer_types=["conv", "conv", "full_attention", "conv",
                                                          "sliding_attention", "conv"])),
    "lfm2_moe": ("Lfm2Moe", "Lfm2MoeForCausalLM", dict(num_hidden_layers=4, layer_types=["conv", "conv", "full_attention", "conv"],
                                                       num_dense_layers=1,
                                                       num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **WIDE)),
    # attention in every layer, its queries and keys through a short convolution and half of each
    # value from the previous token (both held as states, "hybrid")
    "zaya": ("Zaya", "ZayaForCausalLM", dict(num_hidden_layers=4, layer_types=["hybrid"] * 4, **WIDE)),
    "kimi_linear": ("KimiLinear", "KimiLinearForCausalLM", MLA_KDA),
    "bailing_hybrid": ("BailingHybrid", "BailingHybridForCausalLM",
                       dict(MLA_KDA, first_k_dense_replace=1, num_expert_group=1, topk_group=1, layer_group_size=4)),
}


def make(family: str, **fields):
    prefix, model_class, own = FAMILIES[family]
    if not hasattr(transformers, prefix + "Config"):
        pytest.skip(f"transformers {transformers.__version__} has no {prefix}Config")
    if getattr(getattr(transformers, model_class), "_is_stateful", False):
        # (transformers before 5.24 keeps such a model's states in a cache class of its own: refused by
        # name, `checks.check_module_states`; served from transformers' linear-attention cache layers)
        pytest.skip(f"transformers {transformers.__version__} keeps {model_class}'s states in its own cache class")
    config_class = getattr(transformers, prefix + "Config")
    base = config_class()
    config = config_class(**{**{k: v for k, v in SMALL.items() if hasattr(base, k)}, **own, **fields})
    torch.manual_seed(0)
    return getattr(transformers, model_class)(config).eval()


def prompts(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def reference(model, ps: list[list[int]], n: int, eos=None) -> list[list[int]]:
    """transformers' greedy tokens for each prompt alone (no padding)."""
    out = []
    for p in ps:
        ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def ending_early(model, ps: list[list[int]], n: int, at: list[tuple[int, int]]) -> tuple[list[int], list[list[int]]]:
    """End tokens (the token transformers gives prompt i at step j, for each (i, j) of
    ``at``) that end some sequences before ``n`` tokens and leave another to run all
    ``n``, and transformers' greedy tokens of each prompt with them."""
    with torch.inference_mode():
        free = reference(model, ps, n)
        eos = [free[i][j] for i, j in at]
        want = reference(model, ps, n, eos=eos)
    assert any(len(w) < n for w in want) and any(len(w) == n for w in want)
    return eos, want


def compiled_decode_passes(monkeypatch) -> dict:
    """From here on, the decode passes compiled with ``aot_eager`` and ``fullgraph`` (a
    graph break fails the pass; dynamo reset first: many models compiled in one
    process pass its recompile limit); returns the compiled functions made since."""
    import kvpager.hf.compiled as compiled
    from kvpager.hf.recurrent import Recurrent

    torch._dynamo.reset()
    made: dict = {}
    monkeypatch.setattr(compiled, "_compiled", made)
    monkeypatch.setattr(Recurrent, "compile", "aot_eager")
    monkeypatch.setattr(Recurrent, "fullgraph", True)
    return made


def computed_tokens(monkeypatch) -> list[int]:
    """The tokens each forward pass of `Recurrent` runs, as they come (its plan's: left padding not counted)."""
    from kvpager.hf.recurrent import Recurrent

    seen: list[int] = []
    real = Recurrent._pass

    def spy(self, plan, *args, **kwargs):
        seen.append(plan.num_tokens)  # (tokens, not the padding of left-padded rows)
        return real(self, plan, *args, **kwargs)

    monkeypatch.setattr(Recurrent, "_pass", spy)
    return seen


def assert_nothing_held(pool) -> None:
    """No sequence and no block in use left (the published ones evictable), the pool
    (an embedded one or a daemon's) consistent."""
    stats = pool.stats()
    assert stats.num_sequences == 0 and stats.used_blocks == 0
    assert stats.free_blocks + stats.evictable_blocks == stats.total_blocks
    pool.check_integrity()


@pytest.mark.parametrize("pad", [None, True], ids=["default", "padded"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tokens_equal_transformers(family, pad, monkeypatch):
    """Prompts of 1 to 40 tokens (some over several blocks), five new tokens each:
    kvpager's tokens are transformers'; the pool holds the attention layers alone,
    and nothing is left held in it (its blocks published, evictable). Prefilled in
    parts of lengths the rows share (the CPU's default), and left-padded in one pass
    (a GPU's)."""
    from kvpager.hf.recurrent import Recurrent

    monkeypatch.setattr(Recurrent, "pad_prompts", pad)
    model = make(family)
    assert has_recurrent_layers(model)
    kinds = model.config.layer_types
    attending = [k for k in kinds if k not in NO_KV_KINDS]
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    assert 0 < pool.spec.num_layers == len(attending) and (len(attending) < len(kinds) or family in ("falcon_h1", "zaya"))
    ps = prompts(9, 7, 40, 1, 16)
    with torch.inference_mode():
        want = reference(model, ps, 5)
    assert_tokens_vary(want, family)
    assert generate(model, pool, ps, max_new_tokens=5, eos_token_id=None) == want
    assert_nothing_held(pool)


@pytest.mark.parametrize("family", ["zamba", "zamba2"])
def test_attention_shared_across_layers_is_told_its_layer(family, monkeypatch):
    """Zamba's and Zamba2's attention block is one module shared by their hybrid
    layers (``layer_idx`` None / -1: transformers tells it the layer at each call).
    Under kvpager each call passes its layer on (`kvpager.hf.switching`), so each
    layer's K/V go to its own pool layer: transformers' tokens (above, and here with
    sequences ending early, compiled with ``fullgraph``, and a next generation
    compiling nothing again); the module is as it was after. Called without its layer (the model switched by hand, not through
    `paged_attention`), the attention function refuses by name."""
    from torch._dynamo.utils import counters

    from kvpager.hf import PagedBatch, layer_map, paged_forward
    from kvpager.hf.switching import _set_attn

    model = make(family)
    shared = {id(m): m for m in model.modules() if getattr(m, "layer_idx", 0) in (None, -1) and hasattr(m, "is_causal")}
    assert shared and all("forward" not in m.__dict__ for m in shared.values())
    ps = prompts(6, 17, 2, 9, seed=13)
    eos, want = ending_early(model, ps, 6, [(1, 1), (3, 3)])
    made = compiled_decode_passes(monkeypatch)
    pool = KVPool(spec_for_model(model, num_blocks=64, block_size=8))
    assert pool.spec.num_layers == model.config.layers_block_type.count("hybrid") < model.config.num_hidden_layers
    assert generate(model, pool, ps, max_new_tokens=6, eos_token_id=eos) == want
    assert made  # (the decode passes ran compiled)
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, pool, ps, max_new_tokens=6, eos_token_id=eos) == want
    assert counters["stats"]["unique_graphs"] == graphs  # the same generation again compiled nothing
    assert_nothing_held(pool)
    assert all("forward" not in m.__dict__ for m in shared.values())  # told only while switched
    [p] = prompts(5, seed=3)
    [a] = pool.allocate([p], "by hand")
    batch = PagedBatch(pool.plan([a.seq_id], [5], a.slots), torch.float32, torch.device("cpu"), layers=layer_map(model))
    _set_attn(model, "kvpager")
    with torch.inference_mode(), pytest.raises(UnsupportedModel, match="did not say which layer"):
        paged_forward(model, batch, torch.tensor([p]), torch.arange(5)[None])
    pool.free([a.seq_id])
