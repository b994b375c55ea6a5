"""The daemon under a low open files limit: clients past it made ZeroMQ abort
the daemon (its ipc:// listener's accept asserts on EMFILE), every session with
it and its pool left in /dev/shm; so did connections that never say hello, and
KV events subscribers, that leaked their sockets past it. Each test once
failed; bounded waits, free endpoints, every daemon stopped."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import tempfile
import time

import pytest
from daemon_helpers import ipc_endpoint, run_cli, wait_until
from operator_helpers import WAIT, segments, serve, stop

from kvpager.client import Client
from kvpager.errors import DaemonUnavailable, LimitExceeded


@contextlib.contextmanager
def _at_a_low_limit(*extra: str, limit: int = 128):
    """``kvpager serve`` under a hard open files limit of ``limit``: (endpoint, its
    folder, the process, a list of what the test opened: closed at the end); the
    daemon stopped after, ending cleanly with its pool removed."""
    endpoint, d = ipc_endpoint()
    proc = serve(endpoint, *extra, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    opened: list = []
    try:
        yield endpoint, d, proc, opened
    finally:
        for x in opened:
            x.close()
        rc = stop(proc)
        shutil.rmtree(d, ignore_errors=True)
    assert rc == 0 and not segments(proc.pid)


def _leak(path: str, flood: list[socket.socket], until) -> None:
    """Connect to ``path`` as a client that leaks its sockets quickly (ten a
    millisecond), each kept in ``flood``, until ``until()`` (bounded)."""
    deadline = time.monotonic() + WAIT
    while not until() and time.monotonic() < deadline:
        for _ in range(10):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
                flood.append(s)
            except OSError:  # (no file there once the daemon is full; its listen queue full)
                s.close()
        time.sleep(0.001)


def test_clients_past_a_low_open_files_limit_are_refused_and_the_daemon_lives():
    """At a hard limit of 64 open files, the 26th client's connection made ZeroMQ's
    ipc listener abort (its accept asserts on EMFILE): the daemon died with every
    session, its pool left in /dev/shm. Now sessions past what the limit holds are
    refused at hello, and the daemon serves the others (at 128: at 64 the reserve
    kept for bursts of connections leaves room for three)."""
    with _at_a_low_limit() as (endpoint, _, proc, clients):
        healthy = Client(endpoint, timeout=5)
        clients.append(healthy)
        [a] = healthy.allocate([list(range(40))])
        refused = 0
        for _ in range(60):
            try:
                clients.append(Client(endpoint, timeout=5))
            except LimitExceeded:
                refused += 1
        assert proc.poll() is None, "".join(proc.lines[-5:])
        assert refused and len(clients) > 8
        assert any("open files limit (128)" in line for line in proc.lines), proc.lines  # (said at start)
        healthy.append([a.seq_id], 1)
        assert healthy.stats().used_blocks == 3
        for c in clients[1:]:
            c.close()
        with Client(endpoint, timeout=5) as late:
            assert late.stats().num_sequences == 1
        healthy.free([a.seq_id])
        healthy.check_integrity()

def test_connections_that_never_say_hello_past_a_low_open_files_limit_leave_the_daemon_serving():
    """Sessions were capped to fit the open files limit, connections were not: 250
    sockets of a client that leaked them (or of a hostile one), opened and never
    used, ended a daemon whose limit was 200 (ZeroMQ's ipc:// listener found no
    file left and aborted), every session with it. At the connections' cap the
    socket file is out of the way now (new connects find none) and connections
    accepted past it are shut down; the session open before keeps working, and a
    new client gets in once the flood ends."""
    with _at_a_low_limit() as (endpoint, _, proc, flood), Client(endpoint, timeout=5) as healthy:
        path = endpoint[len("ipc://"):]
        [a] = healthy.allocate([list(range(40))])

        def full() -> bool:
            return any("new clients cannot connect" in line for line in proc.lines)

        _leak(path, flood, full)  # (ZeroMQ's accept ran out of files at about 100 before)
        assert wait_until(full, WAIT) and proc.poll() is None, "".join(proc.lines[-5:])
        assert len(flood) > 40  # (the cap: 128 files less the daemon's own and the reserve)
        assert not os.path.exists(path) and os.path.exists(path + ".full")
        for _ in range(20):  # (no file to connect to: nothing more reaches the daemon)
            with socket.socket(socket.AF_UNIX) as s, pytest.raises(OSError):
                s.connect(path)
        with pytest.raises(DaemonUnavailable, match="takes no new connections now"):
            Client(endpoint, timeout=2)
        r = run_cli(["stats", "--endpoint", endpoint, "--timeout", "2"])
        assert r.exit_code == 3 and "open files limit" in r.output.split("next:")[1], r.output
        healthy.append([a.seq_id], 1)  # the session's connections untouched
        assert healthy.stats().used_blocks == 3
        for s in flood:
            s.close()
        flood.clear()
        assert wait_until(lambda: os.path.exists(path), WAIT)  # named back
        with Client(endpoint, timeout=10) as late:
            assert late.stats().num_sequences == 1
        healthy.free([a.seq_id])
        healthy.check_integrity()


def test_a_flood_of_kv_events_subscribers_leaves_the_daemon_serving():
    """The KV events publisher's sockets listen on ipc:// too, where ZeroMQ ends the
    process when a connection finds no file left: a subscriber that leaked its
    sockets took the daemon and every session with it. Each of its sockets keeps
    a share of the connections now; past it its socket file is out of the way."""
    events_dir = tempfile.mkdtemp(prefix="kvp", dir="/tmp")
    path = f"{events_dir}/ev.sock"
    try:
        with _at_a_low_limit("--events-endpoint", f"ipc://{path}") as (endpoint, _, proc, flood), \
                Client(endpoint, timeout=5) as healthy:
            _leak(path, flood, lambda: not os.path.exists(path))
            assert not os.path.exists(path) and os.path.exists(path + ".full") and proc.poll() is None
            [a] = healthy.allocate([list(range(40))])  # the daemon's clients untouched
            healthy.free([a.seq_id])
            for s in flood:
                s.close()
            flood.clear()
            assert wait_until(lambda: os.path.exists(path), WAIT)  # named back
            healthy.check_integrity()
        assert not os.path.exists(path) and not os.path.exists(path + ".full")
    finally:
        shutil.rmtree(events_dir, ignore_errors=True)
