"""vLLM's own prefix-caching block allocator beside kvpager's, in one process, on
the same work; and both beside `LRUReference`, the plain-Python model of vLLM's
v1 block pool that tests/test_allocator_vs_lru.py holds kvpager to.

    python tools/peers_vllm.py [--vllm-site /tmp/vllm_site] [--traces shared,unshared,boundary,samples]
                               [--requests 1000] [--repeats 3] [--micro-blocks 100000] [--json]

vLLM runs unmodified: its `KVCacheManager` (one full-attention group, block
size 16, prefix caching on, sha256 block hashes: its defaults) through the
calls its scheduler makes (get_computed_blocks and allocate_slots for a new
request, append_output_token_ids and allocate_slots of one token a decode
step, free); kvpager's `KVPool` on the CPU backend (allocate + commit, append
+ commit, free); the model twice: in its vLLM mode and in its
one-block-per-key mode (kvpager's). Every pool has the same block count,
null block 0 included on every side. The traces (`vllm_trace.py`): shared
system prompts (Zipf popularity, a pool smaller than the working set),
no sharing, prompts ending on block boundaries and fully cached ones (the
last block computed again), n > 1 samples (vLLM runs them as n requests).

Printed per trace: hit tokens, refused admissions and decode steps, blocks
used / free / evictable / cached and usage at the end; the requests whose hit
tokens or admission differ between two sides, decode refusals that differ,
and the prompts whose cached tokens differ at the end (the first of each
shown); then the replay's time, us per request and per block-table entry,
vLLM (its Request objects, whose construction hashes the prompt, included)
and kvpager (hashing included), median of ``--repeats``, ratio vLLM / kvpager.
Then the microbenchmark: 256 sequences x 32 blocks taken and freed, us per
block: vLLM's BlockPool.get_new_blocks / free_blocks, kvpager's BlockPool
the same way, and kvpager's KVPool.allocate / free (a batch of unique
prompts: hashing and a prefix lookup included).

vLLM's wheel needs torch, which its own dependencies would replace; install
it apart and append it to the path (``--vllm-site``), after this
environment's packages:

    pip download --no-deps vllm==0.34.0 -d /tmp/vl
    pip install --no-deps --target /tmp/vllm_site /tmp/vl/vllm-*.whl
    pip install --no-deps --target /tmp/vllm_site psutil urllib3 aiohttp multidict attrs yarl propcache \\
        aiohappyeyeballs aiosignal frozenlist requests certifi charset-normalizer pybase64 cachetools \\
        cbor2 cloudpickle uvloop py-cpuinfo llguidance xgrammar apache-tvm-ffi
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import vllm_trace as vt

SIDES = ("vLLM", "model (vLLM mode)", "kvpager", "model (one block per key)")
PAIRS = (("vLLM", "model (vLLM mode)"), ("kvpager", "model (one block per key)"), ("vLLM", "kvpager"))
POOL_BLOCKS = {"shared": 1536, "unshared": 1024, "boundary": 128, "samples": 384}


def load_vllm(site: str | None) -> SimpleNamespace:
    """vLLM's modules this tool runs, or exit with one line saying why not."""
    if site:
        sys.path.append(site)
    try:
        import torch
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core import kv_cache_utils
        from vllm.v1.core.block_pool import BlockPool
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.request import Request, RequestStatus
    except ImportError as e:
        sys.exit(f"peers_vllm: vllm is not importable ({e}); install it as this file's docstring says "
                 "and pass --vllm-site")
    kv_cache_utils.init_none_hash(sha256)
    return SimpleNamespace(
        torch=torch, SamplingParams=SamplingParams, BlockPool=BlockPool, KVCacheManager=KVCacheManager,
        FullAttentionSpec=FullAttentionSpec, KVCacheConfig=KVCacheConfig, KVCacheGroupSpec=KVCacheGroupSpec,
        Request=Request, RequestStatus=RequestStatus, hasher=kv_cache_utils.get_request_block_hasher(vt.BS, sha256),
        version=__import__("vllm").__version__)


def make_sides(vllm, model_cls, num_blocks: int) -> dict:
    return {"vLLM": vt.VllmSide(vllm, num_blocks),
            "model (vLLM mode)": vt.ModelSide(model_cls, num_blocks, one_block_per_key=False),
            "kvpager": vt.KvpagerSide(num_blocks),
            "model (one block per key)": vt.ModelSide(model_cls, num_blocks, one_block_per_key=True)}


