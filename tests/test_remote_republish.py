"""Blocks cached here are written again once the store loses them, against a
real redis-server (nothing mocked): after ``FLUSHALL``, a restart without
persistence, expiry or eviction, a host that keeps hitting its blocks locally
writes them again as it uses them, and another host restores them byte for
byte (before, a block was written once, at its first commit: the tier
believed it was there, so no other host ever found it again). The work is
bounded (the blocks an allocate uses, at most the restore cap of them), and
nothing is written again while the store keeps what it was given.

Every server is stopped by the test that started it; every wait is bounded."""

from __future__ import annotations

import time

import numpy as np
import pytest
from redis_helpers import need_redis, redis_server

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import BS, SPEC, kv_of, pool, prefill, written  # noqa: E402

from kvpager import KVPool, PoolSpec  # noqa: E402
from kvpager.render import remote_text  # noqa: E402

WAIT = 20.0
CHECK = 0.1  # the tests' check_every (the default: 10 s)


def use(p: KVPool, prompt: list[int], until, wait: float = WAIT) -> None:
    """Allocate ``prompt`` on ``p`` (its blocks local hits) and free it, over and
    over, flushing the writer between, until ``until()`` holds (bounded)."""
    deadline = time.monotonic() + wait
    while True:
        [x] = p.allocate([prompt], salt="m")
        p.free(x.seq_id)
        assert p.remote.flush(WAIT)
        if until():
            return
        assert time.monotonic() < deadline, p.remote_stats()
        time.sleep(CHECK / 2)


def restores(p: KVPool, prompt: list[int], kv: np.ndarray, blocks: int) -> None:
    """An allocate of ``prompt`` on ``p`` restores its first ``blocks`` blocks from
    the store, byte for byte."""
    [y] = p.allocate([prompt], salt="m")
    assert (y.num_cached_tokens, y.num_remote_tokens) == (blocks * BS, blocks * BS)
    assert np.array_equal(kv_of(p, y.block_table, blocks * BS), kv[:, :, : blocks * BS])
    p.free(y.seq_id)
    p.check_integrity()


@pytest.mark.parametrize("loss", ["flushall", "restart"])
def test_blocks_cached_here_are_written_again_after_the_store_loses_them(loss):
    with redis_server() as store:
        a = pool(store.url, check_every=CHECK)
        prompt = list(range(1000, 1000 + 5 * BS + 3))
        _, kv_a = prefill(a, prompt, seed=1)
        assert written(a, 5)
        use(a, prompt, lambda: True)  # (a local hit: nothing written again while the store holds them)
        if loss == "flushall":
            assert "OK" in store.cli("FLUSHALL")
        else:  # a restart without persistence: every connection reset, the store empty
            store.stop()
            store.start()
        b = pool(store.url)
        [z] = b.allocate([prompt], salt="m")
        assert z.num_remote_tokens == 0  # gone from the store
        b.free(z.seq_id)
        use(a, prompt, lambda: a.remote_stats().written_blocks >= 10)
        assert a.remote.losses.epoch == 1
        rs = a.remote_stats()  # what an operator sees: `kvpager stats`, the metrics
        assert (rs.store_losses, rs.republished_blocks) == (1, 5) and b.remote_stats().store_losses == 0
        assert "store losses   1 (blocks the store lost; 5 cached here written again)" in remote_text(rs)
        restores(b, prompt, kv_a, 5)
        a.check_integrity()
        a.close(), b.close()


