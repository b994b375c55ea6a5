"""The checks `kvpager.hf` runs on a model and its arguments before anything is
allocated: that it is a language model with its head, in eval mode where
dropout would apply, without position biases kvpager's attention would not
add, that the pool has its KV geometry (`check_model`); that the model and pool are what they
say (`check_model_and_pool`); the end-of-sequence ids (`end_tokens`); before
scoring, that a pass given no positions numbers them as generation does
(`check_position_numbering`); before
a packed pass, that its row can carry the model's sequences
(`check_packable`), and after it, that every layer attended
through kvpager once (`check_layers_ran`). A model it cannot serve gets
`UnsupportedModel`, a bad argument `InvalidArgument` (both ValueErrors), a
wrong kind of object a TypeError. Moved from `kvpager.hf.model` (which still answers their names) and
`kvpager.hf.attention`."""

from __future__ import annotations

from typing import Any

import torch

from kvpager.errors import InvalidArgument, KVPagerError, UnsupportedModel
from kvpager.hf.model import (
    decoder_module,
    has_recurrent_layers,
    legacy_layer_types,
    model_geometry,
    modules_of,
    text_config,
)
from kvpager.hf.windows import layer_chunks, layer_windows
from kvpager.spec import PoolSpec
from kvpager.validate import described, integer


def check_model(model: Any, pool: Any) -> list[int | None]:
    """The model's per-layer sliding windows (`layer_windows`), after checking
    that it is a language model with its head (`check_head`), in eval mode
    where dropout would apply (`check_eval_mode`), that kvpager can attend for
    it, and that ``pool`` has its KV geometry (and a block size that divides
    its attention chunk, if it has chunked layers: `layer_chunks`)."""
    check_head(model)
    modules = modules_of(model)
    check_eval_mode(model, modules)
    check_position_bias(model)
    check_mask_bias(model, modules)
    check_own_cache(model)
    check_module_states(model)
    windows = layer_windows(model)
    layer_chunks(model, pool.spec.block_size)
    want = model_geometry(text_config(model))
    spec = pool.spec
    have = {k: getattr(spec, k) for k in want}
    if have != want:
        raise InvalidArgument(f"pool geometry {have} does not match the model's {want}")
    return windows


#: names of a learned absolute position table among the language model's own modules
#: (GPT-2, GPT-Neo, GPT-BigCode: ``wpe``; OPT, BioGPT: ``embed_positions``, with an offset)
_POSITION_TABLES = frozenset({"wpe", "embed_positions", "position_embeddings"})


def position_limit(model: Any) -> int | None:
    """How many positions ``model``'s learned absolute position table holds (its
    rows less the offset its positions start at), where it has one: a direct
    child of its language model (`decoder_module`) that is an embedding under a
    known name; None for rotary, ALiBi, sinusoidal or no positions."""
    for name, module in decoder_module(model).named_children():
        if name in _POSITION_TABLES and isinstance(module, torch.nn.Embedding):
            return module.num_embeddings - int(getattr(module, "offset", 0) or 0)
    return None


def check_positions(model: Any, most: int, what: str) -> None:
    """InvalidArgument, before anything is allocated, where a call feeds the model
    more than the positions its learned position table holds (`position_limit`):
    ``most``, the most tokens a sequence of the call is fed (its prompt, and its new
    tokens but the last, which is never fed back). It failed late with an IndexError
    inside the model's embedding, after its prompts were allocated and passes had run."""
    limit = position_limit(model)
    if limit is not None and most > limit:
        raise InvalidArgument(f"{what}: the model's learned position table holds {limit} positions, and this "
                              f"call feeds a sequence {most} tokens (its prompt and new tokens, but the last): "
                              "shorten the prompt or ask fewer new tokens")


def check_head(model: Any) -> None:
    """ValueError for a model without a language-model head (``AutoModel`` where
    ``AutoModelForCausalLM`` was meant: `LlamaModel`), which transformers'
    ``generate`` refuses too: it has no logits, and its first pass failed with an
    AttributeError after the prompts were allocated. A model that says it cannot
    generate (`can_generate`) and has no output embeddings is refused; one with
    either (remote code that does not inherit ``GenerationMixin``) is taken."""
    can = getattr(model, "can_generate", None)
    heads = getattr(model, "get_output_embeddings", None)
    if callable(can) and not can() and callable(heads) and heads() is None:
        raise UnsupportedModel(f"model: {type(model).__name__} has no language-model head, so no next-token logits; "
                               "load it with AutoModelForCausalLM (or its ...ForCausalLM class), not AutoModel")


