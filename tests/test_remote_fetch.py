"""Chunked lookups read straight into a staging buffer (`kvpager.remote_resp`
behind `RedisStore.get_into`) against a real redis-server: every value and
length compared with what redis-py's own GET returns (as a lookup's
``GETRANGE key 0 W`` reads them: no more than W + 1 bytes); absent keys,
values shorter and longer than a row; a chunk refused by the server; the server
killed or paused mid-lookup (its connections never reused half-read); a
Unix socket; TLS; and the tier on top (nothing restored from a failed lookup,
byte-identical restores once the store is back)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from redis_helpers import need_redis, redis_server, tls_redis_server

need_redis()
redis = pytest.importorskip("redis")

from kvpager import KVPool, PoolSpec  # noqa: E402
from kvpager.prefix_cache import root_key  # noqa: E402
from kvpager.remote_store import StoreError, open_store  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

WIDTH = 4096 + 80


def fill(url: str, values: dict[str, bytes]) -> None:
    r = redis.Redis.from_url(url)
    for k, v in values.items():
        r.set(k, v)
    r.close()


def reference(url: str, keys: list[str]) -> list[bytes | None]:
    """Each key's value by redis-py's own GET, one at a time."""
    r = redis.Redis.from_url(url)
    out = [r.get(k) for k in keys]
    r.close()
    return out


def check_against(url: str, keys: list[str], out: np.ndarray, sizes: np.ndarray) -> None:
    """Each length as a lookup reads it (``GETRANGE key 0 WIDTH``): -1 where
    absent or empty, WIDTH + 1 where longer (no more of it is read)."""
    for i, value in enumerate(reference(url, keys)):
        if not value:
            assert sizes[i] == -1, i
        else:
            assert sizes[i] == min(len(value), WIDTH + 1), i
            if len(value) == WIDTH:
                assert out[i].tobytes() == value, i


def mixed(rng: np.random.Generator, n: int) -> tuple[list[str], dict[str, bytes]]:
    """``n`` keys: most with a value of WIDTH bytes, some absent, some shorter
    or longer (up to 3x), an empty one."""
    keys, values = [], {}
    for i in range(n):
        key = f"t:{i}"
        keys.append(key)
        kind = rng.integers(10)
        if kind == 0:
            continue  # absent
        size = {1: int(rng.integers(1, WIDTH)), 2: int(rng.integers(WIDTH + 1, 3 * WIDTH)), 3: 0}.get(int(kind), WIDTH)
        values[key] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return keys, values


@pytest.mark.parametrize("connections,chunk_bytes", [(1, 1), (1, 5 * WIDTH), (2, 3 * WIDTH), (3, 7 * WIDTH + 100),
                                                     (4, 1 << 20)])
def test_chunked_values_and_lengths_equal_redis_py(connections, chunk_bytes):
    rng = np.random.default_rng(connections * 100 + chunk_bytes % 97)
    with redis_server() as server:
        keys, values = mixed(rng, 90)
        fill(server.url, values)
        store = open_store(server.url, timeout=2.0, connections=connections, chunk_bytes=chunk_bytes)
        out = np.zeros((len(keys), WIDTH), dtype=np.uint8)
        sizes = np.zeros(len(keys), dtype=np.int64)
        seen: list[tuple[int, int]] = []
        lock = threading.Lock()

        def done(lo, hi):
            with lock:
                seen.append((lo, hi))

        store.get_into(keys, out, sizes, done)
        check_against(server.url, keys, out, sizes)
        # every row reported done exactly once
        covered = np.zeros(len(keys), dtype=np.int64)
        for lo, hi in seen:
            covered[lo:hi] += 1
        assert covered.tolist() == [1] * len(keys)
        # the connections stayed in step: a second lookup (other order) reads right
        keys2 = keys[::-1]
        out2 = np.zeros_like(out)
        store.get_into(keys2, out2, sizes, None)
        check_against(server.url, keys2, out2, sizes)
        store.close()


def test_without_raw_reads_lookups_go_through_redis_py_with_the_same_answers():
    """A redis-py that keeps no socket where the raw reader reads it: get_into falls
    back to redis-py's pipelined GETRANGE and answers as the raw path does."""
    rng = np.random.default_rng(17)
    with redis_server() as server:
        keys, values = mixed(rng, 40)
        fill(server.url, values)
        store = open_store(server.url, timeout=2.0, connections=2)
        assert store.raw_reads  # this redis-py has the socket
        store.raw_reads = False
        out = np.zeros((len(keys), WIDTH), dtype=np.uint8)
        sizes = np.zeros(len(keys), dtype=np.int64)
        seen = []
        store.get_into(keys, out, sizes, lambda lo, hi: seen.append((lo, hi)))
        check_against(server.url, keys, out, sizes)
        assert seen == [(0, len(keys))]
        store.close()


