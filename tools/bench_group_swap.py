"""Swapping out and in a group (a parent and its forks sharing a prefix) through
the allocator, against a lone sequence holding the same distinct blocks (the
baseline, in the same run): the host cost of a group's bookkeeping, and the
device blocks each gives back.

    PYTHONPATH=. python tools/bench_group_swap.py [--json]

The pool is the CPU backend's at a tiny block (1 layer, 1 kv head, head dim 8),
so the copies cost little and the table shows the bookkeeping; each figure is
the median of 5 rounds of swap_out + swap_in.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import numpy as np

from kvpager import KVPool, PoolSpec

BS = 16
#: (forks, prompt blocks, own blocks a fork appends)
CASES = [(4, 64, 4), (64, 256, 2), (256, 512, 1), (1024, 2048, 1)]


def pool_for(blocks: int) -> KVPool:
    return KVPool(PoolSpec(1, 1, 8, num_blocks=blocks + 64, block_size=BS, dtype="float32",
                           num_host_blocks=blocks + 64))


def rounds(pool: KVPool, ids: list[int], n: int = 5) -> tuple[float, float, int]:
    """Median seconds of swap_out and of swap_in, and the device blocks a swap_out gave back."""
    outs, ins, freed = [], [], 0
    for _ in range(n):
        used = pool.stats().used_blocks
        t = time.perf_counter()
        pool.swap_out(ids)
        outs.append(time.perf_counter() - t)
        freed = used - pool.stats().used_blocks
        t = time.perf_counter()
        pool.swap_in(ids)
        ins.append(time.perf_counter() - t)
    pool.check_integrity()
    return float(np.median(outs)), float(np.median(ins)), freed


def run() -> list[dict]:
    rows = []
    for forks, prompt, own in CASES:
        distinct = prompt + forks * (own + 2)
        group = pool_for(distinct)
        [a] = group.allocate([list(range(prompt * BS - 1))])
        group.commit(a.seq_id)
        [kids] = group.fork(a.seq_id, forks)
        group.append(kids, own * BS)
        ids = [a.seq_id, *kids]
        entries = sum(len(group.sequence(s).block_table) for s in ids)
        g_out, g_in, g_freed = rounds(group, ids)
        lone = pool_for(distinct)
        [b] = lone.allocate([list(range(group.stats().used_blocks * BS))])
        l_out, l_in, l_freed = rounds(lone, [b.seq_id])
        rows.append(dict(forks=forks, prompt_blocks=prompt, entries=entries, distinct_blocks=g_freed,
                         group_out_ms=g_out * 1e3, group_in_ms=g_in * 1e3, lone_blocks=l_freed,
                         lone_out_ms=l_out * 1e3, lone_in_ms=l_in * 1e3,
                         ratio=(g_out + g_in) / (l_out + l_in)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run()
    if args.json:
        print(json.dumps(dict(date=datetime.date.today().isoformat(), rows=rows), indent=1))
        return
    print("| forks | prompt blocks | table entries | blocks given back | group out / in ms | lone sequence: "
          "blocks, out / in ms | group / lone |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['forks']} | {r['prompt_blocks']} | {r['entries']:,} | {r['distinct_blocks']:,} | "
              f"{r['group_out_ms']:.2f} / {r['group_in_ms']:.2f} | {r['lone_blocks']:,}, "
              f"{r['lone_out_ms']:.2f} / {r['lone_in_ms']:.2f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
