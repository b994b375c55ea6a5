"""Copy-on-write block copy: one kvpager launch for 1,000 random block pairs
against one device-to-device cudaMemcpy of the same bytes.

    PYTHONPATH=. python tools/bench_copy.py [--json]

Checks every destination against its source (bitwise) first, then times both
with CUDA events (median of 20 after warm-up, the calls queued behind a GPU
spin so that host-side launch overhead stays out). Bytes moved = read + write:
2 * pairs * bytes_per_block. --sweep adds other vectors in flight per thread
(`KernelConfig.copy_unroll`) on the same data. "kernel" times the launch with the pairs already
on the GPU; "call" is wall-clock time of the checked copy that CupyBackend.copy_blocks
runs (validation, upload and launch, then a synchronize).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import _needs_cupy  # noqa: F401 (first: names what a machine without CuPy lacks)
import cupy
import numpy as np
from cupy.cuda import runtime

from kvpager import KernelConfig
from kvpager.backends.cupy_backend import CupyBackend
from kvpager.block_moves import copy_blocks, launch_copy
from kvpager.spec import PoolSpec

PAIRS = 1000
GEOMETRIES = {
    "llama-3-8b block (32 layers, 8 kv heads, 16 x 128, bf16)": dict(layers=32),
    "one-layer block (8 kv heads, 16 x 128, bf16)": dict(layers=1),
}


_SPIN = cupy.RawKernel(r"""
extern "C" __global__ void spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {}
}""", "spin")


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median per-call GPU time; the calls are queued behind a ~10 ms GPU spin,
    so host-side launch overhead stays out of the figures."""
    for _ in range(warmup):
        fn()
    cupy.cuda.get_current_stream().synchronize()
    ev = [cupy.cuda.Event() for _ in range(iters + 1)]
    _SPIN((1,), (1,), (np.int64(20_000_000),))
    ev[0].record()
    for i in range(iters):
        fn()
        ev[i + 1].record()
    ev[-1].synchronize()
    return float(np.median([cupy.cuda.get_elapsed_time(ev[i], ev[i + 1]) for i in range(iters)]))


def bench(label: str, layers: int, variants: list[KernelConfig]) -> list[dict]:
    """Time each config's copy launch on one pool; one memcpy baseline."""
    spec = PoolSpec(num_layers=layers, num_kv_heads=8, head_dim=128, num_blocks=2 * PAIRS + 1,
                    block_size=16, dtype="bfloat16")
    be = CupyBackend(spec, 0)
    bits = be.kv.view(cupy.uint16)
    words = be.kv.view(cupy.float32)
    words[...] = cupy.random.standard_normal(words.shape, dtype=cupy.float32)
    ids = np.random.default_rng(0).permutation(np.arange(1, spec.num_blocks))
    pairs = np.stack([ids[:PAIRS], ids[PAIRS : 2 * PAIRS]], axis=1).astype(np.int64)
    d_pairs = cupy.asarray(pairs)
    nbytes = PAIRS * spec.bytes_per_block
    src = cupy.empty(nbytes, dtype=cupy.uint8)
    dst = cupy.empty(nbytes, dtype=cupy.uint8)
    src[...] = 7
    stream = cupy.cuda.get_current_stream().ptr
    sp, dp = src.data.ptr, dst.data.ptr
    base = median_ms(lambda: runtime.memcpyAsync(dp, sp, nbytes, runtime.memcpyDeviceToDevice, stream))
    rows = []
    for config in variants:
        bits[pairs[:, 1]] = 0
        copy_blocks(be.kv, spec, pairs, 0, config)  # CupyBackend.copy_blocks with this config
        assert bool((bits[pairs[:, 1]] == bits[pairs[:, 0]]).all()), "copy is wrong"
        ours = median_ms(lambda config=config: launch_copy(be.kv, d_pairs, spec.bytes_per_block, 0, config))

        def call(config=config):
            copy_blocks(be.kv, spec, pairs, 0, config)
            be.synchronize()

        t0 = time.perf_counter()
        for _ in range(10):
            call()
        call_ms = (time.perf_counter() - t0) / 10 * 1e3
        rows.append(dict(case=label, block_bytes=spec.bytes_per_block, pairs=PAIRS, unroll=config.copy_unroll,
                         ms=ours, call_ms=call_ms, tbs=2 * nbytes / ours / 1e9,
                         memcpy_ms=base, memcpy_tbs=2 * nbytes / base / 1e9, ratio=base / ours))
    be.close()
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="also time 4, 8 and 32 vectors in flight per thread")
    args = ap.parse_args()
    name = runtime.getDeviceProperties(0)["name"].decode()
    date = datetime.date.today().isoformat()
    default = KernelConfig()
    variants = [default]
    if args.sweep:
        variants += [default.replace(copy_unroll=u) for u in (4, 8, 32) if u != default.copy_unroll]
    rows = []
    for label, g in GEOMETRIES.items():
        rows += bench(label, **g, variants=variants)
    if args.json:
        print(json.dumps(dict(card=name, date=date, rows=rows), indent=1))
        return
    print(f"{name}, {date}; {PAIRS} random (src, dst) block pairs; TB/s counts read + write")
    print("| block | vectors in flight | block KiB | kernel ms | TB/s | call ms | D2D memcpy ms | memcpy TB/s | memcpy time / kernel time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['unroll']} | {r['block_bytes'] // 1024} | {r['ms']:.3f} | {r['tbs']:.2f} | "
              f"{r['call_ms']:.3f} | {r['memcpy_ms']:.3f} | {r['memcpy_tbs']:.2f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
