"""The daemon's life in production: the signals that end it, the files it leaves.
A closed terminal (SIGHUP) ended `kvpager serve` with its pool left in
/dev/shm; a daemon stopping removed the socket file of another daemon bound on
its path since; a folder that is missing or a path too long for a unix socket,
or a tcp port taken, was refused only once the pool was allocated; a closed
stderr ended a bound daemon at its start-up line; a daemon in another pid
namespace sharing /dev/shm removed a live daemon's pool, and one restarted as the
same pid (a container's) never removed the segments of the one that crashed.
The operating system's limits: test_operator_limits.py; a removed socket file
and refused hellos: test_operator_served.py. Each test once failed; bounded
waits, free endpoints, every daemon stopped."""

from __future__ import annotations

import _posixshmem
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest
from daemon_helpers import (
    SMALL,
    free_tcp_endpoint,
    ipc_endpoint,
    running_server,
    subprocess_env,
    wait_until,
)
from operator_helpers import ARGS, WAIT, segments, serve, stop

from kvpager import shm
from kvpager.client import Client
from kvpager.errors import InvalidArgument
from kvpager.events_pub import EventsConfig
from kvpager.server import Server
from kvpager.server_bind import check_before_allocating


def test_sighup_stops_the_daemon_and_leaves_nothing():
    """SIGHUP (the terminal or ssh session that ran `kvpager serve` closed) ended the
    daemon by its default action: its pool stayed in /dev/shm, and its socket file."""
    endpoint, d = ipc_endpoint()
    proc = serve(endpoint)
    try:
        with Client(endpoint, timeout=5) as c:
            c.allocate([list(range(20))])
            assert segments(proc.pid)
            proc.send_signal(signal.SIGHUP)
            rc = proc.wait(WAIT)
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)
    assert rc == 0, proc.lines
    assert not segments(proc.pid) and not os.path.exists(endpoint[len("ipc://"):])
    assert any("shutting down" in line for line in proc.lines)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_the_daemon_was_started_ignoring_stays_ignored(sig):
    """``nohup kvpager serve &``: nohup ignores SIGHUP (and a shell without job control
    ignores SIGINT for a background command), and the daemon took both over: the
    ssh session that started it closing ended it, every client's session with it."""
    endpoint, d = ipc_endpoint()
    proc = serve(endpoint, preexec=lambda: signal.signal(sig, signal.SIG_IGN))
    try:
        with Client(endpoint, timeout=5) as c:
            [a] = c.allocate([list(range(20))])
            proc.send_signal(sig)
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(1.0)
            assert c.stats().num_sequences == 1  # the session and its sequence live on
        assert any(f"{signal.Signals(sig).name} is ignored" in line for line in proc.lines), proc.lines
        assert stop(proc) == 0  # SIGTERM still stops it, cleanly
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)
    assert not segments(proc.pid) and not os.path.exists(endpoint[len("ipc://"):])


