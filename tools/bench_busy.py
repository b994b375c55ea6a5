"""The multi-token step while another stream's kernel holds part of the GPU.

    PYTHONPATH=. python tools/bench_busy.py [--held 0,66,120] [--hold-us 300] [--json]

A serving engine's attention shares the GPU: another stream's kernels (a
decode batch beside a prefill, communication kernels) hold some SMs when it
starts and free them during its run. paged_prefill_sm90.cu's persistent grid
(one CTA an SM, each walking work items) then starts with some of its CTAs
late. Each round here launches, on a side stream, a kernel of ``held`` CTAs
that each fill an SM's shared memory and spin for ``hold`` microseconds; once
it is running, the step (8 sequences x 1,024 new tokens on 4,096 cached,
causal; bf16, 32 q / 8 kv heads, head dim 128) is timed on the main stream
with CUDA events: the production kernel (persistent grid) and the same kernel
with a CTA a tile, median of ``--rounds`` rounds. Nothing held (0) is the
free GPU, measured the same way.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable

import _needs_cupy  # noqa: F401 (first: names what a machine without CuPy lacks)
import cupy
import numpy as np
import torch
from attention_common import HQ, card, causal_sdpa, rel_err, setup, tview

from kvpager import KernelConfig
from kvpager.plan import make_plan

_HOLD_SRC = r"""
extern "C" __global__ void hold(long long cycles, int* started) {
    extern __shared__ int fill[];  // as much as an SM has: nothing else fits beside it
    if (threadIdx.x == 0) {
        atomicAdd(started, 1);
        const long long t0 = clock64();
        while (clock64() - t0 < cycles) {}
        fill[0] = 0;
    }
}
extern "C" __global__ void wait_started(const volatile int* started, int count) {
    while (*started < count) {}
}
"""
_HOLD_SMEM = 200 * 1024


def holder() -> tuple[Callable[[int, float], None], cupy.cuda.Stream]:
    """``hold(n, us)``: ``n`` CTAs, one an SM, spinning ``us`` microseconds on a side
    stream; returns once the main stream waits for all of them to have started."""
    mod = cupy.RawModule(code=_HOLD_SRC)
    hold, wait = mod.get_function("hold"), mod.get_function("wait_started")
    hold.max_dynamic_shared_size_bytes = _HOLD_SMEM
    khz = cupy.cuda.runtime.getDeviceProperties(0)["clockRate"]
    started = cupy.zeros(1, dtype=cupy.int32)
    side = cupy.cuda.Stream(non_blocking=True)

    def run(n: int, us: float) -> None:
        if not n:
            return
        started.fill(0)
        cupy.cuda.get_current_stream().synchronize()
        hold((n,), (32,), (np.int64(us * khz / 1000), started), shared_mem=_HOLD_SMEM, stream=side)
        wait((1,), (1,), (started, np.int32(n)))  # the main stream goes on once all n are running

    return run, side


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--held", default="0,33,66,120", help="SMs held by the other kernel, comma-separated")
    ap.add_argument("--hold-us", type=float, default=300.0, help="how long it holds them")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    batch, new, cached = 8, 1024, 4096
    ctx = cached + new
    spec, be, tables, q_cp, kv = setup(batch, ctx, new)
    scale = spec.head_dim ** -0.5
    q4 = tview(q_cp).view(batch, new, HQ, spec.head_dim).transpose(1, 2)
    ref = causal_sdpa(q4, kv, scale)().transpose(1, 2).reshape(batch * new, HQ, spec.head_dim)
    flops = 4 * spec.head_dim * HQ * batch * (new * cached + new * (new + 1) // 2)
    variants = [("persistent grid (production)", KernelConfig()),
                ("a CTA a tile", KernelConfig(prefill_wgmma_persistent=False))]
    plans = []
    for label, config in variants:
        plan = make_plan(be, tables, np.full(batch, ctx, np.int32), np.full(batch, new, np.int32),
                         num_q_heads=HQ, config=config)
        out = cupy.empty_like(q_cp)
        plan.attend(0, q_cp, scale, out)
        err = rel_err(tview(out), ref)
        assert err < 1e-2, f"{label}: relative error {err}"
        plans.append((label, plan, out))
    hold, _ = holder()
    rows = []
    for n in [int(x) for x in args.held.split(",")]:
        times = {label: [] for label, _, _ in plans}
        for _ in range(args.rounds):
            for label, plan, out in plans:  # in turns, so both see the GPU alike
                hold(n, args.hold_us)
                e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
                e0.record()
                plan.attend(0, q_cp, scale, out)
                e1.record()
                e1.synchronize()
                times[label].append(cupy.cuda.get_elapsed_time(e0, e1))
            cupy.cuda.Device().synchronize()
        row = {"held_sms": n, "hold_us": args.hold_us if n else 0}
        for label, ts in times.items():
            ms = float(np.median(ts))
            row[label] = {"ms": ms, "tflops": flops / ms / 1e9}
        rows.append(row)
    name, _ = card()
    result = {"card": name, "date": str(datetime.date.today()), "rows": rows,
              "case": f"{batch} x {new} new tokens on {cached} cached, causal"}
    if args.json:
        print(json.dumps(result, indent=2))
        be.close()
        return
    print(f"{name}, {result['date']}: {result['case']}; median of {args.rounds} rounds")
    labels = [label for label, _, _ in plans]
    print("| SMs held | held for (us) | " + " | ".join(f"{x} ms (TFLOP/s)" for x in labels) + " | ratio |")
    print("|---:|---:|" + "---:|" * (len(labels) + 1))
    for r in rows:
        cells = " | ".join(f"{r[x]['ms']:.3f} ({r[x]['tflops']:.0f})" for x in labels)
        print(f"| {r['held_sms']} | {r['hold_us']:.0f} | {cells} | {r[labels[1]]['ms'] / r[labels[0]]['ms']:.2f}x |")
    be.close()


if __name__ == "__main__":
    torch.cuda.init()
    main()
