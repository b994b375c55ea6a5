"""CUDA graphs of a transformers model's decode step over kvpager, one per batch-size bucket.

A decode step of a 32-layer model launches hundreds of kernels; replaying a
captured graph launches them all with one call, so the host's Python (the
model's and kvpager's) leaves the step. As serving engines do, the step is
captured once per batch-size bucket (1, 2, 4, 8, 16, 32, then multiples of
32): a step of B sequences runs the smallest bucket >= B, its extra rows
being padding (slot -1: nothing written; zero-length: nothing read). As
sequences end, the batch keeps replaying a larger bucket already captured
while it is at most 8 times its own or 64 rows (`DecodeGraphs.reuse`): a
capture costs tens of steps, a few padding rows next to nothing.

What a replay needs is updated in place first: the token ids and positions
(static tensors), and the step plan's block tables, lengths and slots
(`kvpager.plan.StepPlan.update`: same buffers, same grid). A plan holds
tables of a fixed width (blocks per sequence); a step that outgrows it
recaptures with twice the width. With ``compile=True`` the step captured is
the model compiled by ``torch.compile`` (`kvpager.hf.compiled`). A model with
recurrent layers captures its own step (`kvpager.hf.recurrent.Recurrent.graph_pass`:
rows of a token each, its states read and written in place). A generation's
graphs go with it; `CapturedSteps` (`kvpager.hf.captured_steps`) keeps them
across calls.
"""

from __future__ import annotations

import gc
import importlib.util
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpager.errors import InvalidArgument, UnsupportedConfiguration
from kvpager.hf.model import text_config


def check_graph_options(model: Any, pool: Any, cuda_graphs: bool, compile: bool) -> None:
    """InvalidArgument where ``cuda_graphs`` / ``compile`` cannot be had: graphs need
    the model and the pool on a CUDA device; ``compile`` compiles the captured
    step, so it needs ``cuda_graphs``, torch.library.custom_op and triton."""
    for name, value in (("cuda_graphs", cuda_graphs), ("compile", compile)):
        if not isinstance(value, (bool, np.bool_)):
            raise InvalidArgument(f"{name} must be a bool, got {value!r}")
    if compile:
        if not cuda_graphs:
            raise InvalidArgument("compile=True compiles the captured decode step: it needs cuda_graphs=True")
        from kvpager.hf.compiled import HAS_OP

        if not HAS_OP:
            raise InvalidArgument(f"compile=True needs torch >= 2.4 (torch.library.custom_op), got {torch.__version__}")
        if importlib.util.find_spec("triton") is None:  # say so now, not at the first capture
            raise InvalidArgument("compile=True needs triton, torch.compile's GPU code generator: pip install triton")
    if cuda_graphs:
        pool_device = str(getattr(pool, "device", "cpu"))
        if not pool_device.startswith("cuda") or next(model.parameters()).device.type != "cuda":
            raise InvalidArgument("cuda_graphs needs the model and the pool on a CUDA device")


