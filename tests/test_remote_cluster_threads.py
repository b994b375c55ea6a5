"""Embedded pools sharing one Redis Cluster tier, each driven by a thread of
its own (docs/remote.md: "One tier, several pools"), against a real 3-master
cluster: allocate / commit / free loops over prompts the threads share and
prompts of their own, every cached token's K and V (computed from the prompt
alone, so whoever wrote a block, its values are known) checked byte for byte.

The store's reader side (one cluster client, its thread pool, the nodes that
failed, the "read the slot map again" mark) is shared by every calling
thread. Made lazily without a lock, the first lookups of three threads each
made a cluster client and a thread pool (four of each with the writer's, not
two): the tier kept one, the others stayed connected to every master after the
tier closed, until a garbage collection. Reading the slot map again (after a
failure, a ``MOVED``) iterated and cleared the failed nodes while other
threads added to them; it now runs on one thread at a time, the others'
calls unhindered: with redis-py 5, whose refresh disconnected the connections
in use of the nodes it asked, another thread's lookup failed on a master
that answered.

Windows are widened by a sleep in the lazily called constructors (as the
other threaded tests do); every wait is bounded; a paused master is resumed
in a ``finally``."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from daemon_helpers import wait_until
from redis_helpers import need_redis, redis_cluster

need_redis()
redis = pytest.importorskip("redis")

import kvpager.remote_cluster_calls as calls  # noqa: E402
from kvpager import KVPool, OutOfBlocks, PoolSpec  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=12, block_size=16, dtype="float32")
BS = SPEC.block_size
WAIT = 20.0
THREADS = 3
WIDEN = 0.05  # seconds of sleep in the lazily called constructors


@pytest.fixture(scope="module")
def nodes():
    # a node timeout far past any pause here: no master is marked failed (with no
    # replicas the cluster would answer CLUSTERDOWN)
    with redis_cluster(3, node_timeout_ms=60000) as servers:
        yield servers


@pytest.fixture
def counted(monkeypatch):
    """How many cluster clients and thread pools the store makes, each constructor
    made slow (a wider window for two threads to both find none yet)."""
    made = {"clients": 0, "pools": 0}
    init = redis.cluster.RedisCluster.__init__

    def client(self, *args, **kwargs):
        time.sleep(WIDEN)
        init(self, *args, **kwargs)
        made["clients"] += 1

    class Pool(calls.ThreadPoolExecutor):
        def __init__(self, *args, **kwargs):
            time.sleep(WIDEN)
            super().__init__(*args, **kwargs)
            made["pools"] += 1

    monkeypatch.setattr(redis.cluster.RedisCluster, "__init__", client)
    monkeypatch.setattr(calls, "ThreadPoolExecutor", Pool)
    return made


def url_of(servers) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


def expected_k(tokens: list[int]) -> np.ndarray:
    """K of each position as a function of the tokens up to it (V is -K)."""
    out, h = np.empty(len(tokens), np.float32), 17
    for i, t in enumerate(tokens):
        h = (h * 1_000_003 + t + 1) % 16_777_213
        out[i] = h
    return out


def prompts_of(k: int) -> list[list[int]]:
    """Thread ``k``'s prompts: shared prefixes (every thread's) with suffixes of its own
    or shared ones, and prompts no other thread has."""
    rng = np.random.default_rng(7)  # the same shared parts in every thread
    prefixes = [rng.integers(0, 5000, int(rng.integers(2, 5)) * BS).tolist() for _ in range(6)]
    tails = [rng.integers(0, 5000, BS).tolist() for _ in range(3)]
    own = np.random.default_rng(100 + k)
    out = [p + t for p in prefixes for t in tails]
    out += [p + own.integers(0, 5000, int(own.integers(1, 2 * BS))).tolist() for p in prefixes]
    out += [own.integers(5000 + 10_000 * k, 15_000 + 10_000 * k, int(own.integers(2, 5)) * BS + 3).tolist()
            for _ in range(6)]
    return out


class Driver:
    """One pool's thread: allocate, check every cached token's K/V, write the rest,
    commit, free; what it saw."""

    def __init__(self, pool: KVPool, k: int, barrier: threading.Barrier):
        self.pool, self.k, self.barrier = pool, k, barrier
        self.prompts = prompts_of(k)
        self.rng = np.random.default_rng(k)
        self.remote = self.steps = self.full = 0
        self.wrong: list[str] = []
        self.crashed: BaseException | None = None
        self.stop = threading.Event()

    def step(self) -> None:
        p = self.pool
        prompt = self.prompts[int(self.rng.integers(len(self.prompts)))]
        if self.rng.random() < 0.2:
            p.cached_tokens([prompt], salt="m")  # a probe (TYPE) on this thread too
        try:
            [a] = p.allocate([prompt], salt="m")
        except OutOfBlocks:
            self.full += 1
            return
        self.remote += a.num_remote_tokens // BS
        want = expected_k(prompt)
        kv = p.backend.device_array()  # [blocks, layers, 2, heads, bs, dim]
        cached = np.arange(a.num_cached_tokens)
        blocks = np.asarray(a.block_table, dtype=np.int64)[cached // BS]
        got = kv[blocks, :, :, :, cached % BS, :]  # [tokens, layers, 2, heads, dim]
        exp = np.stack([want, -want], axis=1)[: a.num_cached_tokens, None, :, None, None]
        if not np.array_equal(got, np.broadcast_to(exp, got.shape)):
            self.wrong.append(f"{a.num_cached_tokens} cached, {a.num_remote_tokens} from the store")
        vals = want[a.num_cached_tokens :, None, None]
        shape = (len(a.slots), SPEC.num_kv_heads, SPEC.head_dim)
        for layer in range(SPEC.num_layers):
            p.write(layer, a.slots, np.broadcast_to(vals, shape), np.broadcast_to(-vals, shape))
        p.commit(a.seq_id)
        p.free(a.seq_id)
        self.steps += 1

    def run(self, deadline: float) -> None:
        try:
            self.barrier.wait(WAIT)
            while time.monotonic() < deadline and not self.stop.is_set():
                self.step()
        except BaseException as e:  # reported by the test
            self.crashed = e


def run_threads(pools: list[KVPool], seconds: float, during=None) -> list[Driver]:
    """Each pool driven by a thread of its own for ``seconds``, or (``during`` given)
    until ``seconds`` after ``during()`` returns."""
    barrier = threading.Barrier(len(pools))
    drivers = [Driver(p, k, barrier) for k, p in enumerate(pools)]
    deadline = time.monotonic() + 120.0  # (a bound: each stops once told)
    threads = [threading.Thread(target=d.run, args=(deadline,)) for d in drivers]
    for t in threads:
        t.start()
    try:
        if during is not None:
            during()
        time.sleep(seconds)
    finally:
        for d in drivers:
            d.stop.set()
        for t in threads:
            t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    for d in drivers:
        assert d.crashed is None, repr(d.crashed)
        assert not d.wrong, (d.k, d.wrong[:3])
    return drivers


def tier_clients(servers) -> int:
    """Connections named by the tier (``CLIENT SETNAME kvpager``) on every master."""
    return sum(s.cli("CLIENT", "LIST").count("name=kvpager ") for s in servers)


def unexpected(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def close_and_check(pools: list[KVPool], nodes, before: set[int]) -> None:
    for p in pools:
        p.check_integrity()
        assert p.stats().used_blocks == 0
        p.close()  # the tier closes with the last
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not left, left  # no fetch thread of a pool the tier lost track of, no writer
    assert tier_clients(nodes) == 0  # no connection of a cluster client the tier lost track of


def test_pools_sharing_a_cluster_tier_restore_their_own_values_from_three_threads(nodes, counted, caplog):
    caplog.set_level(logging.WARNING, logger="kvpager.remote")
    gc.disable()  # a client the tier lost track of stays connected until a collection: none here
    try:
        before = {t.ident for t in threading.enumerate()}
        tier = RemoteTier(url_of(nodes), timeout=2.0, retry_after=0.05)
        pools = [KVPool(SPEC, remote=tier) for _ in range(THREADS)]
        drivers = run_threads(pools, 4.0)
        assert tier.flush(WAIT)
        st = tier.stats()
        print({d.k: (d.steps, d.remote, d.full) for d in drivers}, st)
        # a client and a thread pool for the lookups, a client and a thread pool for the writer
        assert counted == {"clients": 2, "pools": 2}
        assert all(d.steps > 20 for d in drivers) and sum(d.remote for d in drivers) > 30
        assert st.restored_blocks == sum(d.remote for d in drivers)
        assert st.hit_blocks >= st.restored_blocks and st.written_blocks > 0
        assert st.errors == 0 and st.corrupt_blocks == 0  # no good value refused, none deleted
        assert not unexpected(caplog)
        close_and_check(pools, nodes, before)
    finally:
        gc.enable()


@contextlib.contextmanager
def paused(server):
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def node_id(server) -> str:
    return server.cli("CLUSTER", "MYID").strip()


def test_a_paused_master_and_moved_slots_mid_run(nodes, counted, caplog):
    """Mid-run a master is paused (SIGSTOP: the threads' calls time out, each side
    reads the slot map again, asking the failed node last) and resumed, then slots
    move between masters (``ASK`` while they migrate, ``MOVED`` after: the threads
    read the slot map again at once). Calls may fail meanwhile (counted, a miss),
    but no value is wrong, none refused, nothing unexpected raised, and restores
    go on after."""
    caplog.set_level(logging.WARNING, logger="kvpager.remote")
    before = {t.ident for t in threading.enumerate()}
    tier = RemoteTier(url_of(nodes), timeout=0.3, retry_after=0.05)
    pools = [KVPool(SPEC, remote=tier) for _ in range(THREADS)]
    src, dst = nodes[1], nodes[2]
    marks = {}

    def restored_past(mark: str) -> None:  # (the breaker's next try after the failures: up to a second or
        # two on a loaded host, so a fixed pause saw none and failed the check)
        wait_until(lambda: tier.stats().restored_blocks > marks[mark], 20)

    def during() -> None:
        time.sleep(1.0)
        with paused(nodes[0]):
            time.sleep(1.0)
        marks["resumed"] = tier.stats().restored_blocks
        restored_past("resumed")
        out = subprocess.run(["redis-cli", "--cluster", "reshard", f"127.0.0.1:{src.port}",
                              "--cluster-from", node_id(src), "--cluster-to", node_id(dst),
                              "--cluster-slots", "400", "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        marks["moved"] = tier.stats().restored_blocks
        restored_past("moved")

    drivers = run_threads(pools, 1.5, during)
    assert tier.flush(WAIT)
    st = tier.stats()
    print({d.k: (d.steps, d.remote, d.full) for d in drivers}, st, marks)
    assert st.errors > 0  # the pause was seen
    assert st.restored_blocks == sum(d.remote for d in drivers)
    assert st.restored_blocks > marks["moved"] > marks["resumed"]  # restores went on after each
    assert st.corrupt_blocks == 0
    assert not unexpected(caplog), unexpected(caplog)[:3]
    assert counted == {"clients": 2, "pools": 2}
    close_and_check(pools, nodes, before)


def test_a_slot_map_read_on_one_thread_leaves_another_threads_lookup_whole(nodes, monkeypatch):
    """A thread reads the slot map again (after a failed call) while another
    thread's lookup waits for its replies: the nodes asked for the map get
    clients of their own. redis-py 5 disconnects every connection of each node
    it asks, those in use too, and those nodes' clients were the ones the
    lookups use: the other thread's lookup failed ("Bad file descriptor") on
    masters that answered, and the tier opened its breaker."""
    from kvpager.remote_cluster import RedisClusterStore
    from kvpager.remote_store import open_store

    s = open_store(url_of(nodes), timeout=2.0, write_timeout=2.0)
    rng = np.random.default_rng(3)
    n, width = 30, 4096
    keys = [f"kvpager:v1:test:threads:{i}" for i in range(n)]
    values = rng.integers(0, 256, (n, width), dtype=np.uint8)
    assert s.put_many([(k, memoryview(v)) for k, v in zip(keys, values)], ttl=600) == (n, 0)
    out, sizes = np.zeros((n, width), np.uint8), np.zeros(n, np.int64)
    s.get_into(keys, out, sizes)  # the slot map read, a connection to every master
    masters = len({s._sides[0].rc.get_node_from_key(k).name for k in keys})
    assert masters == 3
    read = RedisClusterStore._read_gets
    held, go, lock = [], threading.Event(), threading.Lock()

    def hold(self, *args, **kwargs):  # the first lookup's masters: their requests sent, replies not read yet
        with lock:
            first = len(held) < masters
            if first:
                held.append(1)
        if first:
            assert go.wait(WAIT)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(RedisClusterStore, "_read_gets", hold)
    errors = []

    def lookup() -> None:
        try:
            s.get_into(keys, out, sizes)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=lookup)
    t.start()
    try:
        deadline = time.monotonic() + WAIT
        while len(held) < masters and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(held) == masters
        s._sides[0].failure()  # as a failed call leaves it: the next call reads the slot map first
        o, z = np.zeros_like(out), np.zeros_like(sizes)
        s.get_into(keys, o, z)
        assert s._sides[0].maps == 2 and (z == width).all() and np.array_equal(o, values)
    finally:
        go.set()
        t.join(WAIT)
    assert not t.is_alive()
    assert not errors, errors
    assert (sizes == width).all() and np.array_equal(out, values)
    s.close()