def test_a_chunk_refused_by_the_server_fails_the_lookup_and_the_next_one_works():
    """An ACL user who may not read one key: the chunk holding it gets an error
    reply (NOPERM) while other chunks are read in parallel."""
    rng = np.random.default_rng(5)
    with redis_server() as server:
        keys = [f"t:{i}" for i in range(40)]
        fill(server.url, {k: rng.integers(0, 256, WIDTH, dtype=np.uint8).tobytes() for k in keys})
        allowed = [f"~{k}" for k in keys if k != "t:23"]
        server.cli("ACL", "SETUSER", "reader", "on", ">pw", *allowed, "+@all")
        url = f"redis://reader:pw@127.0.0.1:{server.port}"
        store = open_store(url, timeout=2.0, connections=3, chunk_bytes=4 * WIDTH)
        out = np.zeros((len(keys), WIDTH), dtype=np.uint8)
        sizes = np.zeros(len(keys), dtype=np.int64)
        with pytest.raises(StoreError, match="NOPERM"):
            store.get_into(keys, out, sizes)
        ok = keys[:20]
        store.get_into(ok, out[:20], sizes[:20])
        check_against(server.url, ok, out[:20], sizes[:20])
        store.close()


def test_server_killed_mid_lookup_is_a_store_error_then_fetches_work_again():
    rng = np.random.default_rng(6)
    with redis_server() as server:
        keys = [f"t:{i}" for i in range(64)]
        fill(server.url, {k: rng.integers(0, 256, WIDTH, dtype=np.uint8).tobytes() for k in keys})
        store = open_store(server.url, timeout=1.0, connections=2, chunk_bytes=2 * WIDTH)
        out = np.zeros((len(keys), WIDTH), dtype=np.uint8)
        sizes = np.zeros(len(keys), dtype=np.int64)
        calls = []

        def kill_once(lo, hi):
            calls.append((lo, hi))
            if len(calls) == 1:
                server.stop()  # SIGKILL: the other connection loses its reply or its request

        t0 = time.monotonic()
        with pytest.raises(StoreError):
            store.get_into(keys, out, sizes, kill_once)
        assert time.monotonic() - t0 < 5
        assert len(calls) < len(keys) // 2  # the lookup stopped, it did not go on chunk after chunk
        with pytest.raises(StoreError):  # still down
            store.get_into(keys, out, sizes)
        server.start()  # same port, empty
        fill(server.url, {k: bytes([i]) * WIDTH for i, k in enumerate(keys[:10])})
        store.get_into(keys, out, sizes)
        check_against(server.url, keys, out, sizes)
        assert (sizes[10:] == -1).all()
        store.close()


def test_server_paused_mid_lookup_times_out_and_no_stale_reply_is_read_later():
    """SIGSTOP after the first chunk: the lookup times out; after SIGCONT the
    replies the server then sends to the abandoned requests must not be read
    as the answer to the next lookup."""
    rng = np.random.default_rng(7)
    with redis_server() as server:
        keys = [f"t:{i}" for i in range(48)]
        first = {k: rng.integers(0, 256, WIDTH, dtype=np.uint8).tobytes() for k in keys}
        fill(server.url, first)
        store = open_store(server.url, timeout=0.3, connections=2, chunk_bytes=3 * WIDTH)
        out = np.zeros((len(keys), WIDTH), dtype=np.uint8)
        sizes = np.zeros(len(keys), dtype=np.int64)
        paused = []

        def pause_once(lo, hi):
            if not paused:
                paused.append(True)
                os.kill(server.proc.pid, signal.SIGSTOP)

        try:
            t0 = time.monotonic()
            with pytest.raises(StoreError):
                store.get_into(keys, out, sizes, pause_once)
            assert time.monotonic() - t0 < 3
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        # new values under the same keys: any stale reply would show the old ones
        second = {k: v[::-1] for k, v in first.items()}
        fill(server.url, second)
        out[:] = 0
        store.get_into(keys[::-1], out, sizes)
        for i, k in enumerate(keys[::-1]):
            assert out[i].tobytes() == second[k], k
        store.close()


def test_unix_socket_store():
    rng = np.random.default_rng(8)
    with redis_server("--unixsocket", "SOCK", "--unixsocketperm", "700") as server:
        path = os.path.join(server.dir, "SOCK")
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        keys, values = mixed(rng, 30)
        fill(server.url, values)
        store = open_store(f"unix://{path}", timeout=2.0, connections=2, chunk_bytes=4 * WIDTH)
        out = np.zeros((len(keys), WIDTH), dtype=np.uint8)
        sizes = np.zeros(len(keys), dtype=np.int64)
        store.get_into(keys, out, sizes)
        check_against(server.url, keys, out, sizes)
        store.close()


SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=64, block_size=16, dtype="float32")