def differences(a: vt.Outcome, b: vt.Outcome, trace: vt.Trace) -> dict:
    """Counts of what differs between two sides' outcomes, and the first of each."""
    hits = [r for r in a.hits if a.hits[r] != b.hits[r]]
    cuts = [r for r in a.hits if a.cut.get(r) != b.cut.get(r)]
    probes = [i for i, (x, y) in enumerate(zip(a.probes, b.probes)) if x != y]
    return dict(
        hits=len(hits), cuts=len(cuts), probes=len(probes), state=a.state == b.state,
        first_hit=hits and dict(rid=hits[0], a=a.hits[hits[0]], b=b.hits[hits[0]]),
        first_cut=cuts and dict(rid=cuts[0], a=a.cut.get(cuts[0]), b=b.cut.get(cuts[0])),
        first_probe=probes and dict(prompt_tokens=len(trace.prompts[probes[0]][0]),
                                    a=a.probes[probes[0]], b=b.probes[probes[0]]))


def summary(out: vt.Outcome) -> dict:
    admitted = [h for h in out.hits.values() if h is not None]
    return dict(hit_tokens=sum(admitted), refused=len(out.hits) - len(admitted), cut=len(out.cut), **out.state)


def time_replays(vllm, trace: vt.Trace, repeats: int) -> dict:
    """Median seconds of a whole replay on a fresh vLLM manager and a fresh kvpager
    pool (built untimed), alternating which goes first."""
    makers = {"vLLM": lambda: vt.VllmSide(vllm, trace.num_blocks), "kvpager": lambda: vt.KvpagerSide(trace.num_blocks)}
    times: dict[str, list[float]] = {name: [] for name in makers}
    for run in range(repeats):
        for name in list(makers)[:: 1 if run % 2 else -1]:
            side = makers[name]()
            t0 = time.perf_counter()
            vt.replay(side, trace)
            times[name].append(time.perf_counter() - t0)
    secs = {name: statistics.median(ts) for name, ts in times.items()}
    return {name: dict(us_per_request=s / trace.num_requests * 1e6, us_per_block=s / trace.table_blocks * 1e6)
            for name, s in secs.items()} | dict(ratio=secs["vLLM"] / secs["kvpager"])


def run_trace(vllm, model_cls, trace: vt.Trace, repeats: int) -> dict:
    outcomes = {name: vt.finish(side, trace, vt.replay(side, trace))
                for name, side in make_sides(vllm, model_cls, trace.num_blocks).items()}
    return dict(trace=trace.name, requests=trace.num_requests, prompts=len(trace.prompts),
                pool_blocks=trace.num_blocks, table_blocks=trace.table_blocks,
                sides={name: summary(out) for name, out in outcomes.items()},
                pairs=[dict(a=a, b=b, **differences(outcomes[a], outcomes[b], trace)) for a, b in PAIRS],
                timing=time_replays(vllm, trace, repeats))


def micro_rows(vllm, num_blocks: int, seqs: int, per_seq: int, repeats: int) -> list[dict]:
    """us per block to take ``seqs`` x ``per_seq`` blocks and to free them (each
    table in reverse, as a finished request's), median of ``repeats``."""
    from kvpager import KVPool, PoolSpec

    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=num_blocks, dtype="float32")
    vpool = vllm.BlockPool(num_blocks, enable_caching=True, hash_block_size=vt.BS)
    kblocks, kpool = KVPool(spec).manager.pool, KVPool(spec)
    runs = iter(range(10**9))

    def prompts():  # unique per run (no hits), int64 as a tokenizer hands them over
        base = next(runs) * seqs
        return [np.full(per_seq * vt.BS, base + i, dtype=np.int64) for i in range(seqs)]

    impls = {
        "vLLM BlockPool.get_new_blocks / free_blocks": (
            lambda: None, lambda _: [vpool.get_new_blocks(per_seq) for _ in range(seqs)],
            lambda tables: [vpool.free_blocks(reversed(t)) for t in tables]),
        "kvpager BlockPool.get_new_blocks / free_blocks": (
            lambda: None, lambda _: [kblocks.get_new_blocks(per_seq) for _ in range(seqs)],
            lambda tables: [kblocks.free_blocks(t[::-1]) for t in tables]),
        "kvpager KVPool.allocate / free (batch)": (
            prompts, lambda p: [a.seq_id for a in kpool.allocate(p)], kpool.free),
    }
    rows = []
    for name, (prepare, take, give) in impls.items():
        takes, gives = [], []
        for _ in range(repeats):
            arg = prepare()
            t0 = time.perf_counter()
            held = take(arg)
            t1 = time.perf_counter()
            give(held)
            takes.append(t1 - t0)
            gives.append(time.perf_counter() - t1)
        per = 1e6 / (seqs * per_seq)
        rows.append(dict(impl=name, take_us_per_block=statistics.median(takes) * per,
                         free_us_per_block=statistics.median(gives) * per))
    return rows


