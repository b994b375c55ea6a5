"""Helpers for tests that start a daemon: free endpoints, in-process and
subprocess daemons, fixtures of a daemon and a client, bounded waits. Every
daemon a test starts, it stops."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from kvpager.client import Client
from kvpager.protocol import VERSION
from kvpager.server import Server
from kvpager.spec import PoolSpec

REPO = str(Path(__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parent)

SMALL = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=96, block_size=16,
                 dtype="float32", num_host_blocks=32)


def ipc_endpoint() -> tuple[str, str]:
    """A fresh ipc:// endpoint in a private temp dir (short path: sun_path is ~107 bytes)."""
    d = tempfile.mkdtemp(prefix="kvp", dir="/tmp")
    return f"ipc://{d}/kv.sock", d


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@contextlib.contextmanager
def running_server(spec: PoolSpec = SMALL, endpoint: str | None = None, **kwargs) -> Iterator[Server]:
    """A daemon in a thread of this process, stopped (and its memory unlinked) on exit."""
    tmp = None
    if endpoint is None:
        endpoint, tmp = ipc_endpoint()
    server = Server.create(spec, endpoint, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def server_fixture(spec: PoolSpec = SMALL, scope: str = "function", **kwargs: Any) -> Any:
    """A fixture of a daemon in a thread (`running_server(spec, **kwargs)`): a
    fresh one per test, or with ``scope="module"`` one per test module. A module
    takes it as ``server = server_fixture(...)`` (the fixture's name is the
    name it is bound to)."""

    @pytest.fixture(scope=scope)
    def server() -> Iterator[Server]:
        with running_server(spec, **kwargs) as s:
            yield s

    return server


def client_fixture(**kwargs: Any) -> Any:
    """A fixture of a `Client(server.endpoint, **kwargs)` of the module's
    ``server`` fixture, closed after each test (``client = client_fixture(...)``)."""

    @pytest.fixture
    def client(server: Server) -> Iterator[Client]:
        with Client(server.endpoint, **kwargs) as c:
            yield c

    return client


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


class CliRun:
    """What `run_cli` saw: the exit code (None: killed past its bound) and the output."""

    def __init__(self, exit_code: int | None, output: str):
        self.exit_code, self.output = exit_code, output


def run_cli(args: list[str], env: dict[str, str] | None = None) -> CliRun:
    """``kvpager ARGS`` in a process of its own, bounded: a daemon that starts
    where it should have refused is killed (exit code None)."""
    full = {**subprocess_env(), **(env or {})}
    try:
        r = subprocess.run([sys.executable, "-m", "kvpager", *args], env=full, capture_output=True,
                           text=True, timeout=20)
    except subprocess.TimeoutExpired as e:
        return CliRun(None, str(e.stderr or ""))
    assert "Traceback" not in r.stderr, r.stderr
    return CliRun(r.returncode, r.stdout + r.stderr)


def as_from_a_terminal() -> None:
    """A daemon subprocess's ``preexec_fn``: SIGINT and SIGHUP at their defaults, as
    a terminal starts it. A daemon started with them ignored leaves them ignored
    (nohup; a shell's background job), and a test run launched so (``pytest &``,
    ``nohup pytest``) passes its ignored signals on across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@contextlib.contextmanager
def daemon_process(args: list[str], endpoint: str, timeout: float = 30) -> Iterator[subprocess.Popen]:
    """``kvpager serve ARGS --endpoint ENDPOINT`` as a subprocess; waits until it
    listens; SIGTERM (then SIGKILL) on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvpager", "serve", "--endpoint", endpoint, *args],
        env=subprocess_env(), stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()  # drains stderr so the daemon never blocks on a full pipe
    try:
        # "kvpager serving on": the line serve prints last, after its metrics and events lines (the
        # log's own "serving on ..." at bind comes before them: a test that read the log then missed
        # the metrics line now and then on a loaded CI machine)
        started = wait_until(lambda: any("kvpager serving on" in x for x in lines) or proc.poll() is not None,
                             timeout)
        if not started or proc.poll() is not None:
            raise RuntimeError("daemon did not start:\n" + "".join(lines))
        proc.log = lines
        yield proc
    finally:
        terminate(proc, timeout)
        reader.join(timeout)


def anon_mib(pid: int) -> float:
    """A process's private resident memory (RssAnon: a pool's shared memory apart), MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to ``proc`` if it runs, a kill if it has not ended ``timeout`` s later."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def wait_published(server: Any, n: int, timeout: float = 10.0) -> bool:
    """Wait until ``server``'s event stream has published ``n`` batches."""
    return wait_until(lambda: server.events.published >= n, timeout)


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``cond`` until true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def join_or_kill(procs, timeout: float) -> None:
    """Join started worker processes, each within ``timeout`` s; kill stragglers."""
    for p in procs:
        if p.pid is not None:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(10)


class Raw:
    """A bare DEALER socket for sending frames a Client never would."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, data: bytes, timeout: float = 10.0) -> list:
        self.sock.send(data)
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return msgpack.unpackb(self.sock.recv(), raw=False, strict_map_key=False)

    def recv_raw(self, data: bytes, timeout: float = 10.0) -> bytes:
        """The reply's bytes, undecoded."""
        self.sock.send(data)
        assert self.sock.poll(int(timeout * 1000)), "no reply"
        return self.sock.recv()

    def close(self):
        self.sock.close(0)


def req(rid, op, args, session=None, version=VERSION) -> bytes:
    """A request envelope as bytes."""
    return msgpack.packb([version, rid, session, op, args])
