"""The remote prefix tier: restore throughput over loopback against recomputing
and against a local host-pool swap-in; then the write policy (on commit or on
eviction) on a two-host workload.

    PYTHONPATH=. python tools/bench_remote.py [--url redis://HOST:PORT] [--block-kib 2048,64]
        [--connections 2] [--chunk-mib 4] [--io-threads 1] [--restore-only] [--tflops 400] [--json]

Starts its own redis-server (the first on PATH; ``--io-threads``,
``--redis-arg``) on a free loopback port unless ``--url`` names a store.
CPU backend (NumPy pools), whatever the machine has. The first lines
printed name the machine, its load, the server and the settings.

On a machine with more cores, sweep the lookup's connections against the
server's I/O threads (Redis >= 6 writes the replies of several connections
from ``io-threads`` threads; one connection is always one thread's):

    export PATH=/path/to/redis/bin:$PATH   # the redis-server to measure
    for t in 1 4 8; do for c in 1 2 4 8; do
        PYTHONPATH=. python tools/bench_remote.py --restore-only --block-kib 2048 --io-threads $t --connections $c
    done; done

Restore: pool A commits 256 MiB (``--total-mib``) of blocks (the tier writes
them), pool B allocates the same prompt and restores every block (chunked
pipelined ``GETRANGE``s, at most a value each, over ``--connections``
connections read straight into staging,
checksums, copies into its pool). Checked byte for byte first, then timed
(median of 5, B's cache emptied between runs). GB/s = restored K/V bytes /
allocate time. Beside it: the tier's fetch alone (the same lookups and
checks, no pool), the chunked reads alone (no checks), redis-py's MGET of
every key at once (the path before chunking), the same single MGET read by a
bare socket into one buffer, and a swap-in of the same blocks from B's host
pool.

Recompute (model-free): FLOPs per token = 2 x weights of the layers the
block holds (a llama-3-8b layer: 218.1 M weights) + 4 x layers x 4096 x
position (attention scores and sums, at the mean position of a 2,048-token
prompt); time = FLOPs / the assumed device rate (``--tflops``, default 400:
about 40% of an H100's dense bf16 peak). GB/s = the K/V bytes those tokens
produce per second of device time.

Write policy: two pools of 96 (then 320) blocks (two hosts) serve 400
requests, each a prefix drawn from 48 shared documents of 6 blocks (Zipf,
s = 1.1) plus 2 blocks of its own, on a host picked at random. "commit"
writes each block when its owner commits it (the tier as shipped); "evict"
writes a block only when the pool evicts it (measured by hooking the
pool's cache). Counted: tokens restored from the store, tokens computed,
blocks and bytes written, loop-thread time spent copying blocks out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator

import numpy as np

from kvpager import KVPool, PoolSpec
from kvpager.prefix_cache import root_key
from kvpager.remote_store import CHUNK_BYTES, CONNECTIONS
from kvpager.remote_tier import RemoteTier

TOTAL = 256 << 20
SALT = "bench"
LAYER_WEIGHTS = 218.1e6  # llama-3-8b: attention 41.9 M + MLP 176.2 M per layer
D_MODEL, PROMPT = 4096, 2048


def redis_version() -> str:
    path = shutil.which("redis-server")
    if path is None:
        return "none"
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.split()
    return f"{path} " + next((w for w in out if w.startswith("v=")), "v=?")[2:]


@contextlib.contextmanager
def local_redis(extra: list[str]) -> Iterator[int]:
    """A redis-server on a free loopback port (no persistence, 2 GiB, LRU, then
    ``extra`` arguments), stopped on exit; yields its port."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server), or pass --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="kvpbench")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", folder, "--maxmemory", "2gb",
                             "--maxmemory-policy", "allkeys-lru", *extra], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def spec_for(layers: int, blocks: int, host: int = 0) -> PoolSpec:
    return PoolSpec(num_layers=layers, num_kv_heads=8, head_dim=128, num_blocks=blocks, block_size=16,
                    dtype="bfloat16", num_host_blocks=host)


def median_s(fn, reps: int = 5) -> float:
    """Median of ``reps`` calls of ``fn``, which returns the seconds it timed."""
    return statistics.median(fn() for _ in range(reps))


