"""kvpager, FlashInfer and SDPA side by side on the same K/V, in one process.

    PYTHONPATH=. python tools/bench_peers.py [--sweep] [--json] [--no-flashinfer]

bf16, 32 q / 8 kv heads, head dim 128, block size 16, block tables shuffled.
One kvpager pool slab holds the K/V: kvpager attends over it through its step
plans, FlashInfer reads the same layer (``pool[:, 0]``, its HND paged layout)
through a torch view, SDPA a contiguous copy gathered from it. Every result is
checked against SDPA's first (relative error < 1e-2, printed), then timed with
CUDA events after warm-up: the median of 20-50 calls queued behind a GPU sleep.
The decode cases are also timed as a model's captured step runs them: 20 calls
in one CUDA graph, a replay timed (no event record between calls).
Cases: paged decode 64x4k, 16x16k, 1x128k, 256x1k, 64x256; 256 sequences
sharing an 8,192-token prefix + 256 own tokens (kvpager plain and cascade,
FlashInfer plain paged and its MultiLevelCascadeAttentionWrapper); 8 x 1,024
new tokens on 4,096 cached, causal (FlashInfer prefill fa2 and fa3). --sweep
adds the sharing sweep (prefix 1k-32k, 16-512 sequences, 1 or 8 groups).
Ratios are peer time / kvpager time (above 1.0x: kvpager is faster). Without
FlashInfer its columns read "absent" and the rest still runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib.util
import json
import os
import sys

DECODE = [(64, 4096), (16, 16384), (1, 131072), (256, 1024), (64, 256)]  # attention_common.DECODE_CASES
SHARED = (256, 8192, 256, 1)  # sequences, shared prefix, own tokens, groups
PREFILL = (8, 1024, 4096)  # sequences, new tokens, cached tokens


def unavailable() -> str | None:
    """Why this benchmark cannot run here (what it needs), or None."""
    absent = [m for m in ("cupy", "torch") if importlib.util.find_spec(m) is None]
    if absent:
        return ("needs " + " and ".join(absent) + " (pip install 'kvpager[cuda]' 'kvpager[torch]'; "
                "FlashInfer is optional)")
    from kvpager.backends import cuda_available

    if not cuda_available():
        return "needs a CUDA GPU: CuPy sees none here"
    import torch

    if not torch.cuda.is_available():
        return f"needs a CUDA build of torch that sees the GPU (torch {torch.__version__} does not)"
    return None


def run_cases(args: argparse.Namespace, fi, absent: str) -> dict:
    import cupy
    import peers_cases as pc
    import torch
    from bench_cascade import SWEEP

    def tidy():
        gc.collect()
        torch.cuda.empty_cache()
        cupy.get_default_memory_pool().free_all_blocks()

    def one(kind: str, case: str, fn, *shape, **extra) -> dict:
        try:
            row = fn(*shape, fi, absent)
        except Exception as e:  # out of memory is a skipped cell, anything else a failed one
            oom = "OutOfMemory" in type(e).__name__ or "out of memory" in str(e)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            row = {"case": case, **extra, ("skipped" if oom else "error"): f"{type(e).__name__}: {first}"}
        tidy()
        # each case's times as it ends, so a run cut short (a long JIT build) still reports them
        times = ", ".join(f"{who} {res['ms']:.4f} ms" if "ms" in res else f"{who} -"
                          for who, res in row.get("results", {}).items())
        print(f"bench_peers: {kind} {case} done" + (f": {times}" if times else ""), file=sys.stderr, flush=True)
        return row

    stream = torch.cuda.Stream()
    out: dict = {"decode": [], "shared": [], "prefill": []}
    with torch.cuda.stream(stream), cupy.cuda.ExternalStream(stream.cuda_stream):
        for b, c in DECODE:
            out["decode"].append(one("decode", f"{b} x {c}", pc.decode, b, c))
        for b, p, o, g in [SHARED] + ([(b, p, 256, g) for b, p, g in SWEEP] if args.sweep else []):
            out["shared"].append(one("shared", f"{b} x ({p} + {o})", pc.shared, b, p, o, g, groups=g))
        out["prefill"].append(one("prefill", "{} x {} on {}".format(*PREFILL), pc.prefill, *PREFILL))
    return out


def versions(fi_version: str) -> dict:
    import cupy
    import torch

    import kvpager

    return {"kvpager": kvpager.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cupy": cupy.__version__, "flashinfer": fi_version}


def failures(rows: dict) -> list[str]:
    """One line per failed check or case."""
    lines = []
    for kind in ("decode", "shared", "prefill"):
        for r in rows[kind]:
            if "error" in r:
                lines.append(f"{kind} {r['case']}: {r['error']}")
            for who, res in r.get("results", {}).items():
                if "error" in res:
                    lines.append(f"{kind} {r['case']}, {who}: {res['error']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true",
                    help="also the sharing sweep: prefix 1k-32k tokens, 16-512 sequences, 1 or 8 groups")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    ap.add_argument("--no-flashinfer", action="store_true",
                    help="leave FlashInfer out even where it is installed (its columns read 'absent')")
    args = ap.parse_args(argv)
    why = unavailable()
    if why:
        print(f"bench_peers: cannot run here: {why}", file=sys.stderr)
        return 2
    import peers_flashinfer as pf
    import peers_render
    from attention_common import BS, HKV, HQ, D, card
    from peers_cases import CONFIG, TOL

    # Keep stdout for the tables / JSON alone: whatever a JIT build prints goes to stderr.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        fi, fi_version = pf.load(args.no_flashinfer)
        rows = run_cases(args, fi, fi_version)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    name, peak = card()
    report = dict(card=name, date=datetime.date.today().isoformat(), versions=versions(fi_version),
                  datasheet_tbs=peak, geometry=dict(dtype="bfloat16", q_heads=HQ, kv_heads=HKV, head_dim=D,
                                                    block_size=BS, tolerance=TOL),
                  kernel_config=dataclasses.asdict(CONFIG), **rows)
    report["failed"] = failures(rows)
    print(json.dumps(report, indent=1) if args.json else peers_render.markdown(report))
    if report["failed"]:
        print(f"bench_peers: {len(report['failed'])} check(s) failed: " + "; ".join(report["failed"]),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
