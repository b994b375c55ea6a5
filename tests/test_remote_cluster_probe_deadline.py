"""A Redis Cluster master whose replies trickle (a real redis-server behind a
TCP proxy that passes its replies on a byte at a time, each byte well inside
the tier's timeout: a congested or broken link): the probe (``TYPE``, on the
daemon's loop: `cached_tokens`, a windowed allocate) must fail within its
time, as a standalone store's probe and every lookup do. Through redis-py's
pipelines each read was bounded by the timeout alone: a probe of 20 keys
held the caller about 9 s at a 0.1 s timeout (past the daemon's 5 s client
heartbeats) and then answered as if nothing were wrong.

The servers and the proxy are started and stopped here; every wait is bounded."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
from redis_helpers import RedisServer, free_cluster_port, need_redis

need_redis()
redis = pytest.importorskip("redis")

from remote_tier_helpers import BS, bounded, pool, prefill, written  # noqa: E402

from kvpager.remote_store import KEY_STRING, StoreError, open_store  # noqa: E402

EVERY = 0.05  # seconds between two bytes of a trickled reply (the timeout is 0.1)


class Proxy:
    """127.0.0.1:port -> a server's port; while ``trickle`` is set, the server's
    bytes reach the client one every `EVERY` seconds."""

    def __init__(self, target: int):
        self.target = target
        self.trickle = False
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self.conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while not self.stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if not (replies and self.trickle):
                    dst.sendall(data)
                    continue
                for i in range(len(data)):
                    if self.stop.wait(EVERY):
                        return
                    dst.sendall(data[i : i + 1])
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()


@pytest.fixture
def node():
    """A one-master Redis Cluster (every slot) that names a proxy in front of it
    as its address, so the cluster client talks to it through the proxy."""
    server = RedisServer(free_cluster_port(), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf").start()
    proxy = None
    try:
        direct = redis.Redis(port=server.port, socket_timeout=5)
        direct.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        proxy = Proxy(server.port)
        direct.config_set("cluster-announce-ip", "127.0.0.1")
        direct.config_set("cluster-announce-port", proxy.port)
        deadline = time.monotonic() + 20
        while "cluster_state:ok" not in server.cli("cluster", "info"):
            assert time.monotonic() < deadline, "the one-node cluster did not come up"
            time.sleep(0.05)
        direct.close()
        yield proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.close()


def test_a_cluster_probe_whose_replies_trickle_fails_in_its_time(node):
    """`exists_many` of 20 keys through a trickling link: a `StoreError` within the
    probe's time (its floor of 1 s, and slack for a loaded host), not the 9 s the
    replies take to come a byte at a time; once the link is well again, the
    probe answers every key."""
    url = f"redis+cluster://127.0.0.1:{node.port}"
    s = open_store(url, timeout=0.1, write_timeout=0.5)
    keys = [f"kvpager:v2:test:trickle:{i}" for i in range(20)]
    try:
        assert s.put_many([(k, b"v" * 64) for k in keys], 600) == (20, 0)
        assert (s.exists_many(keys) == KEY_STRING).all()
        node.trickle = True
        took, r = bounded(lambda: s.exists_many(keys), 30)
        assert isinstance(r, StoreError) and took < 2.5, (took, r)
        node.trickle = False
        deadline = time.monotonic() + 10  # (the next call reads the slot map again, on a fresh connection)
        while True:
            took, r = bounded(lambda: s.exists_many(keys), 30)
            if not isinstance(r, Exception) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not isinstance(r, Exception) and (r == KEY_STRING).all(), r
    finally:
        bounded(s.close, 10)


def test_cached_tokens_over_a_trickling_cluster_stays_within_its_time(node):
    """Through the tier: a pool that wrote a prompt's 20 blocks, another that probes
    them with `cached_tokens` while the link trickles: the local count (nothing),
    within the probe's time, the failure counted; both pools whole."""
    url = f"redis+cluster://127.0.0.1:{node.port}"
    prompt = list(range(20 * BS + 1))
    a, b = pool(url, timeout=0.1, retry_after=30), pool(url, timeout=0.1, retry_after=30)
    try:
        seq, _ = prefill(a, prompt, seed=1)
        a.free(seq)
        assert written(a, 20)
        assert b.cached_tokens([prompt], salt="m") == [20 * BS]  # (the link well: every block counted)
        node.trickle = True
        b.remote.breakers["reads"].success()
        took, r = bounded(lambda: b.cached_tokens([prompt], salt="m"), 30)
        assert r == [0] and took < 2.5, (took, r)
        st = b.remote_stats()
        assert st.errors == 1 and not st.available
        b.check_integrity()
        a.check_integrity()
    finally:
        node.trickle = False
        for p in (a, b):
            bounded(p.close, 10)
