"""kvpager.hf refuses by name what it cannot reproduce: bidirectional layers and
other layer kinds, layers of other geometry, K/V sharing it cannot follow,
families that attend by themselves or more than once a layer (nothing left
allocated), dropout, and attention arguments it does not honour. Float32 on
the CPU backend, the tiny models of test_hf_models.py."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_versions import OLD_TRANSFORMERS, falcon_attends_through_the_interface  # noqa: E402
from test_hf_models import (  # noqa: E402, F401
    COMMON,
    FULL,
    VOCAB,
    make_model,
    one_thread,
    prompt,
)

from kvpager import KVPool  # noqa: E402
from kvpager.errors import InvalidArgument, UnsupportedModel  # noqa: E402
from kvpager.hf import (  # noqa: E402
    PagedBatch,
    PagedCache,
    generate,
    kvpager_attention,
    layer_map,
    paged_attention,
    paged_forward,
    spec_for_model,
)
from kvpager.hf.recurrent_states import cache_argument  # noqa: E402


def test_bidirectional_layers_are_refused():
    model = make_model("gemma3", use_bidirectional_attention=True)
    if all(getattr(m, "is_causal", True) for m in model.modules()):
        pytest.skip(f"transformers {transformers.__version__}'s Gemma-3 has no bidirectional attention: causal")
    with pytest.raises(UnsupportedModel, match="bidirectional"):
        generate(model, KVPool(spec_for_model(model, num_blocks=16)), [prompt(4, 1)], 2)


def test_the_model_checks_walk_every_module_as_modules_does():
    """`modules_of` (the model checks' walk) is ``modules()``: root first, depth first
    in registration order, a module shared at two places once, a child set to None
    skipped; and a dropout module deep in a model is still found in training mode."""
    from kvpager.hf.model import modules_of

    shared = torch.nn.Linear(2, 2)
    inner = torch.nn.Sequential(torch.nn.ReLU(), shared, torch.nn.Sequential(torch.nn.Tanh(), shared))
    root = torch.nn.ModuleDict({"a": inner, "b": torch.nn.Identity(), "c": shared})
    root.register_module("gone", None)
    assert modules_of(root) == list(root.modules())
    model = make_model("llama")
    assert modules_of(model) == list(model.modules())
    model.model.layers[1].mlp.register_module("drop", torch.nn.Dropout(0.1))
    model.train()
    with pytest.raises(UnsupportedModel, match="dropout"):
        generate(model, KVPool(spec_for_model(model, num_blocks=16)), [prompt(4, 1)], 2)


def test_other_layer_kinds_are_refused():
    model = make_model("qwen2")
    model.config.layer_types = [FULL, "linear_attention", FULL, FULL]
    with pytest.raises(UnsupportedModel, match="linear_attention"):
        generate(model, KVPool(spec_for_model(model, num_blocks=16)), [prompt(4, 1)], 2)
    model.config.layer_types = [FULL, "chunked_attention", FULL, FULL]  # and no attention_chunk_size
    with pytest.raises(UnsupportedModel, match="attention_chunk_size is None"):
        generate(model, KVPool(spec_for_model(model, num_blocks=16)), [prompt(4, 1)], 2)


def test_position_scaling_outside_kvpager_hf_is_refused():
    """A Llama-4 switched to kvpager attention by hand (not through paged_attention)
    would scale its NoPE layers' queries by the packed row's positions: refused."""
    model = make_model("llama4")
    pool = KVPool(spec_for_model(model, num_blocks=16))
    (alloc,) = pool.allocate([prompt(4, 1)], "by-hand")
    batch = PagedBatch(pool.plan([alloc.seq_id], [4], alloc.slots), torch.float32, torch.device("cpu"))
    model.config._attn_implementation = "kvpager"
    with pytest.raises(UnsupportedModel, match="scales its queries by positions"), torch.no_grad():
        model(input_ids=torch.tensor([prompt(4, 1)]), position_ids=torch.arange(4)[None], use_cache=False,
              kvpager=batch)


def test_unknown_kv_sharing_is_refused():
    """Layers said to reuse earlier layers' K/V without the layer types that say
    which (Gemma-3n's sharing, served, needs them), or in a chain."""
    model = make_model("llama")
    model.config.num_kv_shared_layers = 2
    with pytest.raises(UnsupportedModel, match="num_kv_shared_layers"):
        generate(model, KVPool(spec_for_model(model, num_blocks=16)), [prompt(4, 1)], 2)
    model = make_model("gemma3n")
    model.config.kv_source_layers = [0, 1, 2, 3, 1, 4]  # layer 5 would reuse layer 4, which reuses
    with pytest.raises(UnsupportedModel, match="reuse an earlier layer that stores"):
        layer_map(model)


# Families whose attention modules compute attention themselves, not through transformers'
# attention interface: Falcon (before transformers 5.25) and MPT (ALiBi) never call kvpager's
# (their own attention over the new tokens alone, nothing cached, generated wrong tokens without
# a word); Bloom and XGLM fail in their own code first.
OWN_ATTENTION = {
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(d_model=64, n_layers=2, n_heads=4)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=64, n_layer=2, n_head=4)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128)),
}


