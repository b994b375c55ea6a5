"""Prometheus metrics: the pool's counters, then a daemon's /metrics over real
HTTP, each metric moving by what the ops between two scrapes must do
(counted from the ops, not read back from the code), and the refusals of
bad settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from click.testing import CliRunner
from daemon_helpers import (
    SMALL,
    Raw,
    daemon_process,
    ipc_endpoint,
    req,
    running_server,
    subprocess_env,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from kvpager import KVPool, PoolSpec, env
from kvpager.cli import main
from kvpager.client import Client
from kvpager.errors import InvalidArgument
from kvpager.protocol import unpack
from kvpager.server import Server

BS = SMALL.block_size
BPB = SMALL.bytes_per_block


def scrape(port: int, timeout: float = 10) -> dict[tuple[str, frozenset], float]:
    """Every sample of http://127.0.0.1:PORT/metrics, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def v(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_pool_counters_count_what_the_ops_did():
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=9, block_size=16, dtype="float32",
                    num_host_blocks=4)
    pool = KVPool(spec)
    prompt = list(range(40))  # 2 full blocks + 8 tokens
    [a] = pool.allocate([prompt])
    pool.commit(a.seq_id)
    [b] = pool.allocate([prompt])  # 32 of 40 tokens hit
    c0 = pool.counters()
    assert (c0.prefix_query_tokens, c0.prefix_hit_tokens) == (80, 32)
    [[child]] = pool.fork(b.seq_id)
    pool.append(b.seq_id, 1)  # its partly filled last block is shared with the child: copied
    pool.append(child, 1)  # the child holds the original alone now: no copy
    assert pool.counters().cow_blocks == 1
    pool.swap_out(child)  # its last block is its own now (b got the copy): 1 block moves
    pool.swap_in(child)
    c1 = pool.counters()
    assert (c1.swap_out_blocks, c1.swap_in_blocks) == (1, 1)
    assert (c1.swap_out_bytes, c1.swap_in_bytes) == (spec.bytes_per_block, spec.bytes_per_block)
    pool.free([a.seq_id, b.seq_id, child])  # the 2 committed blocks stay cached
    pool.allocate([list(range(100, 100 + 8 * 16))])  # all 8 usable blocks: both cached ones evicted
    assert pool.counters().evicted_blocks == 2
    assert pool.counters().prefix_query_tokens == 80 + 128


@pytest.fixture
def daemon():
    endpoint, d = ipc_endpoint()
    # (3 s: a raw session must outlive a loaded 2-core host's pause between its requests and the scrape)
    with running_server(endpoint=endpoint, metrics_port=0, heartbeat_timeout=3.0) as server:
        assert server.metrics_port > 0
        yield server
    shutil.rmtree(d, ignore_errors=True)


