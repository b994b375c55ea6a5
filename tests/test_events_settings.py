"""The daemon's KV event stream's settings and its own tail: `kvpager events`
tailing, replaying and printing JSON; bad settings refused (the CLI's, the
daemon's before anything starts, `kvpager serve`'s flags); events over a pool
already caching refused. Real ZeroMQ sockets, free endpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import zmq
from click.testing import CliRunner
from daemon_helpers import (
    SMALL,
    daemon_process,
    free_tcp_endpoint,
    running_server,
    subprocess_env,
    wait_published,
)
from vllm_events import hashes

from kvpager.cli import main
from kvpager.client import Client
from kvpager.errors import InvalidArgument
from kvpager.events_pub import EventsConfig, replay_endpoint_for
from kvpager.server import Server

BS = SMALL.block_size
WAIT_MS = 5000


def test_kvpager_events_tails_replays_and_prints_json(tmp_ipc):
    endpoint, d = tmp_ipc
    with running_server(endpoint=endpoint, events=EventsConfig(f"ipc://{d}/ev.sock")) as server, \
            Client(endpoint) as c:
        prompt = list(range(2 * BS + 1))
        [a] = c.allocate([prompt])
        c.commit([a.seq_id])
        assert wait_published(server, 2)
        runner = CliRunner()
        r = runner.invoke(main, ["events", "--endpoint", server.events.endpoint, "--from-seq", "0",
                                 "--count", "2", "--json"])
        assert r.exit_code == 0, r.output
        first, second = map(json.loads, r.output.splitlines())
        assert first["seq"] == 0 and first["replayed"] and first["events"] == [{"type": "AllBlocksCleared"}]
        assert second["seq"] == 1 and second["events"][0]["block_hashes"] == hashes(prompt, BS)
        assert second["events"][0]["token_ids"] == prompt[: 2 * BS]
        r = runner.invoke(main, ["events", "--endpoint", server.events.endpoint, "--from-seq", "1",
                                 "--count", "1"])
        assert r.exit_code == 0, r.output
        header, row = r.output.splitlines()
        assert header.split()[:4] == ["seq", "time", "event", "medium"]
        assert row.split()[0] == "1r" and "BlockStored" in row and f"{hashes(prompt, BS)[0]:016x}" in row
        # live: a tail started now sees the next commit
        tail = subprocess.Popen([sys.executable, "-m", "kvpager", "events", "--endpoint", server.events.endpoint,
                                 "--count", "1", "--json", "--idle", "20"], env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            n = 0
            while tail.poll() is None and n < 200:  # until its subscription is live
                n += 1
                [b] = c.allocate([[7, n] * BS])
                c.commit([b.seq_id])
                c.free([b.seq_id])
                time.sleep(0.1)
            out, err = tail.communicate(timeout=30)
        finally:
            if tail.poll() is None:
                tail.kill()
        assert tail.returncode == 0, err
        assert json.loads(out)["events"][0]["type"] == "BlockStored"
        r = runner.invoke(main, ["events", "--endpoint", server.events.endpoint, "--count", "1", "--idle", "0.3"])
        assert r.exit_code == 4 and "0 of 1 batches" in r.output


def test_events_cli_refuses_bad_settings(tmp_ipc):
    _, d = tmp_ipc
    runner = CliRunner()
    r = runner.invoke(main, ["events"], env={"KVPAGER_EVENTS_ENDPOINT": ""})
    assert r.exit_code == 2 and "--endpoint" in r.output
    r = runner.invoke(main, ["events", "--endpoint", "nonsense"])
    assert r.exit_code == 1 and "must look like" in r.output
    r = runner.invoke(main, ["events", "--endpoint", f"ipc://{d}/none.sock", "--idle", "1"])
    assert r.exit_code == 1 and "no KV event publisher" in r.output


def test_bad_events_settings_are_refused_before_anything_starts(tmp_ipc):
    endpoint, d = tmp_ipc
    for bad, match in ((lambda: EventsConfig("nonsense"), "must look like"),
                       (lambda: EventsConfig(f"ipc://{d}/e", format="json"), "format"),
                       (lambda: EventsConfig(f"ipc://{d}/e", f"ipc://{d}/e"), "must differ"),
                       (lambda: EventsConfig("tcp://127.0.0.1:0"), "replay"),
                       (lambda: replay_endpoint_for("tcp://127.0.0.1:65535"), "replay")):
        with pytest.raises(InvalidArgument, match=match):
            bad()
    server = Server.create(SMALL, endpoint, events=EventsConfig(endpoint))
    with pytest.raises(InvalidArgument, match="must differ from the daemon's"):
        server.bind()
    assert server._sock is None and server.memory is None
    # an endpoint in use: the daemon does not start and releases what it took
    taken = free_tcp_endpoint()
    ctx = zmq.Context()
    holder = ctx.socket(zmq.PUB)
    holder.bind(taken)
    try:
        server = Server.create(SMALL, endpoint, events=EventsConfig(taken))
        with pytest.raises(InvalidArgument, match="cannot bind the KV events endpoint"):
            server.bind()
        assert server._sock is None and server.memory is None
        # the replay socket's port taken (by default the events port + 1): named as the replay's
        server = Server.create(SMALL, endpoint, events=EventsConfig(free_tcp_endpoint(), replay_endpoint=taken))
        with pytest.raises(InvalidArgument, match="cannot bind the KV events replay endpoint"):
            server.bind()
        assert server._sock is None and server.memory is None
        with running_server(endpoint=endpoint) as ok:  # the daemon's endpoint is free again
            assert ok.events is None
    finally:
        holder.close(0)
        ctx.term()


def test_serve_cli_events_flags(tmp_ipc):
    endpoint, d = tmp_ipc
    args = ["--layers", "1", "--kv-heads", "1", "--head-dim", "8", "--blocks", "16", "--dtype", "float32",
            "--events-endpoint", f"ipc://{d}/ev.sock", "--events-format", "array"]
    with daemon_process([*args, "--events-replay-rate", "8M"], endpoint) as proc:
        line = next(x for x in proc.log if "kvpager events on" in x)
        assert f"ipc://{d}/ev.sock" in line and f"ipc://{d}/ev.sock.replay" in line
        assert any(f"at most {8 << 20} bytes/s" in x for x in proc.log)
    bad = subprocess.run([sys.executable, "-m", "kvpager", "serve", *args[:10], "--endpoint", endpoint,
                          "--events-endpoint", "udp://x"], env=subprocess_env(), capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "must look like" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "kvpager", "serve", *args[:10], "--endpoint", endpoint,
                          "--events-replay-endpoint", f"ipc://{d}/r"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "needs --events-endpoint" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "kvpager", "serve", *args[:10], "--endpoint", endpoint,
                          "--events-replay-rate", "8M"], env=subprocess_env(), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--events-replay-rate needs --events-endpoint" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "kvpager", "serve", *args, "--endpoint", endpoint,
                          "--events-replay-rate", "0"], env=subprocess_env(), capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 1 and "replay rate must be a positive" in bad.stderr


def test_events_over_a_pool_already_caching_are_refused(tmp_ipc):
    """A daemon started with events over a pool whose prefix cache holds blocks: its
    stream began with AllBlocksCleared, so a consumer replaying it knew nothing of
    those blocks, then saw them removed without ever being stored. Refused now,
    nothing made; the same pool without events, or a fresh one with them, serves."""
    from kvpager import KVPool

    _, d = tmp_ipc
    pool = KVPool(SMALL)
    [a] = pool.allocate([list(range(3 * BS + 1))])
    pool.commit(a.seq_id)
    pool.free(a.seq_id)
    config = EventsConfig(f"ipc://{d}/ev.sock")
    with pytest.raises(InvalidArgument, match="prefix cache is empty.*3 blocks cached"):
        Server(pool, f"ipc://{d}/kv.sock", events=config)
    assert not os.path.exists(f"{d}/ev.sock") and not os.path.exists(f"{d}/kv.sock")
    for server in (Server(pool, f"ipc://{d}/kv.sock"), Server(KVPool(SMALL), f"ipc://{d}/kv2.sock", events=config)):
        server.start()
        try:
            with Client(server.endpoint, map_pool=False) as c:
                assert c.stats().cached_blocks == (3 if server.pool is pool else 0)
        finally:
            server.stop()


def test_a_tail_from_a_sequence_number_past_the_stream_stops_when_idle(tmp_ipc):
    """`kvpager events --from-seq N --idle 3` with N past the daemon's batches (a number
    remembered from before it restarted): every live batch below N is skipped, and
    each restarted the idle wait, so it printed nothing and never ended while the
    daemon published. The wait counts from the last batch yielded now."""
    import threading

    from kvpager.events_cli import Subscription

    endpoint, d = tmp_ipc
    with running_server(endpoint=endpoint, events=EventsConfig(f"ipc://{d}/ev.sock")) as server, \
            Client(endpoint) as c:
        stop, got = threading.Event(), []

        def publish() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                [b] = c.allocate([[9, n] * BS])
                c.commit([b.seq_id])
                c.free([b.seq_id])
                time.sleep(0.05)

        def tail() -> None:
            with Subscription(server.events.endpoint, server.events.replay_endpoint,
                              start=10**6) as sub:
                got.extend(sub.batches(idle=0.5))

        producer = threading.Thread(target=publish, daemon=True)
        producer.start()
        t0 = time.monotonic()
        reader = threading.Thread(target=tail, daemon=True)
        reader.start()
        reader.join(15)
        took = time.monotonic() - t0
        stop.set()
        producer.join(10)
        assert not reader.is_alive() and took < 10, took
        assert got == [] and server.events.published > 5  # (batches went out the whole time)
