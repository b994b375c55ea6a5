"""Paged attention kernels against torch SDPA on the same K/V laid out contiguously.

    PYTHONPATH=. python tools/bench_attention.py [--json]

bf16, 32 query heads over 8 kv heads (--heads: others, e.g. 28/4), head dim 128, block size 16, block
tables shuffled. Each case first checks the kernel's output against SDPA's
(relative error), then times both with CUDA events on one stream (median of
many calls, queued behind a GPU sleep so launch overhead stays out).
--sweep adds variants (kvpager.KernelConfig knobs, split counts) timed on the same data.
On compute capability 9.0 the multi-token case also runs the wgmma kernel
(paged_prefill_sm90.cu) beside the production one (--sweep: its tilings too).
Decode moves the K/V once: bytes = sum(seq_len) * kv_heads * head_dim * 2 (K, V) * 2 bytes;
multi-token counts 4 * head_dim * q_heads FLOPs per (query, visible key) pair.
Each decode case also runs on an FP8 copy of the pool (--fp8, default e4m3: the bf16 K/V
quantised with one scale, 1 byte per value), checked against SDPA over the dequantised
K/V, and timed against the bf16 pool in the same run: the "vs bf16" column is the
bf16 time over the FP8 time.
--sinks: each decode case also with attention sinks (one logit per query head
in the softmax denominator, as GPT-OSS): checked against
the same attention in float32 torch with the sink appended, timed beside the
call without sinks on the same plan ("with sinks" rows).
"""

from __future__ import annotations

import argparse
import datetime
import json

import _needs_cupy  # noqa: F401 (first: names what a machine without CuPy lacks)
import attention_common as ac
import cupy
import numpy as np
import torch
import torch.nn.functional as F
from attention_common import (
    BS,
    DECODE_CASES,
    card,
    causal_sdpa,
    median_ms,
    rel_err,
    setup,
    tview,
)

from kvpager import KernelConfig
from kvpager.backends.cupy_backend import CupyBackend
from kvpager.backends.cupy_prefill import WGMMA_HEAD_DIMS
from kvpager.backends.prefill_work import WHOLE_GROUP_MAX
from kvpager.plan import make_plan


