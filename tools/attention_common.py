"""What the attention benchmarks share: the geometry of their cases, the
timing (per call behind a GPU sleep, and in a captured CUDA graph), the
relative error, a pool of shuffled blocks with its K/V gathered contiguously,
SDPA with the bottom-right causal mask, the card's datasheet bandwidth.
Imports CuPy and torch: the tools import it once they know both are there."""

from __future__ import annotations

import cupy
import numpy as np
import torch
import torch.nn.functional as F

from kvpager.backends.cupy_backend import CupyBackend
from kvpager.spec import PoolSpec

HQ, HKV, D, BS = 32, 8, 128, 16
DECODE_CASES = [(64, 4096), (16, 16384), (1, 131072), (256, 1024), (64, 256)]
DATASHEET_TBS = {"H100": 3.35, "H200": 4.8}


def tview(a: cupy.ndarray) -> torch.Tensor:
    t = torch.from_dlpack(a)
    return t.view(torch.bfloat16) if t.dtype == torch.uint16 else t


def median_ms(fn, iters: int = 50, warmup: int = 5) -> float:
    """Median per-call GPU time; calls are queued behind a 20 ms GPU sleep."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    torch.cuda._sleep(40_000_000)
    ev[0].record()
    for i in range(iters):
        fn()
        ev[i + 1].record()
    torch.cuda.synchronize()
    return float(np.median([ev[i].elapsed_time(ev[i + 1]) for i in range(iters)]))


def graph_ms(fn, calls: int = 20, reps: int = 7, before=None) -> tuple[float, object]:
    """Median per-call GPU time as a model's captured step pays it: ``calls``
    calls captured in one CUDA graph, each replay timed (queued behind a GPU
    sleep), divided by ``calls``. No event between calls, so none of their
    record cost (about 3 us a call on an H200) enters the time. Returns it and
    the last captured call's output (as the replays left it); ``before(out)``
    runs on that output between the capture and the first replay (to poison it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture, as torch asks
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            last = fn()
    if before is not None:
        before(last)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(20_000_000)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del graph
    return float(np.median(times)), last


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).norm() / b.norm())


def setup(batch: int, ctx: int, new: int, head_dim: int = D):
    """A pool holding `batch` sequences of `ctx` tokens in shuffled blocks (bf16,
    `HKV` kv heads of ``head_dim``, block size `BS`); q for the last `new`: (spec,
    backend, tables, q, the K/V gathered contiguously by `dense_kv`)."""
    nb = ctx // BS
    spec = PoolSpec(num_layers=1, num_kv_heads=HKV, head_dim=head_dim, num_blocks=batch * nb + 1,
                    block_size=BS, dtype="bfloat16")
    be = CupyBackend(spec, 0)
    pool = tview(be.kv)
    pool.normal_()
    tables = (torch.randperm(batch * nb, device="cuda") + 1).view(batch, nb).to(torch.int32).cpu().numpy()
    q_cp = cupy.empty((batch * new, HQ, head_dim), dtype=be.dtype)
    tview(q_cp).normal_()
    return spec, be, tables, q_cp, dense_kv(pool, tables, ctx)


def dense_kv(pool: torch.Tensor, tables: np.ndarray, length: int, layer: int = 0,
             chunk_bytes: int = 1 << 30) -> torch.Tensor:
    """The first ``length`` positions of each table's K/V in ``pool`` (torch view of
    the slab, [blocks, layers, 2, kv heads, block size, head dim]) copied into
    contiguous [2, B, kv heads, length, head dim], gathered a few sequences at a
    time (no second full-size temporary)."""
    hkv, bs, d = pool.shape[3], pool.shape[4], pool.shape[5]
    batch, nb = len(tables), -(-length // bs)
    kv = torch.empty((2, batch, hkv, length, d), dtype=pool.dtype, device=pool.device)
    step = max(1, chunk_bytes // (nb * pool[0, layer].numel() * pool.element_size()))
    for s in range(0, batch, step):
        rows = torch.from_numpy(np.ascontiguousarray(tables[s : s + step, :nb])).long().to(pool.device)
        blocks = pool[rows, layer]  # [b, nb, 2, kv heads, block size, head dim]
        kv[:, s : s + step] = blocks.permute(2, 0, 3, 1, 4, 5).reshape(2, len(rows), hkv, nb * bs, d)[..., :length, :]
    return kv


def causal_sdpa(q4: torch.Tensor, kv: torch.Tensor, scale: float):
    """A call of SDPA for multi-token queries q4 [B, q heads, new, D] over kv [2, B,
    kv heads, ctx, D], causal with the mask at the bottom right (the queries are the
    last positions); GQA in SDPA where a fused kernel takes this mask, else K/V with
    the heads repeated."""
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(q4.shape[2], kv.shape[3])

    def sdpa():
        return F.scaled_dot_product_attention(q4, kv[0], kv[1], attn_mask=mask, scale=scale,
                                              enable_gqa=True)

    try:
        sdpa()
    except RuntimeError:  # no fused kernel for this mask with GQA: give SDPA repeated heads
        k_rep, v_rep = (t.repeat_interleave(q4.shape[1] // kv.shape[2], dim=1) for t in (kv[0], kv[1]))

        def sdpa():
            return F.scaled_dot_product_attention(q4, k_rep, v_rep, attn_mask=mask, scale=scale)

    return sdpa


def card() -> tuple[str, float | None]:
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in DATASHEET_TBS.items() if k in name), None)
    return name, peak
