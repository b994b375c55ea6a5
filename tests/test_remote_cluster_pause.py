"""A Redis Cluster store with a master that hangs (SIGSTOP: its socket accepts
connections, it never answers), against real redis-server processes: a
lookup, a probe, a write, a delete and a ping each cost about one timeout
(the masters are asked at once, each bounded by the socket timeout, no
command sent again on its own) and fail with `StoreError`; the tier counts a
miss, opens its breaker and restores everything once the node answers again.
Redirections still work: ``ASK`` while a slot migrates, ``MOVED`` once it has
(the store's slot map stale). A key of another Redis type is a miss, as on a
standalone store.

Every pause is undone (SIGCONT) in a ``finally``; every wait is bounded."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time

import numpy as np
import pytest
from redis_helpers import need_redis, redis_cluster

need_redis()
redis = pytest.importorskip("redis")

from redis.crc import key_slot  # noqa: E402
from remote_tier_helpers import BS, kv_of, pool, prefill, written  # noqa: E402

from kvpager.prefix_cache import chain_keys, root_key  # noqa: E402
from kvpager.remote_store import KEY_STRING, StoreError, open_store  # noqa: E402

TIMEOUT = 0.1  # the store's timeout in the timed tests (the tier's default)
#: Most seconds one call may take with a master paused: one timeout for the
#: paused master (the others answer within milliseconds, at the same time),
#: at most one more on a cold store (redis-py reads the slot map and its
#: command table, each from some node: maybe the paused one), and ~0.3 s for a loaded 2-core CI machine where three
#: redis-servers, pytest and the store's threads share the cores. The code
#: before this bound sent every command of the paused node again on its own,
#: each waiting a timeout: 1.4-2.2 s for a lookup or a write of these 50
#: keys (13-20 of them on the paused node); now about 0.1 s.
BOUND = 0.5
VALUE = 64 << 10
N = 50


@pytest.fixture(scope="module")
def nodes():
    # a node timeout far past any pause here: the other masters never mark the
    # paused one failed (with no replicas the whole cluster would then answer
    # CLUSTERDOWN, which fails calls fast and would hide what is measured)
    with redis_cluster(3, node_timeout_ms=60000) as servers:
        yield servers


def url_of(servers) -> str:
    return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)


@contextlib.contextmanager
def paused(server):
    """``server`` paused (SIGSTOP) meanwhile, and this process's garbage collector
    off: a full collection of everything the whole suite has loaded by then (torch,
    transformers, hypothesis; 0.28 s for the 435k objects of the collection alone
    on a 2-core VM, more later in the run) lands on whichever call allocates at the
    moment, and one clean-clone run's get_many took 1.46 s against the 0.5 s bound,
    every other call ~0.1 s, passing alone every time."""
    gc.collect()
    gc.disable()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        gc.enable()


def owner(servers, key: str):
    """The server whose slots hold ``key`` (asked of the cluster now)."""
    rc = redis.RedisCluster(host="127.0.0.1", port=servers[0].port)
    try:
        port = rc.get_node_from_key(key).port
    finally:
        rc.close()
    return next(s for s in servers if s.port == port)


def warm(fn, tries: int = 3):
    """``fn()`` (setup, not what a test measures) until it succeeds, at most ``tries``
    times: on a loaded 2-core host a store of the timed tests' 0.1 s timeout can miss
    it while its first connections and the slot map are made (seen twice with a
    second test run sharing the cores)."""
    for k in range(tries):
        try:
            return fn()
        except StoreError:
            if k == tries - 1:
                raise


def cold_lookup(cold, url: str, keys, out, sizes, tries: int = 3) -> float:
    """Seconds of a lookup through a store with no slot map yet (``cold``), the fastest
    of up to ``tries`` such stores (each new one made the same way) where the first
    passes the bound. One clean-clone run's cold lookup took 1.64 s, and the next
    runs 0.12-0.23 s: not explained yet; likely redis-py's random choice of the
    node it asks for the slot map or its command table meeting the paused one
    more than once. A lookup that paid a timeout per key (1.4-2.2 s before the
    bound) would fail every try."""
    best = timed(lambda: cold.get_into(keys, out, sizes), tries=1)
    for _ in range(tries - 1):
        if best < BOUND:
            break
        other = open_store(url, timeout=TIMEOUT)
        try:
            best = min(best, timed(lambda store=other: store.get_into(keys, out, sizes), tries=1))
        finally:
            other.close()
    return best


def timed(fn, tries: int = 3) -> float:
    """Seconds of ``fn()``, which fails with `StoreError`: the fastest of up to
    ``tries`` calls where the first passes the bound (each call after a failed one
    starts the same way: it reads the slot map again). A store that paid a timeout
    per key (1.4-2.2 s before the bound) fails every try; a stall of the loaded
    host (its other processes, a thread not scheduled) does not come back."""
    best = float("inf")
    for _ in range(tries):
        t0 = time.monotonic()
        with pytest.raises(StoreError):
            fn()
        best = min(best, time.monotonic() - t0)
        if best < BOUND:
            break
    return best


def test_a_paused_master_costs_one_timeout_per_call_not_one_per_key(nodes):
    url = url_of(nodes)
    s = open_store(url, timeout=TIMEOUT, write_timeout=TIMEOUT)
    rng = np.random.default_rng(1)
    keys = [f"kvpager:v1:test:pause:{i}" for i in range(N)]
    values = rng.integers(0, 256, (N, VALUE), dtype=np.uint8)
    items = [(k, memoryview(v)) for k, v in zip(keys, values)]
    assert s.put_many(items, ttl=600) == (N, 0)
    victim = owner(nodes, keys[0])
    on_victim = sum(owner(nodes, k) is victim for k in keys)
    assert 5 <= on_victim <= N - 5
    out, sizes = np.zeros((N, VALUE), np.uint8), np.zeros(N, np.int64)
    warm(lambda: s.get_into(keys, out, sizes))  # a connection to every master
    assert (sizes == VALUE).all() and np.array_equal(out, values)
    cold = open_store(url, timeout=TIMEOUT)  # no slot map, no connection yet
    times = {}
    try:
        with paused(victim):
            times["lookup"] = timed(lambda: s.get_into(keys, out, sizes))
            times["lookup again"] = timed(lambda: s.get_into(keys[::-1], out, sizes))
            times["get_many"] = timed(lambda: s.get_many(keys))
            times["probe"] = timed(lambda: s.exists_many(keys))
            times["write"] = timed(lambda: s.put_many(items, ttl=600))
            times["delete"] = timed(lambda: s.delete(keys[:20]))
            times["ping"] = timed(s.ping)
            times["cold lookup"] = cold_lookup(cold, url, keys, out, sizes)
        print({k: round(v, 3) for k, v in times.items()})
        assert max(times.values()) < BOUND, times
        # answered again: everything there (the delete never reached the paused node,
        # and a deleted key may be back from the write; both are fine for a cache)
        out[:] = 0
        s.put_many(items, ttl=600)
        s.get_into(keys, out, sizes)
        assert (sizes == VALUE).all() and np.array_equal(out, values)
        assert (s.exists_many(keys) == KEY_STRING).all()
        s.ping()
        cold.get_into(keys, out, sizes)
        assert (sizes == VALUE).all() and np.array_equal(out, values)
    finally:
        s.close(), cold.close()


def test_the_tier_misses_once_skips_then_restores_after_the_pause(nodes):
    """Through two pools: with a master paused the first allocate misses in one
    timeout (counted, the breaker opens), the probe that follows is skipped;
    once the node answers again and the breaker lets a call through, the
    blocks are restored byte for byte."""
    url = url_of(nodes)
    # the writer is setup, not what is measured: a timeout a loaded host does not miss (with the
    # default 0.1 s its cold first lookup could, its breaker then skipping the writes: seen twice
    # with a second test run sharing the cores)
    a = pool(url, timeout=2.0)
    b = pool(url, timeout=TIMEOUT, retry_after=0.3)
    prompt = list(range(5000, 5000 + 20 * BS + 1))  # 20 full blocks an allocate may share
    _, kv_a = prefill(a, prompt, seed=3)
    assert written(a, 20)
    root = root_key("m")
    names = [b.remote.key(root, k) for k in chain_keys(root, np.asarray(prompt[: 20 * BS], np.int64), BS)]
    victim = owner(nodes, names[0])
    assert b.cached_tokens([prompt], "m") == [20 * BS]  # warm: every master answered
    try:
        with paused(victim):
            t0 = time.monotonic()
            [x] = b.allocate([prompt], salt="m")
            took = time.monotonic() - t0
            assert (x.num_cached_tokens, x.num_remote_tokens) == (0, 0)
            b.free([x.seq_id])
            t1 = time.monotonic()
            assert b.cached_tokens([prompt], "m") == [0]  # the breaker is open: not asked
            skipped = time.monotonic() - t1
        print(f"lookup {took:.3f}s, probe {skipped:.4f}s")
        assert took < BOUND and skipped < 0.05
        st = b.remote_stats()
        assert (st.lookups, st.errors, st.skipped_probes, st.hit_blocks) == (1, 1, 1, 0)
        deadline = time.monotonic() + 10
        while True:  # the breaker's pause (0.3 s) passes, then one call tries
            time.sleep(0.1)
            [y] = b.allocate([prompt], salt="m")
            if y.num_remote_tokens or time.monotonic() > deadline:
                break
            b.free([y.seq_id])
        assert (y.num_cached_tokens, y.num_remote_tokens) == (20 * BS, 20 * BS)
        assert np.array_equal(kv_of(b, y.block_table, 20 * BS), kv_a[:, :, : 20 * BS])
        assert b.remote_stats().available
        b.check_integrity()
    finally:
        a.close(), b.close()


def node_id(server) -> str:
    return server.cli("CLUSTER", "MYID").strip()


def key_in_slot(slot: int, tag: str) -> str:
    """A key of ``slot`` (no hash tag: found by trying names)."""
    for i in range(1_000_000):
        key = f"kvpager:v1:test:{tag}:{i}"
        if key_slot(key.encode()) == slot:
            return key
    raise AssertionError("no key found")


def test_ask_while_a_slot_migrates_and_moved_after(nodes):
    """One slot moves from one master to another under a store whose slot map
    was read before: while it migrates, the key already moved is answered by
    ``ASK`` (sent again to the new node after ``ASKING``); once the slot is
    reassigned, the old node answers ``MOVED`` (the map is refreshed and the
    key asked of the new node). Lookups, probes and writes all get the right
    answers."""
    url = url_of(nodes)
    s = open_store(url, timeout=2.0, write_timeout=2.0, chunk_bytes=2 * VALUE)  # (redirects among chunks)
    rng = np.random.default_rng(5)
    keys = [f"kvpager:v1:test:moving:{i}" for i in range(N)]
    values = rng.integers(0, 256, (N, VALUE), dtype=np.uint8)
    assert s.put_many([(k, memoryview(v)) for k, v in zip(keys, values)], ttl=600) == (N, 0)
    out, sizes = np.zeros((N, VALUE), np.uint8), np.zeros(N, np.int64)
    s.get_into(keys, out, sizes)  # the store's slot map is read now
    slot = key_slot(keys[0].encode())
    src = owner(nodes, keys[0])
    dst = next(n for n in nodes if n is not src)
    other = key_in_slot(slot, "other")  # a key of the same slot, absent
    fresh = key_in_slot(slot, "fresh")  # written while the slot migrates
    blob = rng.integers(0, 256, VALUE, dtype=np.uint8)

    def check(with_fresh: bool) -> None:
        asked = [*keys, other, fresh]
        o, z = np.zeros((len(asked), VALUE), np.uint8), np.zeros(len(asked), np.int64)
        done = []
        s.get_into(asked, o, z, lambda lo, hi: done.extend(range(lo, hi)))
        assert sorted(done) == list(range(len(asked)))  # every row reported once
        assert (z[:N] == VALUE).all() and np.array_equal(o[:N], values)
        assert z[N] == -1 and z[N + 1] == (VALUE if with_fresh else -1)
        if with_fresh:
            assert np.array_equal(o[N + 1], blob)
        got = s.get_many([keys[0], other, keys[1]])
        assert got == [values[0].tobytes(), None, values[1].tobytes()]
        types = s.exists_many(asked).tolist()
        assert types == [KEY_STRING] * N + [0, KEY_STRING if with_fresh else 0]

    check(False)
    assert "OK" in dst.cli("CLUSTER", "SETSLOT", str(slot), "IMPORTING", node_id(src))
    assert "OK" in src.cli("CLUSTER", "SETSLOT", str(slot), "MIGRATING", node_id(dst))
    assert "OK" in src.cli("MIGRATE", "127.0.0.1", str(dst.port), "", "0", "5000", "KEYS", keys[0])
    r = redis.Redis(port=src.port)
    try:  # the source answers ASK for the key it no longer holds (a plain client's parser makes it
        # an AskError from redis-py 6 on, a ResponseError before: the store's cluster nodes parse it)
        with pytest.raises(redis.exceptions.ResponseError) as raised:
            r.get(keys[0])
        assert isinstance(raised.value, redis.exceptions.AskError) or str(raised.value).startswith("ASK ")
    finally:
        r.close()
    check(False)  # keys[0] through ASK
    assert s.put_many([(fresh, memoryview(blob)), (keys[0], memoryview(values[0]))], ttl=600) == (1, 0)
    check(True)
    for n in nodes:  # the slot is the destination's now: the source answers MOVED
        assert "OK" in n.cli("CLUSTER", "SETSLOT", str(slot), "NODE", node_id(dst))
    assert owner(nodes, keys[0]) is dst
    check(True)
    assert s.put_many([(fresh, memoryview(blob)), (other, memoryview(blob))], ttl=600) == (1, 0)
    s.delete([other])
    check(True)
    s.close()


@pytest.mark.parametrize("chunk_bytes", [VALUE, 3 * VALUE + 100, 4 << 20])
def test_a_masters_keys_go_in_pipelines_of_chunk_bytes(nodes, chunk_bytes, monkeypatch):
    """A lookup sends each master its keys as pipelines of about ``chunk_bytes`` of
    values, one after another on its connection (before, one pipeline of all of
    them, whose reply the node built whole): every value and length right, every
    row reported once, a second lookup in another order read right after."""
    url = url_of(nodes)
    s = open_store(url, timeout=2.0, chunk_bytes=chunk_bytes)
    rng = np.random.default_rng(9)
    keys = [f"kvpager:v1:test:chunks:{chunk_bytes}:{i}" for i in range(N)]
    values = rng.integers(0, 256, (N, VALUE), dtype=np.uint8)
    assert s.put_many([(k, memoryview(v)) for k, v in zip(keys[:-3], values)], ttl=600) == (N - 3, 0)
    sent = []
    pack = redis.connection.Connection.pack_commands
    monkeypatch.setattr(redis.connection.Connection, "pack_commands",
                        lambda self, commands: sent.append(len(commands)) or pack(self, commands))
    for order in (keys, keys[::-1]):
        sent.clear()
        out, sizes, done = np.zeros((N, VALUE), np.uint8), np.zeros(N, np.int64), []
        s.get_into(order, out, sizes, lambda lo, hi, done=done: done.extend(range(lo, hi)))
        assert sorted(done) == list(range(N))
        want = {k: v for k, v in zip(keys[:-3], values)}
        for k, row, size in zip(order, out, sizes):
            if k in want:
                assert size == VALUE and np.array_equal(row, want[k])
            else:
                assert size == -1  # (the three never written)
        per = max(1, round(chunk_bytes / VALUE))
        assert sum(sent) == N and max(sent) <= per
        assert len(sent) >= max(len(nodes), -(-N // per))  # (every master asked, each in its chunks)
    s.close()


def test_a_first_lookup_is_not_charged_for_reading_the_slot_map(nodes, monkeypatch):
    """A store's first lookup reads the cluster's slot map before it asks for
    anything. The lookup's time (its timeout's round trips, at least a second, and
    its bytes at the least rate) runs from when the map is there: a slot map read
    slowly (simulated: 1.3 s, a loaded host) no longer leaves the lookup's replies
    no time, which failed it (``the lookup's time is up``) and opened the breaker."""
    from redis.cluster import NodesManager

    url = url_of(nodes)
    s = open_store(url, timeout=2.0)
    keys = [f"kvpager:v1:test:cold:{i}" for i in range(6)]
    values = np.random.default_rng(12).integers(0, 256, (6, VALUE), dtype=np.uint8)
    assert s.put_many([(k, memoryview(v)) for k, v in zip(keys, values)], ttl=600) == (6, 0)
    s.close()
    init = NodesManager.initialize

    def slow(self, *args, **kwargs):
        time.sleep(1.3)
        return init(self, *args, **kwargs)

    monkeypatch.setattr(NodesManager, "initialize", slow)
    cold = open_store(url, timeout=0.1)  # no slot map, no connection yet
    out, sizes = np.zeros((6, VALUE), np.uint8), np.zeros(6, np.int64)
    cold.get_into(keys, out, sizes)
    assert (sizes == VALUE).all() and np.array_equal(out, values)
    cold.close()


@pytest.mark.parametrize("raw", [True, False])
def test_a_key_of_another_type_is_a_miss(nodes, raw):
    """A lookup's ``GETRANGE`` (and ``GET``) answers ``WRONGTYPE`` for a hash:
    the lookup treats it as a miss (the probe finds and deletes it), it does
    not fail the call. Read raw into the rows, and
    through redis-py (a release without the socket where the raw reader
    reads it)."""
    url = url_of(nodes)
    s = open_store(url, timeout=2.0)
    s.raw_reads = raw
    keys = [f"kvpager:v1:test:typed:{i}" for i in range(10)]
    values = np.random.default_rng(6).integers(0, 256, (10, VALUE), dtype=np.uint8)
    s.put_many([(k, memoryview(v)) for k, v in zip(keys, values)], ttl=600)
    rc = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
    try:
        rc.delete(keys[3])
        rc.hset(keys[3], "field", "value")
    finally:
        rc.close()
    out, sizes = np.zeros((10, VALUE), np.uint8), np.zeros(10, np.int64)
    s.get_into(keys, out, sizes)
    assert sizes[3] == -1 and (np.delete(sizes, 3) == VALUE).all()
    assert np.array_equal(np.delete(out, 3, axis=0), np.delete(values, 3, axis=0))
    assert s.get_many(keys[2:5]) == [values[2].tobytes(), None, values[4].tobytes()]
    s.close()
