"""The read-only probe (`KVPool.cached_tokens` / `probe_cache`) with a remote
tier, against a real redis-server: two embedded pools stand for two hosts.
The reference is the allocate that follows each probe: its
``num_cached_tokens`` and ``num_remote_tokens`` must be what the probe said,
and the probe must have changed nothing (pool, prefix cache LRU, counters,
events, the store's keys, values and LFU clocks)."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import numpy as np
import pytest
from redis_helpers import need_redis, redis_server

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import BS, SPEC, WAIT, expected_k, pool, prefill, written  # noqa: E402

from kvpager import CacheProbe, EventSink, InvalidArgument, KVPool, OutOfBlocks  # noqa: E402
from kvpager.remote_format import HEADER_BYTES  # noqa: E402
from kvpager.remote_store import KEY_STRING  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402
from kvpager.types import RemoteStats  # noqa: E402

VALUE = HEADER_BYTES + SPEC.bytes_per_block
PROBE_FIELDS = ("probes", "probe_blocks", "probe_hit_blocks", "skipped_probes")


def split(probes: list[CacheProbe]) -> list[tuple[int, int]]:
    return [(p.num_cached_tokens, p.num_remote_tokens) for p in probes]


def got(allocs) -> list[tuple[int, int]]:
    return [(a.num_cached_tokens, a.num_remote_tokens) for a in allocs]


def tier_counters(st: RemoteStats) -> dict:
    """The tier's counters other than the probes' own."""
    return {k: v for k, v in st.to_dict().items() if k not in PROBE_FIELDS}


def store_contents(r) -> dict[bytes, bytes]:
    """Every key of the store and a digest of its value."""
    return {k: hashlib.blake2b(r.get(k), digest_size=16).digest() for k in r.keys("*")}


def snapshot(p: KVPool, sink: EventSink, r) -> tuple:
    """Everything a probe must leave as it was."""
    return (p.blocks(), p.stats(), p.counters(), list(p.manager.pool.evictable), len(sink.items),
            tier_counters(p.remote_stats()), store_contents(r))


def fill(p: KVPool, a, prompt: list[int]) -> None:
    """Write the uncached tokens' K/V (a function of the tokens up to each)."""
    vals = expected_k(prompt)[a.num_cached_tokens :, None, None]
    shape = (len(a.slots), SPEC.num_kv_heads, SPEC.head_dim)
    for layer in range(SPEC.num_layers):
        p.write(layer, a.slots, np.broadcast_to(vals, shape), np.broadcast_to(-vals, shape))


@pytest.mark.parametrize("window", [None, 2 * BS + 1])
def test_probe_equals_the_following_allocate_and_changes_nothing(window):
    """Random batches on two hosts of one store (small pools: eviction and the
    capacity rule; one host under a restore cap of 3 blocks): each probe,
    then the allocate of the same batch. With a window (reading 2 blocks
    before the first new token), the allocate restores only those: before,
    the probe counted as remote every block of the run it restored."""
    rng = np.random.default_rng(7)
    small = SPEC.replace(num_blocks=32)
    with redis_server() as store:
        r = redis.Redis(port=store.port)
        hosts = [pool(store.url, small), pool(store.url, small, max_restore_bytes=3 * VALUE)]
        hosts[0].set_quota("n", 4)
        sinks = [EventSink(), EventSink()]
        for h, sink in zip(hosts, sinks):
            h.set_event_sink(sink)
        prefixes = [rng.integers(0, 1000, int(rng.integers(1, 6)) * BS).tolist() for _ in range(10)]
        live: list[tuple[KVPool, int]] = []
        compared = remote = full = 0
        for step in range(400):
            i = int(rng.integers(2))
            p, sink = hosts[i], sinks[i]
            if len(live) > 8 or (live and rng.random() < 0.3):
                q, seq = live.pop(int(rng.integers(len(live))))
                q.free(seq)
                continue
            n = int(rng.integers(1, 4))
            batch = [prefixes[int(rng.integers(10))] + rng.integers(0, 1000, int(rng.integers(0, 2 * BS))).tolist()
                     for _ in range(n)]
            salts = [("m", "n")[int(rng.integers(2))] for _ in range(n)]
            for h in hosts:  # the writer threads idle: the store holds what it will hold at the allocate
                assert h.remote.flush(WAIT)
            before = snapshot(p, sink, r)
            probes = p.probe_cache(batch, salts, window=window)
            assert snapshot(p, sink, r) == before, step
            assert p.cached_tokens(batch, salts, window=window) == [c.num_cached_tokens for c in probes]
            try:
                allocs = p.allocate(batch, salts, window=window)
            except OutOfBlocks:
                full += 1
                continue
            assert split(probes) == got(allocs), step
            compared += 1
            remote += sum(a.num_remote_tokens > 0 for a in allocs)
            for a, prompt in zip(allocs, batch):
                fill(p, a, prompt)
                if rng.random() < 0.8:
                    p.commit(a.seq_id)
                live.append((p, a.seq_id))
            p.check_integrity()
        assert compared > 100 and remote > 30 and full > 5, (compared, remote, full)
        assert hosts[1].remote_stats().probe_blocks > hosts[1].remote_stats().probe_hit_blocks > 0
        for h in hosts:
            assert h.remote_stats().errors == 0
            h.close()


