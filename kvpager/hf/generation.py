"""Hugging Face transformers on kvpager: a causal LM whose KV cache lives in a kvpager pool.

The model runs unchanged; only its attention function is swapped. A forward
pass takes the batch's new tokens packed into one row (no padding), each with
its own position id, and every attention layer

1. writes the step's K/V into the pool at the slots kvpager handed out
   (``pool.write(layer, slots, k, v)``), then
2. returns ``pool.attend(layer, seq_ids, q, query_lens)``: paged attention of
   the new tokens over everything their sequences hold, causal within them.

The pool is any object with `KVPool`'s methods: an embedded `kvpager.KVPool`
or a daemon client. Sequences are allocated with their prompt ids, so a
prompt whose leading blocks another worker already computed (under the same
salt) starts from them: only the uncached tail goes through the model.

Usage::

    pool = KVPool(spec_for_model(model, num_blocks=4096))
    outputs = generate(model, pool, [prompt_ids, ...], max_new_tokens=64)

Supported: decoder-only models whose attention modules go through
transformers' ``AttentionInterface`` (Llama, Mistral, Mixtral, Qwen2, Qwen3,
Gemma-2, Gemma-3, Phi-3, Starcoder2, ...): full and sliding-window layers (each
layer's window as transformers applies it), Gemma-2's logit soft cap, greedy
decoding. Every keyword argument transformers passes to the attention function
is honoured or refused by name (see `kvpager.hf.model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface

from kvpager.hf.model import ABSENT, check_call, default_salt, layer_windows
from kvpager.spec import PoolSpec, dtype_name

__all__ = ["PagedBatch", "PagedGeneration", "default_salt", "generate", "layer_windows", "spec_for_model"]

ATTN_IMPLEMENTATION = "kvpager"

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class PagedBatch:
    """What the attention layers of one forward pass need from kvpager: the
    step's plan (block tables, lengths and slots, uploaded once). Passed to the
    model as the ``kvpager`` keyword argument."""

    plan: Any  # kvpager.plan.StepPlan
    dtype: torch.dtype  # the pool's dtype
    device: torch.device  # where the pool's tensors live (cpu, or its GPU)
    windows: Sequence[int | None] | None = None  # per layer (`layer_windows`); None: as transformers passes them

    def __post_init__(self) -> None:
        self.on_cpu = self.device.type == "cpu"


def _to_pool(x: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """[T, heads, head_dim] in the pool's dtype and on its device (a no-op for
    a model on the pool's GPU in the pool's dtype: two attribute reads)."""
    if x.dtype is not batch.dtype:
        x = x.to(batch.dtype)
    if x.is_cuda == batch.on_cpu:  # another GPU than the pool's is the plan's error to raise
        x = x.to(batch.device)
    return x


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
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: store this layer's K/V in the pool and
    attend over the pool, through the step's plan. query [1, Hq, T, D],
    key/value [1, Hkv, T, D] (the packed row); returns [1, T, Hq, D]. The
    attention mask is not used: the plan knows each sequence's extent and
    attends causally, within the layer's sliding window if it has one, scores
    soft-capped by ``softcap`` if given. Any other argument that would change
    the result is refused (`kvpager.hf.model.check_call`)."""
    if kvpager is None:
        raise RuntimeError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} needs the kvpager=PagedBatch(...) "
            "keyword in the forward call; use kvpager.hf.generate"
        )
    if query.shape[0] != 1:
        raise ValueError(f"kvpager attention takes one packed row, got batch size {query.shape[0]}")
    batch = kvpager
    layer = module.layer_idx
    if batch.windows is not None:
        window = batch.windows[layer]
    else:
        window = None if sliding_window is ABSENT else sliding_window
    if kwargs or dropout or sliding_window != window or key.shape != value.shape or key.shape[2] != query.shape[2] \
            or key.shape[3] != query.shape[3]:
        check_call(layer, query, key, value, dropout, sliding_window, window, kwargs)
    # [1, H, T, D] -> [T, H, D]: a view; the projections' layout makes it dense.
    batch.plan.write(layer, _to_pool(key[0].transpose(0, 1), batch), _to_pool(value[0].transpose(0, 1), batch))
    out = batch.plan.attend(layer, _to_pool(query[0].transpose(0, 1), batch), scaling, window=window,
                            softcap=softcap)
    if out.dtype is not query.dtype or out.is_cuda != query.is_cuda:
        out = out.to(device=query.device, dtype=query.dtype)
    return out.unsqueeze(0), None