def test_blocks_expired_in_the_store_are_written_again():
    """A block's TTL runs out while its host keeps hitting it locally: the next
    use after the check writes it again (with a fresh TTL)."""
    with redis_server() as store:
        a = pool(store.url, check_every=CHECK, ttl=1)
        prompt = list(range(2000, 2000 + 4 * BS + 1))
        _, kv_a = prefill(a, prompt, seed=2)
        assert written(a, 4)
        deadline = time.monotonic() + WAIT
        while int(store.cli("DBSIZE")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert int(store.cli("DBSIZE")) == 0
        b = pool(store.url)
        use(a, prompt, lambda: a.remote_stats().written_blocks >= 8)
        restores(b, prompt, kv_a, 4)
        a.close(), b.close()


def test_blocks_evicted_by_the_store_are_written_again():
    """A store under ``maxmemory`` / ``allkeys-lru`` evicts what nobody read while
    another host fills it: the blocks of the host that still hits them locally are
    written again as it uses them."""
    big = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=64, block_size=BS, dtype="float32")
    with redis_server("--maxmemory", "6mb", "--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "10") as store:
        a = pool(store.url, big, check_every=CHECK)
        prompt = list(range(3000, 3000 + 4 * BS + 1))
        _, kv_a = prefill(a, prompt, seed=3)
        assert written(a, 4)
        time.sleep(2.1)  # (Redis's LRU clock counts seconds: the flood is younger)
        c = pool(store.url, big)
        for i in range(12):  # 12 x 4 blocks of 64 KiB: about 3 MiB, against 6 MiB with Redis's own
            seq, _ = prefill(c, list(range(100000 * (i + 1), 100000 * (i + 1) + 4 * BS + 1)), seed=10 + i)
            c.free(seq)
        for i in range(12, 400):
            if not int(store.cli("EXISTS", *a_keys(a, prompt))):
                break
            seq, _ = prefill(c, list(range(100000 * (i + 1), 100000 * (i + 1) + 4 * BS + 1)), seed=10 + i)
            c.free(seq)
            assert c.remote.flush(WAIT)
        assert int(store.cli("EXISTS", *a_keys(a, prompt))) == 0  # every block of a's evicted
        use(a, prompt, lambda: a.remote_stats().written_blocks >= 8)
        b = pool(store.url, big)
        restores(b, prompt, kv_a, 4)
        a.close(), b.close(), c.close()


def a_keys(p: KVPool, prompt: list[int]) -> list[str]:
    from kvpager.prefix_cache import chain_keys, root_key, token_array

    root = root_key("m")
    usable = (len(prompt) - 1) // BS
    return [p.remote.key(root, k) for k in chain_keys(root, token_array(prompt[: usable * BS]), BS)]


def test_the_work_is_bounded_and_follows_the_use():
    """After a loss, an allocate writes again only the blocks it uses, at most the
    restore cap's worth of them (here 3 blocks), its prompt's first blocks first;
    a prompt not used again is not written again; without a loss, nothing is."""
    value = SPEC.bytes_per_block + 80
    with redis_server() as store:
        a = pool(store.url, check_every=CHECK, max_restore_bytes=3 * value)
        used = list(range(4000, 4000 + 8 * BS + 1))
        idle = list(range(5000, 5000 + 4 * BS + 1))
        _, kv_used = prefill(a, used, seed=4)
        prefill(a, idle, seed=5)
        assert written(a, 12)
        deadline = time.monotonic() + 3 * CHECK
        while time.monotonic() < deadline:  # several checks: the store holds everything
            use(a, used, lambda: True)
        assert a.remote_stats().written_blocks == 12 and a.remote.losses.epoch == 0
        assert "OK" in store.cli("FLUSHALL")
        steps = []  # blocks written by each use from the loss on (0 until the check finds it)
        deadline = time.monotonic() + WAIT
        while a.remote_stats().written_blocks < 12 + 8:
            before = a.remote_stats().written_blocks
            use(a, used, lambda: True)
            steps.append(a.remote_stats().written_blocks - before)
            assert time.monotonic() < deadline, steps
            time.sleep(CHECK / 2)
        assert a.remote.losses.epoch == 1
        assert max(steps) <= 3 and sum(steps) == 8 and len([n for n in steps if n]) == 3, steps
        use(a, used, lambda: True)  # nothing left to write again
        assert a.remote_stats().written_blocks == 20 and int(store.cli("DBSIZE")) == 8
        b = pool(store.url)
        [y] = b.allocate([idle], salt="m")
        assert y.num_remote_tokens == 0  # not used since the loss: not written again
        b.free(y.seq_id)
        restores(b, used, kv_used, 8)
        a.check_integrity()
        a.close(), b.close()


def test_check_every_is_checked():
    from kvpager import InvalidArgument
    from kvpager.remote_tier import RemoteTier

    for bad in (0, -1, 3601, True, "10", None):
        with pytest.raises(InvalidArgument, match="check_every"):
            RemoteTier("redis://127.0.0.1:1", check_every=bad)
    RemoteTier("redis://127.0.0.1:1", check_every=0.5).close()


def test_a_windowed_conversations_local_hit_is_written_again_after_the_store_loses_it():
    """A windowed allocate whose prompt the local cache gives a windowed hit (its
    leading blocks evicted here, the blocks its window reads held) asks the store
    nothing: its hit blocks were never offered to the writer again, and where no
    prompt of an allocate was asked the store's loss went unchecked. A host serving
    a long conversation that way never wrote again the very blocks other hosts
    restore. They are written again now, and another host restores them."""
    window = 3 * BS
    with redis_server() as store:
        a = pool(store.url, check_every=CHECK)
        prompt = list(range(3000, 3000 + 10 * BS + 3))
        seq, kv_a = prefill(a, prompt, seed=3)
        assert written(a, 10)
        a.release_before(seq, 4 * BS)  # (its first four blocks cached and evictable, the oldest)
        a.free(seq)
        [filler] = a.allocate([list(range(60000, 60000 + (a.stats().free_blocks + 4) * BS))])
        a.free(filler.seq_id)  # (never committed: back to the free list)
        [x] = a.allocate([prompt], salt="m", window=window)
        assert x.block_table[:7] == (0,) * 7 and x.num_cached_tokens == 10 * BS  # a windowed local hit
        a.free(x.seq_id)
        assert "OK" in store.cli("FLUSHALL")
        before = a.remote_stats().written_blocks

        deadline = time.monotonic() + WAIT
        while a.remote_stats().written_blocks < before + 3:  # the three blocks its window reads
            [x] = a.allocate([prompt], salt="m", window=window)
            a.free(x.seq_id)
            assert a.remote.flush(WAIT)
            assert time.monotonic() < deadline, a.remote_stats()
            time.sleep(CHECK / 2)
        assert a.remote_stats().store_losses == 1
        b = pool(store.url)
        [y] = b.allocate([prompt], salt="m", window=window)
        assert (y.num_cached_tokens, y.num_remote_tokens) == (10 * BS, 3 * BS)
        assert np.array_equal(kv_of(b, y.block_table[7:], 3 * BS), kv_a[:, :, 7 * BS : 10 * BS])
        b.free(y.seq_id)
        a.check_integrity(), b.check_integrity()
        a.close(), b.close()
