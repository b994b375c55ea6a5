"""Host cost of a step plan: building it, and each layer's write / attend call.

A decode step of 256 sequences (a 1,024-token shared prompt and 128 own
tokens each), Llama-3-8B geometry (32 q / 8 kv heads, head dim 128, bf16):
the plan built from the pool (`KVPool.plan`: tables gathered, checked,
uploaded; with the GPU idle and with it busy, as when the host runs ahead),
then ``plan.write`` and ``plan.attend`` called with torch tensors, and
``plan.write_attend`` on heads-first views as `kvpager.hf` calls it (a
host-bound plan), while the GPU is kept busy, so only the host's time is
measured; compared
with the one-layer convenience ``KVPool.attend`` (a plan per call). Also the
tables of 64 sequences x 8,192 blocks (`KVPool.tables`), and the search for
shared prefixes a cascading plan makes every step (`find_shared_prefixes`,
compiled where built, beside its NumPy reference), and a small model's
decode layer, where the host's part is most of it.

    python tools/bench_plan.py [--device cuda:0|cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvpager import KVPool, PoolSpec, cascade  # noqa: E402
from kvpager.plan import check_queries  # noqa: E402
from kvpager.plan_numpy import to_numpy  # noqa: E402


def per_call_us(fn, n: int) -> float:
    """Median host microseconds per call over 5 rounds of n calls."""
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return float(np.median(out))


def shared_prefix_rows(tables: np.ndarray, lens: np.ndarray, block_size: int) -> list[tuple[str, float]]:
    """`find_shared_prefixes` on this step's tables (one prompt shared by all) and on 256 rows
    under 8 prompts of 2 forks each, compiled (where built) and by the NumPy reference."""
    rng = np.random.default_rng(1)
    ids = rng.permutation(1 << 20).astype(np.int32)
    forked = np.empty((256, 80), np.int32)
    group, fork = np.arange(256) % 8, np.arange(256) // 8 % 2
    forked[:, :64] = ids[group[:, None] * 64 + np.arange(64)]  # a 1,024-token prompt a group
    forked[:, 64:72] = ids[4096 + (group * 2 + fork)[:, None] * 8 + np.arange(8)]  # a 128-token fork
    forked[:, 72:] = ids[8192:8192 + 256 * 8].reshape(256, 8)  # each row's own
    forked_lens = np.full(256, 72 * block_size + 64, np.int32)
    out = []
    for name, (t, sl) in {"one prompt": (tables, lens), "8 prompts x 2 forks": (forked, forked_lens)}.items():
        for how, fn in (("compiled", cascade.find_shared_prefixes), ("NumPy", cascade.find_shared_prefixes_numpy)):
            if how == "compiled" and cascade.NATIVE is None:
                continue
            out.append((f"find_shared_prefixes, 256 rows, {name}, {how}",
                        per_call_us(lambda fn=fn, t=t, sl=sl: fn(t, sl, block_size), 200)))
    return out


def small_step_rows(device: str) -> list[tuple[str, float]]:
    """A small model's decode step, where the host's part of a layer is most of it:
    8 sequences of 288 tokens, 4 q / 2 kv heads of 64, float32, `write_attend` on
    heads-first views as `kvpager.hf` calls it, a host-bound (eager) plan."""
    import torch

    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=256, block_size=16, dtype="float32")
    pool = KVPool(spec, device=device)
    rng = np.random.default_rng(2)
    ids = [a.seq_id for a in pool.allocate([rng.integers(3, 30000, 288).tolist() for _ in range(8)])]
    plan = pool.plan(ids, None, pool.append_flat(ids, 1), num_q_heads=4, host_bound=True)
    q, k = (torch.randn(8, h, 64, device=device).unsqueeze(0).transpose(1, 2) for h in (4, 2))
    plan.write_attend(0, q, k, k)
    us = per_call_us(lambda: plan.write_attend(1, q, k, k), 200)
    pool.close()
    return [("plan.write_attend per layer, small (8 x 288, 4/2 x 64, fp32)", us)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda:0")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    import torch

    if gpu and not torch.cuda.is_available():
        ap.error("no CUDA device here: pass --device cpu")

    dev = torch.device(args.device)
    spec = PoolSpec(num_layers=32, num_kv_heads=8, head_dim=128, num_blocks=20000, block_size=16,
                    dtype="bfloat16")
    if not gpu:
        spec = spec.replace(num_layers=2, num_blocks=8192)
    pool = KVPool(spec, device=args.device)
    rng = np.random.default_rng(0)
    shared = rng.integers(3, 30000, 1024).tolist()
    [first] = pool.allocate([shared + [1]])
    pool.commit([first.seq_id])
    allocs = pool.allocate([shared + rng.integers(3, 30000, 128).tolist() for _ in range(256)])
    ids = [a.seq_id for a in allocs]
    slots = pool.append_flat(ids, 1)
    def busy() -> None:
        if gpu:
            torch.cuda.synchronize()
            torch.cuda._sleep(2_000_000_000 // 1000 * 100)  # ~0.1 s of GPU work ahead of the calls

    def ahead_us(fn) -> float:
        """Host microseconds of ``fn`` while the GPU stays busy just ahead of the
        host, as in a pipelined decode loop: each call follows a short GPU sleep
        (whose own launch, timed alone, is taken off)."""
        if not gpu:
            return per_call_us(fn, 50)
        nap = lambda: torch.cuda._sleep(200_000)  # noqa: E731  about 0.1 ms of GPU time
        both = per_call_us(lambda: (nap(), fn()), 50)
        torch.cuda.synchronize()
        alone = per_call_us(nap, 50)
        torch.cuda.synchronize()
        return both - alone

    rows = []
    rows.append(("plan, 256 sequences (decode step)", per_call_us(lambda: pool.plan(ids, None, slots), 50)))
    busy()
    rows.append(("  the same, GPU busy (host ahead)", ahead_us(lambda: pool.plan(ids, None, slots))))
    rows.append(("  with its launches (num_q_heads, GPU busy)",
                 ahead_us(lambda: pool.plan(ids, None, slots, num_q_heads=32))))
    tables, lens = pool.tables(ids)
    ql, sl = check_queries(spec, lens, None, slots)
    rows.append(("  of which KVPool.tables (gather)", per_call_us(lambda: pool.tables(ids), 50)))
    rows.append(("  of which check_queries (slots)", per_call_us(lambda: check_queries(spec, lens, None, slots), 50)))
    rows.append(("  of which backend.plan (pack, upload)",
                 per_call_us(lambda: pool.backend.plan(tables, lens, ql, sl), 50)))
    plan = pool.plan(ids, None, slots, num_q_heads=32)
    k = torch.randn(256, 8, 128, device=dev).to(torch.bfloat16)
    q = torch.randn(256, 32, 128, device=dev).to(torch.bfloat16)
    out = torch.empty_like(q)
    plan.write(0, k, k)
    plan.attend(0, q, out=out)
    n = 100 if gpu else 3
    busy()
    rows.append(("plan.write per layer (torch k, v)", per_call_us(lambda: plan.write(1, k, k), n)))
    busy()
    rows.append(("plan.attend per layer (torch q, out given)", per_call_us(lambda: plan.attend(1, q, out=out), n)))
    busy()
    rows.append(("plan.attend per layer (torch q, new out)", per_call_us(lambda: plan.attend(1, q), n)))
    # a model's layer as kvpager.hf runs it: heads-first views, one call, a host-bound (eager) plan
    k4, q4 = k.unsqueeze(0).transpose(1, 2), q.unsqueeze(0).transpose(1, 2)
    eager = pool.plan(ids, None, slots, num_q_heads=32, host_bound=True)
    eager.write_attend(0, q4, k4, k4)
    busy()
    rows.append(("plan.write_attend per layer (heads-first, eager)",
                 per_call_us(lambda: eager.write_attend(1, q4, k4, k4), n)))
    if gpu:  # these sequences share a prefix: the plan above cascades (three launches a layer)
        plain = pool.plan(ids, None, slots, num_q_heads=32, cascade=False)
        plain.attend(0, q, out=out)
        busy()
        rows.append(("  the same without the cascade (out given)", per_call_us(lambda: plain.attend(1, q, out=out), n)))
        # the in-place refill a captured decode step replays over
        rows.append(("plan.update in place (GPU busy)", ahead_us(lambda: plain.update(tables, lens, None, slots))))
        torch.cuda.synchronize()
    qp = q if gpu else to_numpy(q, "q", spec.np_dtype)[0]
    rows.append(("KVPool.attend per layer (a plan each call)",
                 per_call_us(lambda: pool.attend(1, ids, qp), 10 if gpu else 2)))
    if gpu:
        torch.cuda.synchronize()
    rows.extend(shared_prefix_rows(tables, lens, spec.block_size))
    rows.extend(small_step_rows(args.device))
    pool.free(ids)
    # tables are host arrays: a small geometry holds 64 x 8,192 blocks in little memory
    wide = KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=64, num_blocks=64 * 8192 + 8))
    bid = [a.seq_id for a in wide.allocate([rng.integers(3, 30000, 8192 * 16) for _ in range(64)])]
    rows.append(("KVPool.tables, 64 sequences x 8,192 blocks", per_call_us(lambda: wide.tables(bid), 10)))
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"\n{name}")
    print(f"{'what':<62} {'us':>9}")
    for what, us in rows:
        print(f"{what:<62} {us:9.1f}")
    pool.close()


if __name__ == "__main__":
    main()
