"""Two daemons (`kvpager serve --remote`, separate endpoints and pools) stand
for two hosts sharing one real redis-server: a worker on the first prefills
and commits, a worker on the second gets those tokens from the store with
the K/V the first worker wrote, byte for byte. Killing the store mid-run
fails no request. Also a 3-master Redis Cluster, and the CLI's answers to a
bad URL or an unreachable store."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from click.testing import CliRunner
from daemon_helpers import Raw, daemon_process, ipc_endpoint, req, running_server, wait_until
from daemon_workers import dense_kv
from redis_helpers import free_port, need_redis, redis_cluster, redis_server

need_redis()
redis = pytest.importorskip("redis")

from kvpager import KVPool  # noqa: E402
from kvpager.cli import main  # noqa: E402
from kvpager.client import Client  # noqa: E402
from kvpager.remote_tier import RemoteTier  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

SERVE = ["--layers", "2", "--kv-heads", "2", "--head-dim", "32", "--dtype", "float32", "--blocks", "64",
         "--device", "cpu", "--heartbeat-timeout", "30"]
BS = 16
WAIT = 60.0


def write_prompt(c: Client, prompt: list[int], seed: int, salt: str = "model") -> tuple[int, int, int]:
    """Allocate, write the uncached tokens' K/V (dense_kv of ``seed``) through the
    mapped pool, commit. Returns (seq_id, cached tokens, remote tokens)."""
    [a] = c.allocate([prompt], salt=salt)
    spec = c.spec
    for layer in range(spec.num_layers):
        k, v = dense_kv(seed, layer, len(prompt), spec.num_kv_heads, spec.head_dim, spec.dtype)
        c.write(layer, a.slots, k[a.num_cached_tokens :], v[a.num_cached_tokens :])
    c.commit(a.seq_id)
    return a.seq_id, a.num_cached_tokens, a.num_remote_tokens


def stored_kv(c: Client, table: tuple[int, ...], n: int) -> np.ndarray:
    """[layers, 2, n, heads, dim] read from the daemon's pool through ``c``'s mapping."""
    spec = c.spec
    kv = c.device_array()[np.asarray(table[: -(-n // BS)])]  # [nb, L, 2, H, bs, D]
    return kv.transpose(1, 2, 0, 4, 3, 5).reshape(spec.num_layers, 2, -1, spec.num_kv_heads, spec.head_dim)[:, :, :n]


def expected_kv(spec: PoolSpec, seed: int, n: int) -> np.ndarray:
    return np.stack([np.stack(dense_kv(seed, layer, n, spec.num_kv_heads, spec.head_dim, spec.dtype))
                     for layer in range(spec.num_layers)])


def test_two_daemons_share_prefixes_and_survive_the_store_dying():
    with redis_server() as store:
        args = [*SERVE, "--remote", store.url, "--remote-timeout", "0.2", "--remote-connections", "3"]
        (ep_a, dir_a), (ep_b, dir_b) = ipc_endpoint(), ipc_endpoint()
        with daemon_process(args, ep_a) as daemon_a, daemon_process(args, ep_b) as daemon_b, \
                Client(ep_a) as wa, Client(ep_b) as wb:
            assert wa.remote == {"kind": "redis", "url": store.url, "ttl": 86400, "probe": True, "namespace": None}
            prompt = list(range(2000, 2000 + 4 * BS + 5))
            seq_a, cached, remote = write_prompt(wa, prompt, seed=11)
            assert (cached, remote) == (0, 0)
            assert wait_until(lambda: wa.remote_stats().written_blocks == 4, WAIT)

            [b] = wb.allocate([prompt], salt="model")
            assert (b.num_cached_tokens, b.num_remote_tokens) == (4 * BS, 4 * BS)
            assert len(b.slots) == 5
            want = expected_kv(wb.spec, 11, 4 * BS)
            assert np.array_equal(stored_kv(wb, b.block_table, 4 * BS), want)
            assert np.array_equal(stored_kv(wa, wa.sequence(seq_a).block_table, 4 * BS), want)
            st = wb.remote_stats()
            assert (st.restored_blocks, st.errors) == (4, 0)
            assert wb.stats().prefix_hit_tokens == 4 * BS
            wb.free(b.seq_id)

            # The store dies mid-run: every request is still served from the local cache or computed.
            store.stop()
            for i in range(12):
                for w, other in ((wa, wb), (wb, wa)):
                    seq, _, remote = write_prompt(w, list(range(10_000 * (i + 1), 10_000 * (i + 1) + 2 * BS + 1)),
                                                  seed=i)
                    [again] = other.allocate([prompt], salt="model")  # the shared prefix: local hits
                    assert again.num_cached_tokens == 4 * BS and remote == 0
                    other.free(again.seq_id)
                    w.free(seq)
            for w in (wa, wb):
                st = w.remote_stats()
                assert st.errors >= 1 and st.restored_blocks <= 4
                w.check_integrity()
        for proc in (daemon_a, daemon_b):
            assert any("remote store" in line and "failed" in line for line in proc.log), "".join(proc.log)
        for d in (dir_a, dir_b):
            shutil.rmtree(d, ignore_errors=True)


def test_serve_with_an_unreachable_store_starts_and_serves():
    endpoint, d = ipc_endpoint()
    url = f"redis://127.0.0.1:{free_port()}"
    with daemon_process([*SERVE, "--remote", url], endpoint) as proc, Client(endpoint) as c:
        seq, cached, remote = write_prompt(c, list(range(3 * BS + 1)), seed=1)
        assert (cached, remote) == (0, 0)
        st = c.remote_stats()
        assert st.available is False and st.errors >= 1
        c.check_integrity()
    assert any("does not answer" in line for line in proc.log), "".join(proc.log)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:6379", "unknown scheme"),
    ("redis://127.0.0.1:99999", "not HOST:PORT"),
    ("127.0.0.1:6379", "must look like"),
])
def test_serve_refuses_a_bad_remote_url(url, why):
    result = CliRunner().invoke(main, ["serve", *SERVE, "--endpoint", ipc_endpoint()[0], "--remote", url])
    assert result.exit_code != 0 and why in result.output, result.output


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_serve_refuses_bad_remote_connections(value):
    result = CliRunner().invoke(main, ["serve", *SERVE, "--endpoint", ipc_endpoint()[0], "--remote",
                                       "redis://127.0.0.1:6379", "--remote-connections", value])
    assert result.exit_code != 0 and "--remote-connections" in result.output, result.output


def test_cluster_of_three_masters():
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=32, num_blocks=64, block_size=BS, dtype="float32")
    with redis_cluster(3) as nodes:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes[:2])
        a, b = (KVPool(spec, remote=RemoteTier(url, retry_after=0.2)) for _ in range(2))
        prompt = list(range(12 * BS + 1))
        [x] = a.allocate([prompt], salt="m")
        rng = np.random.default_rng(3)
        for layer in range(spec.num_layers):
            k = rng.standard_normal((len(x.slots), 2, 32)).astype(np.float32)
            a.write(layer, x.slots, k, -k)
        a.commit(x.seq_id)
        assert a.remote.flush(WAIT) and a.remote_stats().written_blocks == 12
        per_node = [int(n.cli("dbsize").strip()) for n in nodes]
        assert sum(per_node) == 12 and sum(1 for n in per_node if n) >= 2, per_node  # spread by slot
        # the probe: a cluster pipeline of TYPE over the masters
        short = prompt[: 5 * BS] + [7]  # blocks 0-4 held, then one nobody has
        probes = b.probe_cache([prompt, short, prompt], ["m", "m", "x"])
        assert [(p.num_cached_tokens, p.num_remote_tokens) for p in probes] == [(12 * BS,) * 2, (5 * BS,) * 2, (0, 0)]
        assert b.remote_stats().probe_hit_blocks == 12 and b.remote_stats().lookups == 0
        t0 = time.monotonic()
        [y] = b.allocate([prompt], salt="m")
        assert time.monotonic() - t0 < 10
        assert y.num_remote_tokens == 12 * BS
        kv = a.backend.device_array()
        assert np.array_equal(b.backend.device_array()[list(y.block_table[:12])], kv[list(x.block_table[:12])])
        b.check_integrity()
        a.close(), b.close()


def test_old_clients_get_four_fields_and_stats_show_the_tier():
    with redis_server() as store, running_server(remote=RemoteTier(store.url)) as server:
        raw = Raw(server.endpoint)
        try:
            hello = raw.send(req(1, "hello", {}))[2]
            assert hello["remote"] == {"kind": "redis", "url": store.url, "ttl": 86400, "probe": True, "namespace": None}
            old = raw.send(req(2, "allocate", {"prompts": [list(range(40))]}, hello["session"]))
            assert old[1] == 0 and len(old[2][0]) == 4  # a client that predates the tier
            new = raw.send(req(3, "allocate", {"prompts": [list(range(40))], "remote_tokens": True},
                               hello["session"]))
            assert new[1] == 0 and len(new[2][0]) == 5 and new[2][0][4] == 0
        finally:
            raw.close()
        result = CliRunner().invoke(main, ["stats", "--json", "--endpoint", server.endpoint])
        assert result.exit_code == 0, result.output
        remote = json.loads(result.output)["remote"]
        assert remote["store"] == store.url and remote["lookups"] == 2 and remote["available"] is True
        result = CliRunner().invoke(main, ["stats", "--endpoint", server.endpoint])
        assert f"remote store     {store.url}: available" in result.output, result.output


def test_metrics_carry_the_tier_counters():
    """/metrics of two daemons on one store: the writer's written blocks, the
    reader's lookups, hits and restored bytes, equal to `remote_stats()`."""
    from test_metrics import scrape, v

    with redis_server() as store, \
            running_server(remote=RemoteTier(store.url), metrics_port=0) as a, \
            running_server(remote=RemoteTier(store.url), metrics_port=0) as b, \
            Client(a.endpoint) as wa, Client(b.endpoint) as wb:
        prompt = list(range(500, 500 + 3 * wa.spec.block_size + 2))
        write_prompt(wa, prompt, seed=3)
        assert wait_until(lambda: wa.remote_stats().written_blocks == 3, WAIT)
        assert wb.cached_tokens([prompt], salt="model") == [3 * wb.spec.block_size]  # a probe
        [got] = wb.allocate([prompt], salt="model")
        assert got.num_remote_tokens == 3 * wb.spec.block_size
        assert wb.remote_stats().probe_hit_blocks == 3
        for server, client in ((a, wa), (b, wb)):
            st = client.remote_stats()
            samples = scrape(server.metrics_port)
            assert v(samples, "kvpager_remote_available") == 1.0
            for name in ("lookups", "lookup_blocks", "hit_blocks", "restored_blocks", "restored_bytes",
                         "errors", "written_blocks", "written_bytes", "dropped_blocks", "corrupt_blocks",
                         "probes", "probe_blocks", "probe_hit_blocks", "skipped_probes"):
                assert v(samples, f"kvpager_remote_{name}_total") == getattr(st, name), name
        assert v(scrape(b.metrics_port), "kvpager_remote_restored_blocks_total") == 3
        assert v(scrape(a.metrics_port), "kvpager_remote_written_blocks_total") == 3
