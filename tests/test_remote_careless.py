"""The remote tier against careless operators and hostile or broken Redis
servers (real redis-server processes, nothing mocked):
- a store the tier could never use (credentials refused, a DB past the
  server's, an ACL user without a command the tier sends, a cluster node given
  as a standalone store and a standalone one as a cluster, TLS asked of a
  plain server): `RemoteTier.check` and ``kvpager serve`` refuse it at start,
  naming what is wrong (they warned "does not answer", or said nothing, and
  ran with every lookup failing);
- a store that answers but refuses writes (full under ``noeviction``, a
  read-only replica, an ACL without ``SET``) or probes (an ACL without
  ``TYPE``): only that kind of call pauses, logged once; lookups go on
  restoring (each refused write closed and reopened the breaker every call
  (two warnings a call) and made the lookups skip the store);
- a huge value under a block's key: a lookup reads at most a value's length
  of it (it timed out at every lookup, so nothing was restored again, and the
  store built a reply of the whole value each time) (slow stores:
  test_remote_slow.py);
- (store URLs that did not parse: test_remote_urls.py)."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from daemon_helpers import ipc_endpoint
from redis_helpers import (
    RedisServer,
    free_port,
    need_cli,
    need_redis,
    redis_cluster,
    redis_server,
    tls_redis_server,
)

need_redis()


redis = pytest.importorskip("redis")

from kvpager import InvalidArgument, KVPool, PoolSpec  # noqa: E402
from kvpager.prefix_cache import root_key  # noqa: E402
from kvpager.remote_store import StoreMisconfigured  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=16, dtype="float32")


BS = SPEC.block_size


WAIT = 20.0


SERVE = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--blocks", "48",
         "--device", "cpu", "--heartbeat-timeout", "30"]


TIER = ["+getrange", "+type", "+set", "+strlen", "+del", "+client|setname"]  # what docs/remote.md lists


@pytest.fixture(scope="module")
def cluster():
    with redis_cluster(3) as nodes:
        yield nodes


def acl_user(server: RedisServer, name: str, *rules: str) -> str:
    """A URL of ``server`` as ACL user ``name`` (password pw) with ``rules``."""
    server.cli("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
    return f"redis://{name}:pw@127.0.0.1:{server.port}"


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
    the K/V of its full blocks."""
    [a] = p.allocate([prompt], salt="m")
    out = p.backend.device_array()[np.asarray(a.block_table[: len(prompt) // BS])].copy()
    p.free(a.seq_id)
    return a.num_remote_tokens, out


def stored(url: str, n: int) -> tuple[KVPool, list[list[int]], list[np.ndarray]]:
    """A pool over the store at ``url`` that wrote ``n`` prompts' blocks to it:
    (the pool, the prompts, their full blocks' K/V)."""
    a = KVPool(SPEC, remote=RemoteTier(url, retry_after=0.05))
    shared = prompts(n, 100)
    kvs = [prefill(a, p, seed=i) for i, p in enumerate(shared)]
    assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == 3 * len(shared)
    return a, shared, kvs


def prompts(n: int, base: int) -> list[list[int]]:
    return [list(range(base + 1000 * i, base + 1000 * i + 3 * BS + 1)) for i in range(n)]


def remote_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvpager.remote" and r.levelno >= logging.WARNING]


# -- at start: what the tier could never use ---------------------------------------------------------


def test_check_refuses_credentials_db_and_commands_an_acl_user_lacks():
    need_cli()
    with redis_server() as server:
        good = acl_user(server, "tier", "~kvpager:*", *TIER)
        cases = {  # URL -> what the refusal names
            f"redis://tier:wrong@127.0.0.1:{server.port}": "credentials were refused",
            f"redis://nobody:pw@127.0.0.1:{server.port}": "credentials were refused",
            f"redis://127.0.0.1:{server.port}/99": "DB index is out of range",
            acl_user(server, "nosetname", "~kvpager:*", *TIER, "-client|setname"): "client|setname",
            acl_user(server, "nokeys", "~other:*", *TIER): "GETRANGE for lookups (this user has no permissions to access one of the keys",
        }
        for command in ("getrange", "type", "set", "strlen", "del"):
            url = acl_user(server, f"no{command}", "~kvpager:*", *TIER, f"-{command}")
            cases[url] = f"{command.upper()} for "
        for url, why in cases.items():
            t = RemoteTier(url)
            with pytest.raises(StoreMisconfigured, match=re.escape(why)) as e:
                t.check(SPEC)
            assert isinstance(e.value, InvalidArgument) and "pw" not in str(e.value).replace("pw@", "")
            t.close()
        t = RemoteTier(good)
        assert t.check(SPEC) is None  # exactly the documented commands: enough (PING was needed, not listed)
        t.close()
        # a password the default user needs and the URL lacks
        server.cli("CONFIG", "SET", "requirepass", "secret")
        t = RemoteTier(f"redis://127.0.0.1:{server.port}")
        with pytest.raises(StoreMisconfigured, match="credentials were refused"):
            t.check(SPEC)
        t.close()
    # a store that does not answer stays a warning: it may come up later
    t = RemoteTier(f"redis://127.0.0.1:{free_port()}")
    assert "Connection refused" in t.check(SPEC) and not t.stats().available
    t.close()


# (a client-query-buffer-limit under one write: every write dropped by the store, counted as
# an outage, while the check said it was fine)
@pytest.mark.parametrize("setting", ["proto-max-bulk-len", "client-query-buffer-limit"])
def test_check_refuses_a_store_that_cannot_take_one_value(setting):
    with redis_server() as server:
        server.cli("CONFIG", "SET", setting, str(1 << 20))
        big = SPEC.replace(num_layers=64, head_dim=128)  # 2 MiB blocks
        t = RemoteTier(server.url)
        assert t.check(SPEC) is None
        with pytest.raises(StoreMisconfigured, match=f"{setting} is 1048576 bytes"):
            t.check(big)
        t.close()
        server.cli("CONFIG", "SET", setting, str(4 << 20))
        t = RemoteTier(server.url)
        assert t.check(big) is None
        t.close()


def test_check_refuses_a_cluster_node_as_a_standalone_store_and_the_other_way(cluster):
    with redis_server() as server:
        t = RemoteTier(cluster[0].url)
        with pytest.raises(StoreMisconfigured, match="node of a Redis Cluster.*use redis\\+cluster://"):
            t.check(SPEC)
        t.close()
        t = RemoteTier(f"redis+cluster://127.0.0.1:{server.port}")
        with pytest.raises(StoreMisconfigured, match="no Redis Cluster node.*use redis://"):
            t.check(SPEC)
        t.close()
    t = RemoteTier(f"redis+cluster://127.0.0.1:{cluster[0].port}")
    assert t.check(SPEC) is None
    t.close()
    for node in cluster:
        node.cli("ACL", "SETUSER", "notype", "reset", "on", ">pw", "~*", "+@all", "-type")
    t = RemoteTier(f"redis+cluster://notype:pw@127.0.0.1:{cluster[0].port}")
    with pytest.raises(StoreMisconfigured, match="TYPE for probes"):
        t.check(SPEC)
    t.close()


def test_check_refuses_tls_asked_of_a_plain_server():
    with redis_server() as server:
        t = RemoteTier(f"rediss://127.0.0.1:{server.port}")
        with pytest.raises(StoreMisconfigured, match="answers without TLS; use redis://"):
            t.check(SPEC)
        t.close()


def test_check_refuses_plain_text_asked_of_a_tls_server(tmp_path):
    """redis:// at a port that speaks only TLS: named, with the scheme to use (it read
    "does not answer", and the daemon served without the store for ever)."""
    with tls_redis_server(str(tmp_path)) as (_, tls_port, _cert):
        t = RemoteTier(f"redis://127.0.0.1:{tls_port}")
        with pytest.raises(StoreMisconfigured, match="answers only TLS; use rediss://"):
            t.check(SPEC)
        t.close()
    with redis_server() as server:  # a plain server that does not answer the command is no TLS server
        from kvpager.remote_access import tls_only

        assert not tls_only("127.0.0.1", server.port, 1.0) and not tls_only("127.0.0.1", free_port(), 0.5)


def test_serve_exits_naming_what_the_store_refuses():
    """``kvpager serve`` processes (all at once; killed 30 s on: one that
    serves did not refuse) exit 1 with the reason and no traceback."""
    need_cli()
    with redis_server() as server:
        url = acl_user(server, "notype", "~kvpager:*", *TIER, "-type")
        cases = ((url, "TYPE for probes"),
                 (f"redis://notype:wrong@127.0.0.1:{server.port}", "credentials were refused"),
                 ("redis://[::1", "remote store URL 'redis://[::1'"),
                 (f"redis://127.0.0.1:{server.port}/kv", "is not /DB"))
        endpoints = [ipc_endpoint() for _ in cases]
        try:
            procs = [subprocess.Popen([sys.executable, "-m", "kvpager", "serve", *SERVE, "--endpoint", endpoint,
                                       "--remote", remote], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for (remote, _), (endpoint, _) in zip(cases, endpoints)]
            deadline = time.monotonic() + 30
            for proc, (remote, why) in zip(procs, cases):
                try:
                    out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                assert proc.returncode == 1 and why in out and "Traceback" not in out, (remote, proc.returncode, out)
        finally:
            for _, d in endpoints:
                shutil.rmtree(d, ignore_errors=True)


# -- at run time: a store that answers but refuses one kind of call ----------------------------------


@contextlib.contextmanager
def refusing_writes(kind: str, server: RedisServer):
    """The URL of a store (all of ``server``'s blocks readable) that refuses
    writes: full under noeviction, a read-only replica, an ACL without SET."""
    if kind == "full":
        server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
        server.cli("CONFIG", "SET", "maxmemory", "1")
        yield server.url
    elif kind == "replica":
        server.cli("CONFIG", "SET", "repl-diskless-sync-delay", "0")  # not 5 s for more replicas
        replica = RedisServer(None, "--replicaof", "127.0.0.1", str(server.port)).start()
        try:
            want = int(server.cli("DBSIZE"))
            deadline = time.monotonic() + WAIT
            while "master_link_status:up" not in replica.cli("INFO", "replication") \
                    or int(replica.cli("DBSIZE")) < want:
                assert time.monotonic() < deadline, "the replica did not sync"
                time.sleep(0.05)
            yield replica.url
        finally:
            replica.close()
    else:
        yield acl_user(server, "noset", "~kvpager:*", *TIER, "-set")


@pytest.mark.parametrize("kind", ["full", "replica", "no SET"])
def test_refused_writes_pause_the_writes_only_logged_once(kind, caplog):
    need_cli()
    caplog.set_level(logging.DEBUG, logger="kvpager.remote")
    with redis_server() as server:
        a, shared, kvs = stored(server.url, 8)
        with refusing_writes(kind, server) as url:
            b = KVPool(SPEC, remote=RemoteTier(url, retry_after=0.05))
            caplog.clear()
            for i, (p, kv) in enumerate(zip(shared, kvs)):
                prefill(b, prompts(1, 50_000 + 1000 * i)[0], seed=100 + i)  # its write is refused
                assert b.remote.flush(WAIT)
                time.sleep(0.06)  # past the pause: the writer tries again (and is refused again)
                assert b.cached_tokens([p], "m") == [3 * BS]
                assert restore(b, p) == (3 * BS, pytest.approx(kv))  # every lookup restores
            st = b.remote_stats()
            assert st.skipped_lookups == 0 and st.skipped_probes == 0 and st.restored_blocks == 3 * len(shared)
            assert st.available and st.written_blocks == 0 and st.dropped_blocks >= 3 * len(shared)
            assert st.errors >= 2  # refused again at each try, counted
            warned = remote_warnings(caplog)
            assert len(warned) == 1 and "remote store refuses writes" in warned[0], warned
            b.check_integrity()
            if kind == "full":  # room again: the next try writes, logged once
                server.cli("CONFIG", "SET", "maxmemory", "0")
                deadline = time.monotonic() + WAIT
                while b.remote_stats().written_blocks == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                    prefill(b, prompts(1, 90_000 + int(time.monotonic() * 1000) % 10_000)[0], seed=7)
                    b.remote.flush(WAIT)
                assert "remote store takes writes again" in remote_warnings(caplog)[-1]
            b.close()
        a.close()


def test_refused_probes_do_not_stop_the_lookups(caplog):
    """An ACL user whose TYPE is taken away while the daemon runs: the probe
    counts local blocks only; the allocate still restores."""
    need_cli()
    caplog.set_level(logging.DEBUG, logger="kvpager.remote")
    with redis_server() as server:
        a, shared, kvs = stored(server.url, 6)
        url = acl_user(server, "reader", "~kvpager:*", *TIER)
        b = KVPool(SPEC, remote=RemoteTier(url, retry_after=0.05))
        server.cli("ACL", "SETUSER", "reader", "-type")
        caplog.clear()
        for p, kv in zip(shared, kvs):
            assert b.cached_tokens([p], "m") == [0]  # refused: nothing from the store counts
            assert restore(b, p) == (3 * BS, pytest.approx(kv))
            time.sleep(0.06)
        st = b.remote_stats()
        assert st.skipped_lookups == 0 and st.restored_blocks == 3 * len(shared) and st.available
        warned = remote_warnings(caplog)
        assert len(warned) == 1 and "remote store refuses probes" in warned[0], warned
        b.check_integrity()
        a.close(), b.close()


# -- a hostile writer: a huge value under a block's key ----------------------------------------------


def sent_bytes(nodes: list[RedisServer]) -> int:
    total = 0
    for node in nodes:
        info = redis.Redis(port=node.port).info("stats")
        total += info["total_net_output_bytes"]
    return total


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_a_huge_value_under_a_block_key_costs_a_lookup_one_value(where, request):
    with contextlib.ExitStack() as stack:
        if where == "cluster":
            nodes = request.getfixturevalue("cluster")
            url = f"redis+cluster://127.0.0.1:{nodes[0].port}"
            client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
        else:
            nodes = [stack.enter_context(redis_server())]
            url = nodes[0].url
            client = redis.Redis(port=nodes[0].port)
        a = KVPool(SPEC, remote=RemoteTier(url, retry_after=0.05))
        prompt = list(range(7000, 7000 + 4 * BS + 1))
        [x] = a.allocate([prompt], salt="m")
        blocks = np.asarray(x.block_table[:4])
        kv = a.backend.device_array()
        kv[blocks] = np.random.default_rng(3).standard_normal(kv[blocks].shape)
        kv = kv[blocks].copy()
        a.commit(x.seq_id)
        keys = a.manager.history[x.seq_id].keys[:4]
        a.free(x.seq_id)
        assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == 4
        hostile = a.remote.key(root_key("m"), keys[1])
        client.set(hostile, bytes(48 << 20))  # 48 MiB under block 1's key
        b = KVPool(SPEC, remote=RemoteTier(url, retry_after=0.05))  # the default 0.1 s timeout
        before = sent_bytes(nodes)
        t0 = time.monotonic()
        got, restored = restore(b, prompt)
        took = time.monotonic() - t0
        sent = sent_bytes(nodes) - before
        assert got == BS and np.array_equal(restored[:1], kv[:1])  # block 0; the chain stops at block 1
        assert sent < 4 << 20, sent  # not the 48 MiB (a cluster client's first call reads COMMAND: ~100 KiB)
        assert took < 5.0  # bytes sent are the measure; this only bounds the wait on a loaded machine
        st = b.remote_stats()
        assert (st.errors, st.corrupt_blocks, st.available) == (0, 1, True)
        assert b.remote.flush(WAIT) and not client.exists(hostile)  # deleted as a refused value
        b.check_integrity()
        a.close(), b.close()
        client.close()
