"""Sampling a pass's tokens: kvpager's sampler against transformers' warpers and draw, in one process.

For each batch and setting, random logits [batch, vocab] of the model's dtype
(bf16 on a GPU, float32 on the CPU) and the time of one call, host and device
together (timed after a warm-up, the device drained before and after):

- ``argmax``: greedy, for scale;
- ``transformers``: its warpers in its ``generate``'s order (temperature,
  top-k, top-p, min-p), softmax and ``torch.multinomial``, as its sampling
  step runs them;
- ``kvpager``: `kvpager.hf.sampling.Sampler.choose` for the same settings
  (every row its own seed; rows that all have a top-k on their candidates).

With a repetition penalty each row has seen 1,024 tokens: transformers' processor
gathers and scatters them from its ``input_ids`` [batch, 1,024] first; kvpager
keeps them as a [batch, vocab] mask on the device (a decode pass's draw marks
its token).

    python tools/bench_sampling.py [--batches 64,256] [--vocab 128256] [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_paths  # noqa: E402

from kvpager.hf.sampling import Sampler, Sampling  # noqa: E402

SETTINGS = {
    "temperature 0.7": dict(temperature=0.7),
    "top-k 50, top-p 0.9 (t 0.6)": dict(temperature=0.6, top_k=50, top_p=0.9),
    "top-p 0.9 (t 0.7)": dict(temperature=0.7, top_p=0.9),
    "min-p 0.05 (t 0.7)": dict(temperature=0.7, min_p=0.05),
    "repetition 1.1, top-k 50, top-p 0.9": dict(temperature=0.6, top_k=50, top_p=0.9, repetition_penalty=1.1),
}
#: tokens each row has seen (prompt and output), for the repetition penalty
SEEN = 1024


def timed_ms(fn, device: str, calls: int) -> float:
    """Median ms of ``calls`` calls, each drained before and after (3 untimed first)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    g = torch.Generator(device=args.device).manual_seed(0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        # a peaked distribution, as a language model's: most of the mass on a few hundred tokens
        logits = (torch.randn(batch, args.vocab, generator=g, device=args.device) * 2.5).to(dtype)
        base = timed_ms(functools.partial(torch.argmax, logits, dim=1), args.device, args.calls)
        rows.append((batch, "greedy", "argmax", base, None))
        seen = torch.randint(0, args.vocab, (batch, SEEN), generator=g, device=args.device)
        for name, setting in SETTINGS.items():
            e2e_paths.SAMPLING = dict(setting)  # (a repetition penalty: its processor over `seen` first)
            hf_fn = functools.partial(e2e_paths.hf_next, logits, seen)
            hf = timed_ms(hf_fn, args.device, args.calls)
            sampler = Sampler([Sampling(**setting, seed=i) for i in range(batch)],
                              batch, prompts=seen.tolist())
            ids, draws = list(range(batch)), [0] * batch
            # (record=False: the timed calls leave the rows' seen tokens as they were)
            kv = timed_ms(functools.partial(sampler.choose, logits, ids, draws, record=False), args.device,
                          args.calls)
            rows.append((batch, name, "transformers", hf, 1.0))
            rows.append((batch, name, "kvpager", kv, hf / kv))
    card = e2e_paths.card(args.device)
    print(f"{card}, {datetime.date.today()}, torch {torch.__version__}, vocab {args.vocab}, {dtype}")
    print(f"{'batch':>5} {'setting':<38} {'path':<13} {'ms':>8} {'vs transformers':>16}")
    for batch, name, path, ms, ratio in rows:
        r = f"{ratio:.2f}x" if ratio is not None else "-"
        print(f"{batch:>5} {name:<38} {path:<13} {ms:8.3f} {r:>16}")


if __name__ == "__main__":
    main()
