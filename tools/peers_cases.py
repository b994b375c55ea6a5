"""The cases of `bench_peers.py`: each builds one pool slab, runs kvpager, FlashInfer
and SDPA on it, checks every result against SDPA's, then times each.

A case returns a row: its shape and ``results``, one entry per contender:
``{"ms", "rel_err"}`` (checked, then timed), ``{"error"}`` (it raised, or its
relative error was not below `TOL`: not timed), ``{"absent"}`` (FlashInfer not
installed) or ``{"skipped"}`` (SDPA's contiguous copy would not fit in memory).
Imports CuPy and torch: `bench_peers` imports this module only once it knows
both are there and see a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import peers_flashinfer as pf
import torch
import torch.nn.functional as F
from attention_common import (
    BS,
    HKV,
    HQ,
    D,
    causal_sdpa,
    dense_kv,
    graph_ms,
    median_ms,
    rel_err,
    setup,
    tview,
)
from bench_cascade import setup as shared_setup

from kvpager import KernelConfig
from kvpager.plan import make_plan

TOL = 1e-2  # relative error against SDPA every contender must stay under
CONFIG = KernelConfig()  # the kernel config kvpager's plans run (the production one; in the report)
SCALE = D**-0.5
KV_BYTES_PER_TOKEN = HKV * D * 2 * 2  # K and V, bf16
Make = Callable[[], tuple[Callable[[], Any], Callable[[Any], torch.Tensor]]]


def measure(make: Make, ref: torch.Tensor, iters: int, graph: bool = False) -> dict:
    """``make()`` -> (call, view): check ``view(call())`` against ``ref``, then time
    ``call``; with ``graph``, also in a captured graph (`captured`)."""
    try:
        call, view = make()
        try:
            err = rel_err(view(call()), ref)
        except AssertionError:  # rel_err's check of the output
            return {"error": "the output holds NaN or inf (parts never written?)"}
        if not err < TOL:
            return {"error": f"relative error {err:.2e} against SDPA (limit {TOL:g})", "rel_err": err}
        res = {"ms": median_ms(call, iters=iters), "rel_err": err}
        return captured(call, view, ref, res) if graph else res
    except Exception as e:  # a failing contender is reported; the others still run
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return {"error": f"{type(e).__name__}: {first}"}


def captured(call: Callable[[], Any], view: Callable[[Any], torch.Tensor], ref: torch.Tensor, res: dict) -> dict:
    """``res`` with ``graph_ms``: ``call``'s time in a captured CUDA graph, as a
    model's step runs attention (`attention_common.graph_ms`), its output poisoned
    with NaN before the replays and checked against ``ref`` after them; or
    ``graph_error`` where it cannot be captured or its replays' output is wrong."""
    try:
        ms, out = graph_ms(call, before=lambda out: view(out).fill_(float("nan")))
        err = rel_err(view(out), ref)  # asserts every value finite
        if not err < TOL:
            raise AssertionError(f"relative error {err:.2e} against SDPA after the replays")
        res["graph_ms"] = ms
    except Exception as e:
        torch.cuda.synchronize()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        res["graph_error"] = f"{type(e).__name__}: {first}"
    return res


def peer(fi: Any, absent: str, make: Make, ref: torch.Tensor, iters: int, graph: bool = False) -> dict:
    return {"absent": absent} if fi is None else measure(make, ref, iters, graph)


def kvpager(be: Any, tables: np.ndarray, lens: np.ndarray, qlens: np.ndarray, q_cp: Any,
            plans: list | None = None, **options: Any) -> Make:
    """kvpager's step plan over the pool (appended to ``plans``); its output
    poisoned with NaN before the check."""
    def make():
        plan = make_plan(be, tables, lens, qlens, num_q_heads=HQ, config=CONFIG, **options)
        if plans is not None:
            plans.append(plan)
        out = q_cp.copy()
        tview(out).fill_(float("nan"))
        return (lambda: plan.attend(0, q_cp, SCALE, out)), tview
    return make


