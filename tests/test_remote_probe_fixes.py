"""Four defects of the remote tier a probe found, against real redis-servers
(every server started here is stopped by the test that started it; every
wait is bounded):

- an empty value under a block's key (``SET key ""``): a lookup's
  ``GETRANGE`` answers an empty string as for an absent key, a silent miss,
  while the probe (``TYPE``) counted the key as a string, so
  ``cached_tokens`` said remote tokens at every call and no allocate restored
  them, until the block was committed again; the probe now counts a string of
  a value's length only (``STRLEN`` in the same round) and deletes the rest;
- URL options whose value a URL cannot give (``protocol=4``,
  ``cache_config=1``, ``retry=1``, ...) passed the URL check: redis-py's
  errors from ``RemoteTier(url)``, a traceback from ``kvpager serve``, or a
  store that answered said not to; now an allow-list, each value checked;
- on a Redis Cluster, one sentinel watched one master: a master not holding
  it that restarted empty was never noticed, nothing written again; now one
  sentinel per master;
- a write queue smaller than one block dropped every block; now it holds one
  at least, as the restore cap restores one at least."""

from __future__ import annotations

import re
import time

import pytest
from click.testing import CliRunner
from daemon_helpers import ipc_endpoint
from redis_helpers import need_redis, redis_cluster, redis_server

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import BS, SPEC, WAIT, pool, prefill, written  # noqa: E402

from kvpager import InvalidArgument, KVPool  # noqa: E402
from kvpager.cli import main  # noqa: E402
from kvpager.remote_format import HEADER_BYTES  # noqa: E402
from kvpager.remote_republish import Losses  # noqa: E402
from kvpager.remote_restore import missing  # noqa: E402
from kvpager.remote_store import KEY_ABSENT, KEY_OTHER, KEY_STRING, KEY_WRONG_LENGTH, open_store  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

VALUE = HEADER_BYTES + SPEC.bytes_per_block
SERVE = ["--layers", "2", "--kv-heads", "2", "--head-dim", "32", "--dtype", "float32", "--blocks", "16",
         "--device", "cpu"]


