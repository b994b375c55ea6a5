"""Values kvpager cannot restore from under the remote tier's keys: another
Redis type (a hash, list, set, ... of another program or a stale tool) or a
string of another length. A lookup's ``GETRANGE`` answers ``WRONGTYPE`` for
another type, so a lookup misses it without refusing (or deleting) it; the probe must not count it
either, and must have it deleted; and since the writer's ``SET NX`` never
replaces an existing key, a commit's write replaces it, or that block could
never be shared through the store again. Standalone and Redis Cluster, each
against real redis-server processes."""

from __future__ import annotations

import random

import numpy as np
import pytest
from redis_helpers import need_redis, redis_cluster, redis_server

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import BS, SPEC, WAIT, expected_k, kv_of, pool, written  # noqa: E402

from kvpager.prefix_cache import chain_keys, root_key  # noqa: E402
from kvpager.remote_format import HEADER_BYTES  # noqa: E402
from kvpager.remote_store import StoreError, open_store  # noqa: E402

VALUE = HEADER_BYTES + SPEC.bytes_per_block
PROMPT = list(range(300, 300 + 4 * BS + 1))  # 4 full blocks an allocate may share, then the last token

#: another program's value under a key, by kind
FOREIGN = {
    "hash": lambda r, k: r.hset(k, "field", "value"),
    "list": lambda r, k: r.rpush(k, "a", "b"),
    "set": lambda r, k: r.sadd(k, "a"),
    "zset": lambda r, k: r.zadd(k, {"a": 1.0}),
    "stream": lambda r, k: r.xadd(k, {"a": "b"}),
    "short string": lambda r, k: r.set(k, b"x" * 100),
    "long string": lambda r, k: r.set(k, b"x" * (VALUE + 1)),
    "empty string": lambda r, k: r.set(k, b""),
}
STRINGS = {"short string", "long string", "empty string"}


@pytest.fixture(params=["standalone", "cluster"])
def store(request):
    """(URL, a redis-py client of it) of a fresh store."""
    if request.param == "standalone":
        with redis_server() as server:
            client = redis.Redis(port=server.port)
            yield server.url, client
            client.close()
    else:
        with redis_cluster(3) as nodes:
            client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
            yield "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes), client
            client.close()


def plant(r, name: str, kind: str) -> None:
    r.delete(name)
    FOREIGN[kind](r, name)


def names(p) -> list[str]:
    """The store keys of PROMPT's four full blocks (salt "m")."""
    root = root_key("m")
    return [p.remote.key(root, k) for k in chain_keys(root, np.asarray(PROMPT[: 4 * BS], np.int64), BS)]


def compute(p, before_commit=None):
    """Allocate PROMPT, write the K/V of its uncached tokens (a function of the
    tokens: whoever computes a block, its bytes are the same), commit."""
    [a] = p.allocate([PROMPT], salt="m")
    vals = expected_k(PROMPT)[a.num_cached_tokens :, None, None]
    shape = (len(a.slots), SPEC.num_kv_heads, SPEC.head_dim)
    for layer in range(SPEC.num_layers):
        p.write(layer, a.slots, np.broadcast_to(vals, shape), np.broadcast_to(-vals, shape))
    if before_commit is not None:
        before_commit()
    p.commit(a.seq_id)
    return a


def check_kv(p, a, n: int) -> None:
    """The first ``n`` tokens of allocation ``a`` hold PROMPT's K/V."""
    kv = kv_of(p, a.block_table, n)  # [layers, 2, tokens, heads, dim]
    want = np.broadcast_to(expected_k(PROMPT[:n])[None, :, None, None], kv[:, 0].shape)
    assert np.array_equal(kv[:, 0], want) and np.array_equal(kv[:, 1], -want)


def split(probes) -> list[tuple[int, int]]:
    return [(c.num_cached_tokens, c.num_remote_tokens) for c in probes]


