"""A model's forward pass compiled by ``torch.compile`` around kvpager attention.

A captured decode step of a transformers model is, once the host has left it,
the sum of its kernels' times; at batch 64 on an 8B shape about a quarter of
that time goes to the model's own small kernels (RMSNorm, rotary, SiLU,
residual adds, casts: a few microseconds each, dozens a layer). Compiled, as serving
engines compile before they capture, those fuse into a few kernels a layer.

kvpager's layer call (`StepPlan.write_attend`) is opaque to the compiler, so
inside a compiled region the attention function calls it through the custom
op ``kvpager::write_attend``: the compiler sees one op with a known output
shape, and the graph has no break at any layer. The op reaches the step's plan
through the batch made current by `running` (per thread), which
`paged_forward` and `compiled_forward` set around every pass: a CUDA graph
captured from it replays its launches without running any Python, so
`running` is needed only where Python runs (the warm-up that compiles, the
capture, and eager passes of a model its user compiled).

`kvpager.hf.graphs.DecodeGraphs` with ``compile=True`` uses it (`compiled_forward`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvpager.hf.switching import OutsidePagedPass

try:
    from torch.compiler import is_compiling
except ImportError:  # torch < 2.3 has no public check; nothing kvpager runs is compiled there
    def is_compiling() -> bool:
        return False

#: torch.library.custom_op came with torch 2.4: before it there is no op (and no ``compile=True``)
HAS_OP = hasattr(torch.library, "custom_op")
_current = threading.local()


@contextlib.contextmanager
def running(batch: Any) -> Iterator[None]:
    """Make ``batch`` (a `kvpager.hf.attention.PagedBatch`) the one the
    ``kvpager::write_attend`` op of this thread uses, for the block."""
    previous = getattr(_current, "batch", None)
    _current.batch = batch
    try:
        yield
    finally:
        _current.batch = previous


def current() -> Any:
    """The batch `running` made current in this thread, or None."""
    return getattr(_current, "batch", None)


def write_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float | None,
                 window: int | None, softcap: float | None, sinks: torch.Tensor | None = None,
                 chunk: int | None = None, attn_scale: float | None = None,
                 floor_scale: float | None = None) -> torch.Tensor:
    """One layer's `StepPlan.write_attend` on the current batch's plan (`running`):
    q [1, Hq, T, D], k / v [1, Hkv, T, D]; returns [1, T, Hq, D] of ``q``'s dtype and device.
    Writes the layer's K/V into the pool: not a pure function, but its output is
    always used (the layer's attention), so a compiler never drops or repeats it."""
    from kvpager.hf import attention

    batch = current()
    if batch is None:
        raise OutsidePagedPass("kvpager::write_attend ran outside kvpager.hf.compiled.running(batch): run the "
                               "model through kvpager.hf.paged_forward (or compiled_forward), which make the "
                               "step's batch current, or call it inside running(batch)")
    tuning = None if attn_scale is None or floor_scale is None else (attn_scale, floor_scale)
    return attention.write_attend(batch, layer, q, k, v, scale, window, softcap, sinks, chunk, tuning)


def _write_attend_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float | None,
                       window: int | None, softcap: float | None, sinks: torch.Tensor | None = None,
                       chunk: int | None = None, attn_scale: float | None = None,
                       floor_scale: float | None = None) -> torch.Tensor:
    return q.new_empty((1, q.shape[2], q.shape[1], q.shape[3]))


if HAS_OP:
    write_attend = torch.library.custom_op("kvpager::write_attend", mutates_args=())(write_attend)
    write_attend.register_fake(_write_attend_fake)


_compiled: dict[tuple[Callable[..., Any], str, bool], Callable[..., Any]] = {}


def compiled_fn(fn: Callable[..., Any], backend: str = "inductor", fullgraph: bool = False) -> Callable[..., Any]:
    """``torch.compile(fn, backend=backend, fullgraph=fullgraph)``, made once (its
    compiled graphs are kept by the function it gives, per model and shape)."""
    out = _compiled.get((fn, backend, fullgraph))
    if out is None:
        out = _compiled[fn, backend, fullgraph] = torch.compile(fn, backend=backend, fullgraph=fullgraph)
    return out


def compiled_forward(model: Any, batch: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     logits_to_keep: Any = 0, *, backend: str = "inductor",
                     fullgraph: bool = False) -> torch.Tensor:
    """`kvpager.hf.attention.paged_forward`, compiled (``torch.compile`` with
    ``backend``; ``fullgraph=True`` refuses a graph break instead of running
    the rest eagerly). The first call with a new model or shape compiles (tens
    of seconds for an 8B model); a second batch size makes the compiled graph
    take any size, so later buckets reuse it. The model must be switched to
    kvpager attention (`paged_attention`)."""
    from kvpager.hf.attention import check_packable, forward_pass, run_pass

    check_packable(model, batch)
    return run_pass(model, batch, compiled_fn(forward_pass, backend, fullgraph), input_ids, position_ids,
                    logits_to_keep)
