"""A captured generation whose batch shrinks: which graph buckets it replays, and what that costs, in one process.

``--batch`` prompts of ``--prompt`` tokens, each with its own ``max_new_tokens``
drawn from ``--new`` (low, high), sorted, so sequences end at staggered steps
and the batch passes through every bucket below its own
(`kvpager.hf.graphs.bucket_for`). One `PagedGeneration` with ``cuda_graphs=True``
per round, its whole time (prefill, captures and every step; nothing cached
from the round before), median of ``--rounds`` after an untimed one, for:

- ``own buckets``: every step replays its own bucket, captured when first
  needed (``DecodeGraphs.reuse = 1``, ``reuse_rows = 0``): a capture a bucket;
- ``default``: a larger bucket already captured replays while it is at most
  `DecodeGraphs.reuse` times the step's own or `reuse_rows` rows;
- ``largest``: the first bucket replays throughout;
- ``no ends``: every prompt runs to the longest ``max_new_tokens`` in the first
  bucket, for scale (all rows live every step).

Random-weight models of `bench_e2e.py` (bf16); needs a GPU.

    python tools/bench_graph_buckets.py [--shape 1b] [--batch 64] [--prompt 512] [--new 8 256]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_paths  # noqa: E402
from e2e_models import make_model  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, spec_for_model  # noqa: E402
from kvpager.hf.graphs import DecodeGraphs  # noqa: E402

POLICIES = {
    "own buckets": (1, 0),
    "default": (DecodeGraphs.reuse, DecodeGraphs.reuse_rows),
    "largest": (1 << 20, 0),
}


def run(model, pool, prompts, most, salt, policy) -> tuple[float, list[int], int]:
    """One generation's seconds, the buckets it captured and its steps."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    with PagedGeneration(model, pool, prompts, most, salt, None, True) as gen:
        gen._graphs.reuse, gen._graphs.reuse_rows = policy
        steps = 0
        while not gen.done:
            gen.step()
            steps += 1
        torch.cuda.synchronize()
        return time.perf_counter() - t, sorted(gen._graphs.graphs), steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1b", help="a bench_e2e.py shape")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, nargs=2, default=(8, 256), metavar=("LOW", "HIGH"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_graph_buckets needs a GPU (captured steps)")
    e2e_paths.DEVICE = "cuda"
    model = make_model(args.shape)
    g = np.random.default_rng(0)
    prompts = [g.integers(3, 32000, args.prompt).tolist() for _ in range(args.batch)]
    most = sorted(g.integers(args.new[0], args.new[1] + 1, args.batch).tolist())
    blocks = -(-(args.prompt + args.new[1]) // 16) + 1
    pool = KVPool(spec_for_model(model, num_blocks=args.batch * blocks, block_size=16),
                  device=e2e_paths.pool_device())
    cases = [(name, most, policy) for name, policy in POLICIES.items()]
    cases.append(("no ends", [max(most)] * args.batch, POLICIES["own buckets"]))
    rows = []
    for name, limits, policy in cases:
        run(model, pool, prompts, limits, f"{name} warm-up", policy)
        runs = [run(model, pool, prompts, limits, f"{name} {r}", policy) for r in range(args.rounds)]
        rows.append((name, float(np.median([r[0] for r in runs])) * 1e3, runs[0][1], runs[0][2]))
    base = rows[0][1]
    print(f"\n{e2e_paths.card('cuda')}, {datetime.date.today()}, shape {args.shape}, {args.batch} prompts of "
          f"{args.prompt} tokens, {args.new[0]}-{args.new[1]} new tokens each, {args.rounds} rounds")
    print(f"{'policy':<12} {'ms':>9} {'vs own buckets':>15} {'steps':>6}  buckets captured")
    for name, ms, buckets, steps in rows:
        print(f"{name:<12} {ms:9.1f} {base / ms:14.2f}x {steps:6d}  {', '.join(map(str, buckets))}")


if __name__ == "__main__":
    main()