def check_position_bias(model: Any) -> None:
    """ValueError for a model whose attention adds ALiBi position biases
    (``config.alibi``: Falcon-RW, and Falcon of any kind where so configured):
    transformers adds them to the attention mask, which kvpager's attention
    neither builds nor reads (it attends causally over the pool by the plan's
    extents), so its scores would miss them. Before: Falcon's own code failed
    on the absent mask, explained as attention outside the interface."""
    config = text_config(model)
    where = ("config.alibi" if getattr(config, "alibi", False) is True
             else "config.attn_config.alibi" if getattr(getattr(config, "attn_config", None), "alibi", False) is True
             else None)  # (MPT's: in its attention config)
    if where is not None:
        raise UnsupportedModel(f"{type(model).__name__} adds ALiBi position biases to its attention scores "
                               f"({where}=True), through the attention mask, which kvpager's attention does "
                               "not read: run this model with its own cache")


#: methods of an attention module that build its attention mask from the layer's own values:
#: Doge's dynamic mask attention (an additive bias a key, ``exp(A * softplus(dt_proj(v)))``,
#: and keys outside its top ``keep_window_size`` masked)
MASK_BUILDERS = ("prepare_dynamic_mask",)


def check_mask_bias(model: Any, modules: list[Any] | None = None) -> None:
    """ValueError (`UnsupportedModel`) for a model whose attention modules build their
    attention mask from the layer's values (`MASK_BUILDERS`: Doge): transformers adds that
    mask to the scores, and kvpager's attention does not read the mask (it attends
    causally over the pool by the plan's extents), so its tokens would be others, with no
    error. Before: served, and transformers' tokens only where the bias was the same for
    every key (a freshly built model's zero ``dt_proj``, ``A``), other tokens once trained.
    ``modules``: `modules_of` the model, where the caller has walked them already."""
    for cls in {type(m) for m in (modules_of(model) if modules is None else modules)}:
        for method in MASK_BUILDERS:
            if callable(getattr(cls, method, None)):
                raise UnsupportedModel(f"{type(model).__name__}: its {cls.__name__} builds its attention mask from "
                                       f"its values ({method}), an additive bias a key that kvpager's attention "
                                       "does not read: run this model with its own cache")


def check_position_numbering(model: Any) -> None:
    """ValueError (`UnsupportedModel`) for `score` of a model whose embeddings number a pass's
    positions from the padding index on where it is given none (RoBERTa and its kin as decoders,
    ``is_decoder``: XLM-R, CamemBERT, Data2Vec-text, ...; ``create_position_ids_from_input_ids``,
    position padding_idx + 1 + i), as a plain forward pass is, while transformers' ``generate``
    gives them position ids from 0. kvpager numbers them from 0, as generate does, so its
    tokens and beams are transformers'; its scores would be off the forward pass's
    log-probabilities (by up to 1.3 in a tiny random model), which `score` promises.
    Before: scored, with no error."""
    for cls in {type(m) for m in modules_of(model)}:
        if callable(getattr(cls, "create_position_ids_from_input_ids", None)):
            raise UnsupportedModel(f"{type(model).__name__}: its {cls.__name__} numbers positions from its padding "
                                   "index on (padding_idx + 1 + i) in a pass given no position ids, as a plain "
                                   "forward pass is, while transformers' generate gives position ids from 0: "
                                   "kvpager numbers them as generate does (its generate and beam_search give "
                                   "transformers' tokens), so its scores would not be the forward pass's: score "
                                   "this model with its own forward pass")


#: model types whose forward refuses every cache but its own class (transformers raises a
#: ValueError in the first pass, after the prompts were allocated): MiniMax (`MiniMaxCache`,
#: for its lightning-attention layers' states)
OWN_CACHE = frozenset({"minimax"})


def check_own_cache(model: Any) -> None:
    """ValueError (`UnsupportedModel`) for a model whose forward takes no cache but its
    own class (`OWN_CACHE`), before anything is allocated: kvpager hands the pass a cache
    of transformers' for the states of recurrent layers, which such a model refuses."""
    kind = getattr(text_config(model), "model_type", None)
    if kind in OWN_CACHE:
        raise UnsupportedModel(f"{type(model).__name__} (model type {kind}) takes no cache but its own class, "
                               "which holds its linear-attention layers' states: kvpager cannot hand it one, "
                               "run this model with its own cache")