def test_the_store_is_only_read_no_value_and_the_sentinel_check_leaves_lfu():
    """The probe reads no value: 60 probes of 4 blocks of 8 KiB take from the
    store less than 64 bytes a key (TYPE and STRLEN replies). STRLEN moves a
    string's access clock as a read does (it counts only a value's length:
    an empty string counted, and no allocate restored it); TYPE alone, the
    check for lost blocks (`Store.exists_many` without a width), leaves every
    key's frequency under allkeys-lfu, so a sentinel ages as the blocks
    written with it."""
    with redis_server("--maxmemory-policy", "allkeys-lfu") as store:
        r = redis.Redis(port=store.port)
        a, b = pool(store.url), pool(store.url)
        prompt = list(range(4 * BS + 1))
        prefill(a, prompt, seed=3)
        assert written(a, 4)
        keys = sorted(r.keys("*"))
        sent = r.info("stats")["total_net_output_bytes"]
        for _ in range(60):
            assert split(b.probe_cache([prompt], "m")) == [(4 * BS, 4 * BS)]
        assert r.info("stats")["total_net_output_bytes"] - sent < 60 * 4 * 64 + 4096  # (+ INFO's reply)
        assert b.remote_stats().probes == 60 and b.remote_stats().lookups == 0
        freq = [r.object("freq", k) for k in keys]
        names = [k.decode() for k in keys]
        for _ in range(60):
            assert (b.remote.store.exists_many(names) == KEY_STRING).all()
        assert [r.object("freq", k) for k in keys] == freq
        for _ in range(60):  # the same number of reads that fetch: the check can fail
            r.mget(keys)
        assert [r.object("freq", k) for k in keys] != freq
        a.close(), b.close()


def test_probe_respects_the_restore_cap():
    with redis_server() as store:
        a = pool(store.url)
        b = pool(store.url, max_restore_bytes=2 * VALUE)
        prompt = list(range(5 * BS + 1))
        other = list(range(9000, 9000 + 3 * BS + 1))
        prefill(a, prompt, seed=12)
        prefill(a, other, seed=13)
        assert written(a, 8)
        # the cap covers the batch: the first prompt's missing keys come first
        assert split(b.probe_cache([prompt, other], "m")) == [(2 * BS, 2 * BS), (0, 0)]
        assert b.remote_stats().probe_blocks == 2
        assert split(b.probe_cache([other, prompt], "m")) == [(2 * BS, 2 * BS), (0, 0)]
        assert split(b.probe_cache([prompt], "m")) == [(2 * BS, 2 * BS)]
        [x] = b.allocate([prompt], "m")
        assert got([x]) == [(2 * BS, 2 * BS)]
        assert split(b.probe_cache([prompt], "m")) == [(4 * BS, 2 * BS)]  # two more with the next allocate
        assert b.cached_tokens([prompt], "m", remote=False) == [2 * BS]
        [y] = b.allocate([prompt], "m")
        assert got([y]) == [(4 * BS, 2 * BS)]
        b.check_integrity()
        a.close(), b.close()


