"""The NumPy backend: the CPU implementation and the reference for every GPU kernel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvpager.backends.base import Backend
from kvpager.errors import BackendUnavailable, InvalidArgument
from kvpager.spec import PoolSpec

#: K (or V) bytes a run of `NumpyBackend.write` takes at a time.
WRITE_RUN_BYTES = 16 << 20


#: Bytes of blocks one step of a block copy gathers at a time (a gather makes a temporary of
#: what it reads: a swap of a 3 GiB sequence took 3 GiB more of the daemon's memory at once).
COPY_RUN_BYTES = 64 << 20


#: Blocks of at least this many bytes are copied one at a time: a block is one contiguous
#: chunk, so each is one copy with no temporary, where a gathered run is written twice (into
#: its temporary, then out). `tools/bench_cpu_copies.py` on a 2-core VM, against runs: 2 MiB
#: blocks (Llama-3-8B, bf16, 16 tokens) 7.5 against 4.1 GB/s, 8 KiB 3.8 against 2.8; at 4 KiB
#: the loop's cost a block loses (2.4 against 2.7).
BLOCK_AT_A_TIME_BYTES = 8 << 10


def copy_rows(dst: np.ndarray, src: np.ndarray, pairs: np.ndarray) -> None:
    """``dst[pairs[:, 1]] = src[pairs[:, 0]]``: large blocks one at a time, small ones
    a run of at most `COPY_RUN_BYTES` at a time (no destination is a source of the
    same call: copy-on-write's and swaps' destinations are blocks just taken)."""
    block = src[:1].nbytes
    if block >= BLOCK_AT_A_TIME_BYTES:
        for i, j in pairs.tolist():
            dst[j] = src[i]
        return
    per = max(1, COPY_RUN_BYTES // max(1, block))
    for i in range(0, len(pairs), per):
        run = pairs[i : i + per]
        dst[run[:, 1]] = src[run[:, 0]]


def run_tokens(k: np.ndarray) -> int:
    """The tokens of ``k`` ([tokens, heads, head_dim]) a run of a write takes."""
    return max(1, WRITE_RUN_BYTES // max(1, k[:1].nbytes))


def _pool_array(shape: tuple[int, ...], dtype: Any, buffer: Any, which: str) -> np.ndarray:
    """A pool's array over ``buffer``, or zeroed memory of its own; BackendUnavailable,
    naming the bytes, where the host cannot give that much."""
    if buffer is not None:
        return np.ndarray(shape, dtype, buffer=buffer)
    try:
        return np.zeros(shape, dtype)
    except MemoryError:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        raise BackendUnavailable(
            f"no room in host memory for the {which} pool's {nbytes:,} bytes ({shape[0]} blocks of "
            f"{nbytes // max(shape[0], 1):,}): make the pool smaller (fewer blocks or host blocks, "
            "a smaller head dim or fewer layers / kv heads)") from None


class NumpyBackend(Backend):
    """K/V in NumPy arrays. ``device_buffer`` / ``host_buffer`` let the daemon
    place the pools in shared memory that worker processes map."""

    name = "numpy"
    xp = np

    def __init__(self, spec: PoolSpec, device_buffer: Any = None, host_buffer: Any = None):
        super().__init__(spec)
        shape = (spec.num_blocks, *spec.block_shape)
        host_shape = (spec.num_host_blocks, *spec.block_shape)
        dt = spec.kv_np_dtype
        self.scales = spec.scales if spec.is_fp8 else None  # float32 [layers, 2, kv heads]
        self.kv = _pool_array(shape, dt, device_buffer, "device")
        self.host_kv = _pool_array(host_shape, dt, host_buffer, "host")

    def device_array(self) -> np.ndarray:
        return self.kv

    def host_array(self) -> np.ndarray:
        return self.host_kv

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        # A run of tokens at a time: padding's gather (k[keep]) and FP8's float32
        # copies are of a run, never of the whole write (a 1 GiB staged write with
        # one padding slot took 2 GB and 7 s in whole-array copies).
        step = run_tokens(k)
        for start in range(0, len(slots), step):
            self.write_at(layer, self.positions(slots[start:start + step]), k[start:start + step],
                          v[start:start + step])

    def positions(self, slots: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Where a run of ``slots`` writes: (the tokens kept, None where no slot is
        padding; their blocks; their offsets in them), for `write_at` (a step plan
        keeps them for its layers)."""
        keep = slots >= 0
        if keep.all():
            return None, *np.divmod(slots, self.spec.block_size)
        return keep, *np.divmod(slots[keep], self.spec.block_size)

    def write_at(self, layer: int, where: tuple[np.ndarray | None, np.ndarray, np.ndarray], k: np.ndarray,
                 v: np.ndarray) -> None:
        """One run of a write (at most `run_tokens` of ``k``), at `positions`."""
        keep, blocks, offsets = where
        if keep is not None:
            k, v = k[keep], v[keep]
        if self.scales is not None:  # FP8: x / scale of the (layer, K|V, head), saturated
            from kvpager.fp8 import quantize

            k = quantize(k, self.scales[layer, 0][None, :, None], self.spec)
            v = quantize(v, self.scales[layer, 1][None, :, None], self.spec)
        # Mixed advanced indexing puts the token axis first: [T, heads, head_dim].
        self.kv[blocks, layer, 0, :, offsets] = k
        self.kv[blocks, layer, 1, :, offsets] = v

    def copy_blocks(self, pairs: np.ndarray) -> None:
        if len(pairs):
            copy_rows(self.kv, self.kv, pairs)

    def swap_out(self, pairs: np.ndarray) -> None:
        if len(pairs):
            copy_rows(self.host_kv, self.kv, pairs)

    def swap_in(self, pairs: np.ndarray) -> None:
        if len(pairs):
            copy_rows(self.kv, self.host_kv, pairs)

    def _bytes(self) -> np.ndarray:
        """The device pool as uint8 rows, one per block (a view)."""
        return self.kv.reshape(self.spec.num_blocks, -1).view(np.uint8)

    def read_blocks(self, blocks: np.ndarray, out: np.ndarray) -> None:
        rows = self._bytes()
        for i, b in enumerate(blocks.tolist()):
            out[i] = rows[b]

    def write_blocks(self, blocks: np.ndarray, payloads: Sequence[Any]) -> None:
        rows = self._bytes()
        for b, data in zip(blocks.tolist(), payloads):
            rows[b] = np.frombuffer(data, np.uint8)

    def plan(self, tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
             slots: np.ndarray | None, *, num_rows: int | None = None, config: Any = None,
             **ignored: Any) -> Any:
        """A `NumpyPlan` (capacity and kernel options mean nothing here, but a ``config``
        must be a `kvpager.KernelConfig` as on the GPU, an option's name one the GPU's
        planner takes, and padding rows are refused)."""
        from kvpager.kernel_config import check_config
        from kvpager.plan import check_plan_options
        from kvpager.plan_numpy import NumpyPlan

        check_plan_options(ignored)
        check_config(config)
        if num_rows is not None and num_rows != len(seq_lens):
            raise InvalidArgument("padding rows (num_rows) are for in-place updates on the GPU backend")
        return NumpyPlan(self, tables, seq_lens, query_lens, slots)

    def attend(
        self,
        layer: int,
        q: np.ndarray,
        block_tables: np.ndarray,
        seq_lens: np.ndarray,
        query_lens: np.ndarray,
        scale: float,
        *,
        window: int | None = None,
        softcap: float | None = None,
        sinks: Any = None,
    ) -> np.ndarray:
        from kvpager import cpu_attention
        from kvpager.attend_options import check_sinks

        return cpu_attention.attend(self.kv, layer, q, block_tables, seq_lens, query_lens, scale,
                                    window=window, softcap=softcap, kv_scales=self.scales,
                                    sinks=check_sinks(sinks, q.shape[1]))


