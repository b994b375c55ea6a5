"""kvpager attention inside a transformers model: the attention function and the forward pass.

The model runs unchanged; only its attention function is swapped. A forward
pass takes the batch's new tokens packed into one row (no padding), each with
its own position id, and every attention layer

1. writes the step's K/V into the pool at the slots kvpager handed out, then
2. returns paged attention of the new tokens over everything their
   sequences hold, causal within them,

in one call, ``plan.write_attend(layer, q, k, v, ...)``, on transformers'
heads-first views as they come (inside ``torch.compile``, through the custom
op ``kvpager::write_attend``: `kvpager.hf.compiled`).

`register` makes ``attn_implementation="kvpager"`` known to transformers (done
on import); `paged_attention` (`kvpager.hf.switching`) switches a model to it for a block; `paged_forward`
runs one pass with the step's `PagedBatch`. Every keyword argument transformers
passes to the attention function is honoured or refused by name (see
`kvpager.hf.model`). `kvpager.hf.generation` drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface

from kvpager.errors import InvalidArgument, UnsupportedConfiguration, UnsupportedModel
from kvpager.hf.checks import check_layers_ran, check_packable, refused_pass
from kvpager.hf.compiled import HAS_OP, current, is_compiling, running
from kvpager.hf.compiled import write_attend as _write_attend_op
from kvpager.hf.fitting import fit_layer, pool_mismatch
from kvpager.hf.model import ABSENT, IGNORED, check_call, temperature_tuned

# the switch (`paged_attention`) and the name it switches to, re-exported from their home
from kvpager.hf.switching import (  # noqa: F401
    ATTN_IMPLEMENTATION,
    OutsidePagedPass,
    _set_attn,
    attention_before,
    paged_attention,
)
from kvpager.hf.windows import layer_chunk


@dataclass
class PagedBatch:
    """What the attention layers of one forward pass need from kvpager: the
    step's plan (block tables, lengths and slots, uploaded once). Passed to the
    model as the ``kvpager`` keyword argument."""

    plan: Any  # kvpager.plan.StepPlan
    dtype: torch.dtype  # the pool's dtype
    device: torch.device  # where the pool's tensors live (cpu, or its GPU; a name is taken)
    windows: Sequence[int | None] | None = None  # per layer (`layer_windows`); None: as transformers passes them
    #: per layer, its attention chunk or None (`layer_chunks`); None: read from each layer's config at call time
    chunks: Sequence[int | None] | None = None
    #: per layer, (the pool layer it attends over, whether it stores its K/V there) where some layers
    #: reuse an earlier layer's K/V (`kvpager.hf.model.layer_map`); None: each layer its own
    layers: Sequence[tuple[int, bool]] | None = None
    #: called as ``observe(layer, key, value)`` with what each layer stores, padded as the pool holds it
    #: (eager passes only: `kvpager.hf.fp8.calibrate_kv_scales`)
    observe: Any = None
    #: (the pool's K/V heads, head dim) where the model's layers differ in geometry (`kvpager.hf.model.layer_fit`):
    #: each layer's tensors are fitted to them (`kvpager.hf.fitting`); None: every layer has the pool's
    fit: tuple[int, int] | None = None
    #: the current pass's layer calls (`write_attend`) and a bit per layer called: `run_pass`
    #: zeroes them before a pass and checks after it that each layer ran through kvpager once
    layers_run: int = field(default=0, init=False, repr=False)
    layers_seen: int = field(default=0, init=False, repr=False)
    #: the current pass's position ids ([1, T], the packed row's): `run_pass` sets them
    positions: torch.Tensor | None = field(default=None, init=False, repr=False)
    #: padded rows (a model with recurrent layers' rows left-padded to one length, `kvpager.hf.recurrent`;
    #: a `PagedCache` pass's, `kvpager.hf.paged_cache`): the flat indices (into rows x tokens) of their
    #: tokens, in the plan's order; None: no padding
    real: torch.Tensor | None = field(default=None, repr=False)
    #: the pass gives its kept positions' logits [positions, vocab], not their greedy tokens (a
    #: sampled generation draws its tokens from them: `kvpager.hf.sampling`)
    logits: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"PagedBatch: dtype must be the pool's torch.dtype, got {self.dtype!r}")
        if not isinstance(self.device, torch.device):
            self.device = torch.device(self.device)  # a name: "cpu", "cuda:0"
        self.on_cpu = self.device.type == "cpu"

    def pool_layer(self, layer: int) -> tuple[int, bool]:
        """(the pool layer ``layer`` attends over, whether it stores its K/V there)."""
        return (layer, True) if self.layers is None else self.layers[layer]


def _to_pool(x: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """[T, heads, head_dim] in the pool's dtype and on its device (a no-op for
    a model on the pool's GPU in the pool's dtype: two attribute reads)."""
    if x.dtype is not batch.dtype:
        x = x.to(batch.dtype)
    if x.is_cuda == batch.on_cpu:  # another GPU than the pool's is the plan's error to raise
        x = x.to(batch.device)
    return x


def _to_pool_device(x: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """``x`` on the pool's device (a no-op where it is there)."""
    return x if x.is_cuda != batch.on_cpu else x.to(batch.device)