def test_each_metric_moves_after_the_ops_that_move_it(daemon):
    port = daemon.metrics_port
    s0 = scrape(port)
    assert v(s0, "kvpager_blocks_total") == SMALL.num_blocks - 1
    assert v(s0, "kvpager_blocks_free") == SMALL.num_blocks - 1 and v(s0, "kvpager_kv_cache_usage_perc") == 0
    assert v(s0, "kvpager_host_blocks_total") == SMALL.num_host_blocks == v(s0, "kvpager_host_blocks_free")
    assert v(s0, "kvpager_blocks_pinned") == 0 and v(s0, "kvpager_sessions") == 0
    assert v(s0, "kvpager_info", version=__import__("kvpager").__version__, device="cpu", block_size="16") == 1
    with Client(daemon.endpoint) as c:
        prompt = list(range(3 * BS + 5))  # 4 blocks, 3 of them full
        [a] = c.allocate([prompt])
        c.commit([a.seq_id])
        s1 = scrape(port)
        assert v(s1, "kvpager_sessions") == 1 and v(s1, "kvpager_sequences") == 1
        assert v(s1, "kvpager_blocks_used") == 4 and v(s1, "kvpager_blocks_cached") == 3
        assert v(s1, "kvpager_blocks_free") == SMALL.num_blocks - 1 - 4
        assert v(s1, "kvpager_kv_cache_usage_perc") == pytest.approx(4 / (SMALL.num_blocks - 1))
        assert v(s1, "kvpager_prefix_cache_queries_total") == len(prompt)
        assert v(s1, "kvpager_prefix_cache_hits_total") == 0
        assert v(s1, "kvpager_blocks_pinned") == 0
        assert c.pin([prompt]) == [3 * BS]  # the 3 cached blocks
        assert v(scrape(port), "kvpager_blocks_pinned") == 3
        c.unpin([prompt])
        assert v(scrape(port), "kvpager_blocks_pinned") == 0
        for op in ("hello", "allocate", "commit"):
            assert v(s1, "kvpager_requests_total", op=op, result="ok") == 1
            assert v(s1, "kvpager_request_duration_seconds_count", op=op) == 1
            assert 0 < v(s1, "kvpager_request_duration_seconds_sum", op=op) < 10

        [b] = c.allocate([prompt])  # shares the 3 full blocks
        [[child]] = c.fork([b.seq_id])
        c.append([b.seq_id], 1)  # its partly filled last block is shared with the child: copied
        c.append([child], 1)  # the child holds the original alone now: no copy
        s2 = scrape(port)
        assert v(s2, "kvpager_prefix_cache_hits_total") == 3 * BS
        assert v(s2, "kvpager_prefix_cache_queries_total") == 2 * len(prompt)
        assert v(s2, "kvpager_cow_copies_total") == 1
        assert v(s2, "kvpager_blocks_shared") == 3  # a, b and the child share the full blocks
        assert v(s2, "kvpager_sequences") == 3
        assert v(s2, "kvpager_requests_total", op="append", result="ok") == 2

        c.swap_out([child])  # its own last block goes to host memory
        s3 = scrape(port)
        assert v(s3, "kvpager_sequences_swapped") == 1
        assert v(s3, "kvpager_swap_blocks_total", direction="out") == 1
        assert v(s3, "kvpager_swap_bytes_total", direction="out") == BPB
        assert v(s3, "kvpager_host_blocks_free") == SMALL.num_host_blocks - 1
        c.swap_in([child])
        s4 = scrape(port)
        assert v(s4, "kvpager_sequences_swapped") == 0 and v(s4, "kvpager_host_blocks_free") == SMALL.num_host_blocks
        assert v(s4, "kvpager_swap_blocks_total", direction="in") == 1
        assert v(s4, "kvpager_swap_bytes_total", direction="in") == BPB

        with pytest.raises(Exception, match="unknown sequence"):
            c.free([12345])
        c.free([a.seq_id, b.seq_id, child])
        c.allocate([list(range(10**6, 10**6 + (SMALL.num_blocks - 1) * BS))])  # every block: 3 evictions
        s5 = scrape(port)
        assert v(s5, "kvpager_requests_total", op="free", result="unknown_sequence") == 1
        assert v(s5, "kvpager_requests_total", op="free", result="ok") == 1
        assert v(s5, "kvpager_evictions_total") == 3
        assert v(s5, "kvpager_blocks_evictable") == 0 and v(s5, "kvpager_kv_cache_usage_perc") == 1.0
    raw = Raw(daemon.endpoint)
    try:
        raw.send(b"\xc1 not msgpack")
        raw.sock.send_multipart([b"a", b"b", b"c"])  # several frames: refused, and counted so too (was not)
        assert raw.sock.poll(10_000) and unpack(raw.sock.recv_multipart()[-1])[2]["code"] == "protocol_error"
        session = raw.send(req(1, "hello", {}))[2]["session"]
        first = raw.recv_raw(req(2, "allocate", {"prompts": [[1]]}, session=session))
        assert raw.recv_raw(req(2, "allocate", {"prompts": [[1]]}, session=session)) == first  # a retry
        # a known op with an argument it does not take: counted under its op (was "invalid")
        assert raw.send(req(3, "stats", {"bogus": 1}, session=session))[2]["code"] == "invalid_argument"
        s6 = scrape(port)
        assert v(s6, "kvpager_requests_total", op="invalid", result="protocol_error") == 2
        assert v(s6, "kvpager_requests_total", op="stats", result="invalid_argument") == 1
        assert v(s6, "kvpager_requests_total", op="invalid", result="invalid_argument") == 0
        assert v(s6, "kvpager_requests_total", op="allocate", result="replayed") == 1
        assert v(s6, "kvpager_session_expiries_total") == 0
        # silence: the session expires after the 3 s heartbeat timeout
        assert wait_until(lambda: v(scrape(port), "kvpager_session_expiries_total") == 1, 15)
        assert v(scrape(port), "kvpager_sessions") == 0
    finally:
        raw.close()
    s7 = scrape(port)
    # the histogram of each op: cumulative buckets ending in the count, one per request
    for op in ("hello", "allocate", "commit", "fork", "append", "swap_out", "swap_in", "free", "bye"):
        count = sum(val for (name, labels), val in s7.items()
                    if name == "kvpager_requests_total" and ("op", op) in labels)
        buckets = sorted(((float(dict(labels)["le"]), val) for (name, labels), val in s7.items()
                          if name == "kvpager_request_duration_seconds_bucket" and ("op", op) in labels))
        assert buckets and buckets[-1] == (float("inf"), count) == (float("inf"),
                                                                     v(s7, "kvpager_request_duration_seconds_count",
                                                                       op=op))
        assert all(x[1] <= y[1] for x, y in zip(buckets, buckets[1:]))
    assert 0 < v(s7, "kvpager_loop_busy_seconds_total") > v(s0, "kvpager_loop_busy_seconds_total")
    assert 0 <= v(s7, "kvpager_loop_busy_ratio") <= 1
    assert v(s7, "process_resident_memory_bytes") > 0


