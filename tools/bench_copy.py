"""Copy-on-write block copy: one kvpager launch for 1,000 random block pairs
against one device-to-device cudaMemcpy of the same bytes.

    PYTHONPATH=. python tools/bench_copy.py [--json]

Checks every destination against its source (bitwise) first, then times both
with CUDA events (median of 20 after warm-up). Bytes moved = read + write:
2 * pairs * bytes_per_block. "kernel" times the launch with the pairs already
on the GPU; "call" is wall-clock time of CupyBackend.copy_blocks (validation,
upload and launch, then a synchronize).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import cupy
import numpy as np
from cupy.cuda import runtime

from kvpager import kernels
from kvpager.backends.cupy_backend import CupyBackend
from kvpager.spec import PoolSpec

PAIRS = 1000
GEOMETRIES = {
    "llama-3-8b block (32 layers, 8 kv heads, 16 x 128, bf16)": dict(layers=32),
    "one-layer block (8 kv heads, 16 x 128, bf16)": dict(layers=1),
}


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def bench(label: str, layers: int) -> dict:
    spec = PoolSpec(num_layers=layers, num_kv_heads=8, head_dim=128, num_blocks=2 * PAIRS + 1,
                    block_size=16, dtype="bfloat16")
    be = CupyBackend(spec, 0)
    bits = be.kv.view(cupy.uint16)
    words = be.kv.view(cupy.float32)
    words[...] = cupy.random.standard_normal(words.shape, dtype=cupy.float32)
    ids = np.random.default_rng(0).permutation(np.arange(1, spec.num_blocks))
    pairs = np.stack([ids[:PAIRS], ids[PAIRS : 2 * PAIRS]], axis=1).astype(np.int64)
    be.copy_blocks(pairs)
    assert bool((bits[pairs[:, 1]] == bits[pairs[:, 0]]).all()), "copy is wrong"
    d_pairs = cupy.asarray(pairs)
    ours = median_ms(lambda: kernels.launch_copy(be.kv, d_pairs, spec.bytes_per_block, 0))

    def call():
        be.copy_blocks(pairs)
        be.synchronize()

    t0 = time.perf_counter()
    for _ in range(10):
        call()
    call_ms = (time.perf_counter() - t0) / 10 * 1e3
    nbytes = PAIRS * spec.bytes_per_block
    src = cupy.empty(nbytes, dtype=cupy.uint8)
    dst = cupy.empty(nbytes, dtype=cupy.uint8)
    src[...] = 7
    stream = cupy.cuda.get_current_stream().ptr
    sp, dp = src.data.ptr, dst.data.ptr
    base = median_ms(lambda: runtime.memcpyAsync(dp, sp, nbytes, runtime.memcpyDeviceToDevice, stream))
    be.close()
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return dict(case=label, block_bytes=spec.bytes_per_block, pairs=PAIRS, ms=ours, call_ms=call_ms,
                tbs=2 * nbytes / ours / 1e9, memcpy_ms=base, memcpy_tbs=2 * nbytes / base / 1e9,
                ratio=base / ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time 4, 8 and 16 vectors in flight per thread")
    args = ap.parse_args()
    name = runtime.getDeviceProperties(0)["name"].decode()
    date = datetime.date.today().isoformat()
    ap_unroll = [kernels.COPY_UNROLL] if not args.sweep else [4, 8, 16]
    rows = []
    for unroll in ap_unroll:
        kernels.COPY_UNROLL = unroll
        rows += [{**bench(label, **g), "unroll": unroll} for label, g in GEOMETRIES.items()]
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