# Families that attend more than once a layer in a pass: DiffLlama (differential attention,
# two calls a layer) generated wrong tokens, its second call's K/V over the first's; Dory
# loops over its layers (its transformers cache keeps a copy of a layer per loop); HRM-text
# cycles over two layers and counts the cycles as layers (as many calls as it has "layers"),
# and generated wrong tokens.
MHA = {k: v for k, v in COMMON.items() if k != "num_key_value_heads"}
TWICE = {"diffllama": ("DiffLlamaConfig", "DiffLlamaForCausalLM", {**COMMON, "num_hidden_layers": 2}),
         "dory": ("DoryConfig", "DoryForCausalLM", {**COMMON, "num_hidden_layers": 2}),
         "hrm_text": ("HrmTextConfig", "HrmTextForCausalLM", {**MHA, "num_hidden_layers": 2})}


@pytest.mark.parametrize("family", list(TWICE))
def test_families_that_attend_twice_a_layer_are_refused(family):
    config_cls, model_cls, extra = TWICE[family]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"this transformers has no {model_cls}")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**extra)).eval()
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    # (transformers 4.x runs DiffLlama outside the attention interface: refused for that)
    twice = "more than once a layer" + ("|attention interface" if OLD_TRANSFORMERS else "")
    with pytest.raises(UnsupportedModel, match=f"{model_cls}.*({twice})"):
        generate(model, pool, [prompt(11, 1)], 3, eos_token_id=None)
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    pool.check_integrity()


@pytest.mark.parametrize("family", list(OWN_ATTENTION))
def test_families_that_attend_by_themselves_are_refused(family):
    config_cls, model_cls, extra = OWN_ATTENTION[family]
    if family == "falcon" and falcon_attends_through_the_interface():
        pytest.skip(f"transformers {transformers.__version__}'s Falcon attends through the interface (served: "
                    "test_hf_models)")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(vocab_size=VOCAB, **extra)).eval()
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    why = f"{model_cls}.*(attention interface|ALiBi)"  # (MPT's ALiBi, in its attn_config, named first)
    with pytest.raises(UnsupportedModel, match=why):
        generate(model, pool, [prompt(11, 1), prompt(4, 2)], 3, eos_token_id=None)
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0  # nothing left behind
    # the same through a PagedCache in transformers' generate: MPT's own code failed on the mask
    # kvpager does not build (an AttributeError), Bloom's and XGLM's likewise
    ids = torch.tensor([prompt(11, 1)])
    with pytest.raises(UnsupportedModel, match=why), PagedCache(model, pool) as cache:  # (MPT's when made)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0,
                       **{cache_argument(model): cache})
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    pool.check_integrity()