def test_no_room_for_the_restore_is_predicted():
    with redis_server() as store:
        a = pool(store.url)
        b = pool(store.url, SPEC.replace(num_blocks=6))  # 5 usable blocks
        prompt = list(range(4 * BS + 1))  # 5 blocks, 4 of them in the store
        prefill(a, prompt, seed=8)
        assert written(a, 4)
        [hold] = b.allocate([list(range(9000, 9000 + 2 * BS))])
        assert b.cached_tokens([prompt], "m") == [0]  # the restore would not fit: none
        with pytest.raises(OutOfBlocks):
            b.allocate([prompt], salt="m")
        b.free(hold.seq_id)
        assert split(b.probe_cache([prompt], "m")) == [(4 * BS, 4 * BS)]
        assert got(b.allocate([prompt], salt="m")) == [(4 * BS, 4 * BS)]
        a.close(), b.close()


def test_other_salts_and_geometries_never_count():
    with redis_server() as store:
        a = pool(store.url)
        prompt = list(range(3 * BS + 1))
        prefill(a, prompt, seed=5)
        assert written(a, 3)
        b = pool(store.url)
        assert b.cached_tokens([prompt, prompt, prompt], ["n", None, b"m"]) == [0, 0, 3 * BS]
        for spec in (SPEC.replace(dtype="float16"), SPEC.replace(head_dim=32), SPEC.replace(block_size=8)):
            c = pool(store.url, spec)
            assert c.cached_tokens([prompt], "m") == [0]
            st = c.remote_stats()
            assert st.probes == 1 and st.probe_blocks > 0 and st.probe_hit_blocks == 0
            assert got(c.allocate([prompt], "m")) == [(0, 0)]
            c.close()
        two = KVPool(SPEC, devices=["cpu", "cpu"], remote=RemoteTier(store.url))  # rank-major: another layout
        assert two.cached_tokens([prompt], "m") == [0]
        two.close()
        a.close(), b.close()


def test_local_hits_count_and_remote_false_asks_nothing():
    with redis_server() as store:
        a, b = pool(store.url), pool(store.url)
        prompt = list(range(4 * BS + 1))
        prefill(a, prompt, seed=6)
        assert written(a, 4)  # before b's block 0 reaches the store: the first write of a key counts
        prefill(b, prompt[: BS + 1], seed=6)  # b holds block 0 itself
        assert split(b.probe_cache([prompt], "m")) == [(4 * BS, 3 * BS)]
        assert b.probe_cache([prompt], "m")[0].num_local_tokens == BS
        assert split(b.probe_cache([prompt], "m", remote=False)) == [(BS, 0)]
        assert b.cached_tokens([prompt], "m", remote=True) == [4 * BS]
        assert b.remote_stats().probes == 3
        for bad in (1, "yes", [True]):
            with pytest.raises(InvalidArgument):
                b.cached_tokens([prompt], "m", remote=bad)
        with pytest.raises(InvalidArgument):
            b.probe_cache([[1, "x"]], "m")
        assert b.remote_stats().probes == 3  # refused before the store was asked
        plain = KVPool(SPEC)  # no tier: remote=True answers what an allocate finds, the local cache
        assert split(plain.probe_cache([prompt], "m", remote=True)) == [(0, 0)]
        a.close(), b.close()


def test_a_killed_store_answers_nothing_remote_quickly_and_counts():
    with redis_server() as store:
        a, b = pool(store.url), pool(store.url, timeout=0.5, retry_after=30)
        prompt = list(range(3 * BS + 1))
        prefill(a, prompt, seed=9)
        assert written(a, 3)  # before b's block 0 reaches the store: the first write of a key counts
        prefill(b, prompt[: BS + 1], seed=9)
        assert b.remote.flush(WAIT)  # no write of b's in flight: only the probe fails
        assert split(b.probe_cache([prompt], "m")) == [(3 * BS, 2 * BS)]
        store.stop()
        t0 = time.monotonic()
        assert split(b.probe_cache([prompt], "m")) == [(BS, 0)]  # the local hit still counts
        assert time.monotonic() - t0 < 0.5 + 1.0
        st = b.remote_stats()
        assert (st.errors, st.probes, st.available) == (1, 2, False)
        t0 = time.monotonic()
        assert split(b.probe_cache([prompt], "m")) == [(BS, 0)]  # the breaker: not even tried
        assert time.monotonic() - t0 < 0.1
        [x] = b.allocate([prompt], "m")
        assert got([x]) == [(BS, 0)]
        st = b.remote_stats()
        # one lookup: the prefill's; the allocate's was skipped by the breaker the probe opened
        assert (st.errors, st.probes, st.skipped_probes, st.lookups, st.skipped_lookups) == (1, 2, 1, 1, 1)
        b.check_integrity()
        a.close(), b.close()