def graph_width(pool: Any, longest: int) -> int:
    """Blocks a sequence of at most ``longest`` tokens can reach: the width of a captured
    step's (or a reused plan's) tables, at most the pool's blocks. A longest past what the
    pool holds ends in OutOfBlocks, not in tables sized for it."""
    return min(-(-longest // pool.spec.block_size), pool.spec.num_blocks)


def bucket_for(n: int) -> int:
    """The batch-size bucket that holds ``n`` sequences."""
    if n <= 32:
        return 1 << max(0, (n - 1).bit_length())
    return -(-n // 32) * 32


#: A graph kept from an earlier call (`CapturedSteps`) is captured again where the step's longest
#: context is more than this many times its capture's, or less than its capture's by as much (lengths
#: under `LENGTH_FLOOR` counted as it): its plan's split count and pipeline depth were chosen for
#: those lengths (`kvpager.backends.cupy_decode.plan_splits`: a split per 512 tokens at most). The
#: tokens are right either way; a 1 x 32k step replaying a plan made at 100 tokens runs unsplit.
LENGTH_SPAN = 4
LENGTH_FLOOR = 512


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    plan: Any  # kvpager.plan.StepPlan, updated before each replay
    input_ids: torch.Tensor  # [1, bucket]
    position_ids: torch.Tensor  # [1, bucket]
    next_tokens: torch.Tensor  # [bucket] (or [bucket, vocab] logits, where the batch asks): the graph's output
    max_len: int = 0  # the longest context of the step it was captured at

    def planned_for(self, longest: int) -> bool:
        """Whether a step whose longest context is ``longest`` is one its plan was made for
        (within `LENGTH_SPAN` of its capture's)."""
        a, b = max(longest, LENGTH_FLOOR), max(self.max_len, LENGTH_FLOOR)
        return max(a, b) <= LENGTH_SPAN * min(a, b)


class DecodeGraphs:
    """Captured decode steps of ``model`` over ``pool``. ``make_batch(plan)``
    wraps a plan as the model's ``kvpager`` argument; ``width`` is the
    initial capacity in blocks per sequence; ``cascade`` goes to each plan
    (a captured step keeps its cascade's shape; `StepPlan.update` refills it);
    ``compile``: capture the step compiled by ``torch.compile``
    (`kvpager.hf.compiled`: the model's small kernels fused; the first capture
    of a model compiles it, tens of seconds for an 8B model). ``forward``: the
    step to capture instead, ``forward(model, batch, input_ids, position_ids)``
    with ``input_ids`` [1, bucket], giving the bucket's next tokens."""

    #: A step whose own bucket is not captured replays the smallest captured bucket that is at
    #: most `reuse` times its own or at most `reuse_rows` rows (its extra rows padding), and
    #: captures its own only past both. A decode step's matmuls read every weight whatever the
    #: rows, so a larger bucket costs a step little, where a capture costs tens of steps: a 1B
    #: model's 64 sequences ending at staggered steps (8 to 256 new tokens) took 1,164 ms in 7
    #: captures, 901 ms replaying the bucket of 64 throughout (H200, docs/benchmarks.md).
    #: (1 and 0: every bucket its own.)
    reuse = 8
    reuse_rows = 64

    def __init__(self, model: Any, pool: Any, make_batch: Callable[[Any], Any], width: int,
                 cascade: bool | None = None, compile: bool = False, forward: Callable[..., Any] | None = None):
        from kvpager.hf.attention import paged_forward
        from kvpager.hf.compiled import compiled_forward

        self.model, self.pool, self.make_batch, self.cascade = model, pool, make_batch, cascade
        self._forward = forward or (compiled_forward if compile else paged_forward)
        self.width = max(int(width), 1)
        self.num_q_heads = text_config(model).num_attention_heads
        self.graphs: dict[int, _Graph] = {}
        self.mempool = torch.cuda.graph_pool_handle()
        self.captures = 0
        self.last: _Graph | None = None
        self._checked: set[int] = set()  # buckets captured, or found planned for this call's lengths
        #: a model with recurrent layers: the `kvpager.hf.recurrent_states.States` the graphs read and
        #: write in place (`fixed_states`: a later call's rows loaded into them)
        self.states: Any = None

    def rejoin(self, make_batch: Callable[[Any], Any], forward: Callable[..., Any] | None = None) -> None:
        """Serve another call (`CapturedSteps`): its batches from ``make_batch`` (its
        step from ``forward``, where it gives one: a model's with recurrent layers,
        over `states`), each kept graph checked against its lengths the first time
        it replays."""
        self.make_batch = make_batch
        if forward is not None:
            self._forward = forward
        self._checked.clear()

    def drop(self) -> None:
        """Drop every graph (their tables too narrow, or the states they read replaced)."""
        self.graphs.clear()
        self.last = None
        # a new memory pool: the old one's tensors may outlive its graphs (a pipelined
        # step still reads the last output), and a pool without graphs cannot capture again
        self.mempool = torch.cuda.graph_pool_handle()

    def step(self, seq_ids: list[int], input_ids: torch.Tensor, position_ids: torch.Tensor,
             slots: np.ndarray) -> list[int]:
        """Run one decode step (one new token per sequence, ``input_ids`` and
        ``position_ids`` [1, B]) and return each sequence's greedy next token."""
        return self.launch(seq_ids, input_ids, position_ids, slots).tolist()

    def prepare(self, seq_ids: list[int], slots: np.ndarray) -> _Graph | None:
        """Refill the plan of the graph a step of ``seq_ids`` (their K/V to ``slots``)
        will replay, ahead of its `launch` (``ready``), on the caller's stream, so
        after any replay queued before: that graph, or None where the step needs what
        only `launch` does (a capture, wider tables, a kept graph's first check)."""
        tables, lens = self.pool.tables(seq_ids)
        bucket = self._bucket(len(seq_ids))
        g = self.graphs.get(bucket)
        if g is None or tables.shape[1] > self.width or bucket not in self._checked:
            return None
        g.plan.update(tables, lens, None, slots)
        return g

    def launch(self, seq_ids: list[int], input_ids: torch.Tensor, position_ids: torch.Tensor,
               slots: np.ndarray, ready: _Graph | None = None) -> torch.Tensor:
        """Queue one decode step (as `step`) without waiting for it: each sequence's
        greedy next token, [B] on the device, or its logits [B, vocab] where the
        batch asks for them (`PagedBatch.logits`): the graph's output, read or copy
        it before the next replay of the same bucket. ``ready``: what `prepare` gave
        for these sequences and slots (their plan refilled), where it is still the
        graph of their bucket."""
        from kvpager.hf.generation import paged_attention

        n = len(seq_ids)
        g = ready if ready is not None and self.graphs.get(self._bucket(n)) is ready else None
        captured = False
        if g is None:
            tables, lens = self.pool.tables(seq_ids)
            if tables.shape[1] > self.width:
                self.width = max(2 * self.width, tables.shape[1])
                self.drop()  # every plan's tables are too narrow now
            bucket = self._bucket(n)
            g = self.graphs.get(bucket)
            if g is not None and bucket not in self._checked:  # kept from an earlier call
                self._checked.add(bucket)
                if not g.planned_for(int(lens.max())):
                    del self.graphs[bucket]
                    g = None
            if g is None:
                with torch.inference_mode(), paged_attention(self.model):
                    g = self.graphs[bucket] = self._capture(bucket, seq_ids, slots, input_ids, position_ids)
                g.max_len, captured = int(lens.max()), True  # (its static inputs filled by the capture)
            else:
                g.plan.update(tables, lens, None, slots)
        if not captured:
            with torch.inference_mode():  # the static tensors are inference tensors
                _fill(g.input_ids, input_ids)
                _fill(g.position_ids, position_ids)
        g.graph.replay()
        self.last = g  # the graph (and its plan) replayed last: a caller may keep it while it runs
        return g.next_tokens[:n]

    def _bucket(self, n: int) -> int:
        """The bucket a step of ``n`` sequences replays: its own where captured, else the
        smallest captured one within `reuse` / `reuse_rows`, else its own (captured now)."""
        own = bucket_for(n)
        if own in self.graphs:
            return own
        larger = [b for b in self.graphs if own < b <= max(own * self.reuse, self.reuse_rows)]
        return min(larger) if larger else own

    def _capture(self, bucket: int, seq_ids: list[int], slots: np.ndarray,
                 input_ids: torch.Tensor, position_ids: torch.Tensor) -> _Graph:
        """Plan this step with capacity (bucket rows, ``width`` blocks), run it once
        eagerly on a side stream (kernels compiled, launches prepared), then capture
        it; the replay that follows runs the step again, writing the same K/V."""
        plan = self.pool.plan(seq_ids, None, slots, num_rows=bucket, width=self.width,
                              num_q_heads=self.num_q_heads, cascade=self.cascade)
        device = input_ids.device
        ids = torch.zeros((1, bucket), dtype=torch.long, device=device)
        pos = torch.zeros((1, bucket), dtype=torch.long, device=device)
        _fill(ids, input_ids)
        _fill(pos, position_ids)
        batch = self.make_batch(plan)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._forward(self.model, batch, ids, pos)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # No garbage collection while capturing: a cycle collected then (an earlier generation's
        # graphs, or a compiled step's) frees its graph or device memory inside the capture, which
        # invalidates it ("operation failed due to a previous error during capture"): a sampled
        # generation captured after a compiled one failed so on an H200. It waits for the next.
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self.mempool):
                next_tokens = self._forward(self.model, batch, ids, pos)
        except RuntimeError as e:
            # The eager pass above ran: what failed is the capture itself, so say what that means.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            hint = ""
            if getattr(self.model.config, "_experts_implementation", None) == "grouped_mm":
                # transformers' grouped-mm experts fall back to a loop over a host copy of the
                # routing where torch has no grouped matmul for the dtype (float32)
                hint = (" (its experts run as 'grouped_mm': built with experts_implementation='batched_mm' "
                        "they read nothing back)")
            # What the failed capture made (its graph, the tensors of the forward's frames, which
            # the traceback keeps in reference cycles) goes now, outside any capture: collected
            # later, during another capture in this process, its release invalidates that one.
            del graph
            _clear_frames(e)
            gc.collect()
            raise UnsupportedConfiguration(
                f"{type(self.model).__name__}'s decode step cannot be captured in a CUDA graph: its forward "
                f"waits for the GPU or reads a device value on the host while capturing (torch: {first}); "
                f"pass cuda_graphs=False to decode it without graphs{hint}") from e
        finally:
            if collecting:
                gc.enable()
        self.captures += 1
        self._checked.add(bucket)
        return _Graph(graph, plan, ids, pos, next_tokens)


def _clear_frames(error: BaseException) -> None:
    """Drop the locals of the finished frames of ``error``'s traceback and of the errors it chains."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _fill(static: torch.Tensor, values: torch.Tensor) -> None:
    """The first columns of a static [1, bucket] tensor from ``values`` [1, n], zeros after."""
    n = values.shape[1]
    static[0, :n] = values[0]
    static[0, n:] = 0


def __getattr__(name: str) -> Any:
    """`CapturedSteps`, moved to `kvpager.hf.captured_steps`, still answered here
    (for code that imports it from this module; read when asked: that module
    imports this one)."""
    if name == "CapturedSteps":
        from kvpager.hf.captured_steps import CapturedSteps

        return CapturedSteps
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
