"""The remote tier against a real Redis in states production hits (nothing
mocked):
- a store that refuses writes but still takes ``DEL`` (full under
  ``noeviction``): a value a lookup refuses is deleted all the same (it was
  dropped with the refused writes, so a garbled block stayed in a full store,
  refused and logged "deleting it" at every lookup, its prompts never
  restored); an ACL that lost ``DEL`` pauses the deletes only, not the writes;
- a store whose output buffer limit for normal clients is below one lookup's
  replies: `RemoteTier.check` names it (every lookup of more than the limit
  failed as an outage, "the store closed the connection mid-reply", while the
  check said the store was fine);
- an ACL user that loses ``GETRANGE`` mid-run: the probe counts no block of
  the store while the lookups are paused (it counted blocks the allocate
  then did not restore);
- ``--remote-ttl 0`` under a ``volatile-*`` eviction policy: no key of the
  tier can be evicted, so a full store refuses every write (`RemoteTier.check`
  warns of it);
- a key evicted between a write's ``SET NX`` and its ``STRLEN``: written as
  a new key, not counted corrupt nor logged "held a string of 0 bytes";
- two threads' first lookups make one fetch thread pool (each made one, and
  one was never shut down)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from redis_helpers import RedisServer, need_cli, need_redis, redis_server
from test_remote_careless import prefill  # (the same geometry: blocks of 16)

need_redis()
redis = pytest.importorskip("redis")

from kvpager import CacheProbe, KVPool, PoolSpec  # noqa: E402
from kvpager.remote_store import StoreMisconfigured  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=16, dtype="float32")
BS = SPEC.block_size
WAIT = 20.0
TIER = ["+getrange", "+type", "+set", "+strlen", "+del", "+client|setname"]  # what docs/remote.md lists


def prompts(n: int, base: int) -> list[list[int]]:
    return [list(range(base + 1000 * i, base + 1000 * i + 3 * BS + 1)) for i in range(n)]


def restore(p: KVPool, prompt: list[int]) -> tuple[int, np.ndarray]:
    """Allocate ``prompt`` and free it: the tokens restored from the store and
    the K/V of the blocks restored."""
    [a] = p.allocate([prompt], salt="m")
    n = a.num_remote_tokens // BS
    out = p.backend.device_array()[np.asarray(a.block_table[:n], dtype=np.int64)].copy()
    p.free(a.seq_id)
    return a.num_remote_tokens, out


def garble_first_block(server: RedisServer, p: KVPool, prompt: list[int]) -> str:
    """Flip a payload byte of the store's value of ``prompt``'s first block (its
    length unchanged: a commit of that block would leave it there)."""
    from kvpager.prefix_cache import chain_keys, root_key, token_array

    root = root_key("m")
    [first, *_] = chain_keys(root, token_array(prompt[:BS]), BS)
    name = p.remote.key(root, first)
    client = redis.Redis(port=server.port)
    value = bytearray(client.get(name))
    value[-1] ^= 0xFF
    client.set(name, bytes(value))
    return name


def remote_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvpager.remote" and r.levelno >= logging.WARNING]


def test_a_full_store_still_deletes_a_value_a_lookup_refuses(caplog):
    caplog.set_level(logging.DEBUG, logger="kvpager.remote")
    with redis_server() as server:
        a = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.05))
        shared = prompts(3, 100)
        kvs = [prefill(a, p, seed=i) for i, p in enumerate(shared)]
        assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == 9
        bad = garble_first_block(server, a, shared[0])
        server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        server.cli("CONFIG", "SET", "maxmemory", "1")  # full: SET refused (OOM), DEL taken
        # writes pause for longer than the test: the delete must not wait for them
        b = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=30.0))
        prefill(b, prompts(1, 50_000)[0], seed=9)
        assert b.remote.flush(WAIT) and b.remote_stats().written_blocks == 0
        assert restore(b, shared[0])[0] == 0  # its first block refused: a miss
        assert b.remote.flush(WAIT)
        assert redis.Redis(port=server.port).exists(bad) == 0, "the refused value is still in the store"
        for _ in range(3):  # gone: a miss, not refused again
            assert restore(b, shared[0])[0] == 0
        for p, kv in zip(shared[1:], kvs[1:]):  # the others restore byte for byte
            n, got = restore(b, p)
            assert n == 3 * BS and np.array_equal(got, kv)
        st = b.remote_stats()
        assert st.corrupt_blocks == 1 and st.written_blocks == 0 and st.available
        warned = remote_warnings(caplog)
        assert not any("takes writes again" in w for w in warned), warned  # (a delete is no write)
        b.check_integrity()
        a.close(), b.close()


def test_a_refused_delete_pauses_the_deletes_not_the_writes(caplog):
    need_cli()
    caplog.set_level(logging.DEBUG, logger="kvpager.remote")
    with redis_server() as server:
        a = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.05))
        shared = prompts(2, 100)
        kvs = [prefill(a, p, seed=i) for i, p in enumerate(shared)]
        assert a.remote.flush(WAIT)
        bad = garble_first_block(server, a, shared[0])
        server.cli("ACL", "SETUSER", "tier", "reset", "on", ">pw", "~kvpager:*", *TIER)
        b = KVPool(SPEC, remote=RemoteTier(f"redis://tier:pw@127.0.0.1:{server.port}", retry_after=30.0))
        assert b.remote.check() is None
        server.cli("ACL", "SETUSER", "tier", "-del")  # taken away while it runs
        assert restore(b, shared[0])[0] == 0
        assert b.remote.flush(WAIT)
        assert redis.Redis(port=server.port).exists(bad) == 1  # refused: it stays
        # the writes go on: each commit's blocks are written
        for i, p in enumerate(prompts(3, 60_000)):
            prefill(b, p, seed=20 + i)
            assert b.remote.flush(WAIT)
        st = b.remote_stats()
        assert st.written_blocks == 9 and st.dropped_blocks == 0 and st.errors == 1
        n, got = restore(b, shared[1])
        assert n == 3 * BS and np.array_equal(got, kvs[1])
        warned = remote_warnings(caplog)
        assert any("refuses deletes" in w for w in warned) and not any("refuses writes" in w for w in warned), \
            warned
        b.check_integrity()
        a.close(), b.close()


def test_check_names_an_output_buffer_limit_below_a_lookups_replies():
    big = SPEC.replace(num_layers=8, num_kv_heads=4, head_dim=64)  # 256 KiB blocks: 16 a lookup's pipeline
    with redis_server() as server:
        a = KVPool(big, remote=RemoteTier(server.url, retry_after=0.05))
        prompt = list(range(20 * BS + 1))
        [x] = a.allocate([prompt], salt="m")
        a.commit(x.seq_id)
        a.free(x.seq_id)
        assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == 20
        server.cli("CONFIG", "SET", "client-output-buffer-limit", "normal 1mb 0 0")
        t = RemoteTier(server.url, retry_after=0.05)
        with pytest.raises(StoreMisconfigured, match="client-output-buffer-limit.*normal.*1048576"):
            t.check(big)
        t.close()
        b = KVPool(big, remote=RemoteTier(server.url, retry_after=0.05))
        [y] = b.allocate([prompt], salt="m")  # what the check foresees: the lookup fails
        assert y.num_remote_tokens == 0 and b.remote_stats().errors == 1
        b.close()
        # a tier whose pipelines' replies fit (2 values) checks and restores
        small = KVPool(big, remote=RemoteTier(server.url, retry_after=0.05, chunk_bytes=512 << 10))
        assert small.remote.check() is None
        [z] = small.allocate([prompt], salt="m")
        assert z.num_remote_tokens == 20 * BS
        small.check_integrity()
        server.cli("CONFIG", "SET", "client-output-buffer-limit", "normal 0 0 0")
        t = RemoteTier(server.url)
        assert t.check(big) is None
        t.close(), a.close(), small.close()


def test_pools_sharing_a_tier_restore_their_own_values_from_two_threads():
    """Two embedded pools of one tier, each driven by its own thread (a pool is
    one thread at a time; two pools are two): each lookup reads into a
    staging buffer of its thread. With one buffer for the tier, one thread's
    lookup overwrote the values another's restore was about to copy (wrong
    K/V restored), or was checking (a good value refused and deleted)."""
    with redis_server() as server:
        a = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.05))
        shared = [list(range(100 + 1000 * i, 100 + 1000 * i + 2 * BS + 1)) for i in range(24)]
        kvs = [prefill(a, p, seed=i) for i, p in enumerate(shared)]
        assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == 2 * len(shared)
        tier = RemoteTier(server.url, retry_after=0.05)
        small = SPEC.replace(num_blocks=8)  # each allocate restores: the last ones were evicted
        pools = [KVPool(small, remote=tier), KVPool(small, remote=tier)]
        wrong: list[int] = []
        restored = [0, 0]
        deadline = time.monotonic() + 3.0

        def run(k: int) -> None:
            while time.monotonic() < deadline:
                for i in range(k, len(shared), 2):
                    n, got = restore(pools[k], shared[i])
                    restored[k] += n // BS
                    if not np.array_equal(got, kvs[i][: n // BS]):
                        wrong.append(i)

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert min(restored) > 100 and not wrong, (restored, wrong)
        assert tier.stats().corrupt_blocks == 0  # no good value refused, none deleted
        assert redis.Redis(port=server.port).dbsize() == 2 * len(shared)
        for p in pools:
            p.check_integrity()
            p.close()
        a.close()


def test_the_probe_counts_no_store_block_while_lookups_are_refused():
    need_cli()
    with redis_server() as server:
        a = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.05))
        shared = prompts(2, 100)
        kvs = [prefill(a, p, seed=i) for i, p in enumerate(shared)]
        assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == 6
        server.cli("ACL", "SETUSER", "tier", "reset", "on", ">pw", "~kvpager:*", *TIER)
        b = KVPool(SPEC, remote=RemoteTier(f"redis://tier:pw@127.0.0.1:{server.port}", retry_after=30.0))
        assert b.remote.check() is None
        assert b.probe_cache([shared[1]], salt="m") == [CacheProbe(3 * BS, 3 * BS)]  # (lookups taken)
        server.cli("ACL", "SETUSER", "tier", "-getrange")  # taken away while it runs: TYPE still taken
        assert restore(b, shared[0])[0] == 0 and b.remote.refusals["lookups"].is_open()
        before = b.remote_stats()
        # what the allocate that follows does: nothing from the store
        assert b.probe_cache([shared[1]], salt="m") == [CacheProbe(0, 0)]
        assert b.cached_tokens([shared[1]], salt="m") == [0]
        assert restore(b, shared[1])[0] == 0
        st = b.remote_stats()
        assert st.probes == before.probes and st.skipped_probes == before.skipped_probes + 2  # (no TYPE sent)
        assert not st.available
        # lookups taken again (after the pause): the probe counts the store's blocks again
        server.cli("ACL", "SETUSER", "tier", "+getrange")
        b.remote.refusals["lookups"]._until = 0.0  # (the 30 s pause over)
        assert b.probe_cache([shared[1]], salt="m") == [CacheProbe(3 * BS, 3 * BS)]
        n, got = restore(b, shared[1])
        assert n == 3 * BS and np.array_equal(got, kvs[1])
        b.check_integrity()
        a.close(), b.close()


def test_ttl_0_under_a_volatile_policy_is_warned_at_check(caplog):
    caplog.set_level(logging.WARNING, logger="kvpager.remote")
    with redis_server("--maxmemory-policy", "volatile-lru") as server:
        for ttl in (0, 3600):  # what the warning foresees: with ttl 0 nothing is evicted, writes are refused
            server.cli("FLUSHALL")
            caplog.clear()
            p = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.05, ttl=ttl))
            assert p.remote.check() is None
            warned = remote_warnings(caplog)
            assert (ttl == 0) == any("volatile-lru" in w and "ttl 0" in w and "allkeys-lru" in w
                                     for w in warned), (ttl, warned)
            used = int(server.cli("INFO", "memory").split("used_memory:")[1].split()[0])
            server.cli("CONFIG", "SET", "maxmemory", str(used + 12 * p.remote.codec.value_bytes))
            for i, prompt in enumerate(prompts(12, 70_000)):
                prefill(p, prompt, seed=i)
                assert p.remote.flush(WAIT)
            st = p.remote_stats()
            assert (st.dropped_blocks > 0) == (ttl == 0) and (st.written_blocks == 36) == (ttl > 0), (ttl, st)
            server.cli("CONFIG", "SET", "maxmemory", "0")
            p.close()
        for policy, ttl in (("allkeys-lru", 0), ("noeviction", 0), ("volatile-ttl", 1)):
            server.cli("CONFIG", "SET", "maxmemory-policy", policy)
            caplog.clear()
            t = RemoteTier(server.url, ttl=ttl)
            assert t.check(SPEC) is None and not any("maxmemory-policy" in w for w in remote_warnings(caplog))
            t.close()


def test_a_key_evicted_after_set_nx_is_written_as_new_not_corrupt(caplog):
    """Another host wrote a block; this host's ``SET NX`` of it finds the key
    taken, and the batch's new keys then evict it (allkeys-lru, the store
    nearly full) before ``STRLEN`` asks its length: 0, as of an empty string."""
    caplog.set_level(logging.WARNING, logger="kvpager.remote")
    with redis_server("--maxmemory-policy", "allkeys-lru") as server:
        side = redis.Redis(port=server.port)
        spec = SPEC.replace(head_dim=64, num_blocks=64)  # 32 KiB values: the store's own memory matters less
        a = KVPool(spec, remote=RemoteTier(server.url, retry_after=0.05))
        b = KVPool(spec, remote=RemoteTier(server.url, retry_after=0.05))
        batch = prompts(12, 100)
        seqs = b.allocate(batch, salt="m")  # (the store empty: nothing restored)
        prefill(a, batch[0], seed=1)
        assert a.remote.flush(WAIT) and side.dbsize() == 3
        side.config_set("maxmemory", int(side.info("memory")["used_memory"]) + 6 * b.remote.codec.value_bytes)
        with b.remote._cond:  # b's 36 blocks in one write batch, the 3 taken first
            for s in seqs:
                b.commit(s.seq_id)
                b.free(s.seq_id)
        assert b.remote.flush(WAIT)
        st = b.remote_stats()
        assert st.corrupt_blocks == 0 and st.written_blocks == 36 and st.errors == 0, st  # 33 new, 3 gone: new
        assert not any("written over" in w for w in remote_warnings(caplog)), remote_warnings(caplog)
        side.config_set("maxmemory", 0)  # (a full store evicts at any command: the keys would go as they are read)
        for key in side.keys("kvpager:*"):
            assert side.strlen(key) == b.remote.codec.value_bytes and side.ttl(key) > 0
        a.close(), b.close()


def test_two_threads_first_lookups_make_one_fetch_pool(monkeypatch):
    import kvpager.remote_resp as resp

    made: list[resp.ThreadPoolExecutor] = []

    class Slow(resp.ThreadPoolExecutor):  # widens the window between "no pool yet" and the pool kept
        def __init__(self, *args, **kwargs):
            made.append(self)
            time.sleep(0.3)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(resp, "ThreadPoolExecutor", Slow)
    with redis_server() as server:
        a = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.05))
        shared = prompts(2, 100)
        kvs = [prefill(a, p, seed=i) for i, p in enumerate(shared)]
        assert a.remote.flush(WAIT)
        # one value a chunk over 2 connections: every lookup of 3 blocks uses a helper thread
        tier = RemoteTier(server.url, retry_after=5.0, chunk_bytes=1)
        pools = [KVPool(SPEC, remote=tier), KVPool(SPEC, remote=tier)]
        got: list[tuple[int, np.ndarray] | None] = [None, None]
        start = threading.Barrier(2)

        def run(k: int) -> None:
            start.wait(WAIT)
            got[k] = restore(pools[k], shared[k])

        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        for (n, kv), want in zip(got, kvs):
            assert n == 3 * BS and np.array_equal(kv, want)
        assert len(made) == 1, f"{len(made)} fetch thread pools made"
        for p in pools:
            p.close()
        deadline = time.monotonic() + WAIT
        while any(t.name.startswith("kvpager-remote-fetch") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "a fetch thread outlived the tier's close"
            time.sleep(0.05)
        a.close()