_READ_ALL = r"""
extern "C" __global__ void read_all(const uint4* __restrict__ p, unsigned long long n, unsigned* out) {
    unsigned acc = 0;
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
#pragma unroll 4
    for (; i < n; i += stride) {
        uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) out[blockIdx.x] = acc;  // keeps the loads; as good as never true
}
"""

# Bulk asynchronous copies (sm_90) of whole pieces into shared memory, in a given
# order, one thread a CTA issuing them through STAGES buffers: the copy engine
# reads long runs faster than 16-byte loads do.
_BULK_GATHER = r"""
__device__ __forceinline__ unsigned sa(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void wait(unsigned long long* bar, unsigned parity) {
    unsigned done = 0;
    while (!done)
        asm volatile("{ .reg .pred q; mbarrier.try_wait.parity.shared::cta.b64 q, [%1], %2; selp.u32 %0, 1, 0, q; }"
                     : "=r"(done) : "r"(sa(bar)), "r"(parity) : "memory");
}
extern "C" __global__ void bulk_gather(const char* __restrict__ p, const int* __restrict__ order,
                                       unsigned long long pieces, unsigned* out) {
    extern __shared__ __align__(128) char smem[];
    __shared__ __align__(8) unsigned long long bars[STAGES];
    const unsigned long long per = (pieces + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * per;
    const unsigned long long hi = lo + per < pieces ? lo + per : pieces;
    if (threadIdx.x != 0 || lo >= hi) return;
    for (int s = 0; s < STAGES; s++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(sa(&bars[s])));
    asm volatile("fence.proxy.async.shared::cta;");
    long long k = 0;
    for (unsigned long long c = lo; c < hi; c++, k++) {
        const int s = (int)(k % STAGES);
        if (k >= STAGES) wait(&bars[s], (unsigned)((k / STAGES - 1) & 1));
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(sa(&bars[s])), "r"(PIECE)
                     : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(sa(smem + s * PIECE)), "l"(p + (unsigned long long)order[c] * PIECE), "r"(PIECE),
                        "r"(sa(&bars[s])) : "memory");
    }
    for (long long j = k > STAGES ? k - STAGES : 0; j < k; j++) wait(&bars[j % STAGES], (unsigned)((j / STAGES) & 1));
    if (smem[5] == 123 && smem[77] == 45) out[blockIdx.x] = 1;  // keeps the copies; as good as never true
}
"""
#: A pool block of every kv head's K and V (bf16): the piece the bulk read takes at a time.
BLOCK_BYTES = BS * KV_BYTES_PER_TOKEN


