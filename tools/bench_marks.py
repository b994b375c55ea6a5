"""What marking a batch's recurrent states costs (`kvpager.hf.recurrent_states.States.mark`),
against the copy it replaced: every row's view in one multi-tensor copy over states of mixed
dtypes, which torch runs tensor by tensor.

The states are Qwen3.5's layout at about 2B parameters (the `q35` shape of `bench_e2e.py`): 18
Gated DeltaNet layers, each a float32 recurrent state of 32 x 128 x 128 and a bf16 convolution
state of 8,192 x 4 a row. Rows marked at once: all of a batch whose sequences have one length
(they fill blocks at the same step), and a few scattered ones (sequences of mixed lengths).

    python tools/bench_marks.py [--batch 64]

Prints host ms a call (the call's return) and device ms (to a synchronize after it), medians.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpager.hf.recurrent_states import States  # noqa: E402


def states(batch: int, layers: int, device: str) -> States:
    s = object.__new__(States)
    s.tensors = []
    for _ in range(layers):
        s.tensors.append(torch.randn(batch, 32, 128, 128, device=device))
        s.tensors.append(torch.randn(batch, 8192, 4, device=device).to(torch.bfloat16))
    s.marks, s.marked, s._pairs, s.mark_rows = None, [0] * batch, None, batch
    return s


def mixed_copy(s: States, rows: list[int], views: list) -> None:
    """The copy before: each row's view, one multi-tensor copy over both dtypes."""
    src, dst = views
    torch._foreach_copy_([d[r] for d in dst for r in rows], [x[r] for x in src for r in rows])


def timed(fn, reps: int, sync) -> tuple[float, float]:
    host, dev = [], []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync()
        host.append(t1 - t0)
        dev.append(time.perf_counter() - t0)
    return float(np.median(host)) * 1e3, float(np.median(dev)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    s = states(args.batch, args.layers, device)
    s.mark([0], [16])  # the second copy made
    views = ([t.unbind(0) for t in s.tensors], [m.unbind(0) for m in s.marks])
    mib = sum(t[0].numel() * t.element_size() for t in s.tensors) / 2**20
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{name}, {args.layers} layers, {mib:.1f} MiB of states a row, torch {torch.__version__}")
    print(f"{'rows marked':<22} {'path':<28} {'host ms':>8} {'device ms':>10} {'host vs before':>15}")
    step = max(args.batch // 4, 1)
    for label, rows in ((f"all {args.batch}", list(range(args.batch))),
                        ("4 scattered", list(range(1, args.batch, step))[:4])):
        before = timed(lambda rows=rows: mixed_copy(s, rows, views), args.reps, sync)
        after = timed(lambda rows=rows: s.mark(rows, [16] * len(rows)), args.reps, sync)
        for path, (h, d) in (("before: one mixed copy", before), ("States.mark", after)):
            print(f"{label:<22} {path:<28} {h:8.2f} {d:10.2f} {before[0] / h:14.2f}x")
        for t, m in zip(s.tensors, s.marks):  # the marks hold the rows' states
            assert torch.equal(t[rows], m[rows])


if __name__ == "__main__":
    main()