def paged_forward(model: Any, batch: PagedBatch, input_ids: torch.Tensor, position_ids: torch.Tensor,
                  logits_to_keep: Any = 0) -> torch.Tensor:
    """One forward pass of ``model`` (switched to kvpager attention) over a packed
    row; returns the greedy next token of each kept position. Nothing here waits
    for the device, so a CUDA graph can capture it."""
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
    return out.logits[0].argmax(dim=-1)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask function paired with kvpager attention: it needs none."""
    return None


def register() -> None:
    """Make ``attn_implementation="kvpager"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvpager_attention)
    try:
        from transformers import AttentionMaskInterface
    except ImportError:  # older releases build an sdpa-style mask, which is ignored
        return
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


register()


@contextlib.contextmanager
def paged_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch ``model`` to kvpager attention for the duration of the block."""
    previous = model.config._attn_implementation
    if previous == ATTN_IMPLEMENTATION:
        yield
        return
    _set_attn(model, ATTN_IMPLEMENTATION)
    try:
        yield
    finally:
        _set_attn(model, previous)


def _set_attn(model: torch.nn.Module, name: str) -> None:
    """Switch the attention function. The attention modules read it from the
    (shared) config at call time, so the config's setter, which also reaches
    sub-configs, is enough: ``set_attn_implementation`` walks every module and
    costs about a millisecond a switch, twice per forward pass."""
    model.config._attn_implementation = name


def model_geometry(config: Any) -> dict[str, int]:
    """Layers, KV heads and head dim of a transformers config, as `PoolSpec` names them."""
    heads = config.num_attention_heads
    return dict(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def spec_for_model(
    model: Any, num_blocks: int, block_size: int = 16, dtype: Any = None, num_host_blocks: int = 0,
    kv_dtype: str | None = None, kv_scales: Any = None,
) -> PoolSpec:
    """A `PoolSpec` matching ``model``'s KV geometry (dtype: the model's unless given).
    ``kv_dtype`` "float8_e4m3" / "float8_e5m2": an FP8 pool, its ``kv_scales`` given
    (e.g. from `kvpager.hf.calibrate_kv_scales`) or all 1.0."""
    config = model.config
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return PoolSpec(
        **model_geometry(config),
        num_blocks=num_blocks,
        block_size=block_size,
        dtype=dtype_name(dtype),
        num_host_blocks=num_host_blocks,
        kv_dtype=kv_dtype,
        kv_scales=kv_scales,
    )


def check_model(model: Any, pool: Any) -> list[int | None]:
    """The model's per-layer sliding windows (`layer_windows`), after checking
    that kvpager can attend for it and that ``pool`` has its KV geometry."""
    windows = layer_windows(model)
    want = model_geometry(model.config)
    spec = pool.spec
    have = {k: getattr(spec, k) for k in want}
    if have != want:
        raise ValueError(f"pool geometry {have} does not match the model's {want}")
    return windows


@dataclass
class PagedGeneration:
    """Greedy generation of one batch of prompts with its KV in ``pool``.

    Construction allocates the prompts (sharing any cached prefix) and runs the
    prefill, which yields each sequence's first new token; each `step` runs one
    decode pass for the unfinished sequences; `close` frees them. Several can be
    alive at once over one pool (several workers, or one scheduler's batches).
    """

    model: Any
    pool: Any
    prompts: list[list[int]]
    max_new_tokens: int
    salt: str | bytes | None = None
    eos_token_id: int | Sequence[int] | None = None
    cuda_graphs: bool = False
    #: in a model whose every layer has a sliding window, give back each step the
    #: blocks no window will read again (`KVPool.release_before`): KV memory per
    #: sequence stays about one window, however long it generates
    release_windowed: bool = True
    #: shared-prefix (cascade) attention in decode and multi-token steps: None where it pays
    #: (`kvpager.cascade.worth_it` / `multi_token_worth_it`), True / False to force it on or off
    cascade: bool | None = None
    seq_ids: list[int] = field(init=False, default_factory=list)
    num_cached_tokens: list[int] = field(init=False, default_factory=list)
    outputs: list[list[int]] = field(init=False, default_factory=list)
    finished: list[bool] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        self.prompts = [[int(t) for t in p] for p in self.prompts]
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        self._windows = check_model(self.model, self.pool)
        eos = self.eos_token_id
        self._eos = (
            set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}
        )
        if self.salt is None:
            self.salt = default_salt(self.model)
        self._device = next(self.model.parameters()).device
        self._pool_dtype = _TORCH_DTYPES[dtype_name(self.pool.spec.dtype)]
        pool_device = str(getattr(self.pool, "device", "cpu"))
        self._pool_device = torch.device(pool_device)
        self._graphs = None
        # Decode steps on a GPU pool refill the last step's plan in place while the batch
        # keeps its sequences (`_plan`); the CPU backend's plans are made anew each step.
        self._reuse_plans = pool_device.startswith("cuda") and hasattr(self.pool, "tables")
        self._last_plan: tuple[Any, list[int]] | None = None
        longest = max(map(len, self.prompts)) + self.max_new_tokens
        self._width = -(-longest // self.pool.spec.block_size)  # blocks a sequence can reach
        if self.cuda_graphs:
            if not pool_device.startswith("cuda") or self._device.type != "cuda":
                raise ValueError("cuda_graphs needs the model and the pool on a CUDA device")
            from kvpager.hf.graphs import DecodeGraphs

            self._graphs = DecodeGraphs(self.model, self.pool, self._batch, self._width, cascade=self.cascade)
        # One forward pass writes every layer's K/V for the whole batch before it
        # attends, so prompts of the batch may share the blocks an earlier one fills.
        allocs = self.pool.allocate(self.prompts, self.salt, share_in_batch=True)
        self.seq_ids = [a.seq_id for a in allocs]
        self.num_cached_tokens = [a.num_cached_tokens for a in allocs]
        self.outputs = [[] for _ in allocs]
        self.finished = [False] * len(allocs)
        self._held = set(self.seq_ids)  # not freed yet
        try:
            rows = list(range(len(allocs)))
            tokens = [p[a.num_cached_tokens :] for p, a in zip(self.prompts, allocs)]
            positions = [range(a.num_cached_tokens, len(p)) for p, a in zip(self.prompts, allocs)]
            slots = np.concatenate([np.asarray(a.slots, dtype=np.int64) for a in allocs])
            self._run(rows, tokens, positions, slots)
        except BaseException:
            self.close()
            raise

    @property
    def done(self) -> bool:
        return all(self.finished)

    def step(self) -> None:
        """One decode pass: feed each unfinished sequence its last new token."""
        live = [i for i, f in enumerate(self.finished) if not f]
        if not live:
            return
        ids = [self.seq_ids[i] for i in live]
        last = [self.outputs[i][-1] for i in live]
        # the token fed now sits right after the prompt and the tokens fed before it
        positions = [range(p, p + 1) for p in (self.position(i) for i in live)]
        slots = self.pool.append_flat(ids, 1, [[t] for t in last])
        self._run(live, [[t] for t in last], positions, slots)

    def position(self, i: int) -> int:
        """Position of sequence i's last new token (the next one to feed)."""
        return len(self.prompts[i]) + len(self.outputs[i]) - 1

    def _run(
        self,
        rows: list[int],
        tokens: list[Sequence[int]],
        positions: list[range],
        slots: np.ndarray,
    ) -> None:
        """One forward pass over the packed new tokens of ``rows``; records each
        row's next token, then commits (the K/V is written once the logits are)."""
        lens = [len(t) for t in tokens]
        flat = [t for ts in tokens for t in ts]
        input_ids = torch.tensor([flat], dtype=torch.long, device=self._device)
        position_ids = torch.tensor(
            [[p for ps in positions for p in ps]], dtype=torch.long, device=self._device
        )
        ids = [self.seq_ids[i] for i in rows]
        if self._graphs is not None and max(lens) == 1:
            next_tokens = self._graphs.step(ids, input_ids, position_ids, slots)
        else:
            plan = self._plan(ids, lens, slots)
            ends = torch.as_tensor(np.cumsum(lens) - 1, device=self._device)
            with torch.inference_mode(), paged_attention(self.model):
                next_tokens = paged_forward(self.model, self._batch(plan), input_ids, position_ids, ends).tolist()
        self._record(rows, ids, next_tokens)

    def _plan(self, ids: list[int], lens: list[int], slots: np.ndarray) -> Any:
        """The step plan of an eager pass. A decode step of the same sequences as the
        last one refills that step's plan in place (`StepPlan.update`: no new device
        buffers, kernel launches or cascade planning), as a captured step does; any
        other step gets a new plan, with capacity for the generation's longest
        sequence when it is a decode step that later ones can reuse."""
        heads = self.model.config.num_attention_heads
        decode = max(lens) == 1
        if not (self._reuse_plans and decode):
            return self.pool.plan(ids, lens, slots, num_q_heads=heads, cascade=self.cascade)
        last = self._last_plan
        if last is not None and last[1] == ids:
            tables, seq_lens = self.pool.tables(ids)
            if tables.shape[1] <= last[0].width:
                last[0].update(tables, seq_lens, None, slots)
                return last[0]
        plan = self.pool.plan(ids, None, slots, num_rows=len(ids), width=self._width, num_q_heads=heads,
                              cascade=self.cascade)
        self._last_plan = (plan, list(ids))
        return plan

    def _batch(self, plan: Any) -> PagedBatch:
        return PagedBatch(plan, self._pool_dtype, self._pool_device, self._windows)

    def _record(self, rows: list[int], ids: list[int], next_tokens: list[int]) -> None:
        if hasattr(self.pool, "synchronize"):
            self.pool.synchronize()
        self.pool.commit(ids)
        done = []
        for i, t in zip(rows, next_tokens):
            self.outputs[i].append(int(t))
            if len(self.outputs[i]) >= self.max_new_tokens or t in self._eos:
                self.finished[i] = True
                done.append(self.seq_ids[i])
        self._free(done)  # a finished sequence's blocks go back at once
        windows = self._windows
        if self.release_windowed and windows and None not in windows and hasattr(self.pool, "release_before"):
            # the next query of sequence i sits at position(i) and sees positions after position(i) - w
            live = [i for i in rows if not self.finished[i]]
            if live:
                reach = max(windows)
                self.pool.release_before([self.seq_ids[i] for i in live],
                                         [max(0, self.position(i) - reach + 1) for i in live])

    def _free(self, seq_ids: list[int]) -> None:
        seq_ids = [s for s in seq_ids if s in self._held]
        if seq_ids:
            self.pool.free(seq_ids)
            self._held.difference_update(seq_ids)

    def close(self) -> None:
        """Free the sequences still held (their committed full blocks stay matchable)."""
        self._free(self.seq_ids)

    def __enter__(self) -> PagedGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate(
    model: Any,
    pool: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    salt: str | bytes | None = None,
    eos_token_id: Any = "model",
    cuda_graphs: bool = False,
) -> list[list[int]]:
    """Greedy generation with the KV cache in ``pool``. Returns the new token ids
    of each prompt: ``max_new_tokens`` of them, or fewer where an end-of-sequence
    token came (included, as transformers' ``generate`` does). ``eos_token_id``
    defaults to the model's generation config ("model"); None never stops early."""
    if isinstance(eos_token_id, str) and eos_token_id == "model":
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    with PagedGeneration(model, pool, prompts, max_new_tokens, salt, eos_token_id, cuda_graphs) as gen:
        while not gen.done:
            gen.step()
        return gen.outputs