def test_the_probe_counts_no_foreign_type_and_has_it_deleted(store):
    """A hash under block 1's key: the probe counts block 0 only (what the
    allocate restores), has the hash deleted, and the next commit's write
    stores the block, so a third host restores all four."""
    url, r = store
    a, b, c = pool(url), pool(url), pool(url)
    compute(a)
    assert written(a, 4)
    key = names(a)[1]
    plant(r, key, "hash")
    assert split(b.probe_cache([PROMPT], "m")) == [(BS, BS)]
    st = b.remote_stats()
    assert (st.probe_blocks, st.probe_hit_blocks, st.corrupt_blocks, st.errors) == (4, 3, 1, 0)
    assert b.remote.flush(WAIT) and not r.exists(key)  # the probe's delete has run
    x = compute(b)
    assert (x.num_cached_tokens, x.num_remote_tokens) == (BS, BS)
    assert b.remote.flush(WAIT) and r.type(key) == b"string" and r.strlen(key) == VALUE
    assert split(c.probe_cache([PROMPT], "m")) == [(4 * BS, 4 * BS)]
    [y] = c.allocate([PROMPT], salt="m")
    assert (y.num_cached_tokens, y.num_remote_tokens) == (4 * BS, 4 * BS)
    check_kv(c, y, 4 * BS)
    assert c.remote_stats().corrupt_blocks == 0
    for p in (a, b, c):
        p.check_integrity()
        p.close()


@pytest.mark.parametrize("kind", ["list", "short string"])
def test_a_commit_replaces_a_foreign_value_under_its_key(store, kind):
    """No probe: block 1 is gone from the store, a host misses it and computes
    it, and before its commit's write another program puts a value under the
    key. ``SET NX`` alone would leave that value there for good (a lookup
    misses another type without deleting it); the write replaces it."""
    url, r = store
    a, b, c = pool(url, ttl=600), pool(url, ttl=600), pool(url)
    compute(a)
    assert written(a, 4)
    key = names(a)[1]
    r.delete(key)  # evicted, say
    x = compute(b, before_commit=lambda: plant(r, key, kind))
    assert (x.num_cached_tokens, x.num_remote_tokens) == (BS, BS)
    assert b.remote.flush(WAIT)
    assert r.type(key) == b"string" and r.strlen(key) == VALUE and 0 < r.ttl(key) <= 600
    st = b.remote_stats()
    # blocks 1-3 offered (block 0 was restored), 1 stored over the foreign value, 2 and 3 there already
    assert (st.written_blocks, st.corrupt_blocks, st.errors, st.dropped_blocks) == (1, 1, 0, 0)
    [y] = c.allocate([PROMPT], salt="m")
    assert (y.num_cached_tokens, y.num_remote_tokens) == (4 * BS, 4 * BS)
    check_kv(c, y, 4 * BS)
    for p in (a, b, c):
        p.check_integrity()
        p.close()


def test_exists_many_and_put_many_with_every_redis_type(store):
    """The store calls themselves: `exists_many` tells absent keys, strings (of
    any length: the value is not read) and other types apart; `put_many` stores
    over anything but a string of the value's own length, which it leaves."""
    from kvpager.remote_store import KEY_ABSENT, KEY_OTHER, KEY_STRING

    url, r = store
    s = open_store(url, timeout=2.0)
    keys = {kind: f"kvpager:v1:test:{kind.replace(' ', '-')}" for kind in [*FOREIGN, "absent", "held"]}
    for kind, key in keys.items():
        if kind in FOREIGN:
            plant(r, key, kind)
    held = bytes(VALUE)  # a string of the value's length: left as it is
    r.set(keys["held"], held)
    want = [KEY_ABSENT if k == "absent" else KEY_STRING if k in STRINGS or k == "held" else KEY_OTHER
            for k in keys]
    assert s.exists_many(list(keys.values())).tolist() == want
    assert s.exists_many([]).shape == (0,)
    ours = np.random.default_rng(4).integers(0, 256, VALUE, dtype=np.uint8)
    new, replaced = s.put_many([(key, memoryview(ours)) for key in keys.values()], ttl=60)
    assert (new, replaced) == (1, len(FOREIGN))
    for kind, key in keys.items():
        assert r.get(key) == (held if kind == "held" else ours.tobytes()), kind
        assert (r.ttl(key) == -1) if kind == "held" else (0 < r.ttl(key) <= 60), kind
    assert s.put_many([(key, memoryview(ours)) for key in keys.values()], ttl=60) == (0, 0)
    s.close()