def kvpager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kvpager: PagedBatch | None = None,
    sliding_window: Any = ABSENT,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    kvpager_layer: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: store this layer's K/V in the pool and
    attend over the pool, through the step's plan. query [1, Hq, T, D],
    key/value [1, Hkv, T, D] (the packed row); returns [1, T, Hq, D]. The
    attention mask is not used: the plan knows each sequence's extent and
    attends causally, within the layer's sliding window if it has one (or its
    attention chunk: Llama-4's chunked layers, `kvpager.hf.model.layer_chunk`),
    scores soft-capped by ``softcap`` if given, with the attention sinks ``s_aux`` (a
    logit per query head in the softmax denominator: GPT-OSS) if given. Queries
    of a layer whose module tunes their temperature by position (Llama-4's NoPE
    layers) are scaled here, by the packed row's positions. A value
    head dim other than the query's (latent attention) is zero-padded to the
    pool's, and the output cut back to it. A module shared by several layers
    (Zamba's) attends for the layer its call passes as ``kvpager_layer``
    (`kvpager.hf.switching`). Any other argument that would change the result is
    refused (`kvpager.hf.model.check_call`)."""
    if kvpager is None:
        # Some families' decoder layers do not pass their keyword arguments on to
        # attention (StableLM, Nemotron): the pass's batch is still the current one.
        kvpager = current()
        if kvpager is None:
            # (most often another thread's call of a model a kvpager pass has switched: the switch is
            # the shared config's, so that call reaches here with no batch of its own)
            raise OutsidePagedPass(
                f"{type(module).__name__}: attn_implementation={ATTN_IMPLEMENTATION!r} outside a kvpager pass of "
                "this thread (the model is switched to kvpager attention while a pass of it runs, in any thread: "
                "a PagedCache's, generate's); call the model after that pass, or through kvpager.hf (generate, "
                "score, a PagedCache of its own), or pass the kvpager=PagedBatch(...) keyword"
            )
    rows, tokens = query.shape[0], query.shape[2]
    if rows != 1:  # rows of equal length, each a sequence's new tokens (`kvpager.hf.recurrent`): packed
        if key.shape[0] != rows or value.shape[0] != rows or key.shape[2] != tokens or value.shape[2] != tokens:
            raise InvalidArgument(f"kvpager attention takes one packed row, or rows of as many new tokens each, got "
                                  f"q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}")
        if tokens == 1:  # (a decode step's rows: one swap of axes makes the packed row's view)
            query, key, value = query.transpose(0, 2), key.transpose(0, 2), value.transpose(0, 2)
        else:
            query, key, value = (x.transpose(1, 2).reshape(1, rows * tokens, x.shape[1], x.shape[3]).transpose(1, 2)
                                 for x in (query, key, value))
    if kvpager.real is not None:  # padded rows: their tokens alone (padding is neither stored nor read)
        query, key, value = (x.index_select(2, kvpager.real) for x in (query, key, value))
    batch = kvpager
    # (a module shared by several layers is told its layer at each call: `kvpager.hf.switching`)
    layer = module.layer_idx if kvpager_layer is None else kvpager_layer
    if layer is None or layer < 0:
        raise UnsupportedModel(
            f"{type(module).__name__} is shared by several layers (layer_idx {layer}), and this call did not say "
            "which layer it attends for: run the model through kvpager.hf (generate, paged_attention), which has "
            "each call pass its layer on")
    if batch.windows is not None:
        window = batch.windows[layer]
    else:
        window = None if sliding_window is ABSENT else sliding_window
    # arguments that change nothing here (`IGNORED`, passed at every layer) need no closer look
    if (kwargs and not kwargs.keys() <= IGNORED) or dropout \
            or (sliding_window is not ABSENT and sliding_window != window) \
            or key.shape != value.shape or key.shape[2] != query.shape[2] or key.shape[3] != query.shape[3]:
        check_call(layer, query, key, value, dropout, sliding_window, window, kwargs)
    if s_aux is not None and s_aux.dtype is not torch.float32:
        s_aux = s_aux.float()  # the kernels read float32 sinks
    chunk = batch.chunks[layer] if batch.chunks is not None else layer_chunk(module, layer)
    own = module.__dict__  # (a plain dict's lookups: an nn.Module's getattr of a missing name costs ~1 us)
    tuning = own.get("_kvpager_tuning")
    if tuning is None and own.get("attn_temperature_tuning") and temperature_tuned(module):
        raise UnsupportedModel(f"layer {layer} scales its queries by positions it counts from its own cache, which "
                               "kvpager's packed row does not have; run the model through kvpager.hf (generate, "
                               "paged_attention), which has kvpager apply that scaling")
    dv = value.shape[3]
    fitted = None
    if batch.fit is not None:  # layers of other geometry than the pool's (Gemma-4)
        fitted = fit_layer(query, key, value, scaling, *batch.fit)
        query, key, value, scaling = fitted.query, fitted.key, fitted.value, fitted.scaling
    if value.shape[3] != key.shape[3]:
        # v of another head dim than q and k (latent attention: 192 for q and k, 128 for v):
        # the pool holds the wider; zeros added to v add nothing to the output, which is cut
        # back to v's width, and zeros added to q and k nothing to their scores.
        if dv < key.shape[3]:
            value = torch.nn.functional.pad(value, (0, key.shape[3] - dv))
        else:
            scaling = key.shape[3] ** -0.5 if scaling is None else scaling
            query = torch.nn.functional.pad(query, (0, dv - key.shape[3]))
            key = torch.nn.functional.pad(key, (0, dv - key.shape[3]))
    if batch.observe is not None:
        pool_layer, stores = batch.pool_layer(layer)
        if stores:
            batch.observe(pool_layer, key, value)
    if HAS_OP and is_compiling():  # one opaque op for the compiler (`kvpager.hf.compiled`)
        out = _write_attend_op(query, key, value, layer, None if scaling is None else float(scaling),
                               None if window is None else int(window),
                               None if softcap is None else float(softcap), s_aux, chunk,
                               *((None, None) if tuning is None else tuning))
    else:
        out = write_attend(batch, layer, query, key, value, scaling, window, softcap, s_aux, chunk, tuning)
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
            out = _NoGradient.apply(out, query, key, value)
    if fitted is not None:
        out = fitted.output(out)
    elif out.shape[3] != dv:
        out = out[..., :dv]
    if batch.real is not None:  # back to the padded rows (zeros at the padding, which nothing reads)
        out = out.new_zeros((rows * tokens, out.shape[2], out.shape[3])).index_copy_(0, batch.real, out[0])
    elif rows == 1:
        return out, None
    return out.reshape(rows, tokens, out.shape[-2], out.shape[-1]), None


def write_attend(batch: PagedBatch, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scale: float | None, window: int | None, softcap: float | None,
                 sinks: torch.Tensor | None = None, chunk: int | None = None,
                 tuning: tuple[float, float] | None = None) -> torch.Tensor:
    """One layer through ``batch``'s plan (`StepPlan.write_attend`), the tensors
    crossed into the pool's dtype and device and the output back into the
    query's; what the attention function and the ``kvpager::write_attend`` op run.
    A layer that reuses an earlier layer's K/V (`PagedBatch.layers`) writes
    nothing: ``key`` and ``value`` are its source's, already stored, and it
    attends over that pool layer (`StepPlan.attend`). ``chunk``: a layer of
    chunked attention (`StepPlan.chunked`). ``tuning`` (attn_scale, floor_scale):
    the queries are first scaled by 1 + attn_scale * log1p(floor((p + 1) /
    floor_scale)) at their positions p, as Llama-4's NoPE layers scale them
    (`tuned_queries`)."""
    sinks = None if sinks is None else _to_pool_device(sinks, batch)
    if tuning is not None:
        query = tuned_queries(query, batch.positions, *tuning)
    pool_layer, stores = batch.pool_layer(layer)
    if stores:
        # [1, H, T, D] views of the projections' token-major memory: the plan launches on their pointers
        try:
            out = batch.plan.write_attend(pool_layer, _to_pool(query, batch), _to_pool(key, batch),
                                          _to_pool(value, batch), scale, window=window, softcap=softcap,
                                          sinks=sinks, chunk=chunk)
        except InvalidArgument as e:
            if (wrong := pool_mismatch(batch.plan.spec, layer, key, value)) is None:
                raise
            raise InvalidArgument(wrong) from e
    else:
        plan = batch.plan if chunk is None else batch.plan.chunked(chunk)
        q = _to_pool(query, batch)[0].transpose(0, 1).contiguous()  # [T, H, D]: a view where q is token-major
        out = plan.attend(pool_layer, q, scale, window=window, softcap=softcap, sinks=sinks).unsqueeze(0)
    batch.layers_run += 1  # (the plan has checked the layer)
    batch.layers_seen |= 1 << layer
    if out.dtype is not query.dtype or out.is_cuda != query.is_cuda:
        out = out.to(device=query.device, dtype=query.dtype)
    return out


class _NoGradient(torch.autograd.Function):
    """kvpager attention's output where autograd records the pass (a forward run
    with gradients on): the values as computed, and a backward that refuses, since
    the pool's kernels compute no gradients (else the loss's gradient would leave
    out every path through attention, and no one would know)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise UnsupportedConfiguration(
            "kvpager attention computes no gradients (the pool's kernels run inference alone): a backward "
            "through a pass over a kvpager pool would leave attention out; train on transformers' own cache, "
            "and run kvpager passes under torch.no_grad() or torch.inference_mode()")


