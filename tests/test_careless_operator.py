"""Careless operators of the daemon, the people who start and inspect it: a
limit of 0 taken for "unlimited", a count written as a fraction, a short
token in the environment, a world-readable token file, a daemon restarted
after SIGKILL with ``--memory 90%``, a refusal that came only after the pool
was allocated, a signal during start-up, `kvpager stats` pointed at another
program, a message limit no request fits (in the environment, or given to
`Server`), an IPv6 endpoint, a relative ipc://
path (more in test_careless_serve.py). Each is refused by name (or served) (or warned about) with nothing left behind,
and each test once failed; bounded waits, free endpoints."""

from __future__ import annotations

import _posixshmem
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from daemon_helpers import (
    as_from_a_terminal,
    daemon_process,
    ipc_endpoint,
    run_cli,
    running_server,
    subprocess_env,
    wait_until,
)

from kvpager import KVPool, PoolSpec, server
from kvpager.client import Client
from kvpager.env import MIN_MESSAGE
from kvpager.errors import InvalidArgument
from kvpager.server import Server

WAIT = 60
GEOMETRY = ["--model", "tiny", "--device", "cpu"]
TOKEN = "a-test-token-of-enough-length-0123"


@pytest.mark.parametrize("args, env, named", [
    (["--max-sessions", "0"], {}, "--max-sessions"),
    (["--max-sequences", "0"], {}, "--max-sequences"),
    (["--max-client-name", "0"], {}, "--max-client-name"),
    ([], {"KVPAGER_MAX_IDS": "0"}, "KVPAGER_MAX_IDS"),
    ([], {"KVPAGER_MAX_TOKENS": "0"}, "KVPAGER_MAX_TOKENS"),
])
def test_a_limit_of_zero_is_not_unlimited(args, env, named, tmp_path):
    """`serve --max-sessions 0` started a daemon that refused every hello, even
    `kvpager stats`'s; now refused by name before anything is allocated."""
    endpoint = f"ipc://{tmp_path}/kv.sock"
    r = run_cli(["serve", *GEOMETRY, "--blocks", "8", "--endpoint", endpoint, *args], env)
    assert r.exit_code not in (0, None) and named in r.output and "at least 1" in r.output, r.output
    assert "0 is not unlimited" in r.output
    assert not os.path.exists(f"{tmp_path}/kv.sock")


@pytest.mark.parametrize("args, env, named", [
    (["--max-tables", "1000"], {}, "--max-tables"),
    ([], {"KVPAGER_MAX_ATTEND_WORK": "65536"}, "KVPAGER_MAX_ATTEND_WORK"),
])
def test_a_limit_under_its_least_names_the_least(args, env, named, tmp_path):
    """The tables and attend-work limits take 2**20 at least (docs/protocol.md,
    "Limits"); a value under it is refused by name, and a value that is not 0 is
    not told that 0 is not unlimited (it was)."""
    endpoint = f"ipc://{tmp_path}/kv.sock"
    r = run_cli(["serve", *GEOMETRY, "--blocks", "8", "--endpoint", endpoint, *args], env)
    assert r.exit_code not in (0, None) and named in r.output and f"at least {1 << 20}" in r.output, r.output
    assert "0 is not unlimited" not in r.output
    assert not os.path.exists(f"{tmp_path}/kv.sock")


@pytest.mark.parametrize("args, env, named", [
    (["--max-sequences", "1.5"], {}, "--max-sequences"),
    ([], {"KVPAGER_MAX_KEPT": "2.5"}, "KVPAGER_MAX_KEPT"),
])
def test_a_count_with_a_fraction_is_refused(args, env, named, tmp_path):
    """`--max-sequences 1.5` was cut to 1 without a word."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "8", "--endpoint", f"ipc://{tmp_path}/kv.sock", *args], env)
    assert r.exit_code not in (0, None) and named in r.output and "whole number" in r.output, r.output
    from kvpager.env import parse_size

    assert parse_size("1.5K") == 1536 and parse_size("2.0") == 2  # a unit, or a whole number: as before


@pytest.mark.parametrize("var", ["KVPAGER_TOKEN", "KVPAGER_CONTROL_TOKEN"])
@pytest.mark.parametrize("value", ["short", "   "])
def test_a_short_or_blank_token_in_the_environment_is_refused(var, value, tmp_path):
    """A token file of 5 characters was refused, KVPAGER_TOKEN=short taken (and a
    blank one served with no token at all)."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "8", "--endpoint", f"ipc://{tmp_path}/kv.sock"], {var: value})
    assert r.exit_code not in (0, None) and var in r.output and "at least 16" in r.output, r.output


