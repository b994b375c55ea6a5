"""The remote tier against stores whose replies come slowly (a broken link, a
hostile store): every lookup and probe runs on the daemon's loop, so each
must end within its own time, not only each read within the timeout.

- A server announcing a huge value and sending it slowly: GETRANGE asks for
  at most a value and one byte, so a longer announcement is malformed at once
  (it held the lookup for as long as the server sent).
- A value of the right length, or probe replies, sent a few bytes at a time,
  each read well inside the timeout: the lookup held the loop for as long as
  they kept coming (here 3-4 s, at a 0.1 s timeout); now it fails when its time
  (the timeout for each round trip and one more, at least `LOOKUP_FLOOR`, plus
  its bytes at `MIN_RATE`) is up, the breaker opens, and the allocation goes on
  without it."""

from __future__ import annotations

import time

import pytest
from redis_helpers import need_redis
from slow_store import TricklingServer

need_redis()
pytest.importorskip("redis")

from kvpager import KVPool, PoolSpec  # noqa: E402
from kvpager.remote_resp import LOOKUP_FLOOR  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=16, dtype="float32")
BS = SPEC.block_size


def allocate_from(server: TricklingServer) -> tuple[float, KVPool, object]:
    """One allocation of a 3-block prompt over ``server``: how long it took, the pool, the allocation."""
    p = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=30))
    t0 = time.monotonic()
    [x] = p.allocate([list(range(3 * BS + 1))], salt="m")
    return time.monotonic() - t0, p, x


@pytest.mark.parametrize("announce, chunk, every", [
    (None, 64 << 10, 0.01),  # 1 GB announced, 64 KiB every 10 ms
    ("exact", 32, 0.02),  # a block's length, 32 bytes every 20 ms: each read inside the 0.1 s timeout
])
def test_a_reply_that_keeps_coming_fails_the_lookup_in_its_time(announce, chunk, every):
    server = TricklingServer(seconds=4.0, announce=announce, chunk=chunk, every=every)
    try:
        took, p, x = allocate_from(server)
        assert x.num_cached_tokens == 0 and took < LOOKUP_FLOOR + 1.0, took
        st = p.remote_stats()
        assert st.errors == 1 and not st.available
        p.free(x.seq_id)
        p.check_integrity()
        p.close()
    finally:
        server.close()


def test_probe_replies_that_keep_coming_fail_the_probe_in_its_time():
    """``TYPE`` replies one byte every 40 ms (72 bytes for 8 keys: 2.9 s before)."""
    server = TricklingServer(seconds=4.0, chunk=1, every=0.04)
    try:
        p = KVPool(SPEC, remote=RemoteTier(server.url, retry_after=30))
        t0 = time.monotonic()
        [got] = p.probe_cache([list(range(8 * BS + 1))], salt="m")
        took = time.monotonic() - t0
        assert got.num_remote_tokens == 0 and took < LOOKUP_FLOOR + 1.0, took
        assert p.remote_stats().errors == 1
        p.check_integrity()
        p.close()
    finally:
        server.close()