def check_module_states(model: Any) -> None:
    """ValueError (`UnsupportedModel`) for a model whose config names its recurrent layers
    the old way only (`legacy_layer_types`: RecurrentGemma under older transformers, 5.17
    among them), before anything is allocated: its states live in its modules, never in
    the cache (where transformers names its layer kinds, `recurrent_states.check_layout`
    finds that at the first pass). Likewise a model class that says it keeps states
    (``_is_stateful``: transformers before 5.24 marks its hybrid and state-space models
    so, whose states then live in a cache class of their own; FalconH1, whose layers
    all say "attention", gave other tokens under 4.57)."""
    if getattr(type(model), "_is_stateful", False):
        import transformers

        raise UnsupportedModel(f"{type(model).__name__}: this transformers ({transformers.__version__}) keeps its "
                               "recurrent layers' states (state-space or linear-attention layers) in a cache class "
                               "of the model's own "
                               "(the model class says so: _is_stateful); kvpager moves states through transformers' "
                               "linear-attention cache layers (transformers 5.24 on), so it cannot serve this model "
                               "here: run it with its own cache, or under transformers 5.24 or later")
    config = text_config(model)
    if getattr(config, "layer_types", None) is None and legacy_layer_types(config) is not None:
        raise UnsupportedModel(f"{type(model).__name__}: its recurrent layers keep their states outside "
                               "transformers' cache (in their modules); kvpager moves each sequence's states "
                               "through the cache's linear-attention layers, so it cannot serve this model")