def paged_attention(
    kv: np.ndarray,
    layer: int,
    q: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    query_lens: np.ndarray,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    kv_scales: np.ndarray | None = None,
    sinks: np.ndarray | None = None,
) -> np.ndarray:
    """Paged attention over a block-major pool, float32 accumulation.

    This is the NumPy twin of the CUDA kernels and of the CPU kernel
    (`kvpager.cpu_attention`, which the backend runs where it was built); see `Backend.attend` for the
    contract. ``window``: the query at position i sees keys j with
    i - window < j <= i (only the blocks that can hold such keys are read);
    ``softcap``: scores become softcap * tanh(scores / softcap) after scaling.
    ``kv_scales`` (FP8 pools: float32 [layers, 2, kv heads]): K and V are
    dequantised (stored * scale, float32) before the math. ``sinks`` (float32
    [num_q_heads]): each head's attention sink joins the softmax denominator as
    e^sink (a logit that attends to no value). The result has q's dtype."""
    num_kv_heads, block_size, head_dim = kv.shape[3], kv.shape[4], kv.shape[5]
    num_q_heads = q.shape[1]
    group = num_q_heads // num_kv_heads
    out = np.empty(q.shape, dtype=q.dtype)
    deq = None if kv_scales is None else np.asarray(kv_scales, np.float32)[layer][None, :, :, None, None]
    sink = None if sinks is None else np.asarray(sinks, np.float32).reshape(num_kv_heads, group, 1, 1)
    start = 0
    for b in range(len(seq_lens)):
        n, ql = int(seq_lens[b]), int(query_lens[b])
        nb = -(-n // block_size)
        first = 0 if window is None else max(0, n - ql - window + 1) // block_size
        blocks = block_tables[b, first:nb]
        lo = first * block_size  # position of the first key read
        # [nb', 2, H, bs, D] -> [2, H, nb'*bs, D], cut to the keys before n
        tiles = kv[blocks, layer].astype(np.float32, copy=False)  # (a float32 pool: the gather's copy alone)
        if deq is not None:
            tiles *= deq  # [nb', 2, H, bs, D] * [1, 2, H, 1, 1]
        kvs = tiles.transpose(1, 2, 0, 3, 4).reshape(2, num_kv_heads, len(blocks) * block_size, head_dim)
        keys, values = kvs[0, :, : n - lo], kvs[1, :, : n - lo]
        qs = q[start : start + ql].astype(np.float32)  # [ql, Hq, D]
        qs = qs.reshape(ql, num_kv_heads, group, head_dim).transpose(1, 2, 0, 3)  # [H, G, ql, D]
        # one matrix product per kv head (BLAS), its group's query rows stacked: [H, G*ql, D] x [H, D, k]
        scores = np.matmul(qs.reshape(num_kv_heads, group * ql, head_dim), keys.transpose(0, 2, 1))
        scores = scores.reshape(num_kv_heads, group, ql, -1)
        scores *= np.float32(scale)
        if softcap is not None:
            scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
        pos = np.arange(n - ql, n)[:, None]  # [ql, 1]
        kpos = np.arange(lo, n)[None, :]
        if ql > 1 or window is not None:
            seen = kpos <= pos if window is None else (kpos <= pos) & (kpos > pos - window)
            np.copyto(scores, -np.inf, where=~seen)  # in place: [H, G, ql, k] masked by [ql, k]
        top = scores.max(axis=-1, keepdims=True)
        if sink is not None:
            top = np.maximum(top, sink)
        scores -= top
        np.exp(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True)
        if sink is not None:
            total += np.exp(sink - top)
        # the weights' sums divide the output rows, not every weight (what the kernels do too)
        o = np.matmul(scores.reshape(num_kv_heads, group * ql, -1), values)  # [H, G*ql, D]
        o = o.reshape(num_kv_heads, group, ql, head_dim)
        o /= total
        out[start : start + ql] = o.transpose(2, 0, 1, 3).reshape(ql, num_q_heads, head_dim)
        start += ql
    return out