def sinks_reference(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    sinks: torch.Tensor) -> torch.Tensor:
    """Decode attention [B, ac.HQ, head dim] in float32 with each head's sink as one more logit
    (dropped after the softmax), GQA by repeating the kv heads."""
    rep = ac.HQ // ac.HKV
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q4.float(), kf) * scale
    s = torch.cat([s, sinks.view(1, ac.HQ, 1, 1).expand(s.shape[0], ac.HQ, s.shape[2], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :-1]
    return torch.einsum("bhqk,bhkd->bhqd", p, vf).squeeze(2)


def bench_sinks(batch: int, ctx: int, be, plan, q_cp, q4, kv, scale: float, out, plain_ms: float) -> dict:
    """The same decode plan with sinks: checked, timed (the call with sinks through the merge)."""
    sinks = torch.linspace(-2.0, 6.0, ac.HQ, device="cuda")
    ref = sinks_reference(q4, kv[0], kv[1], scale, sinks)
    out[...] = cupy.nan if out.dtype != cupy.uint16 else 0x7FC0
    plan.attend(0, q_cp, scale, out, sinks=sinks)
    err = rel_err(tview(out), ref)
    assert err < 1e-2, f"decode {batch}x{ctx} with sinks: relative error {err}"
    ms = median_ms(lambda: plan.attend(0, q_cp, scale, out, sinks=sinks))
    return dict(case=f"decode {batch}x{ctx}", sinks_ms=ms, plain_ms=plain_ms, rel_err=err,
                sinks_cost=ms / plain_ms)


def bench_decode(batch: int, ctx: int, peak: float | None,
                 variants: list[tuple[str, KernelConfig, int | None]] | None = None,
                 sinks: bool = False, head_dim: int = 128) -> list[dict]:
    """Decode of `batch` x `ctx` for each variant (label, kernel config, num_splits), one SDPA baseline."""
    spec, be, tables, q_cp, kv = setup(batch, ctx, 1, head_dim)
    scale = head_dim**-0.5
    q4 = tview(q_cp).unsqueeze(2)  # [B, ac.HQ, 1, head dim]
    ref = F.scaled_dot_product_attention(q4, kv[0], kv[1], scale=scale, enable_gqa=True)
    base = median_ms(lambda: F.scaled_dot_product_attention(q4, kv[0], kv[1], scale=scale, enable_gqa=True))
    nbytes = batch * ctx * ac.HKV * head_dim * 2 * 2
    rows = []
    for label, config, splits in variants or [("", KernelConfig(), None)]:
        try:
            plan = make_plan(be, tables, np.full(batch, ctx, np.int32), np.ones(batch, np.int32),
                             num_splits=splits, num_q_heads=ac.HQ, config=config)
            out = cupy.empty_like(q_cp)
            out[...] = cupy.nan if out.dtype != cupy.uint16 else 0x7FC0
            plan.attend(0, q_cp, scale, out)
            err = rel_err(tview(out), ref.squeeze(2))
            assert err < 1e-2, f"decode {batch}x{ctx} {label}: relative error {err}"
        except Exception as e:  # a broken variant is reported, the others still run
            if not label:
                raise
            print(f"decode {batch}x{ctx} ({label}): FAILED: {e}", flush=True)
            continue
        ours = median_ms(lambda plan=plan, out=out: plan.attend(0, q_cp, scale, out))
        case = f"decode {batch}x{ctx}" + (f" ({label})" if label else "")
        rows.append(dict(case=case, splits=plan.splits, rel_err=err, ms=ours, tbs=nbytes / ours / 1e9,
                         pct_peak=(nbytes / ours / 1e9 / peak * 100) if peak else None,
                         sdpa_ms=base, sdpa_tbs=nbytes / base / 1e9, ratio=base / ours))
        if sinks and not label:
            rows.append(bench_sinks(batch, ctx, be, plan, q_cp, q4, kv, scale, out, ours))
    be.close()
    return rows


def bench_prefill(batch: int = 8, new: int = 1024, cached: int = 4096,
                  variants: list[tuple[str, KernelConfig]] | None = None, head_dim: int = 128) -> list[dict]:
    ctx = cached + new
    spec, be, tables, q_cp, kv = setup(batch, ctx, new, head_dim)
    scale = head_dim**-0.5
    q4 = tview(q_cp).view(batch, new, ac.HQ, head_dim).transpose(1, 2)
    sdpa = causal_sdpa(q4, kv, scale)
    ref = sdpa()
    base = median_ms(sdpa, iters=20)
    pairs = batch * (new * cached + new * (new + 1) // 2)
    flops = 4 * head_dim * ac.HQ * pairs
    rows = []
    for label, config in variants or [("", KernelConfig())]:
        try:
            plan = make_plan(be, tables, np.full(batch, ctx, np.int32), np.full(batch, new, np.int32),
                             num_q_heads=ac.HQ, config=config)
            out = cupy.empty_like(q_cp)
            out[...] = cupy.nan if out.dtype != cupy.uint16 else 0x7FC0
            plan.attend(0, q_cp, scale, out)
            err = rel_err(tview(out), ref.transpose(1, 2).reshape(batch * new, ac.HQ, head_dim))
            assert err < 1e-2, f"prefill {label}: relative error {err}"
        except Exception as e:  # a broken variant is reported, the others still run
            if not label:
                raise
            print(f"prefill {batch}x{new} on {cached} ({label}): FAILED: {e}", flush=True)
            continue
        ours = median_ms(lambda plan=plan, out=out: plan.attend(0, q_cp, scale, out), iters=20)
        case = f"prefill {batch}x{new} on {cached}" + (f" ({label})" if label else "")
        rows.append(dict(case=case, rel_err=err, ms=ours, tflops=flops / ours / 1e9,
                         sdpa_ms=base, sdpa_tflops=flops / base / 1e9, ratio=base / ours))
    be.close()
    return rows


def bench_fp8(batch: int, ctx: int, kv_dtype: str, peak: float | None, head_dim: int = 128) -> dict:
    """Decode of `batch` x `ctx` on a bf16 pool and on its FP8 copy, timed alternately."""
    spec, be, tables, q_cp, kv = setup(batch, ctx, 1, head_dim)
    fmt, top = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}[kv_dtype]
    scale_kv = 8.0 / top  # the normal(0, 1) values stay below 8
    spec8 = spec.replace(kv_dtype=f"float8_{kv_dtype}", kv_scales=[scale_kv] * (2 * ac.HKV))
    be8 = CupyBackend(spec8, 0)
    stored = (tview(be.kv).float() / scale_kv).clamp(-top, top).to(fmt)
    torch.from_dlpack(be8.kv).copy_(stored.view(torch.uint8))
    deq = (stored.float() * scale_kv).to(torch.bfloat16)[torch.from_numpy(tables).long().cuda(), 0]
    nb = ctx // BS
    kv8 = deq.permute(2, 0, 3, 1, 4, 5).reshape(2, batch, ac.HKV, nb * BS, head_dim)
    scale = head_dim**-0.5
    q4 = tview(q_cp).unsqueeze(2)
    ref8 = F.scaled_dot_product_attention(q4, kv8[0], kv8[1], scale=scale, enable_gqa=True).squeeze(2)
    ref = F.scaled_dot_product_attention(q4, kv[0], kv[1], scale=scale, enable_gqa=True).squeeze(2)
    plans = [make_plan(b, tables, np.full(batch, ctx, np.int32), np.ones(batch, np.int32), num_q_heads=ac.HQ)
             for b in (be, be8)]
    outs = [cupy.full(q_cp.shape, 0x7FC0, dtype=q_cp.dtype) if q_cp.dtype == cupy.uint16
            else cupy.full(q_cp.shape, cupy.nan, dtype=q_cp.dtype) for _ in plans]
    for plan, out in zip(plans, outs):
        plan.attend(0, q_cp, scale, out)
    err8 = rel_err(tview(outs[1]), ref8)
    assert err8 < 1e-2, f"fp8 decode {batch}x{ctx}: relative error {err8} against the dequantised K/V"
    times = [[], []]
    for _ in range(3):  # alternate, so clocks and neighbours treat both alike
        for i, (plan, out) in enumerate(zip(plans, outs)):
            times[i].append(median_ms(lambda plan=plan, out=out: plan.attend(0, q_cp, scale, out)))
    bf16_ms, fp8_ms = (float(np.median(t)) for t in times)
    nbytes = batch * ctx * ac.HKV * head_dim * 2  # one byte per value
    be.close()
    be8.close()
    return dict(case=f"decode {batch}x{ctx} fp8 {kv_dtype}", splits=plans[1].splits, rel_err=err8,
                rel_err_vs_bf16=rel_err(tview(outs[1]), ref), ms=fp8_ms, tbs=nbytes / fp8_ms / 1e9,
                pct_peak=(nbytes / fp8_ms / 1e9 / peak * 100) if peak else None, bf16_ms=bf16_ms,
                speedup=bf16_ms / fp8_ms, memory_ratio=spec8.bytes_per_block / spec.bytes_per_block)


def prefill_variants(sweep: bool, head_dim: int = 128, kernels: bool = True) -> list[tuple[str, KernelConfig]]:
    """The multi-token case's variants: the production config (on compute capability 9.0
    the wgmma kernel, paged_prefill_sm90.cu, with its producer warpgroup), and there the
    mma kernel and the wgmma kernel's other variants beside it (where it is built for
    ``head_dim``); a GQA group past 16 heads (cut into chunks of heads a tile) also whole,
    a token a tile, on both kernels; --sweep adds one m-tile per warp and the wgmma kernel's
    tilings (warpgroups, K/V tile, stages). ``kernels`` False: the production config (and the
    whole groups) alone."""
    c = KernelConfig()
    variants = [("", c)]
    group = ac.HQ // ac.HKV
    if group > WHOLE_GROUP_MAX:  # the planner cuts it into chunks of heads: against whole groups a tile
        variants.append(("whole group a tile", c.replace(prefill_head_chunk=group)))
        variants.append(("mma, whole group a tile", c.replace(prefill_kernel="mma", prefill_head_chunk=group)))
    wg = c.replace(prefill_kernel="wgmma", prefill_wgmma_producer=False)
    if not kernels:
        return variants
    if torch.cuda.get_device_capability() == (9, 0) and head_dim in WGMMA_HEAD_DIMS:
        variants += [("mma", c.replace(prefill_kernel="mma")),
                     ("wgmma", wg), ("wgmma, overlap", wg.replace(prefill_wgmma_overlap=True)),
                     ("wgmma, producer warpgroup", wg.replace(prefill_wgmma_producer=True)),
                     ("wgmma, producer warpgroup, a CTA a tile (no persistent grid)",
                      wg.replace(prefill_wgmma_producer=True, prefill_wgmma_persistent=False)),
                     ("wgmma, producer warpgroup, cp.async only (no TMA)",
                      wg.replace(prefill_wgmma_producer=True, prefill_wgmma_tma=False)),
                     ("wgmma, producer warpgroup, FlashAttention-3 loop",
                      wg.replace(prefill_wgmma_producer=True, prefill_wgmma_overlap=True, prefill_wgmma_bn=128)),
                     ("wgmma, producer warpgroup, FlashAttention-3 loop, no TMA",
                      wg.replace(prefill_wgmma_producer=True, prefill_wgmma_overlap=True, prefill_wgmma_bn=128,
                                 prefill_wgmma_tma=False))]
    if sweep:
        if head_dim <= 128:  # (one m-tile is the rule past 128)
            variants.append(("1 m-tile per warp", c.replace(prefill_kernel="mma", prefill_mt=1)))
        if torch.cuda.get_device_capability() == (9, 0) and head_dim in WGMMA_HEAD_DIMS:
            for wgs, bn, st, ov in ((2, 64, 2, False), (2, 128, 2, False), (1, 64, 3, False), (1, 64, 4, False),
                                    (1, 128, 2, False), (1, 128, 3, False), (2, 64, 3, True), (2, 64, 4, True),
                                    (2, 128, 3, True), (1, 64, 3, True), (1, 128, 3, True)):
                variants.append((f"wgmma {64 * wgs} rows, {bn}-position tiles, {st} stages" + (", overlap" if ov else ""),
                                 wg.replace(prefill_wgmma_warpgroups=wgs, prefill_wgmma_bn=bn,
                                            prefill_wgmma_stages=st, prefill_wgmma_overlap=ov)))
            for bn, st, ov, pp in ((64, 4, True, True), (128, 3, True, True), (128, 3, True, False),
                                   (128, 2, False, True), (64, 3, False, True), (64, 2, False, True)):
                variants.append((f"wgmma producer warpgroup, {bn}-position tiles, {st} stages"
                                 + (", FlashAttention-3 loop" if ov else "") + ("" if pp else ", no ping-pong"),
                                 wg.replace(prefill_wgmma_producer=True, prefill_wgmma_bn=bn,
                                            prefill_wgmma_stages=st, prefill_wgmma_overlap=ov,
                                            prefill_wgmma_pingpong=pp)))
    return variants


def layout_variants(batch: int, ctx: int) -> list[tuple[str, KernelConfig, int | None]]:
    """The --layouts sweep: the planner's choice, then one kv head per CTA (4 warps) and 4 kv
    heads per CTA (one warp each) forced."""
    def layout(hpc: int, wph: int) -> KernelConfig:
        return KernelConfig(decode_heads_per_cta=hpc, decode_warps_per_head=wph)

    return [("", KernelConfig(), None), ("1 head x 4 warps/CTA", layout(1, 4), None),
            ("4 heads x 1 warp/CTA", layout(4, 1), None)]


def sweep_variants(batch: int, ctx: int) -> list[tuple[str, KernelConfig, int | None]]:
    """The --sweep variants of a decode case after the production config: the L2 prefetch
    hint off and at 256 bytes, the L2 evict-first policy off, 2 and 4 stages, other split counts."""
    c = KernelConfig()
    variants = [("", c, None), ("L2 evict-first off", c.replace(decode_l2_evict_first=False), None)]
    if batch >= 64 and ctx >= 1024:
        variants += [(f"L2 prefetch {pf or 'off'}", c.replace(decode_l2_prefetch=pf), None) for pf in (0, 256)]
    if ctx >= 4096:
        variants += [(f"{st} stages", c.replace(decode_stages=st), None) for st in (2, 4)]
        extra = {4096: (3,), 16384: (8, 10), 131072: (66, 132)}.get(ctx, ())
        variants += [(f"{n} splits", c, n) for n in extra]
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--sweep", action="store_true",
                    help="also time other L2 prefetch hints, stage and split counts, "
                         "one m-tile per warp in the multi-token kernel and the wgmma kernel's tilings")
    ap.add_argument("--cases", default="",
                    help="decode cases to run, e.g. 64x4096,1x131072 (default: all); "
                         "'none' runs only the multi-token case")
    ap.add_argument("--no-prefill", action="store_true", help="skip the multi-token case")
    ap.add_argument("--production-prefill", action="store_true",
                    help="the multi-token case in the production config alone (a group past 16 heads also "
                         "a whole group a tile), not the kernels' other variants")
    ap.add_argument("--fp8", choices=["e4m3", "e5m2", "off"], default="e4m3",
                    help="FP8 storage of each decode case against bf16, in the same run (default e4m3)")
    ap.add_argument("--sinks", action="store_true", help="each decode case also with attention sinks")
    ap.add_argument("--layouts", action="store_true",
                    help="decode CTA layouts (kv heads per CTA, warps per head) against the "
                         "planner's choice, instead of --sweep's variants")
    ap.add_argument("--head-dim", type=int, default=128, help="head dim of every case (default 128)")
    ap.add_argument("--heads", default=f"{ac.HQ}/{ac.HKV}",
                    help="query / kv heads of every case, e.g. 28/4 (a GQA group of 7), 71/1 (default 32/8)")
    args = ap.parse_args()
    ac.HQ, ac.HKV = map(int, args.heads.split("/"))
    d = args.head_dim
    cases = DECODE_CASES
    if args.cases:
        cases = [] if args.cases == "none" else [tuple(map(int, c.split("x"))) for c in args.cases.split(",")]
    name, peak = card()
    stream = torch.cuda.Stream()
    rows = []
    with torch.cuda.stream(stream), cupy.cuda.ExternalStream(stream.cuda_stream):
        for batch, ctx in cases:
            if args.layouts:
                variants = layout_variants(batch, ctx)
            elif args.sweep:
                variants = sweep_variants(batch, ctx)
            else:
                variants = [("", KernelConfig(), None)]
            rows += bench_decode(batch, ctx, peak, variants, args.sinks, d)
            if args.fp8 != "off":
                rows.append(bench_fp8(batch, ctx, args.fp8, peak, d))
            torch.cuda.empty_cache()
            cupy.get_default_memory_pool().free_all_blocks()
        pf = prefill_variants(args.sweep, args.head_dim, not args.production_prefill)
        if not args.no_prefill:
            rows += bench_prefill(variants=pf, head_dim=d)
    date = datetime.date.today().isoformat()
    if args.json:
        print(json.dumps(dict(card=name, date=date, rows=rows), indent=1))
        return
    print(f"{name}, {date}; bf16, {ac.HQ} q / {ac.HKV} kv heads, head dim {d}, block size {BS}")
    print("| case | splits | kvpager ms | TB/s | % of datasheet | SDPA ms | SDPA TB/s | SDPA time / kvpager time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "tbs" in r and "speedup" not in r:
            pct = f"{r['pct_peak']:.0f}%" if r["pct_peak"] is not None else "-"
            print(f"| {r['case']} | {r['splits']} | {r['ms']:.3f} | {r['tbs']:.2f} | {pct} | "
                  f"{r['sdpa_ms']:.3f} | {r['sdpa_tbs']:.2f} | {r['ratio']:.2f}x |")
    if any("speedup" in r for r in rows):
        print()
        print("FP8 K/V (bytes: one per value), the bf16 pool timed alternately in the same run")
        print("| case | splits | FP8 ms | TB/s | % of datasheet | bf16 ms | vs bf16 | bytes / bf16 "
              "| rel. err vs dequantised | rel. err vs bf16 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "speedup" in r:
                pct = f"{r['pct_peak']:.0f}%" if r["pct_peak"] is not None else "-"
                print(f"| {r['case']} | {r['splits']} | {r['ms']:.3f} | {r['tbs']:.2f} | {pct} | "
                      f"{r['bf16_ms']:.3f} | {r['speedup']:.2f}x | {r['memory_ratio']:.2f} | "
                      f"{r['rel_err']:.1e} | {r['rel_err_vs_bf16']:.1e} |")
    if any("sinks_ms" in r for r in rows):
        print()
        print("With attention sinks (the same plan; the sinks apply in the split merge, which then always runs)")
        print("| case | without sinks ms | with sinks ms | with / without | rel. err vs float32 torch |")
        print("|---|---|---|---|---|")
        for r in rows:
            if "sinks_ms" in r:
                print(f"| {r['case']} | {r['plain_ms']:.4f} | {r['sinks_ms']:.4f} | {r['sinks_cost']:.3f}x | "
                      f"{r['rel_err']:.1e} |")
    multi = [r for r in rows if "tflops" in r]
    if not multi:  # (--no-prefill)
        return
    print()
    print("| case | kvpager ms | TFLOP/s | SDPA ms | SDPA TFLOP/s | SDPA time / kvpager time |")
    print("|---|---|---|---|---|---|")
    for r in multi:
        print(f"| {r['case']} | {r['ms']:.3f} | {r['tflops']:.0f} | {r['sdpa_ms']:.3f} | "
              f"{r['sdpa_tflops']:.0f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