def check_eval_mode(model: Any, modules: list[Any] | None = None) -> None:
    """ValueError for a model in training mode (``model.train()``) where dropout
    would apply: a dropout module with p > 0, or a config field of a dropout
    probability above 0 (Starcoder2 drops out functionally, ``training=self.training``).
    Its tokens would be random, and the K/V it stores would be published to the
    prefix cache under the same default salt as the model in eval mode: before,
    a later eval-mode generation of the same prompt, from any caller, started
    from those blocks and gave other tokens than transformers'. Training mode
    without dropout gives eval mode's tokens and is taken. ``modules``: `modules_of` the
    model, where the caller has walked them already."""
    if not any(m.training for m in (modules_of(model) if modules is None else modules)):
        return
    drops = [f"{name}.p={m.p}" for name, m in model.named_modules()
             if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
    drops += [f"config.{k}={v}" for k, v in sorted(text_config(model).to_dict().items())
              if ("dropout" in k or "pdrop" in k) and type(v) in (int, float) and v > 0]
    if drops:
        raise UnsupportedModel(f"model is in training mode with dropout ({', '.join(drops[:3])}"
                               f"{', ...' if len(drops) > 3 else ''}): its tokens would be random and the K/V "
                               "it stores, shared through the prefix cache, wrong for every caller; call "
                               "model.eval() first")


def check_is_model(model: Any) -> None:
    """TypeError for a ``model`` that is no transformers model: no torch module, or
    one without a config (a bare ``nn.Linear`` raised an AttributeError from inside)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        what = "a torch.nn.Module with no config" if isinstance(model, torch.nn.Module) else type(model).__name__
        raise TypeError(f"model must be a transformers causal LM (a torch.nn.Module with a config), got {what}"
                        + (f" ({type(model).__name__})" if isinstance(model, torch.nn.Module) else ""))


def check_model_and_pool(model: Any, pool: Any) -> None:
    """TypeError, naming the argument, for a ``model`` that is no torch module or a
    ``pool`` without a pool's methods (a `PoolSpec` given where ``KVPool(spec)`` was
    meant, the two arguments swapped): before, an AttributeError from deep inside
    ('PoolSpec' object has no attribute 'spec')."""
    check_is_model(model)
    if not (callable(getattr(pool, "allocate", None)) and isinstance(getattr(pool, "spec", None), PoolSpec)):
        hint = ": pass KVPool(spec)" if isinstance(pool, PoolSpec) else ""
        raise TypeError(f"pool must be a kvpager pool (KVPool, or a daemon Client), got {type(pool).__name__}{hint}")


def model_eos(model: Any, eos: Any) -> Any:
    """``eos`` with "model" read as the model's generation config's end ids (what
    transformers' `generate` stops at; None where it names none): `generate`'s,
    `beam_search`'s and `PagedGeneration`'s default."""
    if isinstance(eos, str) and eos == "model":
        return getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return eos


def end_tokens(eos: Any) -> set[int]:
    """The end-of-sequence ids of ``eos`` (None, a token id, or a list, 1-D array or
    tensor of them; an id may be a NumPy integer or a 0-d integer tensor, as a
    tokenizer or a config hands them out); ValueError saying what was given otherwise."""
    if eos is None:
        return set()
    one = integer(eos)
    if one is not None:
        ids = {one}
    else:
        given = eos.tolist() if getattr(eos, "ndim", None) == 1 and hasattr(eos, "tolist") else eos
        many = None if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__") \
            or getattr(given, "ndim", 1) != 1 else [integer(e) for e in given]
        if many is None or None in many:
            raise InvalidArgument(f"eos_token_id must be None, a token id or a list of them (ints, NumPy integers "
                                  f"or 0-d integer tensors), got {described(eos)}")
        ids = set(many)
    if any(not -(1 << 63) <= e < 1 << 63 for e in ids):  # (ids outside the vocabulary are never generated)
        raise InvalidArgument(f"eos_token_id: token ids must be within int64, got {eos!r}")
    return ids


def check_packable(model: Any, batch: Any) -> None:
    """ValueError for a model with recurrent layers (`kvpager.hf.recurrent`) unless
    ``batch``'s row is one whole prompt (one sequence, every token of it new: its
    recurrent layers start from no state, as transformers' do): a packed row's
    sequences would run through those layers as one sequence, and a continued
    one without its state, giving wrong tokens without a word."""
    plan = batch.plan
    if has_recurrent_layers(model) and not (plan.num_seqs == 1
                                            and int(plan.query_lens[0]) == int(plan.seq_lens[0])):
        raise UnsupportedModel(f"{type(model).__name__} has recurrent layers (layer_types "
                               f"{sorted(set(text_config(model).layer_types))}): one packed row cannot carry its "
                               "sequences; run it through kvpager.hf.generate / PagedGeneration (kvpager.hf.recurrent)")


NOT_SERVED = ("its attention does not run through transformers' attention interface (attn_implementation), "
               "so kvpager cannot serve it: run this model with its own cache")


def check_layers_ran(model: Any, batch: Any) -> None:
    """ValueError unless ``batch``'s pass ran every layer of ``model`` through
    kvpager, once: a family whose attention does not go through transformers'
    attention interface (Falcon, MPT: their modules compute it themselves) would
    otherwise run its own attention over the new tokens alone, with nothing
    cached, and one that attends twice a layer
    (DiffLlama, Dory's recurrent loops) would overwrite a layer's K/V with its
    second call's (HRM-text counts its cycles as layers: as many calls as
    layers, over two of them): all generate wrong tokens without a word."""
    ran, layers = batch.layers_run, text_config(model).num_hidden_layers
    want, attending = (1 << layers) - 1, layers
    if batch.layers is not None:  # layers without attention (pool layer -1: `kvpager.hf.model.layer_map`)
        for i, (p, _) in enumerate(batch.layers):
            if p < 0:
                want &= ~(1 << i)
                attending -= 1
    if ran == attending and batch.layers_seen == want:
        return
    distinct = bin(batch.layers_seen).count("1")
    if ran > distinct:  # a layer attended twice: its second K/V would overwrite the first's
        raise UnsupportedModel(
            f"{type(model).__name__}: {ran} attention calls in one pass over {distinct} of its {layers} layers; "
            "it attends more than once a layer (recurrent loops over its layers, differential attention), and "
            "kvpager holds one K/V per layer and token: run this model with its own cache")
    raise UnsupportedModel(
        f"{type(model).__name__}: {distinct} of its {attending} attention layers attended through kvpager in this "
        "pass; " + NOT_SERVED)


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def refused_pass(model: Any, batch: Any, e: Exception) -> UnsupportedModel | None:
    """What a pass that raised ``e`` is, said by name, where its model's class says its
    attention does not go through transformers' attention interface and it failed in
    its own code before any layer reached kvpager (Bloom, XGLM, MPT); None where ``e``
    stands as it is (a kvpager error, out of memory, a layer ran, a CUDA graph
    capture, whose failures `kvpager.hf.graphs` explains after the eager pass before
    it, a model with recurrent layers, which run first as served code)."""
    if (isinstance(e, (KVPagerError, MemoryError, torch.cuda.OutOfMemoryError)) or batch.layers_run
            or getattr(type(model), "_supports_attention_backend", True) or capturing()
            or has_recurrent_layers(model)):
        return None
    check_position_bias(model)  # (its reason first, where it is the one: ALiBi Falcon, MPT)
    return UnsupportedModel(f"{type(model).__name__} failed under kvpager attention ({type(e).__name__}: {e}); "
                            + NOT_SERVED)
