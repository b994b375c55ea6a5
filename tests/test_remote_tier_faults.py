"""The remote prefix tier when its store fails: down at start, killed mid-run
and back, hung (one timeout, then skipped), a handshake that never ends, a TTL
Redis would refuse, a tier shared by two pools closing with the last; against
a real redis-server. Requests are served throughout; nothing leaks."""

from __future__ import annotations

import os
import signal
import time

import pytest
from redis_helpers import need_redis, redis_server

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import BS, SPEC, WAIT, pool, prefill, written  # noqa: E402

from kvpager import InvalidArgument, KVPool  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402


def test_store_down_at_start_and_killed_mid_run():
    with redis_server() as store:
        a, b = pool(store.url), pool(store.url)
        prompt = list(range(2 * BS + 1))
        prefill(a, prompt, seed=9)
        assert written(a, 2)
        store.stop()  # the store crashes
        t0 = time.monotonic()
        for i in range(20):  # every request is served; only the first pays a failed call
            seq, _ = prefill(b, list(range(100 * i, 100 * i + 2 * BS + 1)), seed=i)
            b.free(seq)
        assert time.monotonic() - t0 < 10
        assert b.remote.flush(WAIT)  # (the writer's turn: its failed writes dropped, however busy the host)
        st = b.remote_stats()
        assert st.errors >= 1 and not st.available and st.skipped_lookups >= 1
        assert st.lookups + st.skipped_lookups == 20 and st.dropped_blocks > 0
        b.check_integrity()
        store.start()  # back, empty: after the pause the tier writes again
        deadline, i = time.monotonic() + WAIT, 1000
        while b.remote_stats().written_blocks == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            i += 1
            seq, _ = prefill(b, list(range(100 * i, 100 * i + 2 * BS + 1)), seed=i)
            b.free(seq)
            b.remote.flush(WAIT)
        assert b.remote_stats().written_blocks > 0 and b.remote_stats().available
        b.check_integrity()
        a.close(), b.close()

    # a store that never answered: requests are served, the tier says why
    dead = pool("redis://127.0.0.1:1", timeout=0.05)
    assert dead.remote.check() is not None
    prefill(dead, list(range(2 * BS + 1)), seed=1)
    assert dead.remote_stats().available is False
    dead.check_integrity()
    dead.close()


def test_a_hung_store_costs_one_timeout_then_is_skipped():
    with redis_server() as store:
        b = pool(store.url, timeout=0.2, retry_after=30)
        assert b.remote.check() is None
        os.kill(store.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
        try:
            times = []
            for i in range(10):
                t0 = time.monotonic()
                [x] = b.allocate([list(range(100 * i, 100 * i + 3 * BS))], salt="m")
                times.append(time.monotonic() - t0)
                assert x.num_cached_tokens == 0
                b.free(x.seq_id)
        finally:
            os.kill(store.proc.pid, signal.SIGCONT)
        assert times[0] >= 0.15 and times[0] < 5  # the one lookup that waited for the timeout
        assert max(times[1:]) < 0.15  # then no wait: the breaker skips the store
        st = b.remote_stats()
        assert (st.lookups, st.skipped_lookups, st.errors, st.available) == (1, 9, 1, False)
        b.check_integrity()
        b.close()


def test_a_handshake_reply_that_never_ends_costs_a_bounded_wait():
    """An endpoint on the store's address that answers redis-py's connect handshake a
    byte at a time, never ending the line: each read came within the timeout, so an
    allocate (and a probe) waited for ever. Now the whole connect is bounded
    (`remote_store.bound_connects`): the call fails as a timeout does, the breaker skips
    the store after it, nothing changes in the pool."""
    import threading

    from redis_helpers import listener

    with listener("trickle") as port:
        url = f"redis://127.0.0.1:{port}"
        for call in ("allocate", "cached_tokens"):
            p = pool(url, timeout=0.1, retry_after=30)
            before = p.blocks()
            out: dict = {}
            fn = getattr(p, call)
            worker = threading.Thread(target=lambda fn=fn, out=out: out.setdefault("r", fn([list(range(3 * BS))],
                                                                                           salt="m")), daemon=True)
            t0 = time.monotonic()
            worker.start()
            worker.join(10)
            assert not worker.is_alive(), f"{call} still waiting after 10 s"
            assert time.monotonic() - t0 < 3  # (the connect's round trips at 0.1 s each, and slack)
            st = p.remote_stats()
            assert st.errors >= 1 and not st.available
            if call == "allocate":
                assert out["r"][0].num_cached_tokens == 0
                p.free(out["r"][0].seq_id)
            assert p.blocks() == before
            p.check_integrity()
            t0 = time.monotonic()
            p.close()
            assert time.monotonic() - t0 < 5


def test_a_ttl_redis_would_refuse_is_refused_at_construction():
    """A TTL past what Redis takes (10**16 seconds, meant as "forever") was accepted,
    passed `check`, and every write was then refused: nothing was ever stored."""
    longest = (1 << 31) - 1  # (about 68 years)
    with pytest.raises(InvalidArgument, match="ttl must be at most"):
        RemoteTier("redis://127.0.0.1:1", ttl=10**16)
    with pytest.raises(InvalidArgument, match="ttl must be at most"):
        RemoteTier("redis://127.0.0.1:1", ttl=longest + 1)
    with redis_server() as store:
        a = pool(store.url, ttl=longest)
        assert a.remote.check() is None
        prefill(a, list(range(2 * BS + 3)), seed=1)
        assert written(a, 2)
        assert 0 < int(store.cli("TTL", next(k for k in store.cli("KEYS", "*").split() if k))) <= longest
        a.close()


def test_a_tier_shared_by_two_pools_closes_with_the_last():
    """One tier attached to two pools (of its geometry): closing the first closed it
    under the second, whose commits then queued writes no writer would send, never
    counted dropped. Now the tier closes with the last pool; a closed tier drops
    what it is offered (counted) and asks the store nothing."""
    with redis_server() as store:
        tier = RemoteTier(store.url, retry_after=0.2)
        a, b = KVPool(SPEC, remote=tier), KVPool(SPEC, remote=tier)
        a.close()
        prefill(b, list(range(100, 100 + 3 * BS + 1)), seed=2)
        assert written(b, 3) and b.remote_stats().queued_blocks == 0
        b.close()
        with pytest.raises(InvalidArgument, match="RemoteTier is closed"):
            KVPool(SPEC, remote=tier)
        st = tier.stats()
        tier.offer(None, [(1, b"r" * 32, b"k" * 32)])  # (what a commit offers: nothing read once closed)
        assert tier.fetch([(b"r" * 32, b"k" * 32)]) == {}
        after = tier.stats()
        assert (after.queued_blocks, after.dropped_blocks, after.lookups) == (0, st.dropped_blocks + 1, st.lookups)
