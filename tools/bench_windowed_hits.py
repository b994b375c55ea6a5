"""Conversations of a model whose every layer has a sliding window, in a full
pool: the prompt tokens each next turn must compute, with windowed prefix
hits (`KVPool.allocate(..., window=w)`) and with prefix hits only, on the
same workload in the same run.

    PYTHONPATH=. python tools/bench_windowed_hits.py [--conversations 32] [--turns 6]
        [--window 4096] [--blocks 10240] [--json]

Each turn is what a serving loop does for one conversation: allocate its
whole history plus a new user message, compute (commit) what the cache did
not give, decode the answer a token at a time (appended with its id,
committed a block at a time, the blocks behind the window released, as
`kvpager.hf` does), then free it. Conversations take turns round-robin, so
between two turns of one conversation every other one runs a turn: with
more history than the pool holds, the oldest cached blocks are evicted,
and a windowed sequence's first blocks are the oldest (released first).
Every allocator decision is the real one; no K/V bytes matter (a 1-layer,
1-head, head-dim-8 pool). Reported: prompt tokens computed per turn after
the first, the share of the prompt found cached, and the allocator's time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    from kvpager import KVPool, PoolSpec
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kvpager import KVPool, PoolSpec

from kvpager.render import table


def run(args: argparse.Namespace, window: int | None) -> dict[str, float]:
    """One pass of the workload; ``window`` None: prefix hits only."""
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=args.blocks, block_size=args.block_size,
                    dtype="float32")
    pool, bs, rng = KVPool(spec), args.block_size, np.random.default_rng(args.seed)
    history = [rng.integers(3, 32000, args.system).tolist() for _ in range(args.conversations)]
    computed = prompted = 0
    started = time.perf_counter()
    for turn in range(args.turns):
        for c in range(args.conversations):
            prompt = history[c] + rng.integers(3, 32000, args.user).tolist()
            [a] = pool.allocate([prompt], window=window)
            if turn:
                computed += len(prompt) - a.num_cached_tokens
                prompted += len(prompt)
            pool.commit(a.seq_id)
            answer = rng.integers(3, 32000, args.answer).tolist()
            n = len(prompt)
            for i, t in enumerate(answer):
                pool.append([a.seq_id], 1, token_ids=[[t]])
                n += 1
                if n % bs == 0 or i == len(answer) - 1:
                    pool.commit(a.seq_id)
                    if args.window:
                        pool.release_before([a.seq_id], [max(0, n - args.window + 1)])
            pool.free([a.seq_id])
            history[c] = prompt + answer
    seconds = time.perf_counter() - started
    pool.check_integrity()
    turns = args.conversations * (args.turns - 1)
    return {"computed_per_turn": computed / turns, "cached_share": 1 - computed / prompted,
            "prompt_per_turn": prompted / turns, "allocator_s": seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system", type=int, default=2048, help="tokens of each conversation's first prompt")
    p.add_argument("--user", type=int, default=256, help="tokens of each later user message")
    p.add_argument("--answer", type=int, default=512, help="tokens of each answer")
    p.add_argument("--window", type=int, default=4096, help="every layer's sliding window (Mistral-7B-v0.1's)")
    p.add_argument("--blocks", type=int, default=10240, help="pool size in blocks")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    for name in ("conversations", "turns", "system", "user", "answer", "window", "blocks", "block_size"):
        if getattr(args, name) < (2 if name == "turns" else 1):  # (a next turn is what it measures)
            p.error(f"--{name.replace('_', '-')} must be at least {2 if name == 'turns' else 1}")
    prefix, windowed = run(args, None), run(args, args.window)
    if args.json:
        print(json.dumps({"args": vars(args), "prefix_only": prefix, "windowed": windowed}))
        return
    print(f"{args.conversations} conversations x {args.turns} turns, window {args.window}, "
          f"{args.blocks} blocks of {args.block_size}; {prefix['prompt_per_turn']:.0f} prompt tokens a later turn")
    rows = [(name, f"{r['computed_per_turn']:.0f}", f"{100 * r['cached_share']:.1f}%", f"{r['allocator_s']:.2f}")
            for name, r in (("prefix hits only", prefix), ("windowed hits", windowed))]
    print(table(["allocate", "prompt tokens computed a later turn", "cached", "allocator s"], rows))
    ratio = prefix["computed_per_turn"] / max(windowed["computed_per_turn"], 1e-9)
    print(f"prompt tokens computed: {ratio:.1f}x fewer with windowed hits")


if __name__ == "__main__":
    main()