def read_floor(x: torch.Tensor) -> dict:
    """What this card reads of ``x``'s bytes at best, the bar for a kernel's
    bandwidth (not attention: nothing to check), timed as the contenders are;
    the fastest of a few grids of two ways: a streaming read with 16-byte loads
    (any GPU), and on sm_90 bulk asynchronous copies of whole pool blocks
    (`BLOCK_BYTES`) in a shuffled order, as the cases' block tables are. A
    H200 reads 537 MB at 4.30 TB/s the first way and 4.39 the second (long
    contiguous runs: 4.44), 2026-12-01."""
    import cupy

    nbytes = x.numel() * x.element_size()
    src = cupy.asarray(x.reshape(-1)).view(cupy.uint8)
    out = cupy.zeros(1 << 16, cupy.uint32)
    dev = torch.cuda.get_device_properties(x.device)
    sms = dev.multi_processor_count
    smem_per_sm = cupy.cuda.Device(x.device.index).attributes["MaxSharedMemoryPerMultiprocessor"]
    ways = []
    fn = cupy.RawKernel(_READ_ALL, "read_all")
    for per_sm, threads in ((2, 1024), (4, 512), (8, 256), (16, 256), (32, 128)):
        grid = sms * per_sm
        ways.append((f"16-byte loads, {grid} x {threads}",
                     lambda fn=fn, grid=grid, threads=threads: fn((grid,), (threads,),
                                                                  (src, cupy.uint64(nbytes // 16), out))))
    if dev.major >= 9 and nbytes % BLOCK_BYTES == 0:
        g = torch.Generator().manual_seed(0)
        order = cupy.asarray(torch.randperm(nbytes // BLOCK_BYTES, generator=g, dtype=torch.int32).cuda())
        for stages in (2, 3):
            smem = stages * BLOCK_BYTES
            bulk = cupy.RawModule(code=_BULK_GATHER.replace("STAGES", str(stages))
                                  .replace("PIECE", str(BLOCK_BYTES))).get_function("bulk_gather")
            bulk.max_dynamic_shared_size_bytes = smem
            for per_sm in (1, 2):
                grid = sms * per_sm
                if per_sm * smem > smem_per_sm - 8192:
                    continue
                ways.append((f"bulk copies of {BLOCK_BYTES // 1024} KiB blocks, {stages} stages, {grid} CTAs",
                             lambda bulk=bulk, grid=grid, smem=smem: bulk(
                                 (grid,), (32,), (src, order, cupy.uint64(len(order)), out), shared_mem=smem)))
    best = None
    for how, call in ways:
        t = median_ms(call, iters=50)
        if best is None or t < best["ms"]:
            best = {"ms": t, "how": how}
    return best


def same(x: torch.Tensor) -> torch.Tensor:
    return x


def layer(be: Any) -> torch.Tensor:
    """Layer 0 of kvpager's pool as FlashInfer's HND paged cache (the same memory)."""
    return tview(be.kv)[:, 0]


def decode(batch: int, ctx: int, fi: Any, absent: str) -> dict:
    """``batch`` sequences of ``ctx`` tokens, one query each."""
    _, be, tables, q_cp, kv = setup(batch, ctx, 1)
    q = tview(q_cp)
    q4 = q.unsqueeze(2)

    def sdpa():
        return F.scaled_dot_product_attention(q4, kv[0], kv[1], scale=SCALE, enable_gqa=True)

    ref = sdpa().squeeze(2)
    lens, ones = np.full(batch, ctx, np.int32), np.ones(batch, np.int32)
    res = {
        "kvpager": measure(kvpager(be, tables, lens, ones, q_cp), ref, 50, graph=True),
        "flashinfer": peer(fi, absent, lambda: (pf.decode(fi, layer(be), tables, lens, q, HKV, BS, SCALE),
                                                same), ref, 50, graph=True),
        "sdpa": captured(sdpa, lambda out: out.squeeze(2), ref, {"ms": median_ms(sdpa), "rel_err": 0.0}),
        "read floor": read_floor(kv),
    }
    be.close()
    return dict(case=f"{batch} x {ctx}", batch=batch, context=ctx, bytes=batch * ctx * KV_BYTES_PER_TOKEN,
                results=res)


def prefill(batch: int, new: int, cached: int, fi: Any, absent: str) -> dict:
    """``batch`` sequences of ``new`` tokens on ``cached`` ones, causal."""
    ctx = cached + new
    _, be, tables, q_cp, kv = setup(batch, ctx, new)
    q = tview(q_cp)
    sdpa = causal_sdpa(q.view(batch, new, HQ, D).transpose(1, 2), kv, SCALE)
    ref = sdpa().transpose(1, 2).reshape(batch * new, HQ, D)
    lens, qlens = np.full(batch, ctx, np.int32), np.full(batch, new, np.int32)
    hopper = torch.cuda.get_device_capability() == (9, 0)

    def fi_make(backend: str) -> Make:
        return lambda: (pf.prefill(fi, backend, layer(be), tables, lens, qlens, q, HKV, BS, SCALE), same)

    res = {
        "kvpager": measure(kvpager(be, tables, lens, qlens, q_cp), ref, 20),
        "flashinfer fa2": peer(fi, absent, fi_make("fa2"), ref, 20),
        "flashinfer fa3": peer(fi, absent, fi_make("fa3"), ref, 20) if hopper or fi is None
        else {"skipped": "FlashInfer's fa3 kernels need a Hopper (sm90) GPU"},
        "sdpa": {"ms": median_ms(sdpa, iters=20), "rel_err": 0.0},
    }
    be.close()
    pairs = batch * (new * cached + new * (new + 1) // 2)  # (query, visible key) pairs
    return dict(case=f"{batch} x {new} on {cached}", batch=batch, new=new, cached=cached,
                flops=4 * D * HQ * pairs, results=res)


def shared(batch: int, prefix: int, own: int, groups: int, fi: Any, absent: str) -> dict:
    """``batch`` sequences in ``groups`` groups, each sharing ``prefix`` tokens (the
    same blocks), then ``own`` tokens of their own and the query's (bench_cascade's
    step). Every contender is checked against SDPA; SDPA is timed where its
    contiguous copy fits in memory, else only used chunk by chunk as the reference."""
    row = dict(case=f"{batch} x ({prefix} + {own})", batch=batch, prefix=prefix, own=own, groups=groups,
               distinct_bytes=(groups * prefix + batch * (own + 1)) * KV_BYTES_PER_TOKEN)
    pool_bytes = (groups * prefix // BS + batch * -(-(own + 1) // BS) + 1) * BS * KV_BYTES_PER_TOKEN
    if pool_bytes > 0.8 * torch.cuda.mem_get_info()[0]:
        row["skipped"] = f"the pool ({pool_bytes / 1e9:.1f} GB) does not fit in free GPU memory"
        return row
    be, tables, lens, _, q_cp = shared_setup(batch, prefix, own, groups)
    length, q = int(lens[0]), tview(q_cp)
    q4, pool = q.unsqueeze(2), tview(be.kv)
    dense = batch * length * KV_BYTES_PER_TOKEN
    res: dict[str, dict] = {}
    if dense < 0.7 * torch.cuda.mem_get_info()[0]:
        kv = dense_kv(pool, tables, length)

        def sdpa():
            return F.scaled_dot_product_attention(q4, kv[0], kv[1], scale=SCALE, enable_gqa=True)

        ref = sdpa().squeeze(2)
        res["sdpa"] = {"ms": median_ms(sdpa), "rel_err": 0.0}
        del kv
    else:
        ref = torch.empty_like(q)
        step = max(1, (4 << 30) // (length * KV_BYTES_PER_TOKEN))
        for s in range(0, batch, step):
            kv = dense_kv(pool, tables[s : s + step], length)
            ref[s : s + step] = F.scaled_dot_product_attention(q4[s : s + step], kv[0], kv[1], scale=SCALE,
                                                               enable_gqa=True).squeeze(2)
            del kv
        res["sdpa"] = {"skipped": f"its contiguous copy ({dense / 1e9:.1f} GB) does not fit in GPU memory"}
    ones = np.ones(batch, np.int32)
    plans: list = []
    res["kvpager cascade"] = measure(kvpager(be, tables, lens, ones, q_cp, plans, cascade=True), ref, 50)
    if plans:  # whether the plan found the shared prefixes (else it ran the plain decode)
        res["kvpager cascade"]["cascades"] = plans[0].shared_prefixes is not None
    res["kvpager plain"] = measure(kvpager(be, tables, lens, ones, q_cp, cascade=False), ref, 50)

    def fi_cascade():
        call, order = pf.cascade(fi, layer(be), tables, lens, prefix, q, HKV, BS, SCALE)
        back = torch.from_numpy(np.argsort(order)).to(q.device)  # grouped rows -> the step's rows
        return call, lambda out: out[back]

    res["flashinfer cascade"] = peer(fi, absent, fi_cascade, ref, 50)
    res["flashinfer paged"] = peer(
        fi, absent, lambda: (pf.decode(fi, layer(be), tables, lens, q, HKV, BS, SCALE), same), ref, 50)
    be.close()
    row["results"] = res
    return row
