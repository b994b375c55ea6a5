"""The connections' watch (`kvpager.server_watch`) beside other daemons and
listeners: a second daemon is refused while the first's socket file is out of
the way at its cap (it bound the path, and the first served on unreachable, its
pool held); a socket file left renamed by a daemon that died is no daemon at its
cap; an inproc:// server binds (no watch: no files); another listener's socket
on the same tcp port at another address is none of the endpoint's (the watch
would have shut it down). Each once failed."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from daemon_helpers import SMALL, ipc_endpoint, running_server, wait_until

from kvpager.errors import InvalidArgument
from kvpager.server import Server
from kvpager.server_bind import check_before_allocating
from kvpager.server_watch import _local_address, _same_endpoint


def _flood_until_hidden(path: str, server: Server) -> list[socket.socket]:
    flood: list[socket.socket] = []
    deadline = time.monotonic() + 10
    while not server._watch.hidden and time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            flood.append(s)
        except OSError:
            s.close()
        time.sleep(0.005)
    assert server._watch.hidden
    return flood


def test_a_second_daemon_is_refused_while_the_first_is_at_its_cap():
    """While daemon A's socket file is renamed to PATH.full (A at its connections'
    cap), nothing checks PATH.full: `kvpager serve`'s check passes and a second
    daemon B binds PATH. When A's connections fall, `_show` finds B's file and
    removes A's own: A serves on, unreachable, its pool held (two pools)."""
    endpoint, d = ipc_endpoint()
    path = endpoint[len("ipc://"):]
    flood: list[socket.socket] = []
    try:
        with running_server(SMALL, endpoint) as a:
            a._watch.cap = 3  # (as at a low open files limit; the cap is read per event)
            flood = _flood_until_hidden(path, a)
            assert os.path.exists(path + ".full") and not os.path.exists(path)
            # what `kvpager serve` says before allocating: a daemon listens there
            with pytest.raises(InvalidArgument, match="another daemon"):
                check_before_allocating(endpoint, None)
            with pytest.raises(InvalidArgument, match="another daemon"):
                Server.create(SMALL, endpoint).bind()
    finally:
        for s in flood:
            s.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.2"), (socket.AF_INET6, "::1")])
def test_another_listener_on_the_same_tcp_port_is_none_of_the_endpoints(family, host):
    """`_same_endpoint` compares a tcp socket's port alone: an accepted socket of
    another listener of the daemon's on the same port number at another address (the
    metrics server at --metrics-host, a KV events endpoint) passes the check, and the
    watch would shut down a connection that is none of the endpoint's
    (fd reuse: ZeroMQ closed the accepted fd the event names, another socket took it)."""
    with socket.socket(socket.AF_INET) as daemon:
        daemon.bind(("127.0.0.1", 0))
        daemon.listen()
        port = daemon.getsockname()[1]
        try:
            other = socket.socket(family)
            other.bind((host, port))
        except OSError as e:
            pytest.skip(f"cannot bind {host}: {e}")
        with other:
            other.listen()
            with socket.create_connection((host, port)):
                accepted, _ = other.accept()
                with accepted:
                    assert not _same_endpoint(accepted, _local_address(f"tcp://127.0.0.1:{port}")), \
                        "an accepted socket of another listener (same port, other address) taken for the daemon's"
                    assert _same_endpoint(accepted, _local_address(f"tcp://*:{port}"))  # (any address: ours)


def test_a_socket_file_left_renamed_by_a_dead_daemon_is_no_daemon(tmp_path):
    """A daemon killed (SIGKILL, the OOM killer) while its socket file was renamed
    leaves PATH.full and no PATH. `probe` then says a daemon is there at its cap, and
    clients and the CLI tell the operator to close connections, where no daemon runs
    (the probe never connects to PATH.full)."""
    from kvpager.endpoints import probe

    path = str(tmp_path / "kv.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path + ".full")  # (a socket file nothing listens on any more)
    dead.close()
    why = probe(f"ipc://{path}")
    assert why == f"no socket file {path}", why
    with running_server(SMALL, f"ipc://{path}") as server:  # (the dead one's file removed at the bind)
        assert not os.path.exists(path + ".full") and probe(server.endpoint) is None


def test_an_inproc_server_binds():
    """docs/protocol.md: inproc:// endpoints serve a `Server` and its clients in one
    process. `_watch_connections` now makes a `ConnectionWatch` for every endpoint but
    ipc:// ones' files, and `_local_address` parses an inproc name as a tcp port: bind
    raises ValueError (worked at 5dc0616)."""
    s = Server.create(SMALL, "inproc://kv-review")
    try:
        assert s.bind() == "inproc://kv-review"
    finally:
        s.close()


def test_the_watch_counts_on_past_an_error_and_stops_with_the_daemon():
    """ZeroMQ's I/O thread waits on the monitor's queue once it is full: a watch
    thread that died on an error left every connection of the daemon stalled. An
    error counting an event is logged and the count goes on; the daemon's stop ends
    the thread and leaves the socket file where it was, then removes it."""
    endpoint, d = ipc_endpoint()
    path = endpoint[len("ipc://"):]
    try:
        with running_server(SMALL, endpoint) as server:
            watch = server._watch
            fails, counted = iter([True]), watch._event

            def broken(frames) -> None:
                if next(fails, False):
                    raise RuntimeError("a bug")  # (the first event: lost)
                counted(frames)

            watch._event = broken
            conns = [socket.socket(socket.AF_UNIX) for _ in range(3)]
            for s in conns:
                s.connect(path)
            assert wait_until(lambda: watch.open >= 2, 10) and watch._thread.is_alive()
            for s in conns:
                s.close()
            assert wait_until(lambda: watch.open == 0, 10)
        assert not watch._thread.is_alive() and not os.path.exists(path) and not os.path.exists(path + ".full")
    finally:
        shutil.rmtree(d, ignore_errors=True)