def test_a_world_readable_token_file_is_warned_about(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o644)
    endpoint, _ = ipc_endpoint()
    with daemon_process([*GEOMETRY, "--blocks", "8", "--token-file", str(token)], endpoint, WAIT) as proc:
        assert any("mode 644" in line and f"chmod 600 {token}" in line for line in proc.log), proc.log
    os.chmod(token, 0o600)
    endpoint, _ = ipc_endpoint()
    with daemon_process([*GEOMETRY, "--blocks", "8", "--token-file", str(token)], endpoint, WAIT) as proc:
        assert not any("mode" in line for line in proc.log)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(WAIT)
    return p.pid


def test_memory_fraction_is_measured_after_a_killed_daemons_segments_are_swept():
    """A daemon killed by SIGKILL leaves its segments in /dev/shm; a new daemon
    measured free memory with them still there (and swept them after), so a
    restart with --memory 90% got 90% of what the dead one left."""
    from kvpager.sizing import memory_budget

    name = f"kvp{_dead_pid()}_deadbeef_dev"
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode=0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        os.posix_fallocate(fd, 0, 1 << 20)
    finally:
        os.close(fd)
    try:
        memory_budget("50%", "cpu")
        assert not os.path.exists(f"/dev/shm/{name}")
    finally:
        if os.path.exists(f"/dev/shm/{name}"):
            _posixshmem.shm_unlink("/" + name)


def test_a_refusal_of_the_endpoint_comes_before_the_pool_is_allocated():
    """Beyond loopback without a token: once refused only after the pool was
    made, here after a pool /dev/shm cannot hold was asked for (and refused first)."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "99999999999", "--endpoint", "tcp://0.0.0.0:0"],
                {"KVPAGER_TOKEN": "", "KVPAGER_TOKEN_FILE": ""})
    assert r.exit_code not in (0, None) and "token" in r.output and "shared memory" not in r.output, r.output


def _segments(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"kvp{pid}_")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_leaves_nothing(sig, tmp_path):
    """SIGTERM before the handlers were installed (while the pool's memory was
    being reserved) killed the daemon with its segments left in /dev/shm."""
    sock = tmp_path / "kv.sock"
    proc = subprocess.Popen([sys.executable, "-m", "kvpager", "serve", *GEOMETRY, "--memory", "1G",
                             "--host-memory", "64M", "--endpoint", f"ipc://{sock}"],
                            env=subprocess_env(), stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        # the pool's segment exists: start-up is under way
        assert wait_until(lambda: _segments(proc.pid) or proc.poll() is not None, WAIT), lines
        proc.send_signal(sig)
        rc = proc.wait(WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        reader.join(WAIT)
    assert rc == 0, lines
    assert not any("Traceback" in line for line in lines), lines
    assert not _segments(proc.pid) and not sock.exists()


def test_stats_against_another_program_says_so():
    """A program that answers garbage: the hint was "see `kvpager --help`"."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    stop = threading.Event()

    def answer():
        srv.settimeout(0.2)
        conns = []
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            conns.append(c)
            c.sendall(b"HTTP/1.0 200 OK\r\n\r\nnot a daemon" * 10)
        for c in conns:
            c.close()

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        start = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "kvpager", "stats", "--endpoint", f"tcp://127.0.0.1:{port}",
                            "--timeout", "5"], env=subprocess_env(), capture_output=True, text=True, timeout=WAIT)
        assert time.monotonic() - start < 30
    finally:
        stop.set()
        t.join(WAIT)
        srv.close()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "is a kvpager daemon listening there" in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["0", "10", "60K"])
def test_a_message_limit_no_request_fits_is_refused(value):
    """KVPAGER_MAX_MESSAGE=0 meant the default without a word; 10 started a
    daemon that refused every request, hello included."""
    r = run_cli(["serve", *GEOMETRY, "--blocks", "8", "--endpoint", ipc_endpoint()[0]], {"KVPAGER_MAX_MESSAGE": value})
    assert r.exit_code not in (0, None) and "KVPAGER_MAX_MESSAGE" in r.output, r.output