def test_a_busy_loop_gets_a_nonzero_busy_ratio(daemon):
    slow = daemon._handlers["heartbeat"]

    def heartbeat(s, a):
        time.sleep(0.2)
        return slow(s, a)

    daemon._handlers["heartbeat"] = heartbeat
    with Client(daemon.endpoint, heartbeat=False) as c:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:
            c.heartbeat()
    ratio = v(scrape(daemon.metrics_port), "kvpager_loop_busy_ratio")
    assert 0.5 < ratio <= 1.0


def test_a_stalled_loop_does_not_stall_a_scrape(daemon):
    """The pool's figures come from the loop; a scrape while it is stuck in a
    request answers after its wait with the last figures and says how old."""
    scrape(daemon.metrics_port)  # a first snapshot
    release = threading.Event()
    real = daemon._handlers["stats"]

    def stuck(s, a):
        release.wait(20)
        return real(s, a)

    daemon._handlers["stats"] = stuck
    raw = Raw(daemon.endpoint)
    try:
        raw.sock.send(req(1, "stats", {}))
        time.sleep(0.3)  # the loop is in the request now
        t0 = time.monotonic()
        samples = scrape(daemon.metrics_port)
        took = time.monotonic() - t0
        assert 1.5 < took < 8
        assert v(samples, "kvpager_pool_snapshot_age_seconds") > 1.5
        assert v(samples, "kvpager_blocks_total") == SMALL.num_blocks - 1
    finally:
        release.set()
        assert raw.sock.poll(10_000)
        raw.close()
    assert v(scrape(daemon.metrics_port), "kvpager_pool_snapshot_age_seconds") < 1.0


