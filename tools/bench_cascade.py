"""Shared-prefix attention: kvpager's cascade against its plain paged attention
on the same step, and (headline case) SDPA on contiguous K/V; multi-token steps
and FP8 pools; then a sharing sweep.

    PYTHONPATH=. python tools/bench_cascade.py [--sweep] [--mma] [--captured] [--json]

bf16, 32 query heads over 8 kv heads, head dim 128, block size 16, blocks
shuffled. A step of B sequences in G groups: each group's sequences share a
prefix of P tokens (the same blocks), then hold O tokens of their own, then
Q query tokens (1: decode; more: chunked prefill on the cached prefix or
speculative verification, causal). The headline case is 256 sequences sharing
an 8,192-token prefix with 256 own tokens each, decoding. Multi-token cases:
64 sequences x 8 query tokens on an 8k shared prefix + 256 own, and 8 x 1,024
new tokens on a 4k shared cached prefix. FP8 rows: the same steps on an e4m3
pool (random stored values, one scale). Every timed call is checked first
(relative error against the plain kernel, and against SDPA in the headline
case); times are medians of CUDA-event-timed calls queued behind a GPU sleep.
`auto` is what the plan chooses by itself. The floor reads each distinct K/V
byte once at the card's datasheet bandwidth. ``--mma``: the headline case
again with ``prefill_kernel="mma"`` (on compute capability 9.0 the cascade's
shared part then runs on mma.sync, cascade_prefix.cu, instead of wgmma), its
K/V column marked "(mma)". ``--captured``: decode steps of a model's size
as a captured CUDA graph runs them, the cascade's own and shared parts side
by side against one after the other (the same bits) and plain attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import _needs_cupy  # noqa: F401 (first: names what a machine without CuPy lacks)
import cupy
import numpy as np
import torch
import torch.nn.functional as F
from attention_common import BS, DATASHEET_TBS, HKV, HQ, D, dense_kv, median_ms, rel_err, tview

from kvpager.backends.cupy_backend import CupyBackend
from kvpager.kernel_config import DEFAULT, KernelConfig
from kvpager.plan import make_plan
from kvpager.spec import PoolSpec

SWEEP = [(b, p, g) for p in (1024, 4096, 32768) for b in (16, 64, 512) for g in (1, 8) if b >= 8 * g]


def setup(batch: int, prefix: int, own: int, groups: int, qlen: int = 1, kv_dtype: str | None = None):
    """Backend, tables, lengths, query lengths, q for a step of ``batch`` sequences in
    ``groups`` sharing groups, ``qlen`` query tokens each (after ``own`` tokens of their own)."""
    pb, ob = prefix // BS, -(-(own + qlen) // BS)
    nblocks = groups * pb + batch * ob + 1
    spec = PoolSpec(num_layers=1, num_kv_heads=HKV, head_dim=D, num_blocks=nblocks, block_size=BS,
                    dtype="bfloat16", kv_dtype=kv_dtype, kv_scales=None if kv_dtype is None else [1 / 64] * 2 * HKV)
    be = CupyBackend(spec, 0)
    if kv_dtype is None:
        tview(be.kv).normal_()
    else:  # normal(0, 1) values stored at scale 1 / 64
        fmt = {"float8_e4m3": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}[kv_dtype]
        raw = torch.from_dlpack(be.kv)
        raw.view(fmt).copy_((torch.randn(raw.shape, device=raw.device) * 64).clamp(-400, 400).to(fmt))
    ids = np.random.default_rng(0).permutation(np.arange(1, nblocks)).astype(np.int32)
    shared = ids[: groups * pb].reshape(groups, pb)
    owned = ids[groups * pb :].reshape(batch, ob)
    tables = np.concatenate([shared[np.arange(batch) % groups], owned], axis=1)
    lens = np.full(batch, prefix + own + qlen, np.int32)  # the queries are the last positions
    qlens = np.full(batch, qlen, np.int32)
    q = cupy.empty((batch * qlen, HQ, D), dtype=be.dtype)
    tview(q).normal_()
    return be, tables, lens, qlens, q


def run(batch: int, prefix: int, own: int, groups: int, peak: float | None, sdpa: bool = False,
        qlen: int = 1, kv_dtype: str | None = None, config: KernelConfig = DEFAULT) -> dict:
    be, tables, lens, qlens, q = setup(batch, prefix, own, groups, qlen, kv_dtype)
    scale = D**-0.5
    cascade = make_plan(be, tables, lens, qlens, num_q_heads=HQ, cascade=True, config=config)
    plain = make_plan(be, tables, lens, qlens, num_q_heads=HQ, cascade=False, config=config)
    auto = make_plan(be, tables, lens, qlens, num_q_heads=HQ, config=config)
    out_c, out_p = cupy.empty_like(q), cupy.empty_like(q)
    cascade.attend(0, q, scale, out_c)
    plain.attend(0, q, scale, out_p)
    err = rel_err(tview(out_c), tview(out_p))
    assert err < 1e-2, f"cascade vs plain: relative error {err}"
    row = dict(batch=batch, prefix=prefix, own=own, groups=groups, qlen=qlen, kv=kv_dtype or "bfloat16",
               kernels=config.prefill_kernel,
               rel_err=err, cascade_ms=median_ms(lambda: cascade.attend(0, q, scale, out_c)),
               plain_ms=median_ms(lambda: plain.attend(0, q, scale, out_p)),
               auto_ms=median_ms(lambda: auto.attend(0, q, scale, out_c)),
               auto_cascades=auto.shared_prefixes is not None)
    distinct = (groups * prefix + batch * (own + qlen)) * HKV * D * 2 * be.spec.itemsize
    row["floor_ms"] = distinct / (peak * 1e12) * 1e3 if peak else None
    if sdpa:
        kv = dense_kv(tview(be.kv), tables, int(lens[0]))
        q4 = tview(q).unsqueeze(2)
        ref = F.scaled_dot_product_attention(q4, kv[0], kv[1], scale=scale, enable_gqa=True).squeeze(2)
        row["rel_err_sdpa"] = rel_err(tview(out_c), ref)
        assert row["rel_err_sdpa"] < 1e-2
        row["sdpa_ms"] = median_ms(lambda: F.scaled_dot_product_attention(q4, kv[0], kv[1], scale=scale,
                                                                            enable_gqa=True))
        del kv
    be.close()
    return row


def captured(batch: int, prefix: int, own: int, groups: int, calls: int = 20) -> dict:
    """A decode step's attention as a model's captured step runs it: ``calls`` calls in
    one CUDA graph, per-call time of a replay (CUDA events), the cascade with its own
    and shared parts side by side (`KernelConfig.decode_cascade_fork`), one after the
    other, side by side with a CTA per merged row (`KernelConfig.merge_warp_max_parts` 0; the
    default merges a warp per row where it may), and plain; the first two cascades' outputs
    must be the same bits, the others close."""
    be, tables, lens, qlens, q = setup(batch, prefix, own, groups)
    row = dict(batch=batch, prefix=prefix, own=own, groups=groups)
    outs = {}
    variants = (("fork", True, DEFAULT), ("serial", True, DEFAULT.replace(decode_cascade_fork=False)),
                ("cta_merge", True, DEFAULT.replace(merge_warp_max_parts=0)), ("plain", False, DEFAULT))
    for label, cascade, config in variants:
        plan = make_plan(be, tables, lens, qlens, num_q_heads=HQ, cascade=cascade, config=config)
        out = cupy.empty_like(q)
        plan.attend(0, q, None, out)  # prepared outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                plan.attend(0, q, None, out)
        row[f"{label}_us"] = median_ms(graph.replay) * 1e3 / calls
        outs[label] = cupy.asnumpy(out)
    assert np.array_equal(outs["fork"].view(np.uint16), outs["serial"].view(np.uint16)), "fork != serial"
    for other in ("plain", "cta_merge"):
        row[f"rel_err_{other}"] = rel_err(tview(cupy.asarray(outs["fork"])), tview(cupy.asarray(outs[other])))
        assert row[f"rel_err_{other}"] < 1e-2, other
    be.close()
    return row


#: decode steps of a model's size (sequences, shared, own), captured
CAPTURED = [(64, 1024, 72), (256, 1024, 72), (64, 1024, 256), (128, 2048, 128), (256, 8192, 256)]

#: (batch, prefix, own, groups, query tokens, kv dtype): multi-token steps and FP8 pools
CASES = [(64, 8192, 256, 1, 8, None), (8, 4096, 0, 1, 1024, None),
         (256, 8192, 256, 1, 1, "float8_e4m3"), (64, 8192, 256, 1, 8, "float8_e4m3"),
         (8, 4096, 0, 1, 1024, "float8_e4m3")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also the sharing sweep")
    ap.add_argument("--mma", action="store_true", help="the headline case again on the mma kernels")
    ap.add_argument("--captured", action="store_true",
                    help="only decode steps captured in a CUDA graph: the cascade's parts side by side or not")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in DATASHEET_TBS.items() if k in name), None)
    if args.captured:
        rows = [captured(b, p, o, 1) for b, p, o in CAPTURED]
        if args.json:
            print(json.dumps(dict(card=name, rows=rows), indent=1))
            return
        print(f"{name}, {datetime.date.today()}; bf16, {HQ} q / {HKV} kv heads, head dim {D}, block size {BS}; "
              "per call of a captured graph")
        print("| sequences x (shared + own) | cascade, parts side by side us | one after the other us | "
              "side by side, a CTA per merged row us | plain us | side by side gain | warp-per-row merge gain |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['batch']} x ({r['prefix']} + {r['own']}) | {r['fork_us']:.1f} | {r['serial_us']:.1f} | "
                  f"{r['cta_merge_us']:.1f} | {r['plain_us']:.1f} | {r['serial_us'] / r['fork_us']:.2f}x | "
                  f"{r['cta_merge_us'] / r['fork_us']:.2f}x |")
        return
    rows = [run(256, 8192, 256, 1, peak, sdpa=True)]
    if args.mma:
        rows.append(run(256, 8192, 256, 1, peak, config=DEFAULT.replace(prefill_kernel="mma")))
    for b, p, o, g, ql, kv in CASES:
        rows.append(run(b, p, o, g, peak, qlen=ql, kv_dtype=kv))
        torch.cuda.empty_cache()
    if args.sweep:
        rows += [run(b, p, 256, g, peak) for b, p, g in SWEEP]
    if args.json:
        print(json.dumps(dict(card=name, kernel_config=dataclasses.asdict(DEFAULT), rows=rows), indent=1))
        return
    print(f"{name}, {datetime.date.today()}; bf16, {HQ} q / {HKV} kv heads, head dim {D}, block size {BS}")
    print("| sequences x (shared + own) | query tokens | K/V | groups | cascade ms | plain paged ms | "
          "plain / cascade | auto ms | SDPA ms | floor ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sd = f"{r['sdpa_ms']:.3f}" if "sdpa_ms" in r else "-"
        fl = f"{r['floor_ms']:.3f}" if r["floor_ms"] else "-"
        auto = f"{r['auto_ms']:.3f}" + (" (cascade)" if r["auto_cascades"] else " (plain)")
        kv = r["kv"] + ("" if r["kernels"] == DEFAULT.prefill_kernel else f" ({r['kernels']})")
        print(f"| {r['batch']} x ({r['prefix']} + {r['own']}) | {r['qlen']} | {kv} | {r['groups']} | "
              f"{r['cascade_ms']:.3f} | "
              f"{r['plain_ms']:.3f} | {r['plain_ms'] / r['cascade_ms']:.2f}x | {auto} | {sd} | {fl} |")


if __name__ == "__main__":
    main()
