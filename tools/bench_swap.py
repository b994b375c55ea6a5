"""Swap out and in of 1,000 scattered blocks: one kvpager launch each way
(SMs copying over PCIe through mapped pinned memory) against one pinned
cudaMemcpy of the same bytes, with one cudaMemcpyAsync per block beside it.

    PYTHONPATH=. python tools/bench_swap.py [--json]

Checks the moved blocks bitwise first, then times with CUDA events (median of
10 after warm-up). GB/s = pairs * bytes_per_block / time (each byte crosses
PCIe once).
"""

from __future__ import annotations

import argparse
import datetime
import json

import _needs_cupy  # noqa: F401 (first: names what a machine without CuPy lacks)
import cupy
import numpy as np
from cupy.cuda import runtime

from kvpager.backends.cupy_backend import CupyBackend
from kvpager.block_moves import launch_swap
from kvpager.spec import PoolSpec

PAIRS = 1000
GEOMETRIES = {
    "llama-3-8b block (32 layers, 8 kv heads, 16 x 128, bf16)": dict(layers=32),
    "one-layer block (8 kv heads, 16 x 128, bf16)": dict(layers=1),
}


def median_ms(fn, iters: int = 10, warmup: int = 2) -> float:
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


def time_way(be: CupyBackend, way: str, pairs: np.ndarray, label: str) -> dict:
    """kvpager's launch, one pinned memcpy of the same bytes, and per-block memcpyAsync."""
    bpb = be.spec.bytes_per_block
    nbytes = len(pairs) * bpb
    stream = cupy.cuda.get_current_stream().ptr
    dev, host, host_mapped = be.kv.data.ptr, be._host_ptr, be._host_dev_ptr
    d_pairs = cupy.asarray(pairs)
    if way == "out":
        kind, src, dst, src_base, dst_base = runtime.memcpyDeviceToHost, dev, host_mapped, dev, host
    else:
        kind, src, dst, src_base, dst_base = runtime.memcpyHostToDevice, host_mapped, dev, host, dev
    ours = median_ms(lambda: launch_swap(src, dst, d_pairs, bpb, 0))
    # One pinned copy of the same bytes: host blocks 0.. <-> device blocks 1.. (contiguous).
    one_src = src_base + (bpb if way == "out" else 0)
    one_dst = dst_base + (bpb if way == "in" else 0)
    base = median_ms(lambda: runtime.memcpyAsync(one_dst, one_src, nbytes, kind, stream))

    def per_block():
        for s, d in pairs:
            runtime.memcpyAsync(dst_base + int(d) * bpb, src_base + int(s) * bpb, bpb, kind, stream)

    per = median_ms(per_block, iters=5, warmup=1)
    return dict(case=label, way=way, block_bytes=bpb, pairs=len(pairs), ms=ours,
                gbs=nbytes / ours / 1e6, memcpy_ms=base, memcpy_gbs=nbytes / base / 1e6,
                per_block_ms=per, per_block_gbs=nbytes / per / 1e6, ratio=base / ours)


def bench(label: str, layers: int) -> list[dict]:
    spec = PoolSpec(num_layers=layers, num_kv_heads=8, head_dim=128, num_blocks=2 * PAIRS + 1,
                    block_size=16, dtype="bfloat16", num_host_blocks=PAIRS + 8)
    be = CupyBackend(spec, 0)
    bits = be.kv.view(cupy.uint16)
    words = be.kv.view(cupy.float32)
    words[...] = cupy.random.standard_normal(words.shape, dtype=cupy.float32)
    rng = np.random.default_rng(0)
    dev = rng.permutation(np.arange(1, spec.num_blocks))[:PAIRS]
    host = rng.permutation(spec.num_host_blocks)[:PAIRS]
    out_pairs = np.stack([dev, host], axis=1).astype(np.int64)
    be.swap_out(out_pairs)
    host_bits = be.host_array().view(np.uint16)
    assert np.array_equal(host_bits[host], cupy.asnumpy(bits[dev])), "swap out is wrong"
    back = rng.permutation(np.arange(1, spec.num_blocks))[:PAIRS]
    in_pairs = np.stack([host, back], axis=1).astype(np.int64)
    be.swap_in(in_pairs)
    be.synchronize()
    assert np.array_equal(cupy.asnumpy(bits[back]), host_bits[host]), "swap in is wrong"

    rows = []
    for way in ("out", "in"):
        rows.append(time_way(be, way, out_pairs if way == "out" else in_pairs, label))
    be.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    name = runtime.getDeviceProperties(0)["name"].decode()
    date = datetime.date.today().isoformat()
    rows = [r for label, g in GEOMETRIES.items() for r in bench(label, **g)]
    if args.json:
        print(json.dumps(dict(card=name, date=date, rows=rows), indent=1))
        return
    print(f"{name}, {date}; {PAIRS} scattered blocks, pinned mapped host pool")
    print("| block | way | block KiB | kvpager ms | GB/s | one memcpy ms | memcpy GB/s | "
          "per-block memcpyAsync ms | per-block GB/s | memcpy time / kvpager time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['way']} | {r['block_bytes'] // 1024} | {r['ms']:.2f} | {r['gbs']:.1f} | "
              f"{r['memcpy_ms']:.2f} | {r['memcpy_gbs']:.1f} | {r['per_block_ms']:.2f} | "
              f"{r['per_block_gbs']:.1f} | {r['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