def tuned_queries(query: torch.Tensor, positions: torch.Tensor | None, attn_scale: float,
                  floor_scale: float) -> torch.Tensor:
    """``query`` [1, H, T, D] scaled at each token's position as Llama-4's NoPE
    layers scale it (with the same operations, in the same order and precision,
    so the values are those transformers computes), by the pass's ``positions``
    [1, T] rather than the count a cache would give; a view of token-major memory."""
    if positions is None:
        raise RuntimeError("this layer scales its queries by position, but the pass has no position ids: run "
                           "it through kvpager.hf.paged_forward (or compiled_forward)")
    scales = torch.log1p(torch.floor((positions[0].to(query.device).float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return (query.transpose(1, 2) * scales.view(1, -1, 1, 1)).to(query.dtype).transpose(1, 2)


def paged_forward(model: Any, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  logits_to_keep: Any = 0) -> torch.Tensor:
    """One forward pass of ``model`` (switched to kvpager attention) over a packed
    row; returns the greedy next token of each kept position (their logits where
    ``batch.logits``). Nothing here waits
    for the device, so a CUDA graph can capture it. A model compiled by its user
    (``torch.compile(model)``) works too: its attention layers call the
    ``kvpager::write_attend`` op, which reaches ``batch`` through `running`.
    ValueError for a model with recurrent layers, whose layers would mix the
    packed row's sequences (`check_packable`)."""
    check_packable(model, batch)
    return run_pass(model, batch, forward_pass, input_ids, position_ids, logits_to_keep)


def run_pass(model: Any, batch: PagedBatch, fn: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
             logits_to_keep: Any = 0) -> torch.Tensor:
    """``fn(model, batch, input_ids, position_ids, logits_to_keep)`` (`forward_pass`,
    or it compiled) with ``batch`` current and its positions set, then
    `check_layers_ran`. A model whose class says its attention does not go
    through transformers' attention interface and that fails inside its own
    code before any layer reached kvpager gets that said, with its error as the
    cause."""
    with running(batch):
        batch.layers_run = batch.layers_seen = 0
        batch.positions = position_ids
        try:
            out = fn(model, batch, input_ids, position_ids, logits_to_keep)
        except Exception as e:
            refusal = refused_pass(model, batch, e)
            if refusal is None:
                raise
            raise refusal from e
    check_layers_ran(model, batch)
    return out


def forward_pass(model: Any, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 logits_to_keep: Any = 0) -> torch.Tensor:
    """`paged_forward` without making ``batch`` current: what `compiled_forward`
    compiles (it makes the batch current around the compiled call; checking
    whether a trace is under way instead would not be safe across threads,
    where torch's flag is global)."""
    # A 4-D mask is taken as given: transformers builds none (no work, no host sync).
    mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=input_ids.device)
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=mask,
        use_cache=False,
        logits_to_keep=logits_to_keep,
        kvpager=batch,
    )
    return out.logits[0] if batch.logits else out.logits[0].argmax(dim=-1)


def _no_mask(*args: Any, **kwargs: Any) -> Any:
    """The mask function paired with kvpager attention: it needs none. Called with no
    kvpager pass current in this thread, it is another caller's call of a model that a
    pass has switched (the switch is the shared config's): that call gets the mask of
    the attention the model had before, which its layers run once the pass has ended
    (they raise `OutsidePagedPass` while it runs). Without a mask its padding and
    windows went unmasked: other logits without a word."""
    if current() is not None:
        return None
    before = attention_before(kwargs.get("config"))
    if before is None:
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    try:
        build = ALL_MASK_ATTENTION_FUNCTIONS[before]
    except KeyError:  # (an attention of the caller's own, with no mask function registered)
        return None
    return build(*args, **kwargs)


def register() -> None:
    """Make ``attn_implementation="kvpager"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvpager_attention)
    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # older releases build an sdpa-style mask, which is ignored
        return
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


register()