def split(p: KVPool, prompt: list[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """(the probe's (cached, remote) tokens, the following allocate's), the sequence freed."""
    [c] = p.probe_cache([prompt], "m")
    [a] = p.allocate([prompt], salt="m")
    p.free(a.seq_id)
    return (c.num_cached_tokens, c.num_remote_tokens), (a.num_cached_tokens, a.num_remote_tokens)


def plant(r, key: str, kind: str) -> None:
    """Put what ``kind`` names under ``key`` (a careless tool's write)."""
    if kind == "hash":
        r.delete(key)
        r.hset(key, "f", "v")
    else:
        r.set(key, {"empty": b"", "short": b"x" * 10, "long": b"y" * (VALUE + 1), "value": bytes(VALUE)}[kind])


KINDS = ["empty", "short", "long", "value", "hash", "absent"]
WANT = [KEY_WRONG_LENGTH, KEY_WRONG_LENGTH, KEY_WRONG_LENGTH, KEY_STRING, KEY_OTHER, KEY_ABSENT]


def test_an_empty_value_is_not_counted_by_the_probe_and_is_deleted():
    """Every value of a prompt emptied (``SET key ""``): the probe counted 4
    blocks at every call while every allocate restored none. Now it counts
    none, and deletes them (``corrupt_blocks``), so the next commit stores the
    blocks; one emptied in the middle ends the run there, as the allocate's."""
    with redis_server() as store:
        r = redis.Redis(port=store.port)
        a, b = pool(store.url), pool(store.url)
        prompt = list(range(4 * BS + 1))
        prefill(a, prompt, seed=1)
        assert written(a, 4)
        keys = sorted(r.keys("kvpager:*"))
        for k in keys:
            r.set(k, b"")
        for _ in range(2):
            assert split(b, prompt) == ((0, 0), (0, 0))
            assert b.remote.flush(WAIT)
        assert r.keys("kvpager:*") == [] and b.remote_stats().corrupt_blocks == 4
        c = pool(store.url)  # a host that commits the blocks again: the store holds them again
        prefill(c, prompt, seed=1)
        assert written(c, 4) and c.remote_stats().corrupt_blocks == 0
        d = pool(store.url)
        key, (root, _) = list(missing(d.manager.pool, BS, [prompt], ["m"]).wants.items())[2]  # (chain order)
        r.set(d.remote.key(root, key), b"")
        assert split(d, prompt) == ((2 * BS, 2 * BS), (2 * BS, 2 * BS))
        for p in (a, b, c, d):
            assert p.remote_stats().errors == 0
            p.check_integrity()
            p.close()


def test_exists_many_with_a_width_tells_strings_of_another_length():
    """`Store.exists_many` with a value's length: only a string of that length is
    `KEY_STRING`; an empty, shorter or longer one `KEY_WRONG_LENGTH`; without a
    width (the sentinel's check: TYPE alone) any string is one, as before."""
    with redis_server() as store:
        r = redis.Redis(port=store.port)
        s = open_store(store.url, timeout=2.0)
        keys = [f"kvpager:test:{kind}" for kind in KINDS]
        for kind, key in zip(KINDS, keys):
            if kind != "absent":
                plant(r, key, kind)
        assert s.exists_many(keys, VALUE).tolist() == WANT
        assert s.exists_many(keys).tolist() == [KEY_STRING] * 4 + [KEY_OTHER, KEY_ABSENT]
        many = keys * 300  # (a long pipeline: replies read in many pieces)
        assert s.exists_many(many, VALUE).tolist() == WANT * 300
        r.execute_command("ACL", "SETUSER", "default", "-strlen")
        with pytest.raises(Exception, match="NOPERM"):
            s.exists_many(keys, VALUE)
        r.execute_command("ACL", "SETUSER", "default", "+strlen")
        assert s.exists_many(keys, VALUE).tolist() == WANT  # (the connection that failed was dropped)
        s.close()


@pytest.mark.parametrize("url, option", [
    ("redis://127.0.0.1:6379?protocol=4", "protocol"),  # redis-py's ConnectionError from RemoteTier(url)
    ("redis://127.0.0.1:6379?cache_config=1", "cache_config"),  # an AttributeError
    ("redis://127.0.0.1:6379?retry=1", "retry"),  # check() then said a store that answers does not
    ("redis://127.0.0.1:6379?socket_type=1", "socket_type"),
    ("redis://127.0.0.1:6379?event_dispatcher=1", "event_dispatcher"),
    ("redis://127.0.0.1:6379?decode_responses=1", "decode_responses"),
    ("redis://127.0.0.1:6379?client_name=a%20b", "client_name"),  # CLIENT SETNAME refuses a space
    ("redis://127.0.0.1:6379?ssl_ca_certs=/ca.pem", "ssl_ca_certs"),  # TLS options without TLS
    ("rediss://127.0.0.1:6379?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("rediss://127.0.0.1:6379?ssl_check_hostname=perhaps", "ssl_check_hostname"),
    ("redis://127.0.0.1:6379?client_name=a&client_name=b", "client_name"),
    ("unix:///run/redis.sock?protocol=4", "protocol"),
])
def test_an_option_a_url_cannot_give_is_refused_naming_it(url, option):
    with pytest.raises(InvalidArgument, match=f"option '{re.escape(option)}'"):
        RemoteTier(url)


def test_the_options_a_url_may_give_work():
    """Each option of the allow-list, against a server that answers: the check
    passes, and a block goes to the store and back."""
    with redis_server() as store:
        r = redis.Redis(port=store.port)
        r.execute_command("ACL", "SETUSER", "kv", "on", ">pw", "~kvpager:*", "+@all")
        for query in ("protocol=3&client_name=w@n1", "protocol=2&db=0", "username=kv&password=pw"):
            a, b = pool(f"{store.url}?{query}"), pool(f"{store.url}?{query}")
            assert a.remote.check() is None, query
            prompt = list(range(len(query), len(query) + 2 * BS + 1))
            prefill(a, prompt, seed=2)
            assert written(a, 2)
            assert split(b, prompt) == ((2 * BS, 2 * BS), (2 * BS, 2 * BS)), query
            assert a.remote_stats().errors == b.remote_stats().errors == 0
            a.close(), b.close()


def test_serve_exits_naming_the_option_without_a_traceback():
    result = CliRunner().invoke(main, ["serve", *SERVE, "--endpoint", ipc_endpoint()[0], "--remote",
                                       "redis://127.0.0.1:6379?protocol=4"])
    assert result.exit_code != 0 and "'protocol'" in result.output, result.output
    assert isinstance(result.exception, SystemExit), result.exception


@pytest.mark.parametrize("queue_bytes", [0, 4096])  # a value is 8,272 bytes
def test_a_queue_smaller_than_a_block_holds_one(queue_bytes):
    """Before, every block was dropped (``dropped_blocks`` 20, none written);
    now an empty queue takes one block, whatever its size."""
    with redis_server() as store:
        a = pool(store.url, queue_bytes=queue_bytes)
        for i in range(4):
            prefill(a, [i * 1000 + t for t in range(BS + 1)], seed=i)  # one block each
            assert a.remote.flush(WAIT)
        [x] = a.allocate([list(range(9000, 9000 + 3 * BS + 1))], salt="m")  # three blocks at once
        a.commit(x.seq_id)
        assert a.remote.flush(WAIT)
        st = a.remote_stats()
        assert (st.written_blocks, st.dropped_blocks, st.errors) == (5, 2, 0), st
        a.close()


class _Owners:
    """What `Losses` asks of a store: each key's master now (``where``: key -> master)."""

    def __init__(self, where: dict[str, str | None] | None):
        self.where = where

    def owners(self, keys):
        return None if self.where is None else [(k, self.where.get(k)) for k in keys]


def test_one_sentinel_a_master_and_the_masters_changing():
    """A standalone store: one sentinel, the first block written (as before).
    A cluster: the first block written to each master; after a failover or a
    resharding the sentinels are keyed by the master holding each now, one a
    master, and a master without one gets one from the next batch."""
    w = Losses(1.0)
    w.wrote(_Owners(None), iter(["k1", "k2"]))
    w.wrote(_Owners(None), iter(["k3"]))
    assert w.sentinels == {"": "k1"}
    w = Losses(1.0)
    store = _Owners({"k1": "A", "k2": "B", "k3": "A", "k4": "C", "k5": None})
    w.wrote(store, iter(["k1", "k2", "k3", "k5"]))
    w.wrote(store, iter(["k4"]))
    assert w.sentinels == {"A": "k1", "B": "k2", "C": "k4"}
    store.where.update(k1="D", k2="D")  # A and B gone: their slots on D now
    w.regroup(store)
    assert w.sentinels == {"D": "k1", "C": "k4"}
    store.where.update(k6="E")  # a new master: its first block
    w.wrote(store, iter(["k6", "k1"]))
    store.where.update(k4=None)  # a slot no master holds for now: kept as it was
    w.regroup(store)
    assert w.sentinels == {"D": "k1", "C": "k4", "E": "k6"}


def test_a_cluster_master_that_restarts_empty_is_noticed():
    """Blocks on every master of a 3-master cluster; each master but one
    restarts empty (no persistence), one after another: each loss is noticed
    within ``check_every`` and the blocks it held written again, so another
    host restores every prompt. Before, only the master holding the one
    sentinel was watched: ``store_losses`` stayed 0."""
    spec = SPEC.replace(num_blocks=200)
    with redis_cluster(3) as nodes:
        url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
        rc = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
        keys = [f"kvpager:test:{kind}:{i}" for i in range(4) for kind in KINDS]  # (over the masters)
        for key in keys:
            if ":absent:" not in key:
                plant(rc, key, key.split(":")[2])
        s = open_store(url, timeout=2.0)
        for raw in (True, False):  # the probe as it reads replies raw, and through redis-py
            s.raw_reads = raw
            assert s.exists_many(keys, VALUE).tolist() == WANT * 4, raw
        for key in keys:
            rc.delete(key)
        s.close(), rc.close()
        a = pool(url, spec, check_every=0.2)
        prompts = [[p * 1000 + t for t in range(6 * BS + 1)] for p in range(8)]
        for i, prompt in enumerate(prompts):
            prefill(a, prompt, seed=i)
            a.free(a.allocate([prompt], salt="m")[0].seq_id)
        assert written(a, 48)
        assert len(a.remote.losses.sentinels) == 3
        for restarts, node in enumerate(nodes[1:], 1):  # (not the first: the one the URL names)
            held = int(node.cli("dbsize").strip())
            assert held > 0
            node.stop()
            node.start()
            deadline = time.monotonic() + WAIT
            while not all("cluster_state:ok" in n.cli("cluster", "info") for n in nodes):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            deadline = time.monotonic() + WAIT
            while a.remote_stats().store_losses < restarts or int(node.cli("dbsize").strip()) < held:
                assert time.monotonic() < deadline, (a.remote_stats(), node.cli("dbsize"))
                for prompt in prompts:  # this host keeps hitting them locally
                    a.free(a.allocate([prompt], salt="m")[0].seq_id)
                a.remote.flush(WAIT)
                time.sleep(0.1)
        assert a.remote_stats().store_losses == 2
        b = pool(url, spec)
        for prompt in prompts:
            [y] = b.allocate([prompt], salt="m")
            assert y.num_remote_tokens == 6 * BS
            b.free(y.seq_id)
        for p in (a, b):
            p.check_integrity()
            p.close()
