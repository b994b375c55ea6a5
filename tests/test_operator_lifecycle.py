"""The daemon's life in production: the signals that end it, the files it leaves,
the operating system's limits. A closed terminal (SIGHUP) ended `kvpager serve`
with its pool left in /dev/shm; a daemon stopping removed the socket file of
another daemon bound on its path since; a folder that is missing or a path too
long for a unix socket, or a tcp port taken, was refused only once the pool was
allocated; a closed
stderr ended a bound daemon at its start-up line; clients past
a low open files limit made ZeroMQ abort the daemon; a daemon in another pid
namespace sharing /dev/shm removed a live daemon's pool, and one restarted as the
same pid (a container's) never removed the segments of the one that crashed.
A removed socket file and refused hellos: test_operator_served.py. Each test
once failed; bounded waits, free endpoints, every daemon stopped."""

from __future__ import annotations

import _posixshmem
import contextlib
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from daemon_helpers import (
    SMALL,
    as_from_a_terminal,
    free_tcp_endpoint,
    ipc_endpoint,
    run_cli,
    running_server,
    subprocess_env,
    wait_until,
)

from kvpager import shm
from kvpager.client import Client
from kvpager.errors import DaemonUnavailable, InvalidArgument, LimitExceeded
from kvpager.events_pub import EventsConfig
from kvpager.server import Server
from kvpager.server_bind import check_before_allocating

WAIT = 30
ARGS = ["--model", "tiny", "--blocks", "64", "--host-memory", "256K", "--device", "cpu"]


def _serve(endpoint: str, *extra: str, preexec=None) -> subprocess.Popen:
    """``kvpager serve`` in a process of its own, once it serves (``proc.lines``: its log);
    its SIGINT and SIGHUP at their defaults (`as_from_a_terminal`) before ``preexec``."""

    def started() -> None:
        as_from_a_terminal()
        if preexec is not None:
            preexec()

    proc = subprocess.Popen([sys.executable, "-m", "kvpager", "serve", "--endpoint", endpoint, *ARGS, *extra],
                            env=subprocess_env(), stderr=subprocess.PIPE, text=True, preexec_fn=started)
    proc.lines = []
    proc.reader = threading.Thread(target=lambda: proc.lines.extend(proc.stderr), daemon=True)
    proc.reader.start()
    if not wait_until(lambda: any("kvpager serving on" in x for x in proc.lines) or proc.poll() is not None, WAIT) \
            or proc.poll() is not None:
        _stop(proc)
        raise RuntimeError("daemon did not start:\n" + "".join(proc.lines))
    return proc


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)
    proc.reader.join(WAIT)
    return proc.returncode


def _segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"kvp{pid}_")]


@contextlib.contextmanager
def _at_a_low_limit(*extra: str, limit: int = 128):
    """``kvpager serve`` under a hard open files limit of ``limit``: (endpoint, its
    folder, the process, a list of what the test opened: closed at the end); the
    daemon stopped after, ending cleanly with its pool removed."""
    endpoint, d = ipc_endpoint()
    proc = _serve(endpoint, *extra, preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    opened: list = []
    try:
        yield endpoint, d, proc, opened
    finally:
        for x in opened:
            x.close()
        rc = _stop(proc)
        shutil.rmtree(d, ignore_errors=True)
    assert rc == 0 and not _segments(proc.pid)


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


def test_sighup_stops_the_daemon_and_leaves_nothing():
    """SIGHUP (the terminal or ssh session that ran `kvpager serve` closed) ended the
    daemon by its default action: its pool stayed in /dev/shm, and its socket file."""
    endpoint, d = ipc_endpoint()
    proc = _serve(endpoint)
    try:
        with Client(endpoint, timeout=5) as c:
            c.allocate([list(range(20))])
            assert _segments(proc.pid)
            proc.send_signal(signal.SIGHUP)
            rc = proc.wait(WAIT)
    finally:
        _stop(proc)
        shutil.rmtree(d, ignore_errors=True)
    assert rc == 0, proc.lines
    assert not _segments(proc.pid) and not os.path.exists(endpoint[len("ipc://"):])
    assert any("shutting down" in line for line in proc.lines)


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_signal_the_daemon_was_started_ignoring_stays_ignored(sig):
    """``nohup kvpager serve &``: nohup ignores SIGHUP (and a shell without job control
    ignores SIGINT for a background command), and the daemon took both over: the
    ssh session that started it closing ended it, every client's session with it."""
    endpoint, d = ipc_endpoint()
    proc = _serve(endpoint, preexec=lambda: signal.signal(sig, signal.SIG_IGN))
    try:
        with Client(endpoint, timeout=5) as c:
            [a] = c.allocate([list(range(20))])
            proc.send_signal(sig)
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(1.0)
            assert c.stats().num_sequences == 1  # the session and its sequence live on
        assert any(f"{signal.Signals(sig).name} is ignored" in line for line in proc.lines), proc.lines
        assert _stop(proc) == 0  # SIGTERM still stops it, cleanly
    finally:
        _stop(proc)
        shutil.rmtree(d, ignore_errors=True)
    assert not _segments(proc.pid) and not os.path.exists(endpoint[len("ipc://"):])


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
        assert not os.path.exists(sock) and not _segments(proc.pid)
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