def test_a_daemon_whose_stderr_is_closed_serves_on():
    """Its start-up line to a closed stderr (``2>&1 | grep -m1 'serving on'``, which
    saw the log's line first and exited; a log reader gone) raised a broken pipe:
    the bound daemon exited with status 1, its socket file left behind."""
    endpoint, d = ipc_endpoint()
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.Popen([sys.executable, "-m", "kvpager", "serve", "--endpoint", endpoint, *ARGS],
                            env=subprocess_env(), stdout=write, stderr=write)
    os.close(write)
    try:
        sock = endpoint[len("ipc://"):]
        assert wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, WAIT)
        with Client(endpoint, timeout=5) as c:
            assert c.stats().total_blocks == 63
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        assert not os.path.exists(sock) and not segments(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("events", [False, True])
def test_a_daemon_stopping_leaves_the_socket_file_of_the_next_one(events, tmp_path):
    """A's socket file removed (an operator, a /tmp cleaner), B bound the same path:
    A's shutdown removed B's file, and B ran on where no client could reach it. So
    did A's KV events publisher with B's events socket."""
    endpoint = f"ipc://{tmp_path}/kv.sock"
    ev = EventsConfig(f"ipc://{tmp_path}/ev.sock") if events else None
    a_events = EventsConfig(f"ipc://{tmp_path}/ev.sock") if events else None
    with running_server(SMALL, endpoint=endpoint, events=a_events) as a:
        a.keep_socket_file = lambda: None  # (A making its file again first would refuse B: this is of A's end)
        os.unlink(tmp_path / "kv.sock")
        if events:
            os.unlink(tmp_path / "ev.sock")
            os.unlink(tmp_path / "ev.sock.replay")
        with running_server(SMALL, endpoint=f"ipc://{tmp_path}/b.sock" if events else endpoint, events=ev) as b:
            a.stop()
            files = ["ev.sock", "ev.sock.replay"] if events else ["kv.sock"]
            assert all((tmp_path / f).is_socket() for f in files), os.listdir(tmp_path)
            with Client(b.endpoint, timeout=5) as c:
                assert c.stats().total_blocks == SMALL.num_blocks - 1
    assert not (tmp_path / "kv.sock").exists() and not (tmp_path / "ev.sock").exists()


@pytest.mark.parametrize("where, named", [
    ("/tmp/kvp-" + "x" * 110 + "/kv.sock", "a unix socket's path holds at most"),
    ("/nonexistent-kvpager-folder/sub/kv.sock", "does not exist"),
    ("/etc/hostname/kv.sock", "is not a folder"),
])
def test_an_ipc_endpoint_no_socket_can_be_made_at_is_refused_before_the_pool(where, named):
    """ZeroMQ's refusal (in words about its constants) came only once the pool was
    allocated: here a pool /dev/shm cannot hold is asked for, and refused after."""
    with pytest.raises(InvalidArgument, match=named):
        check_before_allocating(f"ipc://{where}", None)
    r = subprocess.run([sys.executable, "-m", "kvpager", "serve", "--model", "tiny", "--device", "cpu",
                        "--blocks", "99999999999", "--endpoint", f"ipc://{where}"],
                       env=subprocess_env(), capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 1 and named in r.stderr and "shared memory" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_tcp_port_another_program_listens_on_is_refused_before_the_pool():
    """Another daemon (or any program) on the port was said only once the pool was
    allocated; a port a closed connection left in TIME_WAIT still serves."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        endpoint = f"tcp://127.0.0.1:{other.getsockname()[1]}"
        with pytest.raises(InvalidArgument, match="the port is taken"):
            check_before_allocating(endpoint, None)
        r = subprocess.run([sys.executable, "-m", "kvpager", "serve", "--model", "tiny", "--device", "cpu",
                            "--blocks", "99999999999", "--endpoint", endpoint],
                           env=subprocess_env(), capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 1 and "the port is taken" in r.stderr and "shared memory" not in r.stderr, r.stderr
    endpoint = free_tcp_endpoint()
    with running_server(SMALL, endpoint=endpoint) as server, Client(endpoint, timeout=5) as c:
        c.stats()
        server.stop()  # (closed with a connection open: its side of it waits in TIME_WAIT)
    assert check_before_allocating(endpoint, None) == endpoint


def test_the_sweep_keeps_a_live_daemons_pool_whose_pid_it_cannot_see(monkeypatch):
    """A daemon in another container (another pid namespace) sharing /dev/shm
    found no process of a live daemon's pid, took its segments for a dead one's and
    removed them: that daemon's new workers found no pool to map."""
    with running_server(SMALL) as server:
        names = [server.memory.device.name, server.memory.host.name, server.releases.segment.name]
        alive = shm._alive  # this process seen from another pid namespace: no such pid
        monkeypatch.setattr(shm, "_alive", lambda pid: pid != os.getpid() and alive(pid))
        shm.sweep_stale()
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
        with Client(server.endpoint, timeout=5) as c:
            [a] = c.allocate([list(range(20))])
            assert c.kv(0)[0].shape[0] == SMALL.num_blocks
            c.free([a.seq_id])


def test_the_sweep_removes_a_crashed_daemons_segments_left_under_this_pid():
    """A daemon restarted as the pid of the one that crashed (a container's first
    process, its /dev/shm kept) never removed that one's segments: a pid alive is
    no live daemon. Each crash left a whole pool in /dev/shm."""
    name = f"kvp{os.getpid()}_{secrets.token_hex(4)}_dev"
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o600)
    try:
        os.ftruncate(fd, 1 << 16)
    finally:
        os.close(fd)
    try:
        with running_server(SMALL) as server:  # (the sweep at its start)
            assert not os.path.exists(f"/dev/shm/{name}")
            assert os.path.exists(f"/dev/shm/{server.memory.device.name}")
    finally:
        if os.path.exists(f"/dev/shm/{name}"):
            _posixshmem.shm_unlink("/" + name)


@pytest.mark.parametrize("events", [False, True])
def test_two_daemons_binding_one_path_together_leave_one_reachable(events, tmp_path, monkeypatch):
    """A checked its path (no socket there yet) and, before it bound, B checked too:
    both bound (ZeroMQ's bind removes the socket file at its path), and A served on
    with its file gone, where no client could reach it. Now B waits for A's bind and
    is refused, and A is reached. The same for two KV events publishers."""
    from kvpager import endpoints, events_pub, server_bind
    module = events_pub if events else server_bind
    real = endpoints.prepare_ipc_bind
    checked, go, calls = threading.Event(), threading.Event(), []

    def slow_first_check(endpoint):
        real(endpoint)
        calls.append(endpoint)
        if len(calls) == 1:  # A: checked, not bound yet
            checked.set()
            go.wait(WAIT)

    monkeypatch.setattr(module, "prepare_ipc_bind", slow_first_check)
    a_kw = {"events": EventsConfig(f"ipc://{tmp_path}/ev.sock")} if events else {}
    b_kw = {"events": EventsConfig(f"ipc://{tmp_path}/ev.sock")} if events else {}
    a_end, b_end = ((f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock") if events
                    else (f"ipc://{tmp_path}/kv.sock",) * 2)
    servers, errors = {}, {}

    def start(name, endpoint, kw):
        server = Server.create(SMALL, endpoint, **kw)
        try:
            servers[name] = server.start()
        except InvalidArgument as e:
            errors[name] = e

    a = threading.Thread(target=start, args=("a", a_end, a_kw))
    a.start()
    try:
        assert checked.wait(WAIT)
        b = threading.Thread(target=start, args=("b", b_end, b_kw))
        b.start()
        b.join(0.5)  # B checks now (it waits for A's bind under the fix)
        go.set()
        a.join(WAIT)
        b.join(WAIT)
        assert set(servers) == {"a"} and set(errors) == {"b"}, (servers, errors)
        assert "already listens" in str(errors["b"])
        with Client(servers["a"].endpoint, timeout=5) as c:
            assert c.stats().total_blocks == SMALL.num_blocks - 1
        if events:
            assert (tmp_path / "ev.sock").is_socket() and (tmp_path / "ev.sock.replay").is_socket()
    finally:
        go.set()
        for s in servers.values():
            s.stop()
    assert not any(n.endswith(".lock") for n in os.listdir(tmp_path)), os.listdir(tmp_path)
