"""The daemon's busy poll (`Server(busy_poll_us=)`, `kvpager serve --busy-poll-us`,
KVPAGER_BUSY_POLL_US): after a reply the loop polls for the next request for up
to that long before it sleeps in recv. What it must not change: results,
sessions, shutdown, and a bad setting is refused before anything is bound."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import msgpack
import pytest
import zmq
from daemon_helpers import SMALL, daemon_process, ipc_endpoint, running_server, subprocess_env

from kvpager.client import Client
from kvpager.errors import InvalidArgument
from kvpager.server import MAX_BUSY_POLL_US, Server

WAIT = 30


@pytest.mark.parametrize("bad", [-1, MAX_BUSY_POLL_US + 1, float("nan"), float("inf"), True, "100"])
def test_a_bad_busy_poll_is_refused_before_anything_is_bound(bad):
    endpoint, _ = ipc_endpoint()
    with pytest.raises(InvalidArgument, match="busy poll"):
        Server.create(SMALL, endpoint, busy_poll_us=bad)
    with running_server(SMALL, endpoint=endpoint) as server:  # the endpoint was never taken
        assert server.busy_poll == 0.0


@pytest.mark.parametrize("raw,ok", [("250", True), ("", True), ("abc", False), ("-5", False),
                                    ("20000", False)])
def test_the_environment_variable(monkeypatch, raw, ok):
    monkeypatch.setenv("KVPAGER_BUSY_POLL_US", raw)
    endpoint, _ = ipc_endpoint()
    if not ok:
        with pytest.raises(InvalidArgument, match="BUSY_POLL_US|busy poll"):
            Server.create(SMALL, endpoint)
        return
    with running_server(SMALL, endpoint=endpoint) as server:
        assert server.busy_poll == pytest.approx(float(raw or 0) * 1e-6)
    with running_server(SMALL, busy_poll_us=0) as server:  # an argument wins over the variable
        assert server.busy_poll == 0.0


def test_the_poll_ends_at_a_request_at_its_limit_or_at_stop():
    endpoint, _ = ipc_endpoint()
    server = Server.create(SMALL, endpoint, busy_poll_us=100)
    server.bind()
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        t0 = time.perf_counter()
        assert server._spin(0.05) is False  # nothing came: the whole poll, then back to recv
        assert 0.05 <= time.perf_counter() - t0 < WAIT
        dealer.connect(endpoint)
        dealer.send(msgpack.packb([1, 1, None, "ping", {}]))
        t0 = time.perf_counter()
        assert server._spin(WAIT) is True  # the request ends the poll, long before its limit
        assert time.perf_counter() - t0 < WAIT / 2
        server._sock.recv_multipart()  # take it: the queue is empty again
        threading.Timer(0.05, server._stop.set).start()
        t0 = time.perf_counter()
        assert server._spin(WAIT) is False  # stop() ends it too
        assert time.perf_counter() - t0 < WAIT / 2
    finally:
        dealer.close()
        server.close()


def _session(endpoint: str) -> list:
    """Two clients sharing a prompt, forking and appending: every slot handed out."""
    out = []
    with Client(endpoint) as a, Client(endpoint) as b:
        [x] = a.allocate([list(range(20))])
        [y] = b.allocate([list(range(20))])
        [[z]] = a.fork([x.seq_id], 1)
        out += [list(x.block_table), list(y.block_table)]
        for _ in range(40):  # x and z share a partly filled block: the first append copies it
            out += [s.tolist() for s in a.append([x.seq_id, z])] + b.append([y.seq_id])[0].tolist()
        time.sleep(3.0)  # longer than the heartbeat timeout: heartbeats still get through
        assert a.stats().num_sequences == 3
        a.check_integrity()
    return out


def test_a_busy_polling_daemon_in_a_thread_serves_as_one_that_sleeps():
    with running_server(SMALL, busy_poll_us=2000, heartbeat_timeout=2.0) as server:
        polled = _session(server.endpoint)
    with running_server(SMALL, heartbeat_timeout=2.0) as server:
        assert _session(server.endpoint) == polled


def test_serve_busy_poll_option():
    endpoint, _ = ipc_endpoint()
    args = ["--model", "tiny", "--blocks", "64", "--device", "cpu", "--busy-poll-us", "5000"]
    with daemon_process(args, endpoint) as proc:
        with Client(endpoint) as c:
            [a] = c.allocate([list(range(20))])
            first = int(c.append([a.seq_id])[0][0])
            assert [int(c.append([a.seq_id])[0][0]) for _ in range(40)] == list(range(first + 1, first + 41))
            c.check_integrity()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0 and time.monotonic() - t0 < WAIT
    r = subprocess.run([sys.executable, "-m", "kvpager", "serve", "--model", "tiny", "--blocks", "8",
                        "--device", "cpu", "--endpoint", endpoint, "--busy-poll-us", "20000"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 2 and "--busy-poll-us" in r.stderr
