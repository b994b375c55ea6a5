"""Repeated generation calls: captured steps kept across calls (`kvpager.hf.CapturedSteps`)
against steps captured every call, eager steps and transformers' `generate`, in one process.

What a serving loop that calls `generate` once a batch sees: ``--calls`` calls
in a row, each ``--batch`` new prompts of ``--prompt`` tokens (no prefix shared
between calls) and ``--new`` new tokens, timed whole (prefill, captures, decode,
frees), median of ``--rounds`` rounds of all calls after an untimed call of
each path. Paths:

- ``hf generate``: transformers' own `generate` over its dynamic cache (greedy),
  the prompts one left-padded batch (all of one length here: no padding);
- ``kvpager eager``: `generate` without graphs;
- ``graphs a call``: ``cuda_graphs=True``, every call capturing its buckets;
- ``kept graphs``: ``cuda_graphs=steps``, one `CapturedSteps` for all calls
  (its first capture in the untimed call);
- with ``--compiled``: the two graph paths compiled by ``torch.compile``.

The table: ms a call, new tokens/s, ratio against transformers and against
graphs a call, and the captures the timed calls made. Random-weight models of
`bench_e2e.py` (bf16); needs a GPU.

    python tools/bench_kept_graphs.py [--shape 1b] [--batch 16] [--prompt 256] [--new 32] [--calls 8]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_paths  # noqa: E402
from e2e_models import make_model  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import CapturedSteps, generate, spec_for_model  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", help="a bench_e2e.py shape")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compiled", action="store_true", help="also the graph paths compiled by torch.compile")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kept_graphs needs a GPU (captured steps)")
    e2e_paths.DEVICE = "cuda"
    model = make_model(args.shape)
    g = np.random.default_rng(0)
    batches = [[g.integers(3, 32000, args.prompt).tolist() for _ in range(args.batch)]
               for _ in range(args.calls * (args.rounds + 1))]
    blocks = -(-(args.prompt + args.new) // 16) + 1
    pool = KVPool(spec_for_model(model, num_blocks=args.batch * blocks + 16, block_size=16),
                  device=e2e_paths.pool_device())
    kept = {False: CapturedSteps(model, pool)}
    if args.compiled:
        kept[True] = CapturedSteps(model, pool, compile=True)

    def hf(prompts: list[list[int]]) -> None:
        ids = torch.tensor(prompts, device="cuda")
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    def ours(graphs: object, compile: bool = False) -> Callable[[list[list[int]]], None]:
        def run(prompts: list[list[int]]) -> None:
            generate(model, pool, prompts, max_new_tokens=args.new, eos_token_id=None, cuda_graphs=graphs,
                     compile=compile)
        return run

    paths: list[tuple[str, Callable[[list[list[int]]], None], Callable[[], int]]] = [
        ("hf generate", hf, lambda: 0),
        ("kvpager eager", ours(False), lambda: 0),
    ]
    counted = {"n": 0}

    def per_call(compile: bool) -> Callable[[list[list[int]]], None]:
        def run(prompts: list[list[int]]) -> None:
            from kvpager.hf import PagedGeneration

            with PagedGeneration(model, pool, prompts, args.new, None, None, True, compile=compile) as gen:
                while not gen.done:
                    gen.step()
                counted["n"] += gen._graphs.captures
        return run

    for compile in sorted(kept):
        tag = " compiled" if compile else ""
        paths.append((f"graphs a call{tag}", per_call(compile), lambda: counted["n"]))
        steps = kept[compile]
        paths.append((f"kept graphs{tag}", ours(steps, compile), lambda steps=steps: steps.captures))
    results = {name: [] for name, _, _ in paths}
    captures = {name: 0 for name, _, _ in paths}
    for _, run, _ in paths:  # untimed: compiles, first captures, caches
        run(batches[0])
    for r in range(args.rounds):
        calls = batches[(r + 1) * args.calls:(r + 2) * args.calls]
        for name, run, count in paths:
            before = count()
            results[name].append(timed(lambda run=run, calls=calls: [run(p) for p in calls]) / args.calls)
            captures[name] += count() - before
    for steps in kept.values():
        steps.close()
    pool.check_integrity()
    ms = {name: float(np.median(v)) * 1e3 for name, v in results.items()}
    base = ms["hf generate"]
    print(f"\n{e2e_paths.card('cuda')}, {datetime.date.today()}, shape {args.shape}, {args.calls} calls x "
          f"{args.batch} prompts of {args.prompt} tokens, {args.new} new tokens, {args.rounds} rounds "
          f"(median ms a call)")
    print(f"{'path':<24} {'ms/call':>9} {'new tok/s':>10} {'vs hf':>7} {'vs graphs a call':>17} {'captures':>9}")
    for name, value in ms.items():
        rate = args.batch * args.new / (value / 1e3)
        per = ms["graphs a call compiled" if name.endswith("compiled") else "graphs a call"]
        print(f"{name:<24} {value:9.2f} {rate:10.0f} {base / value:6.2f}x {per / value:16.2f}x "
              f"{captures[name]:9d}")


if __name__ == "__main__":
    main()