@pytest.mark.parametrize("multi_query", [True, False])
def test_alibi_is_refused_by_name(multi_query):
    """Falcon with ALiBi (Falcon-RW): transformers adds the biases to the attention
    mask, which kvpager's attention does not read. Refused before anything is
    allocated, in every transformers (before: its own code failed on the absent
    mask, explained as attention outside the interface)."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       alibi=True, multi_query=multi_query)
    model = transformers.FalconForCausalLM(config).eval()
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    with pytest.raises(UnsupportedModel, match=r"FalconForCausalLM adds ALiBi position biases .*config.alibi=True"):
        generate(model, pool, [prompt(11, 1), prompt(4, 2)], 3, eos_token_id=None)
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    # straight through paged_forward (no check_model): the same reason, not another
    p = prompt(5, 1)
    [a] = pool.allocate([p], "by hand")
    batch = PagedBatch(pool.plan([a.seq_id], [5], a.slots), torch.float32, torch.device("cpu"))
    with paged_attention(model), torch.inference_mode(), pytest.raises(UnsupportedModel, match="ALiBi position biases"):
        paged_forward(model, batch, torch.tensor([p]), torch.arange(5)[None])
    pool.free([a.seq_id])
    pool.check_integrity()


def test_a_model_that_takes_only_its_own_cache_is_refused_by_name():
    """MiniMax refuses every cache but its own class (for its lightning-attention layers'
    states): refused by name before anything is allocated (before: transformers' ValueError
    from the first pass, the prompts allocated)."""
    if not hasattr(transformers, "MiniMaxConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no MiniMax")
    torch.manual_seed(0)
    config = transformers.MiniMaxConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        num_local_experts=2, num_experts_per_tok=1,
                                        layer_types=["linear_attention", "full_attention"])
    model = transformers.MiniMaxForCausalLM(config).eval()
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    with pytest.raises(UnsupportedModel, match=r"MiniMaxForCausalLM \(model type minimax\) takes no cache but its own"):
        generate(model, pool, [prompt(11, 1), prompt(4, 2)], 3, eos_token_id=None)
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    pool.check_integrity()


def test_a_model_class_that_keeps_states_is_refused_by_name():
    """A model class marked stateful (transformers before 5.24 marks its hybrid and
    state-space models so: their states live in a cache class of their own, which kvpager
    does not hand the model; FalconH1, whose layers all say "attention", gave other tokens
    under 4.57) is refused by name before anything is allocated, by generate and by a
    PagedCache."""
    from kvpager.hf import PagedCache

    class StatefulLlama(transformers.LlamaForCausalLM):
        _is_stateful = True

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = StatefulLlama(config).eval()
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    with pytest.raises(UnsupportedModel, match=r"StatefulLlama: .* in a cache class of the model's own"):
        generate(model, pool, [prompt(11, 1)], 3, eos_token_id=None)
    with pytest.raises(UnsupportedModel, match=r"StatefulLlama: .*_is_stateful"):
        PagedCache(model, pool)
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    assert "forward" not in model.__dict__  # nothing taken over
    pool.check_integrity()


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_attention_that_does_not_follow_the_pools_config_is_named(family):
    """A config field the family ignores: GPT-2's and GPT-NeoX's attention makes a K/V
    head per query head whatever ``num_key_value_heads`` says, so a pool sized from
    it holds fewer K/V heads than the attention makes. Refused at the first pass by
    an error that says so (before: the plan's "k must have shape ..."), nothing
    left allocated. (A pool of another geometry than the config's is refused
    before anything is allocated: `check_model`.)"""
    if OLD_TRANSFORMERS and family == "gpt2":
        pytest.skip(f"transformers {transformers.__version__}'s GPT-2 passes is_causal=False: refused for that")
    cls = {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM")}
    config = getattr(transformers, cls[family][0])(
        vocab_size=VOCAB, hidden_size=64, n_embd=64, num_hidden_layers=2, n_layer=2, num_attention_heads=4,
        n_head=4, intermediate_size=128, bos_token_id=1, eos_token_id=2)
    config.num_key_value_heads = 2  # read by spec_for_model, not by the attention
    torch.manual_seed(0)
    model = getattr(transformers, cls[family][1])(config).eval()
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    assert pool.spec.num_kv_heads == 2
    with pytest.raises(InvalidArgument, match=r"layer 0's attention makes K/V of 4 heads x \d+ dims, where the pool "
                                         r"holds \d heads.*does not follow.*\(here 4 K/V heads\)"):
        generate(model, pool, [prompt(11, 1), prompt(4, 2)], 3, eos_token_id=None)
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    pool.check_integrity()


def test_dropout_in_training_mode_is_refused():
    model = make_model("llama", attention_dropout=0.1).train()
    with pytest.raises(UnsupportedModel, match="dropout"):
        generate(model, KVPool(spec_for_model(model, num_blocks=16)), [prompt(4, 1)], 2)


class _Layer(torch.nn.Module):
    layer_idx = 0


def _call(q_len=3, k_len=3, d=16, dv=16, dk=None, v_heads=2, **kwargs):
    q = torch.zeros(1, 4, q_len, d)
    k = torch.zeros(1, 2, k_len, dk or d)
    v = torch.zeros(1, v_heads, k_len, dv)
    batch = PagedBatch(None, torch.float32, torch.device("cpu"), [None])
    return kvpager_attention(_Layer(), q, k, v, None, kvpager=batch, **kwargs)


@pytest.mark.parametrize("name,value", [("sinks", torch.zeros(4)),
                                        ("head_mask", torch.ones(4)), ("position_bias", torch.zeros(1)),
                                        ("output_attentions", True), ("is_causal", False),
                                        ("cu_seq_lens_q", torch.zeros(2))])
def test_unhonoured_attention_arguments_are_refused_by_name(name, value):
    with pytest.raises(UnsupportedModel, match=name):
        _call(**{name: value})


def test_cross_attention_mismatched_heads_and_foreign_windows_are_refused():
    """v may differ from q and k in head dim (latent attention: padded, the families above),
    q and k may not, nor k and v in heads."""
    with pytest.raises(UnsupportedModel, match="cross-attention"):
        _call(k_len=5)
    with pytest.raises(UnsupportedModel, match="q and k of one head dim"):
        _call(dk=8)
    with pytest.raises(UnsupportedModel, match="q and k of one head dim"):
        _call(v_heads=4)
    with pytest.raises(UnsupportedModel, match="sliding_window=4"):
        _call(sliding_window=4)  # the layer's planned window is None


def test_arguments_that_change_no_attention_pass():
    """What some families pass down to attention without effect on it (which logits
    the LM head keeps: GOT-OCR2's wrapper) is not refused."""
    from kvpager.hf.model import ABSENT, check_call

    q, kv = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16)
    check_call(0, q, kv, kv, 0.0, ABSENT, None, {"logits_to_keep": torch.tensor([0, 2]), "use_cache": False})
    with pytest.raises(UnsupportedModel, match="head_mask"):
        check_call(0, q, kv, kv, 0.0, ABSENT, None, {"logits_to_keep": 1, "head_mask": torch.ones(4)})


@pytest.mark.parametrize("args, needle", [
    (([[1.5, 2.0]], 2), "token ids must be ints"),  # was truncated into ids 1 and 2
    (([[3, True]], 2), "token ids must be ints"),
    (([[VOCAB + 5]], 2), "outside the model's vocabulary"),  # was an IndexError in the embedding
    (([[-1, 4]], 2), "outside the model's vocabulary"),
    ((["abc"], 2), "must be a list of token ids"),
    (([[3, 4]], 1.5), "max_new_tokens must be an int"),  # was taken: two tokens generated
    (([[3, 4]], True), "max_new_tokens must be an int"),
    # (untyped errors before: a NotImplementedError, an OverflowError)
    ((torch.tensor([[3, 4]], device="meta"), 2), r"prompts\[0\]: its token ids cannot be read"),
    (([[3, 4]], 2, None, 10**30), "eos_token_id: token ids must be within int64"),
])
def test_careless_generate_arguments_are_refused_before_anything_is_allocated(args, needle):
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=16))
    before = pool.stats()
    with pytest.raises(InvalidArgument, match=needle):
        generate(model, pool, *args)
    assert pool.stats() == before
    pool.check_integrity()