def test_a_paused_store_costs_one_timeout_then_is_skipped():
    with redis_server() as store:
        a, b = pool(store.url), pool(store.url, timeout=0.2, retry_after=30)
        prompt = list(range(3 * BS + 1))
        prefill(a, prompt, seed=10)
        assert written(a, 3)
        assert b.cached_tokens([prompt], "m") == [3 * BS]
        os.kill(store.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            times = []
            for _ in range(5):
                t0 = time.monotonic()
                assert b.cached_tokens([prompt], "m") == [0]
                times.append(time.monotonic() - t0)
        finally:
            os.kill(store.proc.pid, signal.SIGCONT)
        assert 0.15 <= times[0] < 5  # the one probe that waited for the timeout
        assert max(times[1:]) < 0.15
        st = b.remote_stats()
        assert (st.probes, st.skipped_probes, st.errors, st.available) == (2, 4, 1, False)
        assert st.lookups == 0
        a.close(), b.close()


def test_a_value_the_fetch_refuses_is_counted_by_the_probe_until_deleted():
    """Documented limit: the probe reads no value, so a corrupt one counts
    until an allocate refuses it (and deletes it)."""
    with redis_server() as store:
        r = redis.Redis(port=store.port)
        a, b = pool(store.url), pool(store.url)
        prompt = list(range(2 * BS + 1))
        prefill(a, prompt, seed=11)
        assert written(a, 2)
        for k in r.keys("*"):
            v = bytearray(r.get(k))
            v[-1] ^= 1
            r.set(k, bytes(v))
        assert b.cached_tokens([prompt], "m") == [2 * BS]
        [x] = b.allocate([prompt], "m")
        assert got([x]) == [(0, 0)] and b.remote_stats().corrupt_blocks == 2
        assert b.remote.flush(WAIT) and r.dbsize() == 0
        assert b.cached_tokens([prompt], "m") == [0]
        a.close(), b.close()


def test_exists_many_against_redis_py_and_an_error_reply():
    """The store's pipelined TYPE vs redis-py's EXISTS of each key (strings
    only here; other types: test_remote_foreign); a key an ACL user may not
    read fails the call (StoreError), and the next call on a fresh connection
    answers right."""
    from kvpager.remote_store import KEY_ABSENT, StoreError, open_store

    with redis_server() as server:
        r = redis.Redis(port=server.port)
        names = [f"kvpager:v1:test:{i:05d}" for i in range(3000)]
        rng = np.random.default_rng(1)
        for name in names:
            if rng.random() < 0.3:
                r.set(name, b"x" * int(rng.integers(1, 100)))
        r.set("secret", b"x")
        want = np.array([KEY_STRING if r.exists(n) else KEY_ABSENT for n in names])
        store = open_store(server.url, timeout=2.0)
        assert np.array_equal(store.exists_many(names), want) and 0 < (want == KEY_STRING).sum() < len(names)
        assert store.exists_many([]).shape == (0,)
        store.close()
        server.cli("ACL", "SETUSER", "reader", "on", ">pw", "~kvpager:*", "+@all")
        store = open_store(f"redis://reader:pw@127.0.0.1:{server.port}", timeout=2.0)
        with pytest.raises(StoreError, match="NOPERM"):
            store.exists_many([names[0], "secret", *names[1:50]])
        assert np.array_equal(store.exists_many(names[:200]), want[:200])
        store.close()