@pytest.mark.parametrize("size", [4096, 0, -1, MIN_MESSAGE - 1, True, 1.5, 65536.0, "16M"])
def test_a_message_limit_no_request_fits_is_refused_by_the_constructor(size, monkeypatch):
    """`Server(max_message_bytes=4096)` started a daemon that refused every
    request, hello included (0 meant the default). Now refused by name, with
    the floor, as KVPAGER_MAX_MESSAGE is: by `Server` before anything is bound,
    by `Server.create` before the pool is allocated."""
    endpoint, d = ipc_endpoint()
    pool = KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=8, block_size=8, dtype="float32"))
    try:
        with pytest.raises(InvalidArgument, match=f"max_message_bytes.*{MIN_MESSAGE}"):
            Server(pool, endpoint, max_message_bytes=size)
        assert os.listdir(d) == []

        class Allocated(Exception):
            pass

        def create_pool(*args, **kwargs):
            raise Allocated

        monkeypatch.setattr(server, "create_pool", create_pool)
        with pytest.raises(InvalidArgument, match=f"max_message_bytes.*{MIN_MESSAGE}"):
            Server.create(pool.spec, endpoint, max_message_bytes=size)
        with pytest.raises(Allocated):  # the floor itself is taken
            Server.create(pool.spec, endpoint, max_message_bytes=MIN_MESSAGE)
        assert os.listdir(d) == []
    finally:
        pool.close()
        os.rmdir(d)


def test_the_least_message_limit_serves(monkeypatch):
    """The floor, given as a number of any integer type, serves; None still means KVPAGER_MAX_MESSAGE."""
    monkeypatch.setenv("KVPAGER_MAX_MESSAGE", "128K")
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=8, block_size=8, dtype="float32")
    for size, want in ((np.int64(MIN_MESSAGE), MIN_MESSAGE), (None, 128 << 10)):
        with running_server(spec, max_message_bytes=size) as srv, Client(srv.endpoint) as c:
            assert type(srv.max_message_bytes) is int and c.max_message_bytes == want
            assert c.allocate([[1, 2, 3]])


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_an_ipv6_endpoint_serves():
    """tcp://[::1]:PORT failed to bind with ZeroMQ's "No such device" (its sockets
    speak IPv4 unless told): the daemon, its clients and its KV events."""
    from kvpager import PoolSpec
    from kvpager.client import Client
    from kvpager.events_cli import Subscription
    from kvpager.events_pub import EventsConfig
    from kvpager.server import Server

    ports = []
    for _ in range(2):
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            ports.append(s.getsockname()[1])
    server = Server.create(PoolSpec(2, 2, 16, 64, 8, "float32"), endpoint="tcp://[::1]:0",
                           events=EventsConfig(f"tcp://[::1]:{ports[0]}", replay_endpoint=f"tcp://[::1]:{ports[1]}"))
    server.start()
    try:
        assert server.endpoint.startswith("tcp://[::1]:")
        with Client(server.endpoint, timeout=WAIT) as c:
            [a] = c.allocate([list(range(20))])
            c.commit(a.seq_id)
            assert c.stats().num_sequences == 1
        sub = Subscription(server.events.endpoint, server.events.replay_endpoint, start=0)
        try:
            assert next(sub.batches(idle=WAIT)) is not None  # the replay from 0 answers over IPv6
        finally:
            sub.close()
    finally:
        server.stop()


def test_a_relative_ipc_path_is_bound_and_named_absolute(tmp_path):
    """ipc://kv.sock was bound in the daemon's directory and its "serving on" line
    said ipc://kv.sock, which a client started elsewhere resolves elsewhere."""
    proc = subprocess.Popen([sys.executable, "-m", "kvpager", "serve", *GEOMETRY, "--blocks", "8",
                             "--endpoint", "ipc://kv.sock"], env=subprocess_env(), cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: any("kvpager serving on" in x for x in lines) or proc.poll() is not None, WAIT)
        assert any(f"kvpager serving on ipc://{tmp_path}/kv.sock" in x for x in lines), lines
        from kvpager.client import Client

        with Client(f"ipc://{tmp_path}/kv.sock", timeout=WAIT) as c:  # from this test's directory
            assert c.stats().num_sequences == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(WAIT)
        reader.join(WAIT)
    assert not (tmp_path / "kv.sock").exists()