def test_an_eos_that_is_no_token_id_is_refused_by_name():
    model = make_model("llama")
    pool = KVPool(spec_for_model(model, num_blocks=16))
    with pytest.raises(InvalidArgument, match="eos_token_id must be"):
        generate(model, pool, [prompt(4, 1)], 2, eos_token_id="x")
    assert generate(model, pool, [prompt(4, 1)], 2, eos_token_id=[VOCAB - 1, VOCAB - 2]) == \
        generate(model, pool, [prompt(4, 1)], 2)  # a list of ids is taken


def test_attention_that_builds_its_mask_from_its_values_is_refused_by_name():
    """Doge's dynamic mask attention adds a bias a key, computed from the layer's values,
    through the attention mask, which kvpager's attention does not read. A freshly built
    Doge has a zero ``dt_proj`` and ``A`` (the same bias for every key: transformers'
    tokens either way), which is why a sweep of random models matched it; trained (here
    drawn), the bias changes transformers' tokens, and kvpager gave the unbiased ones with
    no error. Refused by name before anything is allocated."""
    if not hasattr(transformers, "DogeConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Doge")
    torch.manual_seed(0)
    config = transformers.DogeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.DogeForCausalLM(config).eval()
    tokens = torch.tensor([prompt(21, 1)])
    with torch.no_grad():
        flat = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False)
        for name, p in model.named_parameters():
            if name.endswith(".A") or ".dt_proj." in name:
                p.normal_(generator=torch.Generator().manual_seed(2))
        biased = model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False)
    assert flat.tolist() != biased.tolist()  # the bias is real: what kvpager would have left out
    pool = KVPool(spec_for_model(model, num_blocks=32, block_size=8))
    with pytest.raises(UnsupportedModel, match=r"DogeForCausalLM: its DogeAttention builds its attention mask from "
                                               r"its values \(prepare_dynamic_mask\)"):
        generate(model, pool, [prompt(11, 1), prompt(4, 2)], 3, eos_token_id=None)
    assert pool.stats().num_sequences == 0 and pool.stats().used_blocks == 0
    pool.check_integrity()


