"""The remote tier's bounds, against real redis-server processes and plain TCP
listeners (nothing mocked):
- a store too slow to take writes (its writer times out) no longer pauses the
  lookups: reads and writes each have a breaker of their own, so restores that
  work go on (before, one writer timeout skipped every lookup and probe for the
  breaker's pause, and ``available`` said the store was gone);
- a Redis Cluster node that accepts connections and then never finishes a
  reply costs a call a bounded wait, as a standalone store's handshake does
  (before, a cluster node's handshake was bounded per read only: a reply sent
  a byte at a time held the caller, the daemon's loop, for ever);
- the tier's counters, updated from several threads (pools sharing a tier, the
  writer), lose no update and are read as one snapshot;
- a cluster node given as a standalone store is named whichever redis-py
  parses its replies (redis-py 5 gives ``CROSSSLOT`` as a plain error).

Every server is stopped by the test that started it; every wait is bounded."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from redis_helpers import listener, need_redis, redis_cluster, redis_server

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import BS, SPEC, bounded, kv_of, pool, prefill, written  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.remote_store import StoreError, StoreMisconfigured, open_store  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

WAIT = 20.0


# -- reads and writes fail apart ----------------------------------------------------------------------
def test_a_write_timeout_does_not_pause_restores():
    """``CLIENT PAUSE ... WRITE`` holds every write (as a store busy persisting, or
    during a failover) while reads are answered: the writer times out, its blocks
    are dropped and the writes pause; the lookups and probes that follow still
    restore from the store, byte for byte."""
    with redis_server() as store:
        a = pool(store.url)
        prompt = list(range(1000, 1000 + 4 * BS + 1))
        _, kv_a = prefill(a, prompt, seed=1)
        assert written(a, 4)
        b = KVPool(SPEC, remote=RemoteTier(open_store(store.url, timeout=1.0, write_timeout=0.2), retry_after=10.0))
        try:
            assert "OK" in store.cli("CLIENT", "PAUSE", "5000", "WRITE")
            try:
                seq, _ = prefill(b, list(range(9000, 9000 + 2 * BS + 1)), seed=2)  # b's writer times out
                b.free(seq)
                assert b.remote.flush(WAIT)
                st = b.remote_stats()
                assert st.errors == 1 and st.written_blocks == 0 and st.dropped_blocks == 2, st
                assert st.available  # the lookups are not paused
                assert b.cached_tokens([prompt], "m") == [4 * BS]
                [x] = b.allocate([prompt], salt="m")
                assert (x.num_cached_tokens, x.num_remote_tokens) == (4 * BS, 4 * BS)
                assert np.array_equal(kv_of(b, x.block_table, 4 * BS), kv_a[:, :, : 4 * BS])
                st = b.remote_stats()
                assert (st.skipped_lookups, st.skipped_probes, st.restored_blocks) == (0, 0, 4), st
                # the writes stay paused meanwhile: a commit's blocks are dropped before they are copied
                seq, _ = prefill(b, list(range(20000, 20000 + 2 * BS + 1)), seed=3)
                b.free([seq, x.seq_id])
                assert b.remote.flush(WAIT) and b.remote_stats().dropped_blocks == 4
            finally:
                store.cli("CLIENT", "UNPAUSE")
            b.check_integrity()
        finally:
            a.close(), b.close()


def test_a_store_that_is_down_still_pauses_both():
    """A store that does not answer fails each side once, then both skip it: a
    lookup pays one failed call, the writer one, and nothing after waits."""
    with redis_server() as store:
        b = pool(store.url, retry_after=30)
        store.stop()
        for i in range(5):
            seq, _ = prefill(b, list(range(100 * i, 100 * i + 2 * BS + 1)), seed=i)
            b.free(seq)
            b.remote.flush(WAIT)
        st = b.remote_stats()
        assert (st.lookups, st.skipped_lookups, st.errors, st.available) == (1, 4, 2, False), st
        assert st.dropped_blocks == 10 and st.written_blocks == 0
        b.close()


# -- cluster handshakes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    # a node timeout far past the test: the other masters never mark a dead one failed (with no
    # replicas the cluster would answer CLUSTERDOWN, which fails calls fast and hides the wait)
    with redis_cluster(3, node_timeout_ms=60000) as servers:
        yield servers


@pytest.mark.parametrize("kind", ["silent", "trickle"])
def test_a_cluster_node_that_never_answers_costs_a_bounded_wait(kind):
    """A ``redis+cluster://`` store whose node accepts and never finishes a reply:
    every call fails (`StoreError`) within its bound (the connect's round trips at
    the timeout, and slack for a loaded host; `verify` also tries a plain
    connection at 1 s), each time, and an allocate through the tier misses, counted,
    nothing changed in the pool."""
    with listener(kind) as port:
        s = open_store(f"redis+cluster://127.0.0.1:{port}", timeout=0.1, write_timeout=0.1)
        out, sizes = np.zeros((2, 64), np.uint8), np.zeros(2, np.int64)
        calls = {"ping": s.ping, "probe": lambda: s.exists_many(["kvpager:a", "kvpager:b"]),
                 "lookup": lambda: s.get_into(["kvpager:a", "kvpager:b"], out, sizes),
                 "write": lambda: s.put_many([("kvpager:a", b"x" * 64)], 0), "delete": lambda: s.delete(["kvpager:a"])}
        try:
            for _ in range(2):  # (the second time through a slot map read again after the failure)
                for name, call in calls.items():
                    took, r = bounded(call, 10)
                    assert isinstance(r, StoreError) and took < 2.5, (name, took, r)
            took, r = bounded(lambda: s.verify("kvpager:v2:test:"), 15)
            assert isinstance(r, StoreError) and took < 5, (took, r)
        finally:
            bounded(s.close, 10, must=False)
        p = pool(f"redis+cluster://127.0.0.1:{port}", timeout=0.1, retry_after=30)
        try:
            before = p.blocks()
            took, r = bounded(lambda: p.allocate([list(range(3 * BS + 1))], salt="m"), 10)
            assert not isinstance(r, Exception) and took < 2.5, (took, r)
            assert r[0].num_cached_tokens == 0
            p.free(r[0].seq_id)
            st = p.remote_stats()
            assert st.errors == 1 and not st.available
            assert p.blocks() == before
            p.check_integrity()
        finally:
            took, _ = bounded(p.close, 10, must=False)
        assert took < 5


# -- redis-py 5 -----------------------------------------------------------------------------------------
def test_a_cluster_reply_is_known_whichever_redis_py_parsed_it(cluster):
    """redis-py 6 and later parse ``CROSSSLOT``, ``ASK`` and ``MOVED`` on a plain
    connection as cluster errors; 5.x (which pyproject allows) as plain
    ``ResponseError``s: `Store.verify` named a cluster node given as
    ``redis://`` under redis-py >= 6 only, and under 5.x warned that the store
    "refuses deleting refused values" and served with every call failing."""
    from kvpager.remote_store import cluster_reply

    exc = redis.exceptions
    assert cluster_reply(exc.ResponseError("CROSSSLOT Keys in request don't hash to the same slot"))  # redis-py 5
    assert cluster_reply(exc.ResponseError("MOVED 3999 127.0.0.1:6381"))
    assert cluster_reply(exc.ResponseError("ASK 3999 127.0.0.1:6381"))
    assert cluster_reply(exc.ClusterCrossSlotError("Keys in request don't hash to the same slot"))  # redis-py >= 6
    assert cluster_reply(exc.AskError("3999 127.0.0.1:6381")) and cluster_reply(exc.MovedError("3999 127.0.0.1:6381"))
    assert not cluster_reply(exc.ResponseError("NOPERM this user has no permissions"))
    assert not cluster_reply(exc.ResponseError("ERR unknown command 'ASKING'")) and not cluster_reply(None)
    s = open_store(cluster[0].url, timeout=2.0)
    try:
        with pytest.raises(StoreMisconfigured, match="node of a Redis Cluster.*use redis\\+cluster://"):
            s.verify("kvpager:v2:test:")
    finally:
        s.close()


def test_a_cluster_master_that_turns_into_a_trickle_costs_a_bounded_wait(cluster):
    """A master of a real cluster dies and something on its port accepts and
    answers a byte at a time (the other masters still list it): the store's next
    calls connect to it afresh, each bounded; once the master is back, lookups
    read every value again."""
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in cluster)
    s = open_store(url, timeout=0.2, write_timeout=0.2)
    keys = [f"kvpager:v2:test:trickle:{i}" for i in range(30)]
    values = np.random.default_rng(3).integers(0, 256, (30, 256), dtype=np.uint8)
    out, sizes = np.zeros((30, 256), np.uint8), np.zeros(30, np.int64)
    try:
        assert s.put_many([(k, memoryview(v)) for k, v in zip(keys, values)], 600) == (30, 0)
        s.get_into(keys, out, sizes)
        assert (sizes == 256).all()
        rc = redis.RedisCluster(host="127.0.0.1", port=cluster[0].port)
        try:
            port = rc.get_node_from_key(keys[0]).port
        finally:
            rc.close()
        victim = next(n for n in cluster if n.port == port)  # (the last test of the module to use the cluster)
        victim.stop()
        with listener("trickle", victim.port):
            for _ in range(3):
                took, r = bounded(lambda: s.get_into(keys, out, sizes), 10)
                assert isinstance(r, StoreError) and took < 3, (took, r)
                took, r = bounded(lambda: s.put_many([(keys[0], memoryview(values[0]))], 600), 10)
                assert isinstance(r, StoreError) and took < 3, (took, r)
    finally:
        bounded(s.close, 10, must=False)


# -- counters -----------------------------------------------------------------------------------------
def test_counters_are_one_moment_and_lose_no_update():
    """Two threads offer blocks of keys of their own one at a time while the
    writer sends them and a third thread reads `stats`, thread switches forced
    as often as the interpreter allows: every block offered is queued, written
    or dropped, so at every read ``queued + written + dropped`` lies between the
    offers finished before it and those begun after it (the writer counted a
    batch written before it took it off the queue, so a read in between saw it
    twice), and at the end every block is counted once."""
    from kvpager.prefix_cache import root_key

    with redis_server() as store:
        tier = RemoteTier(store.url)
        p = KVPool(SPEC, remote=tier)
        root = root_key("m")
        begun, done, bad = [0], [0], []
        stop = threading.Event()
        lock = threading.Lock()

        def offers(me: int, n: int) -> None:
            for i in range(n):
                with lock:
                    begun[0] += 1
                tier.offer(p.backend, [(1, root, me.to_bytes(2, "little") + i.to_bytes(14, "little"))])
                with lock:
                    done[0] += 1
                time.sleep(0.0002)  # (the writer keeps up: a batch an offer or two)

        def reads() -> None:
            while not stop.is_set():
                before = done[0]
                st = tier.stats()
                after = begun[0]
                total = st.queued_blocks + st.written_blocks + st.dropped_blocks
                if not before <= total <= after:
                    bad.append((before, total, after, st.queued_blocks, st.written_blocks, st.dropped_blocks))

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        try:
            reader = threading.Thread(target=reads)
            reader.start()
            workers = [threading.Thread(target=offers, args=(me, 1500)) for me in range(2)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(60)
            assert tier.flush(WAIT)
            stop.set()
            reader.join(10)
        finally:
            sys.setswitchinterval(interval)
            stop.set()
        try:
            st = tier.stats()
            assert st.errors == 0 and st.queued_blocks == 0
            assert st.written_blocks + st.dropped_blocks == 3000 and st.written_blocks > 0
            assert not bad, bad[:5]
        finally:
            p.close()