def raw_mget_s(port: int, names: list[str], value_bytes: int) -> float:
    """One MGET of ``names`` read by a bare socket into a preallocated buffer:
    what the store and loopback can deliver with no client work at all."""
    cmd = b"*%d\r\n$4\r\nMGET\r\n" % (len(names) + 1) + b"".join(
        b"$%d\r\n%s\r\n" % (len(n), n.encode()) for n in names)
    expect = len(b"*%d\r\n" % len(names)) + len(names) * (len(b"$%d\r\n" % value_bytes) + value_bytes + 2)
    buf = memoryview(bytearray(expect))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        s.sendall(cmd)
        got = 0
        while got < expect:
            n = s.recv_into(buf[got:], expect - got)
            if not n:
                raise RuntimeError("the store closed the connection")
            got += n
        return time.perf_counter() - t0


def recompute_s(layers: int, tokens: int) -> tuple[float, float]:
    """FLOPs of prefilling ``tokens`` tokens through ``layers`` layers (model in the docstring)."""
    per_token = 2 * LAYER_WEIGHTS * layers + 4 * layers * D_MODEL * (PROMPT / 2)
    return per_token * tokens, per_token


def restore_case(url: str, port: int | None, layers: int, args: argparse.Namespace) -> dict:
    total = args.total_mib << 20
    n = total // spec_for(layers, 2).bytes_per_block
    a = KVPool(spec_for(layers, n + 2), remote=RemoteTier(url, queue_bytes=2 * total, ttl=3600))
    b = KVPool(spec_for(layers, n + 2, host=n),
               remote=RemoteTier(url, timeout=5.0, max_restore_bytes=2 * total, connections=args.connections,
                                 chunk_bytes=int(args.chunk_mib * 2**20)))
    tflops = args.tflops
    rng = np.random.default_rng(layers)
    prompt = rng.integers(0, 2**31, n * 16 + 1).tolist()
    [x] = a.allocate([prompt], salt=SALT)
    rows = a.backend.device_array().reshape(a.spec.num_blocks, -1).view(np.uint8)
    blocks = np.asarray(x.block_table[:n])
    rows[blocks] = rng.integers(0, 256, (n, rows.shape[1]), dtype=np.uint8)  # stands for a prefill
    t0 = time.perf_counter()
    a.commit(x.seq_id)
    offer_s = time.perf_counter() - t0
    assert a.remote.flush(600) and a.remote_stats().written_blocks == n, a.remote_stats()

    filler = list(range(-(n + 1) * 16, 0))  # takes every block of B: evicts what it restored

    def restore_once() -> float:
        for s in b.sequences():
            b.free(s.seq_id)
        [f] = b.allocate([filler])
        b.free(f.seq_id)
        t = time.perf_counter()
        [y] = b.allocate([prompt], salt=SALT)
        dt = time.perf_counter() - t
        assert y.num_remote_tokens == n * 16, y.num_remote_tokens
        return dt

    restore_once()
    [y] = b.sequences()
    got = b.backend.device_array().reshape(b.spec.num_blocks, -1).view(np.uint8)[np.asarray(y.block_table[:n])]
    assert np.array_equal(got, rows[blocks]), "restored bytes differ"
    restore = median_s(restore_once)

    tier, keys = b.remote, a.manager.history[x.seq_id].keys[:n]
    root = root_key(SALT)
    wants = [(root, k) for k in keys]

    def fetch_once() -> float:
        t = time.perf_counter()
        assert len(tier.fetch(wants)) == n
        return time.perf_counter() - t

    fetch = median_s(fetch_once)
    names = [tier.key(root, k) for k in keys]

    def redis_py_once() -> float:
        t = time.perf_counter()
        assert sum(v is not None for v in tier.store.get_many(names)) == n
        return time.perf_counter() - t

    redis_py = median_s(redis_py_once)
    staging, sizes = np.empty((n, tier.codec.value_bytes), np.uint8), np.empty(n, np.int64)

    def chunked_once() -> float:
        t = time.perf_counter()
        tier.store.get_into(names, staging, sizes)
        dt = time.perf_counter() - t
        assert (sizes == tier.codec.value_bytes).all()
        return dt

    chunked = median_s(chunked_once)
    raw = median_s(lambda: raw_mget_s(port, names, tier.codec.value_bytes)) if port else float("nan")

    for s in b.sequences():
        b.free(s.seq_id)
    [z] = b.allocate([list(range(10**9, 10**9 + n * 16))])
    b.swap_out(z.seq_id)

    def swap_once() -> float:
        t = time.perf_counter()
        b.swap_in(z.seq_id)
        dt = time.perf_counter() - t
        b.swap_out(z.seq_id)
        return dt

    swap = median_s(swap_once)
    nbytes = n * a.spec.bytes_per_block
    flops, per_token = recompute_s(layers, n * 16)
    recompute = flops / (tflops * 1e12)
    a.close(), b.close()
    return dict(block_kib=a.spec.bytes_per_block >> 10, layers=layers, blocks=n, mib=nbytes >> 20,
                restore_ms=restore * 1e3, restore_gbs=nbytes / restore / 1e9,
                fetch_gbs=nbytes / fetch / 1e9, redis_py_gbs=nbytes / redis_py / 1e9, chunked_gbs=nbytes / chunked / 1e9, raw_gbs=nbytes / raw / 1e9,
                swap_in_gbs=nbytes / swap / 1e9, recompute_ms=recompute * 1e3,
                recompute_gbs=nbytes / recompute / 1e9, gflop_per_token=per_token / 1e9,
                offer_gbs=nbytes / offer_s / 1e9)