@pytest.mark.parametrize("family", ["stablelm", "llama"])
@pytest.mark.parametrize("how", ["forward", "generate", "config"])
def test_a_cache_pass_asking_for_attention_weights_is_refused_before_it_runs(family, how):
    """kvpager's attention computes no weights. StableLM's layers (as GPT-2's, OPT's,
    Falcon's) do not pass ``output_attentions`` on to the attention function, so a
    PagedCache pass returned empty weights without a word where Llama's refused."""
    model = make_model(family)
    pool = KVPool(spec_for_model(model, num_blocks=16, block_size=8))
    ids = torch.tensor([prompt(12, 1)])
    before = pool.stats()
    with PagedCache(model, pool) as cache, torch.no_grad():
        given = {cache_argument(model): cache}
        with pytest.raises(UnsupportedModel, match="output_attentions=True"):
            if how == "forward":
                model(ids, **given, output_attentions=True)
            elif how == "generate":
                model.generate(ids, **given, max_new_tokens=2, do_sample=False,
                               output_attentions=True, return_dict_in_generate=True)
            else:
                model.config._attn_implementation = "eager"  # (transformers refuses the flag under SDPA)
                model.config.output_attentions = True
                model(ids, **given)
        assert pool.stats() == before and cache.get_seq_length() == 0
        model.config.output_attentions = False
        out = model(ids, **given, output_attentions=False)  # (the cache serves on)
        with torch.no_grad():
            want = model(ids).logits
        assert torch.allclose(out.logits, want, atol=1e-4)
