"""An attend's per-call options, checked: scale, sliding window, soft cap,
attention sinks and chunked attention (`chunk_step`: a step as a layer of
chunked attention sees it). Shared by step plans (`kvpager.plan`), `KVPool.attend`,
a worker's `Client.attend` and the daemon's staging path, so every way in
refuses the same values with the same words."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.validate import whole

#: the largest float32: the kernels and the NumPy twin score in float32
FLOAT32_MAX = float(np.finfo(np.float32).max)
#: a soft cap past this changes no float32 score (cap * tanh(s / cap) rounds to s): none is applied
SOFTCAP_NONE = 1e30


def _real(x: Any) -> float:
    """A real number (NumPy's too) as a Python float, compared in float64 (an
    ``np.float16`` compared with float32's maximum would overflow); NaN for
    anything else (a bool, a str), infinity for an int past float64."""
    if not isinstance(x, (int, float, np.integer, np.floating)) or isinstance(x, (bool, np.bool_)):
        return math.nan
    try:
        return float(x)
    except OverflowError:
        return math.inf


def check_scale(scale: Any, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    value = _real(scale)
    if not math.isfinite(value) or value <= 0 or value > FLOAT32_MAX:
        raise InvalidArgument(f"scale must be a positive finite number a float32 holds, got {scale!r}")
    return value


#: past every position a pool holds (lengths are int32): a window or chunk this long cuts nothing,
#: and the kernels take it as an int32
POSITIONS = (1 << 31) - 1


def check_window(window: Any) -> int | None:
    """A sliding window: None (full attention) or a positive int; one longer than
    any sequence can be (`POSITIONS`) is that long, which cuts nothing either."""
    if window is None:
        return None
    n = whole(window)
    if n is None or n < 1:
        raise InvalidArgument(f"window must be None or a positive int, got {window!r}")
    return min(n, POSITIONS)


def check_chunk(chunk: Any) -> int:
    """A chunked-attention chunk size: a positive int (capped at `POSITIONS`, past
    which a chunk cuts nothing)."""
    n = whole(chunk)
    if n is None or n < 1:
        raise InvalidArgument(f"chunk must be a positive int, got {chunk!r}")
    return min(n, POSITIONS)


def chunk_step(tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray, chunk: int,
               block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A step as chunked attention sees it (Llama-4's ``attention_chunk_size``):
    the query at position p attends to positions [p - p % chunk, p]. Each
    sequence's queries are cut where a chunk starts; each piece becomes a row
    whose table starts at its chunk's first block and whose length ends at its
    last query, so it attends causally as any row does. Rows keep the order of
    the step's query tokens: a plan of the result answers the step's q rows.
    Returns (tables as wide as the step's, seq_lens, query_lens); the step's own
    arrays where no query is past the first chunk. InvalidArgument where a
    piece's chunk starts inside a block (a block size that does not divide
    ``chunk``, or a chunk that is no positive int: `check_chunk`)."""
    chunk = check_chunk(chunk)
    lens = seq_lens.astype(np.int64)
    first = lens - query_lens  # each sequence's first query position
    k0, k1 = first // chunk, (lens - 1) // chunk  # the chunks its queries fall in
    if not k1.any():
        return tables, seq_lens, query_lens
    pieces = k1 - k0 + 1
    rows = np.repeat(np.arange(len(lens)), pieces)
    k = np.repeat(k0, pieces) + np.arange(len(rows)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = k * chunk
    ends = np.minimum(starts + chunk, lens[rows])
    qlens = ends - np.maximum(starts, first[rows])
    bad = np.flatnonzero(starts % block_size)
    if len(bad):
        i = int(bad[0])
        raise InvalidArgument(
            f"chunked attention over chunks of {chunk} tokens: sequence {int(rows[i])} of the step reaches "
            f"position {int(ends[i]) - 1}, past a chunk start ({int(starts[i])}) inside a block of "
            f"{block_size}; chunked layers need a block size that divides the chunk size")
    width = tables.shape[1]
    cols = (starts // block_size)[:, None] + np.arange(width)
    out = np.where(cols < width, tables[rows[:, None], np.minimum(cols, width - 1)], 0).astype(np.int32)
    return out, (ends - starts).astype(np.int32), qlens.astype(np.int32)


def check_sinks_shape(sinks: Any, num_q_heads: int) -> None:
    """InvalidArgument unless ``sinks`` is an array or tensor of floats of shape [num_q_heads]."""
    shape = tuple(getattr(sinks, "shape", ()))
    kind = str(getattr(sinks, "dtype", type(sinks).__name__)).removeprefix("torch.")
    if shape != (num_q_heads,) or not kind.startswith(("float", "bfloat")):
        raise InvalidArgument(f"sinks must be floats of shape ({num_q_heads},), one per query head; got "
                              f"shape {shape}, dtype {kind}")


def check_sinks(sinks: Any, num_q_heads: int, any_device: bool = False) -> np.ndarray | None:
    """Attention sinks as float32 [num_q_heads] on the host: None, or finite floats
    of that shape (a NumPy array or a CPU torch tensor; ``any_device``: a GPU
    torch tensor or CuPy array too, copied to the host)."""
    if sinks is None:
        return None
    check_sinks_shape(sinks, num_q_heads)
    if type(sinks).__module__.startswith("torch"):
        if sinks.device.type != "cpu" and not any_device:
            raise InvalidArgument(f"sinks are on {sinks.device}; this pool is on the CPU")
        out = sinks.detach().float().cpu().numpy()
    else:
        out = np.asarray(sinks.get() if any_device and type(sinks).__module__.startswith("cupy") else sinks,
                         dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidArgument(f"sinks must be finite, got {out[~np.isfinite(out)][0]}")
    return out


def check_softcap(softcap: Any) -> float | None:
    """An attention-logit soft cap: None or a positive finite number; one past
    `SOFTCAP_NONE` caps no float32 score, and is taken as none (in float32 a cap
    past 3.4e38 would be infinite, and its scores NaN)."""
    if softcap is None:
        return None
    value = _real(softcap)
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"softcap must be None or a positive finite number, got {softcap!r}")
    return None if value > SOFTCAP_NONE else value