def test_exists_many_equals_redis_py_type_over_a_long_pipeline():
    """3,000 keys of every kind in one pipeline (replies of different lengths,
    read in whatever pieces the socket gives) vs redis-py's TYPE per key; an
    ACL's NOPERM in the middle fails the call, and the next call answers right."""
    from kvpager.remote_store import KEY_ABSENT, KEY_OTHER, KEY_STRING

    with redis_server() as server:
        r = redis.Redis(port=server.port)
        rng = random.Random(5)
        keys = [f"kvpager:v1:test:{i:05d}" for i in range(3000)]
        for key in keys:
            kind = rng.choice([*FOREIGN, "absent", "absent", "absent"])
            if kind != "absent":
                plant(r, key, kind)
        code = {b"none": KEY_ABSENT, b"string": KEY_STRING}
        want = [code.get(r.type(k), KEY_OTHER) for k in keys]
        s = open_store(server.url, timeout=2.0)
        assert s.exists_many(keys).tolist() == want and len(set(want)) == 3
        s.close()
        r.set("secret", b"x")
        server.cli("ACL", "SETUSER", "reader", "on", ">pw", "~kvpager:*", "+@all")
        s = open_store(f"redis://reader:pw@127.0.0.1:{server.port}", timeout=2.0)
        with pytest.raises(StoreError, match="NOPERM"):
            s.exists_many([*keys[:100], "secret", *keys[100:200]])
        assert s.exists_many(keys[:500]).tolist() == want[:500]
        s.close()
        r.close()


class _Socket:
    """Replies handed out in pieces of random sizes (1 byte and up)."""

    def __init__(self, data: bytes, seed: int, most: int = 40):
        self.data, self.at, self.rng, self.most = data, 0, random.Random(seed), most

    def sendall(self, data: bytes) -> None:
        pass

    def recv_into(self, view, n: int = 0) -> int:
        take = min(self.rng.randint(1, self.most), len(view), len(self.data) - self.at, n or len(view))
        view[:take] = self.data[self.at : self.at + take]
        self.at += take
        return take


def test_type_replies_split_anywhere_and_malformed_ones():
    from kvpager.remote_key_types import key_types
    from kvpager.remote_resp import FetchError
    from kvpager.remote_store import KEY_ABSENT, KEY_OTHER, KEY_STRING

    replies = {b"+string\r\n": KEY_STRING, b"+none\r\n": KEY_ABSENT, b"+stream\r\n": KEY_OTHER,
               b"+hash\r\n": KEY_OTHER, b"+set\r\n": KEY_OTHER, b"+ReJSON-RL\r\n": KEY_OTHER,
               b"+strinG\r\n": KEY_OTHER}
    rng = random.Random(6)
    for seed in range(20):
        picks = [rng.choice(list(replies)) for _ in range(rng.randint(1, 400))]
        got = key_types(_Socket(b"".join(picks), seed), ["k"] * len(picks))
        assert got.tolist() == [replies[p] for p in picks]
    for bad, why in ((b"+string\r\n-NOPERM no\r\n+none\r\n", "NOPERM"), (b"+string\r\n:1\r\n+none\r\n", ":1"),
                     (b"+string\r\n+none\n+none\r\n", "malformed")):
        with pytest.raises(FetchError, match=why):
            key_types(_Socket(bad, 1), ["k"] * 3)
    with pytest.raises(FetchError, match="malformed"):  # more than the replies asked for
        key_types(_Socket(b"+string\r\n+none\r\n+none\r\n:", 1, most=1000), ["k"] * 3)
    with pytest.raises(FetchError, match="closed"):
        key_types(_Socket(b"+string\r\n", 1), ["k"] * 2)