def test_events_pointed_at_the_request_endpoint_says_so(tmp_path):
    """`kvpager events --endpoint` given the daemon's request endpoint (a ROUTER,
    which ZeroMQ's SUB cannot talk to) waited in silence: now a warning says the
    publisher's replay socket is missing and what may be wrong."""
    from click.testing import CliRunner

    from kvpager import PoolSpec
    from kvpager.cli import main
    from kvpager.server import Server

    server = Server.create(PoolSpec(2, 2, 16, 64, 8, "float32"), endpoint=f"ipc://{tmp_path}/kv.sock")
    server.start()
    try:
        r = CliRunner().invoke(main, ["events", "--endpoint", server.endpoint, "--idle", "0.5"])
    finally:
        server.stop()
    assert "nothing listens at the replay endpoint" in r.output and "--events-endpoint" in r.output, r.output


def test_a_scales_file_of_null_is_refused(tmp_path):
    """--kv-scales naming a file that holds `null` served an FP8 pool with every
    scale 1.0: a file given for the scales meant some."""
    path = tmp_path / "scales.json"
    path.write_text("null\n")
    r = run_cli(["serve", "--layers", "2", "--kv-heads", "2", "--head-dim", "32", "--dtype", "float16",
                 "--kv-dtype", "fp8", "--kv-scales", str(path), "--blocks", "8", "--device", "cpu",
                 "--endpoint", ipc_endpoint()[0]])
    assert r.exit_code == 2 and "holds null" in r.output, r.output


@pytest.mark.parametrize("args, env, named", [
    (["serve", "--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--memory", "99999999999999999999999T"], {},
     "at most 2147483647 blocks"),
    (["serve", "--layers", "2", "--kv-heads", "3000000000", "--head-dim", "3000000000", "--blocks", "8"], {},
     "past the most kvpager takes"),
    (["serve", "--layers", "2", "--kv-heads", "99999999999", "--head-dim", "99999999", "--blocks", "8", "--dry-run"],
     {}, "past the most kvpager takes"),  # (its size wrapped to a negative number in int64)
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_MAX_MESSAGE": "99999999999999999999T"}, "KVPAGER_MAX_MESSAGE"),
    (["events", "--endpoint", "ipc:///nowhere.sock", "--idle", "nan"], {}, "--idle"),
    (["stats", "--timeout", "nan"], {}, "--timeout"),
    (["serve", *GEOMETRY, "--blocks", "8", "--endpoint", "ipc:///tmp/\udcff.sock"], {}, "not UTF-8"),
    (["events", "--endpoint", "ipc:///nowhere.sock", "--topic", "\udcff"], {}, "not UTF-8"),
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_TOKEN_FILE": "/dev/urandom"}, "not a regular file"),
    (["serve", "--model", "/dev/zero", "--blocks", "8"], {}, "not a regular file"),
])
def test_careless_sizes_numbers_bytes_and_files_get_one_line_and_no_traceback(args, env, named, tmp_path):
    """Each was a traceback (or a read of /dev/urandom until memory ran out):
    sizes past 2**63 bytes, a message limit past ZeroMQ's, a nan wait, bytes of
    a command line that are not UTF-8, a device for a token or config file."""
    r = run_cli(args, env)  # (a lone surrogate goes on the command line as the byte 0xff)
    assert r.exit_code not in (0, None) and named in r.output, r.output


def test_a_fifo_for_a_token_file_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "token"
    os.mkfifo(fifo)
    r = run_cli(["serve", *GEOMETRY, "--blocks", "8", "--endpoint", ipc_endpoint()[0]],
                {"KVPAGER_TOKEN_FILE": str(fifo)})
    assert r.exit_code not in (0, None) and "not a regular file" in r.output, r.output


def test_an_answer_that_cannot_be_written_is_one_line_and_exit_code_1():
    with running_server(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=8, block_size=16,
                                 dtype="float32")) as srv, open("/dev/full", "w") as full:
        # (top's frames were written past the check: a traceback)
        for cmd in (["stats"], ["seqs", "--json"], ["sessions"], ["top", "--json", "--iterations", "2"],
                    ["top", "--iterations", "1"]):
            r = subprocess.run([sys.executable, "-m", "kvpager", *cmd, "--endpoint", srv.endpoint],
                               env=subprocess_env(), stdout=full, stderr=subprocess.PIPE, text=True, timeout=WAIT)
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert "cannot write the output" in r.stderr