def policy_case(url: str, policy: str, blocks: int, seed: int = 0) -> dict:
    """The two-host workload under one write policy, pools of ``blocks`` blocks
    (see the module docstring)."""
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=blocks + 1, block_size=16,
                    dtype="float16")
    hosts = [KVPool(spec, remote=RemoteTier(url, ttl=3600)) for _ in range(2)]
    offer_time = [0.0]
    salt = f"policy-{policy}-{blocks}-{seed}"
    root = root_key(salt)
    for p in hosts:
        tier, real = p.remote, p.remote.offer

        def timed(backend, fresh, real=real):
            t = time.perf_counter()
            real(backend, fresh)
            offer_time[0] += time.perf_counter() - t

        if policy == "commit":
            tier.offer = timed
        else:  # write a block when it leaves the cache, never on commit
            tier.offer = lambda backend, fresh: None
            cache = p.manager.pool.cache

            def evicted(block, cache=cache, p=p, timed=timed, remove=cache.remove):
                key = cache.block_key.get(block)
                if key is not None:
                    timed(p.backend, [(block, root, key)])
                return remove(block)

            def evicted_many(blocks, cache=cache, p=p, timed=timed, remove_many=cache.remove_many):
                # (an eviction's blocks leave the cache together: `PrefixCache.remove_many`)
                got = [(int(b), root, cache.block_key.get(int(b))) for b in blocks]
                got = [g for g in got if g[2] is not None]
                if got:
                    timed(p.backend, got)
                return remove_many(blocks)

            cache.remove, cache.remove_many = evicted, evicted_many
    rng = np.random.default_rng(seed)
    docs = 48
    weights = 1 / np.arange(1, docs + 1) ** 1.1
    weights /= weights.sum()
    remote = computed = 0
    for i in range(400):
        d = int(rng.choice(docs, p=weights))
        prompt = [d * 1000 + t for t in range(6 * 16)] + list(range(10**7 + i * 64, 10**7 + i * 64 + 2 * 16))
        p = hosts[int(rng.integers(2))]
        [a] = p.allocate([prompt], salt=salt)
        remote += a.num_remote_tokens
        computed += len(a.slots)
        p.commit(a.seq_id)
        p.free(a.seq_id)
    for p in hosts:
        p.remote.flush(60)
    st = [p.remote_stats() for p in hosts]
    out = dict(policy=policy, pool_blocks=blocks, requests=400, remote_tokens=remote, computed_tokens=computed,
               written_blocks=sum(s.written_blocks for s in st), written_mib=sum(s.written_bytes for s in st) / 2**20,
               offer_ms=offer_time[0] * 1e3)
    for p in hosts:
        p.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a store to use instead of a redis-server started here")
    ap.add_argument("--block-kib", default="2048,64",
                    help="block sizes to restore, KiB, multiples of 64 (a 64 KiB layer: 8 kv heads x 16 x 128 bf16)")
    ap.add_argument("--total-mib", type=int, default=TOTAL >> 20, help="bytes restored per allocate (MiB)")
    ap.add_argument("--connections", type=int, default=CONNECTIONS, help="connections one lookup fetches over")
    ap.add_argument("--chunk-mib", type=float, default=CHUNK_BYTES / 2**20, help="about the MiB of one chunk of reads (rounded to whole values)")
    ap.add_argument("--io-threads", type=int, default=1, help="the started redis-server's io-threads")
    ap.add_argument("--redis-arg", action="append", default=[], metavar="ARG",
                    help="more arguments for the started redis-server (repeat: --redis-arg=--io-threads-do-reads "
                         "--redis-arg=yes)")
    ap.add_argument("--restore-only", action="store_true", help="skip the write-policy workload")
    ap.add_argument("--tflops", type=float, default=400.0, help="assumed device rate for recomputing (TFLOP/s)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kibs = [int(k) for k in args.block_kib.split(",")]
    if any(k <= 0 or k % 64 for k in kibs):
        ap.error(f"--block-kib takes multiples of 64, got {args.block_kib}")
    extra = ["--io-threads", str(args.io_threads), *args.redis_arg]

    def run(url: str, port: int | None) -> dict:
        load = os.getloadavg()
        rows = [restore_case(url, port, kib // 64, args) for kib in kibs]
        policies = [] if args.restore_only else [
            policy_case(url, p, blocks, seed) for seed, blocks in enumerate((96, 320)) for p in ("commit", "evict")]
        return dict(date=datetime.date.today().isoformat(), tflops=args.tflops, cpus=os.cpu_count(),
                    load_before=load, load_after=os.getloadavg(), machine=platform.machine(),
                    python=platform.python_version(), redis=redis_version() if not args.url else args.url,
                    redis_args=extra if not args.url else [], connections=args.connections,
                    chunk_mib=args.chunk_mib, restore=rows, policy=policies)

    if args.url:
        from kvpager.remote_store import open_store

        store = open_store(args.url, 2.0)
        try:
            store.ping()
        except Exception as e:  # noqa: BLE001 - whatever the store says: it is not there to measure
            ap.error(f"--url {args.url}: the store does not answer ({type(e).__name__}: {e})")
        finally:
            store.close()
        result = run(args.url, None)
    else:
        with local_redis(extra) as port:
            result = run(f"redis://127.0.0.1:{port}", port)
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['date']}; {result['cpus']} CPUs ({result['machine']}), load average "
          f"{result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after; Python {result['python']}")
    print(f"store: {result['redis']} {' '.join(result['redis_args'])}; lookups over {args.connections} "
          f"connections, {args.chunk_mib:g} MiB per chunk; CPU backend; recompute at an assumed {args.tflops:g} TFLOP/s")
    print("| block | blocks | restore ms | restore GB/s | tier fetch GB/s | chunked reads, no checks GB/s | "
          "redis-py one MGET GB/s | "
          "bare socket one MGET GB/s | host swap-in GB/s | recompute GFLOP/token | recompute ms | recompute GB/s | "
          "commit copy GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["restore"]:
        print(f"| {r['block_kib']} KiB ({r['layers']} layers) | {r['blocks']} | {r['restore_ms']:.0f} | "
              f"{r['restore_gbs']:.2f} | {r['fetch_gbs']:.2f} | {r['chunked_gbs']:.2f} | {r['redis_py_gbs']:.2f} | {r['raw_gbs']:.2f} | "
              f"{r['swap_in_gbs']:.2f} | {r['gflop_per_token']:.2f} | {r['recompute_ms']:.0f} | "
              f"{r['recompute_gbs']:.2f} | {r['offer_gbs']:.2f} |")
    if not result["policy"]:
        return
    print()
    print("| write policy | blocks per pool | requests | tokens from the store | tokens computed | blocks written | "
          "MiB written | loop ms copying |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["policy"]:
        print(f"| {r['policy']} | {r['pool_blocks']} | {r['requests']} | {r['remote_tokens']} | {r['computed_tokens']} | "
              f"{r['written_blocks']} | {r['written_mib']:.1f} | {r['offer_ms']:.1f} |")


if __name__ == "__main__":
    main()
