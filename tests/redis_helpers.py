"""Real redis-server processes for the remote tier's tests: each on a free
loopback port in a temp dir, no persistence, waited for (bounded) and
stopped by the test that started it. Tests skip only where redis-server is
not installed (CI installs it: .ci/run)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

START_TIMEOUT = 20.0  # seconds for a server to answer PING (a busy 2-core machine)


def need_redis() -> None:
    """Skip the calling test module where redis-server is not installed."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)",
                    allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


def ping(port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server answers PING on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``stop`` / ``start`` again on the same port."""

    def __init__(self, port: int | None = None, *extra: str):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="kvpredis")
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGKILL: the store vanishes as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cli(self, *args: str) -> str:
        need_cli()
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                             timeout=30)
        return out.stdout

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def need_cli() -> None:
    """Skip the calling test where ``redis-cli`` (Debian's redis-tools, which
    redis-server's package pulls in) is not installed."""
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed (apt install redis-tools)")


@contextlib.contextmanager
def redis_server(*extra: str) -> Iterator[RedisServer]:
    server = RedisServer(None, *extra).start()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def tls_redis_server(folder: Any) -> Iterator[tuple[RedisServer, int, str]]:
    """A redis-server with a TLS port beside its plain one, on a self-signed
    certificate for 127.0.0.1 made in ``folder``: (the server, its TLS port, the
    certificate's path). Skips where openssl is not installed."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    tls_port = free_port()
    with redis_server("--tls-port", str(tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                      "--tls-auth-clients", "no") as server:
        yield server, tls_port, cert


@contextlib.contextmanager
def redis_cluster(masters: int = 3, node_timeout_ms: int = 2000) -> Iterator[list[RedisServer]]:
    """``masters`` cluster-enabled servers joined by ``redis-cli --cluster create``,
    waited for until every node says ``cluster_state:ok``. ``node_timeout_ms``:
    how long a node may not answer before the others mark it failed (then,
    with no replicas, the whole cluster refuses: ``CLUSTERDOWN``)."""
    need_cli()
    servers = []
    try:
        for _ in range(masters):
            servers.append(RedisServer(free_cluster_port(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                       "--cluster-node-timeout", str(node_timeout_ms)).start())
        nodes = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       capture_output=True, text=True, timeout=60, check=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not all("cluster_state:ok" in s.cli("cluster", "info") for s in servers):
            if time.monotonic() > deadline:
                raise RuntimeError("the redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield servers
    finally:
        for s in servers:
            s.close()


@contextlib.contextmanager
def listener(kind: str, port: int | None = None):
    """A TCP listener on 127.0.0.1 that accepts connections and never finishes a
    reply: ``silent`` sends nothing, ``trickle`` a status line a byte every
    50 ms, never ended (each read of redis-py's comes within its timeout); or,
    ``ok``, answers ``+OK`` to every command it is sent (a sidecar or proxy that
    is no Redis)."""
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", port or free_port()))
    server.settimeout(0.2)
    held: list[socket.socket] = []

    def talk(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(0.2)
            while kind == "ok" and not stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    return
                conn.sendall(b"+OK\r\n" * max(1, data.count(b"*")))
            if kind == "trickle":
                conn.sendall(b"+")
            while not stop.wait(0.05):
                if kind == "trickle":
                    conn.sendall(b"O")

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()
        for conn in held:
            conn.close()
