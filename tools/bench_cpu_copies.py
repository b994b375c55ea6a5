"""The NumPy backend's block copies (swap out, the daemon's CPU pool): blocks
copied one at a time against gathered runs of `COPY_RUN_BYTES` (the code
before) and against one gather of every block, on the same pools, in one run.

    PYTHONPATH=. python tools/bench_cpu_copies.py [--mib 1024] [--json]

Each way copies the same scattered blocks, about ``--mib`` MiB, from a touched
device pool into a touched host pool (first-touch page faults are not timed);
the result is checked against the baseline's first. GB/s = bytes moved / time
(median of 5).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import numpy as np

import kvpager.backends.numpy_backend as nb

#: block geometries: (name, layers, kv heads, head dim, block size), bf16-sized (2-byte) values
GEOMETRIES = [
    ("llama-3-8b (32 layers, 8 kv heads, 16 x 128)", 32, 8, 128, 16),
    ("one layer, 8 kv heads, 16 x 128", 1, 8, 128, 16),
    ("one layer, 2 kv heads, 16 x 64", 1, 2, 64, 16),
    ("one layer, 1 kv head, 16 x 64", 1, 1, 64, 16),
]


def median_s(fn, iters: int = 5) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run(mib: int) -> list[dict]:
    rows = []
    for name, layers, heads, dim, bs in GEOMETRIES:
        block = layers * 2 * heads * bs * dim * 2
        n = max(8, (mib << 20) // block)
        src = np.ones((n, block // 2), np.uint16)
        dst = np.zeros((n, block // 2), np.uint16)
        src[:] = np.arange(block // 2, dtype=np.uint16)
        dst += 1
        rng = np.random.default_rng(0)
        pairs = np.stack([rng.permutation(n), rng.permutation(n)], axis=1).astype(np.int64)
        want = src[pairs[:, 0]]

        def gather_all(dst=dst, src=src, pairs=pairs):
            dst[pairs[:, 1]] = src[pairs[:, 0]]

        def with_threshold(threshold: int, dst=dst, src=src, pairs=pairs):
            def go():
                saved = nb.BLOCK_AT_A_TIME_BYTES
                nb.BLOCK_AT_A_TIME_BYTES = threshold
                try:
                    nb.copy_rows(dst, src, pairs)
                finally:
                    nb.BLOCK_AT_A_TIME_BYTES = saved
            return go

        ways = {"one gather": gather_all, "runs": with_threshold(1 << 62), "block at a time": with_threshold(0)}
        got = {}
        for way, fn in ways.items():
            dst[:] = 0
            fn()
            assert np.array_equal(dst[pairs[:, 1]], want), way
            got[way] = median_s(fn)
        nbytes = n * block
        chosen = "block at a time" if block >= nb.BLOCK_AT_A_TIME_BYTES else "runs"
        rows.append(dict(geometry=name, block_bytes=block, blocks=n, chosen=chosen,
                         **{f"{w} GB/s": nbytes / s / 1e9 for w, s in got.items()},
                         vs_runs=got["runs"] / got[chosen], vs_gather=got["one gather"] / got[chosen]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024, help="MiB copied per geometry")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run(args.mib)
    if args.json:
        print(json.dumps(dict(date=datetime.date.today().isoformat(), rows=rows), indent=1))
        return
    print("| geometry | block | blocks | one gather GB/s | runs GB/s | block at a time GB/s | copy_rows uses | "
          "vs runs | vs one gather |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['geometry']} | {r['block_bytes'] >> 10} KiB | {r['blocks']} | {r['one gather GB/s']:.2f} | "
              f"{r['runs GB/s']:.2f} | {r['block at a time GB/s']:.2f} | {r['chosen']} | {r['vs_runs']:.2f}x | "
              f"{r['vs_gather']:.2f}x |")


if __name__ == "__main__":
    main()
