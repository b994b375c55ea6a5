"""The remote tier's probe (`KVPool.cached_tokens` with a tier): ways to ask a
store which of N keys it holds, then the probe end to end.

    PYTHONPATH=. python tools/bench_probe.py [--url redis://HOST:PORT] [--keys 16,256,4096]
        [--value-kib 64] [--json]

Starts its own redis-server (the first on PATH) on a free loopback port
unless ``--url`` names a store (its keys under ``kvpagerbench:`` are
written and deleted). Half of the N keys hold a value of ``--value-kib``.

Checked first: every way gives the same answer for every key. Then timed
(median of 15, after one warm-up call), in ms per batch of N keys:
- the tier's probe: one ``TYPE`` per key (a string, nothing, or another
  Redis type, which no lookup could restore), all sent before any reply is
  read, the reply lines split and classified with NumPy
  (`remote_key_types.key_types`);
- an ``EXISTS`` pipeline through redis-py (its parser, a Python object per
  reply): the probe before it told strings from other types;
- a redis-py pipeline of ``STRLEN`` (would also check lengths, but moves the
  keys' LRU / LFU clocks: a probe must not make a block look used);
- one ``EVAL`` of a Lua loop of ``STRLEN`` (one command; scripting may be
  disabled, and a cluster needs every key in one slot);
- one ``EXISTS k1 .. kN``: a count, not which keys; the floor of the
  store's own work;
- the values themselves (the tier's chunked ``GETRANGE`` reads into staging): what a
  lookup reads, and what the probe must not.
End to end: `cached_tokens` of a prompt whose N blocks another pool wrote
(1 KiB values), with the tier (``remote=True``) and without (``remote=False``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import numpy as np
from bench_remote import local_redis, redis_version

from kvpager import KVPool, PoolSpec
from kvpager.remote_store import KEY_STRING, RedisStore, open_store
from kvpager.remote_tier import RemoteTier

LUA = "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('STRLEN', k) end return r"


def median_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def ways(url: str, n: int, value_kib: int) -> dict:
    import redis

    store = open_store(url, timeout=5.0)
    assert isinstance(store, RedisStore)
    r = redis.Redis.from_url(url)
    names = [f"kvpagerbench:{i:08d}:{'f' * 64}" for i in range(n)]
    held = np.arange(n) % 2 == 0
    value = os.urandom(value_kib << 10)
    pipe = r.pipeline(transaction=False)
    for name, h in zip(names, held):
        if h:
            pipe.set(name, value)
    pipe.execute()
    script = r.register_script(LUA)

    def pipelined(cmd: str):
        def run():
            p = r.pipeline(transaction=False)
            for name in names:
                p.execute_command(cmd, name)
            return p.execute()
        return run

    rows = np.empty((n, value_kib << 10), dtype=np.uint8)
    sizes = np.empty(n, dtype=np.int64)
    answers = {
        "tier probe (raw TYPE pipeline)": (lambda: store.exists_many(names), lambda a: np.asarray(a) == KEY_STRING),
        "redis-py EXISTS pipeline": (pipelined("EXISTS"), lambda a: np.asarray(a) > 0),
        "redis-py STRLEN pipeline": (pipelined("STRLEN"), lambda a: np.asarray(a) > 0),
        "EVAL Lua STRLEN loop": (lambda: script(keys=names), lambda a: np.asarray(a) > 0),
        "values: chunked GETRANGE": (lambda: store.get_into(names, rows, sizes), lambda a: sizes >= 0),
    }
    out: dict = {"keys": n}
    try:
        for label, (fn, held_of) in answers.items():
            assert np.array_equal(held_of(fn()), held), label  # correct first
            out[label] = median_ms(fn)
        assert r.exists(*names) == held.sum()
        out["one EXISTS k1..kN (a count only)"] = median_ms(lambda: r.exists(*names))
    finally:
        for i in range(0, n, 1000):
            r.delete(*names[i : i + 1000])
        store.close()
        r.close()
    return out


def end_to_end(url: str, n: int) -> dict:
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=n + 8, block_size=16,
                    dtype="float16")
    a = KVPool(spec, remote=RemoteTier(url, timeout=5.0))
    b = KVPool(spec, remote=RemoteTier(url, timeout=5.0, max_restore_bytes=1 << 40))
    salt = f"bench{time.time_ns()}"
    prompt = np.random.default_rng(n).integers(0, 50_000, n * 16 + 1).tolist()
    [x] = a.allocate([prompt], salt=salt)
    a.commit(x.seq_id)
    assert a.remote.flush(120) and a.remote_stats().written_blocks == n
    assert b.cached_tokens([prompt], salt) == [n * 16] and b.cached_tokens([prompt], salt, remote=False) == [0]
    out = {"keys": n, "remote=True": median_ms(lambda: b.cached_tokens([prompt], salt)),
           "remote=False": median_ms(lambda: b.cached_tokens([prompt], salt, remote=False))}
    a.close(), b.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="a store to use instead of a redis-server started here")
    ap.add_argument("--keys", default="16,256,4096", help="batch sizes (keys per probe)")
    ap.add_argument("--value-kib", type=int, default=64, help="bytes of each held value (KiB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    counts = [int(k) for k in args.keys.split(",")]

    def run(url: str) -> dict:
        load = os.getloadavg()
        rows = [ways(url, n, args.value_kib) for n in counts]
        e2e = [end_to_end(url, n) for n in counts]
        return dict(date=datetime.date.today().isoformat(), cpus=os.cpu_count(), machine=platform.machine(),
                    load_before=load, load_after=os.getloadavg(), python=platform.python_version(),
                    redis=redis_version() if not args.url else args.url, ways=rows, end_to_end=e2e)

    if args.url:
        result = run(args.url)
    else:
        with local_redis([]) as port:
            result = run(f"redis://127.0.0.1:{port}")
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['date']}; {result['cpus']} CPUs ({result['machine']}), load average "
          f"{result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after; Python {result['python']}; "
          f"store {result['redis']}; half the keys hold {args.value_kib} KiB")
    labels = [k for k in result["ways"][0] if k != "keys"]
    print("| ms per batch | " + " | ".join(f"{r['keys']} keys" for r in result["ways"]) + " |")
    print("|---|" + "---|" * len(result["ways"]))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{r[label]:.3f}" for r in result["ways"]) + " |")
    for label in ("remote=True", "remote=False"):
        print(f"| cached_tokens, {label} | " + " | ".join(f"{r[label]:.3f}" for r in result["end_to_end"]) + " |")


if __name__ == "__main__":
    main()