def print_trace(r: dict) -> None:
    print(f"\n== {r['trace']}: {r['requests']:,} requests, {r['prompts']:,} distinct prompts, "
          f"pool {r['pool_blocks']:,} blocks ({r['pool_blocks'] - 1:,} usable), "
          f"{r['table_blocks']:,} block-table entries")
    print(f"{'side':<27}{'hit tokens':>11}{'refused':>8}{'cut':>5}{'used':>6}{'free':>6}"
          f"{'evictable':>10}{'cached':>7}{'usage':>7}")
    for name, s in r["sides"].items():
        print(f"{name:<27}{s['hit_tokens']:>11,}{s['refused']:>8}{s['cut']:>5}{s['used']:>6}{s['free']:>6}"
              f"{s['evictable']:>10}{s['cached']:>7}{s['usage']:>7.3f}")
    print(f"differences (requests / decode refusals / prompts cached at the end, of "
          f"{r['requests']:,} / {r['requests']:,} / {r['prompts']:,}; end state same?)")
    for p in r["pairs"]:
        firsts = "; ".join(f"first {k[6:]}: {p[k]}" for k in ("first_hit", "first_cut", "first_probe") if p[k])
        print(f"  {p['a']} vs {p['b']}: {p['hits']} / {p['cuts']} / {p['probes']}; "
              f"{'same' if p['state'] else 'differs'}" + (f"  ({firsts})" if firsts else ""))
    t = r["timing"]
    print(f"time: vLLM {t['vLLM']['us_per_request']:.1f} us/request, {t['vLLM']['us_per_block']:.2f} us/block; "
          f"kvpager {t['kvpager']['us_per_request']:.1f} us/request, {t['kvpager']['us_per_block']:.2f} us/block; "
          f"vLLM / kvpager {t['ratio']:.2f}x")


def print_micro(rows: list[dict], num_blocks: int, seqs: int, per_seq: int, repeats: int) -> None:
    print(f"\nmicrobenchmark: {seqs} sequences x {per_seq} blocks, {num_blocks:,}-block pools, "
          f"us per block (median of {repeats})")
    print(f"{'':<48}{'take':>8}{'free':>8}")
    for r in rows:
        print(f"{r['impl']:<48}{r['take_us_per_block']:>8.3f}{r['free_us_per_block']:>8.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm-site", help="a directory holding vllm (pip install --target), appended to sys.path")
    ap.add_argument("--traces", default=",".join(vt.TRACES), help="comma-separated: " + ", ".join(vt.TRACES))
    ap.add_argument("--requests", type=int, default=1000, help="requests per trace")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed replays per trace")
    ap.add_argument("--micro-blocks", type=int, default=100_000, help="microbenchmark pool blocks (0: skip it)")
    ap.add_argument("--micro-repeats", type=int, default=15)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    unknown = set(args.traces.split(",")) - set(vt.TRACES)
    if unknown:
        ap.error(f"unknown traces: {', '.join(sorted(unknown))}")
    vllm = load_vllm(args.vllm_site)
    model_cls = vt.load_model()
    traces = [run_trace(vllm, model_cls, vt.TRACES[n](args.seed, args.requests, POOL_BLOCKS[n]), args.repeats)
              for n in args.traces.split(",")]
    micro = micro_rows(vllm, args.micro_blocks, 256, 32, args.micro_repeats) if args.micro_blocks else []
    machine = f"{platform.machine()} CPU, {platform.python_implementation()} {platform.python_version()}"
    if args.json:
        print(json.dumps(dict(machine=machine, vllm=vllm.version, traces=traces, micro=micro)))
        return
    print(f"vLLM {vllm.version} KVCacheManager vs kvpager KVPool vs LRUReference, {machine}")
    for r in traces:
        print_trace(r)
    if micro:
        print_micro(micro, args.micro_blocks, 256, 32, args.micro_repeats)


if __name__ == "__main__":
    main()
