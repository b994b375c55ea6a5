"""Paged attention on the CPU: the compiled kernel (`kvpager.cpu_attention`)
against its NumPy twin on the same pool, and torch SDPA on the same K/V laid
out contiguously (what transformers' cache runs on the CPU).

    PYTHONPATH=. python tools/bench_cpu_attention.py [--dtype float32|bfloat16] [--threads N] [--json]

Block tables are shuffled. Each case checks the kernel against SDPA in float64
(relative error), then times the three alternately: the best of ``--rounds``
rounds, each the median of ``--calls`` calls. torch runs on ``--threads``
threads, the kernel on as many at most (KVPAGER_CPU_THREADS); the twin is
single-threaded NumPy (its products use the BLAS's threads). GB/s counts the
K/V bytes read once.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np

# (name, batch, context, new tokens per sequence, q heads, kv heads, head dim)
CASES = [
    ("decode s", 8, 288, 1, 8, 2, 64),
    ("decode s", 32, 288, 1, 8, 2, 64),
    ("decode s", 8, 2048, 1, 8, 2, 64),
    ("decode, head dim 72", 8, 288, 1, 8, 2, 72),  # (a multiple of 8, not 16: the AVX2 build)
    ("decode, head dim 72", 1, 2048, 1, 8, 2, 72),
    ("decode 8b", 8, 1024, 1, 32, 8, 128),
    ("decode 8b", 1, 16384, 1, 32, 8, 128),
    ("decode 8b", 64, 1024, 1, 32, 8, 128),
    ("4 new tokens", 8, 288, 4, 8, 2, 64),
    ("16 new tokens", 8, 288, 16, 8, 2, 64),
    ("prefill", 4, 288, 288, 8, 2, 64),
    ("prefill", 1, 2048, 2048, 32, 8, 128),
]
BS = 16


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def case_data(rng, batch, ctx, heads_kv, head_dim, dtype):
    nb = -(-ctx // BS)
    blocks = batch * nb + 1
    kv = rng.standard_normal((blocks, 1, 2, heads_kv, BS, head_dim)).astype(np.float32).astype(dtype)
    tables = rng.permutation(np.arange(1, blocks))[: batch * nb].reshape(batch, nb).astype(np.int32)
    return kv, tables


def run_case(case, dtype, rounds, calls, rng):
    import torch
    import torch.nn.functional as F

    from kvpager import cpu_attention
    from kvpager.backends.numpy_backend import paged_attention

    name, batch, ctx, new, hq, hkv, d = case
    kv, tables = case_data(rng, batch, ctx, hkv, d, dtype)
    lens = np.full(batch, ctx, np.int32)
    qlens = np.full(batch, new, np.int32)
    q = rng.standard_normal((batch * new, hq, d)).astype(np.float32).astype(dtype)
    scale = 1 / np.sqrt(d)
    # contiguous K/V [B, H, ctx, D] for SDPA, from the same stored values
    dense = kv[tables, 0].astype(np.float32)  # [B, nb, 2, H, bs, D]
    dense = dense.transpose(2, 0, 3, 1, 4, 5).reshape(2, batch, hkv, -1, d)[:, :, :, :ctx]
    tdt = torch.float32 if np.dtype(dtype) == np.float32 else torch.bfloat16
    kt = torch.from_numpy(np.ascontiguousarray(dense[0])).to(tdt)
    vt = torch.from_numpy(np.ascontiguousarray(dense[1])).to(tdt)
    qt = torch.from_numpy(q.astype(np.float32).reshape(batch, new, hq, d).transpose(0, 2, 1, 3).copy()).to(tdt)
    mask = None
    if new > 1:  # the new tokens are the sequence's last: query i sees keys <= ctx - new + i
        pos = torch.arange(ctx - new, ctx)[:, None]
        mask = torch.arange(ctx)[None, :] <= pos

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)

    def kernel():
        return cpu_attention.attend(kv, 0, q, tables, lens, qlens, scale)

    def twin():
        return paged_attention(kv, 0, q, tables, lens, qlens, scale)

    ref = F.scaled_dot_product_attention(qt.double(), kt.double(), vt.double(), attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    ref = ref.permute(0, 2, 1, 3).reshape(batch * new, hq, d).numpy()
    got = kernel().astype(np.float64)
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    best = {"kernel": float("inf"), "twin": float("inf"), "sdpa": float("inf")}
    slow = batch * new * ctx * hq * d > 1 << 31  # the twin's large prefill: fewer calls
    with torch.inference_mode():
        for _ in range(rounds):
            for key, fn in (("kernel", kernel), ("twin", twin), ("sdpa", sdpa)):
                fn()
                best[key] = min(best[key], median_ms(fn, 3 if slow else calls))
    mb = batch * ctx * hkv * d * 2 * np.dtype(dtype).itemsize / 1e6
    return {"case": name, "batch": batch, "context": ctx, "new": new, "heads": f"{hq}/{hkv}", "head_dim": d,
            "kernel_ms": best["kernel"], "twin_ms": best["twin"], "sdpa_ms": best["sdpa"],
            "gbps": mb / best["kernel"], "rel_err": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ["KVPAGER_CPU_THREADS"] = str(args.threads)
    import torch

    from kvpager import cpu_attention
    from kvpager.spec import numpy_dtype

    if cpu_attention.KERNEL is None:
        raise SystemExit("kvpager._cpu_attention is not built (pip install -e . with a C compiler)")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = [run_case(c, numpy_dtype(args.dtype), args.rounds, args.calls, rng) for c in CASES]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"{args.dtype}, {datetime.date.today()}, torch {torch.__version__}")
    print("| case | batch x context | new | q/kv heads, dim | kernel ms | GB/s | twin ms | SDPA ms "
          "| vs twin | vs SDPA | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} x {r['context']} | {r['new']} | {r['heads']}, {r['head_dim']} "
              f"| {r['kernel_ms']:.3f} | {r['gbps']:.1f} | {r['twin_ms']:.3f} | {r['sdpa_ms']:.3f} "
              f"| {r['twin_ms'] / r['kernel_ms']:.2f}x | {r['sdpa_ms'] / r['kernel_ms']:.2f}x | {r['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