def test_scrapes_in_a_tight_loop_take_a_bounded_share_of_the_loop(daemon):
    """Every scrape answers, with figures taken after it asked, but the loop
    takes at most one snapshot of the pool per 0.1 s however many ask."""
    results: list[float] = []

    def scraper():
        for _ in range(10):
            results.append(v(scrape(daemon.metrics_port), "kvpager_blocks_total"))

    before = daemon._snapshots.taken
    t0 = time.monotonic()
    threads = [threading.Thread(target=scraper) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    assert results == [SMALL.num_blocks - 1] * 80
    assert daemon._snapshots.taken - before <= took / 0.1 + 1
    with Client(daemon.endpoint) as c:  # and the daemon answers meanwhile
        c.allocate([[1, 2, 3]])
        assert v(scrape(daemon.metrics_port), "kvpager_sequences") == 1


def test_bad_metrics_settings_are_refused(monkeypatch):
    endpoint, d = ipc_endpoint()
    try:
        with running_server(endpoint=endpoint, metrics_port=0) as first:
            server = Server.create(SMALL, f"ipc://{d}/other.sock", metrics_port=first.metrics_port)
            with pytest.raises(InvalidArgument, match=r"cannot serve metrics on 127\.0\.0\.1:\d+: .*in use"):
                server.bind()
            assert server._sock is None and server.memory is None  # everything released
        for host in ("a..b", "x" * 70 + ".com"):  # (the idna codec's UnicodeError: a traceback before)
            server = Server.create(SMALL, f"ipc://{d}/other.sock", metrics_port=0, metrics_host=host)
            with pytest.raises(InvalidArgument, match="cannot serve metrics on"):
                server.bind()
            assert server._sock is None and server.memory is None
        for bad in ("http", "-1", "65536", "1.5"):
            monkeypatch.setenv("KVPAGER_METRICS_PORT", bad)
            with pytest.raises(InvalidArgument, match="KVPAGER_METRICS_PORT"):
                env.metrics_port()
        monkeypatch.setenv("KVPAGER_METRICS_PORT", " ")
        assert env.metrics_port() is None
        with pytest.raises(InvalidArgument, match="metrics port"):
            Server.create(SMALL, endpoint, metrics_port=70_000).bind()
        r = CliRunner().invoke(main, ["serve", "--layers", "1", "--kv-heads", "1", "--head-dim", "8",
                                      "--blocks", "8", "--endpoint", endpoint, "--metrics-port", "70000"])
        assert r.exit_code == 2 and "70000" in r.output
        bad = subprocess.run([sys.executable, "-m", "kvpager", "serve", "--layers", "1", "--kv-heads", "1",
                              "--head-dim", "8", "--blocks", "8", "--endpoint", endpoint],
                             env={**subprocess_env(), "KVPAGER_METRICS_PORT": "http"}, capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 1 and "KVPAGER_METRICS_PORT='http'" in bad.stderr
        bad = subprocess.run([sys.executable, "-m", "kvpager", "serve", "--layers", "1", "--kv-heads", "1",
                              "--head-dim", "8", "--blocks", "8", "--endpoint", endpoint, "--metrics-port", "0",
                              "--metrics-host", "no-such-host.invalid"], env=subprocess_env(),
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "cannot serve metrics on no-such-host.invalid" in bad.stderr
        assert not os.path.exists(endpoint[len("ipc://"):])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_serve_reads_metrics_port_and_events_endpoint_from_the_environment(monkeypatch):
    endpoint, d = ipc_endpoint()
    monkeypatch.setenv("KVPAGER_METRICS_PORT", "0")
    monkeypatch.setenv("KVPAGER_EVENTS_ENDPOINT", f"ipc://{d}/ev.sock")
    try:
        args = ["--layers", "1", "--kv-heads", "1", "--head-dim", "8", "--blocks", "16", "--dtype", "float32"]
        with daemon_process(args, endpoint) as proc:
            line = next(x for x in proc.log if "kvpager metrics on" in x)
            port = int(line.rsplit(":", 1)[1].split("/")[0])
            assert any(f"kvpager events on ipc://{d}/ev.sock" in x for x in proc.log)
            with Client(endpoint) as c:
                c.allocate([[1, 2, 3]])
                assert v(scrape(port), "kvpager_requests_total", op="allocate", result="ok") == 1
        with pytest.raises(OSError):
            scrape(port, timeout=2)  # gone with the daemon
    finally:
        shutil.rmtree(d, ignore_errors=True)
