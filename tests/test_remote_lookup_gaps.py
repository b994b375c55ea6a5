"""A plain (unwindowed) lookup whose prompts' blocks the store holds with a
gap (one evicted, refused or never written): a prompt's run of restorable
blocks ends at its first block the store lacks, so no value past it can be
restored. A lookup read them all the same: a prompt of 40 blocks of 256 KiB
whose first block was gone made the store send 10 MB (on the daemon's loop)
for nothing restored, and kept those unusable blocks recent in an LRU store.
A lookup of more than `ASK_FIRST_BYTES` of values now asks which keys the
store holds first (``TYPE``, no value read) and reads only the runs' values.

Real redis-servers, started and stopped here; every wait bounded."""

from __future__ import annotations

import numpy as np
import pytest
from redis_helpers import need_redis, redis_server

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import WAIT, kv_of, prefill  # noqa: E402

from kvpager import KVPool, PoolSpec  # noqa: E402
from kvpager.prefix_cache import chain_keys, root_key, token_array  # noqa: E402
from kvpager.remote_restore import ASK_FIRST_BYTES  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

# 256 KiB a block: a prompt of 40 blocks asks for more than ASK_FIRST_BYTES
BIG = PoolSpec(num_layers=4, num_kv_heads=8, head_dim=64, num_blocks=100, block_size=16, dtype="float32")
BS = BIG.block_size
N = 40


def names(p: KVPool, prompt: list[int], salt: str = "m") -> list[str]:
    """The store keys of ``prompt``'s full blocks, in chain order."""
    root = root_key(salt)
    usable = (len(prompt) - 1) // BS
    return [p.remote.key(root, k) for k in chain_keys(root, token_array(prompt, "p")[: usable * BS], BS)]


def sent(r) -> int:
    return int(r.info("stats")["total_net_output_bytes"])


@pytest.fixture
def hosts():
    with redis_server() as server:
        a = KVPool(BIG, remote=RemoteTier(server.url, retry_after=0.2))
        b = KVPool(BIG, remote=RemoteTier(server.url, retry_after=0.2))
        r = redis.Redis(port=server.port, socket_timeout=10)
        try:
            yield a, b, r
        finally:
            r.close()
            a.close()
            b.close()


def test_a_gap_at_the_first_block_reads_no_value(hosts):
    """The store lost a prompt's first block: the allocate restores nothing and the
    store sends no value (before: all 39 others, 10 MB), as the probe said."""
    a, b, r = hosts
    assert N * (BIG.bytes_per_block + 80) > ASK_FIRST_BYTES
    prompt = list(range(N * BS + 1))
    seq, _ = prefill(a, prompt, seed=1)
    assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == N
    keys = names(b, prompt)
    assert r.delete(keys[0]) == 1  # (as an eviction would)
    assert b.cached_tokens([prompt], salt="m") == [0]
    before = sent(r)
    [al] = b.allocate([prompt], salt="m")
    assert al.num_cached_tokens == 0 and al.num_remote_tokens == 0
    assert sent(r) - before < BIG.bytes_per_block, "values the allocate could not restore were read"
    st = b.remote_stats()
    assert st.restored_blocks == 0 and st.corrupt_blocks == 0
    b.free(al.seq_id)
    b.check_integrity()
    assert b.stats().used_blocks == 0
    a.free(seq)


def test_a_gap_mid_prompt_reads_only_the_run_and_restores_it_byte_for_byte(hosts):
    """Block 25 gone: the first 25 are restored byte for byte, the store sends
    about their values and no more; a second prompt of the batch with no gap is
    restored whole (the two share nothing)."""
    a, b, r = hosts
    gap = 25
    p1 = list(range(N * BS + 1))
    p2 = list(range(10_000, 10_000 + 20 * BS + 1))
    s1, kv1 = prefill(a, p1, seed=1)
    s2, kv2 = prefill(a, p2, seed=2)
    assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == N + 20
    assert r.delete(names(b, p1)[gap]) == 1
    assert b.cached_tokens([p1, p2], salt="m") == [gap * BS, 20 * BS]
    before = sent(r)
    x, y = b.allocate([p1, p2], salt="m")
    assert (x.num_cached_tokens, x.num_remote_tokens) == (gap * BS, gap * BS)
    assert (y.num_cached_tokens, y.num_remote_tokens) == (20 * BS, 20 * BS)
    value = BIG.bytes_per_block + 80
    assert sent(r) - before < (gap + 20 + 1) * value, "values past the gap were read"
    got1, got2 = kv_of(b, x.block_table, gap * BS), kv_of(b, y.block_table, 20 * BS)
    assert np.array_equal(got1, kv1[:, :, : gap * BS]) and np.array_equal(got2, kv2[:, :, : 20 * BS])
    assert b.remote_stats().restored_blocks == gap + 20
    b.free([x.seq_id, y.seq_id])
    b.check_integrity()
    assert b.stats().used_blocks == 0
    a.free([s1, s2])
    a.check_integrity()


def test_a_large_lookup_whose_probe_is_refused_still_restores():
    """An ACL user whose ``TYPE`` is taken away while the daemon runs: a lookup past
    `ASK_FIRST_BYTES` asks ``TYPE`` first, is refused, and read the empty answer as a
    store holding nothing: nothing restored, where the plain lookup restores all. It
    reads the values as before now."""
    with redis_server() as server:
        a = KVPool(BIG, remote=RemoteTier(server.url, retry_after=0.2))
        server.cli("ACL", "SETUSER", "reader", "reset", "on", ">pw", "~*", "+getrange", "+type", "+set",
                   "+strlen", "+del", "+client|setname")
        b = KVPool(BIG, remote=RemoteTier(f"redis://reader:pw@127.0.0.1:{server.port}", retry_after=0.2))
        try:
            prompt = list(range(N * BS + 1))
            seq, kv = prefill(a, prompt, seed=3)
            assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == N
            server.cli("ACL", "SETUSER", "reader", "-type")
            [al] = b.allocate([prompt], salt="m")
            assert (al.num_cached_tokens, al.num_remote_tokens) == (N * BS, N * BS)
            assert np.array_equal(kv_of(b, al.block_table, N * BS), kv[:, :, : N * BS])
            b.free(al.seq_id)
            b.check_integrity()
            a.free(seq)
        finally:
            a.close(), b.close()