def test_tier_restores_nothing_from_a_failed_parallel_lookup_then_restores_byte_identical():
    """Pool B's tier reads over 3 connections, 2 blocks per chunk; its ACL user
    may not read one block in the middle of the chain: the lookup fails as a
    whole (counted; refused, so the lookups pause: the tier is not available),
    the allocate computes everything; with the key allowed, the chain is
    restored byte for byte."""
    with redis_server() as server:
        a = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.2))
        prompt = list(range(500, 500 + 12 * 16 + 5))
        [x] = a.allocate([prompt], salt="m")
        rng = np.random.default_rng(9)
        kv = a.backend.device_array()
        kv[np.asarray(x.block_table[:13])] = rng.standard_normal(kv[np.asarray(x.block_table[:13])].shape)
        a.commit(x.seq_id)
        assert a.remote.flush(20) and a.remote_stats().written_blocks == 12
        names = sorted(server.cli("--scan", "--pattern", "kvpager:*").split())
        assert len(names) == 12
        keys = a.manager.history[x.seq_id].keys[:12]
        hidden = a.remote.key(root_key("m"), keys[6])
        assert hidden in names
        server.cli("ACL", "SETUSER", "reader", "on", ">pw", *[f"~{n}" for n in names if n != hidden], "+@all")
        url = f"redis://reader:pw@127.0.0.1:{server.port}"
        b = KVPool(SPEC, remote=RemoteTier(url, retry_after=0.2, connections=3, chunk_bytes=2 * SPEC.bytes_per_block + 200))
        [y] = b.allocate([prompt], salt="m")
        assert (y.num_cached_tokens, y.num_remote_tokens) == (0, 0)
        st = b.remote_stats()
        assert (st.errors, st.hit_blocks, st.restored_blocks, st.available) == (1, 0, 0, False)
        assert b.remote.refusals["lookups"].is_open()
        b.free(y.seq_id)
        b.check_integrity()
        server.cli("ACL", "SETUSER", "reader", f"~{hidden}")
        time.sleep(0.3)  # the breaker's pause
        [z] = b.allocate([prompt], salt="m")
        assert (z.num_cached_tokens, z.num_remote_tokens) == (12 * 16, 12 * 16)
        got = b.backend.device_array()[np.asarray(z.block_table[:12])]
        assert np.array_equal(got, kv[np.asarray(x.block_table[:12])])
        assert b.remote_stats().restored_blocks == 12
        b.check_integrity()
        a.close(), b.close()


def test_tier_refuses_longer_and_shorter_values_mid_batch_and_reads_on():
    """One lookup of two 8-block prompts over 3 connections, 2 blocks per chunk:
    one value made longer, one shorter. Each is refused, counted and deleted,
    its chain stops there, and every other block is restored byte for byte."""
    with redis_server() as server:
        a = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.2))
        p1 = list(range(100, 100 + 8 * 16 + 1))
        p2 = list(range(9000, 9000 + 8 * 16 + 1))
        rng = np.random.default_rng(10)
        kv = a.backend.device_array()
        tables = []
        for p in (p1, p2):
            [x] = a.allocate([p], salt="m")
            blocks = np.asarray(x.block_table[:8])
            kv[blocks] = rng.standard_normal(kv[blocks].shape)
            a.commit(x.seq_id)
            tables.append((blocks, a.manager.history[x.seq_id].keys[:8]))
        assert a.remote.flush(20) and a.remote_stats().written_blocks == 16
        r = redis.Redis.from_url(server.url)
        long_name = a.remote.key(root_key("m"), tables[0][1][3])
        short_name = a.remote.key(root_key("m"), tables[1][1][5])
        r.set(long_name, r.get(long_name) + bytes(1000))
        r.set(short_name, r.get(short_name)[:-10])
        b = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=0.2, connections=3,
                                           chunk_bytes=2 * SPEC.bytes_per_block))
        x, y = b.allocate([p1, p2], salt="m")
        assert (x.num_cached_tokens, x.num_remote_tokens) == (3 * 16, 3 * 16)
        assert (y.num_cached_tokens, y.num_remote_tokens) == (5 * 16, 5 * 16)
        got = b.backend.device_array()
        assert np.array_equal(got[np.asarray(x.block_table[:3])], kv[tables[0][0][:3]])
        assert np.array_equal(got[np.asarray(y.block_table[:5])], kv[tables[1][0][:5]])
        st = b.remote_stats()
        assert (st.lookups, st.lookup_blocks, st.hit_blocks, st.corrupt_blocks, st.errors) == (1, 16, 14, 2, 0)
        assert b.remote.flush(20) and not r.exists(long_name) and not r.exists(short_name)
        b.check_integrity()
        r.close(), a.close(), b.close()


def test_tls_store(tmp_path):
    """rediss://: the values come through redis-py's TLS socket."""
    rng = np.random.default_rng(11)
    with tls_redis_server(str(tmp_path)) as (server, tls_port, cert):
        keys, values = mixed(rng, 40)
        fill(server.url, values)
        store = open_store(f"rediss://127.0.0.1:{tls_port}?ssl_ca_certs={cert}", timeout=2.0, connections=2,
                           chunk_bytes=3 * WIDTH)
        out = np.zeros((len(keys), WIDTH), dtype=np.uint8)
        sizes = np.zeros(len(keys), dtype=np.int64)
        store.get_into(keys, out, sizes)
        check_against(server.url, keys, out, sizes)
        store.close()
