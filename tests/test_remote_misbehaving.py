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
  check said the store was fine)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from redis_helpers import RedisServer, need_cli, need_redis, redis_server

need_redis()
redis = pytest.importorskip("redis")

from kvpager import KVPool, PoolSpec  # noqa: E402
from kvpager.remote_store import StoreMisconfigured  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=16, dtype="float32")
BS = SPEC.block_size
WAIT = 20.0
TIER = ["+getrange", "+type", "+set", "+strlen", "+del", "+client|setname"]  # what docs/remote.md lists


def prompts(n: int, base: int) -> list[list[int]]:
    return [list(range(base + 1000 * i, base + 1000 * i + 3 * BS + 1)) for i in range(n)]


def prefill(p: KVPool, prompt: list[int], seed: int) -> np.ndarray:
    """Allocate, write random K/V, commit, free: the full blocks' K/V."""
    [a] = p.allocate([prompt], salt="m")
    blocks = np.asarray(a.block_table[: len(prompt) // BS])
    kv = p.backend.device_array()
    kv[blocks] = np.random.default_rng(seed).standard_normal(kv[blocks].shape)
    p.commit(a.seq_id)
    out = kv[blocks].copy()
    p.free(a.seq_id)
    return out


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
