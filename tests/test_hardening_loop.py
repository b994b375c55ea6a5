"""Issue 11, a loop that cannot be stalled and a daemon that lives: healthy
sessions outliving a slow request and many sessions expiring at once, a
silent session expired while another keeps the loop busy, a request or a
session's end that raises, a request of many empty containers, no file
descriptor left, the open files limit raised. Each test is an attack that once
worked against a CPU daemon; bounded waits, free endpoints. (The bounds on what
a client asks: `test_hardening_limits.py`.)"""

from __future__ import annotations

import dataclasses
import struct
import time

import numpy as np
import pytest
from daemon_helpers import SMALL, Raw, req, running_server, wait_until

from kvpager.client import Client
from kvpager.limits import Limits


def test_a_slow_request_does_not_expire_healthy_sessions(monkeypatch):
    """D9: one slow request kept the loop busy longer than the heartbeat
    timeout; then every healthy session was expired before its queued
    heartbeats were read."""
    with running_server(SMALL, heartbeat_timeout=1.0) as server:
        clients = [Client(server.endpoint) for _ in range(3)]
        try:
            for c in clients:
                c.allocate([[1, 2, 3]])
            real = server._handlers["stats"]

            def slow(s, a):
                time.sleep(3.0)  # three heartbeat timeouts without reading a message
                return real(s, a)

            monkeypatch.setitem(server._handlers, "stats", slow)
            with Client(server.endpoint, timeout=20) as obs:
                obs.stats()
                monkeypatch.setitem(server._handlers, "stats", real)
                time.sleep(0.5)  # a few more expiry checks
                for c in clients:
                    c.heartbeat()  # still open
                assert obs.stats().num_sequences == 3
        finally:
            for c in clients:
                c.close()


def test_a_silent_session_is_expired_while_another_keeps_the_loop_busy():
    """The loop marks when everything queued was read at most every 10 ms under
    steady load (not after every request): with one client sending request after
    request without a pause, the mark still moves on, a client that went silent
    is expired within the timeout (its sequences freed), and the busy one is not."""
    with running_server(SMALL, heartbeat_timeout=0.5) as server, \
            Client(server.endpoint, timeout=20) as busy:
        silent = Client(server.endpoint, heartbeat=False)
        try:
            busy.allocate([[7, 8, 9]])
            t0 = time.monotonic()  # the silent session's last message is sent after this
            silent.allocate([[1, 2, 3], [4, 5, 6]])
            gone = False
            while time.monotonic() - t0 < 5.0:  # requests back to back, never a pause
                if busy.stats().num_sequences == 1:  # the daemon's count, read on its loop
                    gone = True
                    break
            assert gone, "the silent session was never expired under steady load"
            assert 0.5 <= time.monotonic() - t0 < 3.0  # not before its timeout, and not long after
            assert busy.stats().num_sequences == 1  # the busy client's session is alive
        finally:
            silent.close()


def test_many_sessions_expiring_at_once_do_not_stall_the_loop():
    """D10: ending a session scanned every sequence: 900 sessions expiring at
    once stalled the loop for seconds. Ending one costs its own sequences."""
    with running_server(SMALL, heartbeat_timeout=3.0) as server, \
            Client(server.endpoint, timeout=30) as healthy, Client(server.endpoint, timeout=30) as other:
        healthy.allocate([[]] * 60_000)  # many live sequences: no blocks needed
        other.allocate([[]] * 60_000)
        raw = Raw(server.endpoint)
        try:
            for rid in range(600):
                session = raw.send(req(2 * rid, "hello", {}))[2]["session"]
                assert raw.send(req(2 * rid + 1, "allocate", {"prompts": [[]] * 10}, session=session))[1] == 0
        finally:
            raw.close()
        passes = []
        real = server.expire

        def timed():
            t0 = time.monotonic()
            n = len(server.sessions)
            real()
            if len(server.sessions) < n:
                passes.append((n - len(server.sessions), time.monotonic() - t0))

        server.expire = timed
        assert wait_until(lambda: len(server.sessions) == 2, timeout=60), (len(server.sessions), passes)
        assert sum(n for n, _ in passes) == 600
        assert max(s for _, s in passes) < 1.5, passes
        healthy.heartbeat()
        assert healthy.stats().num_sequences == 120_000
        healthy.check_integrity()


def test_a_request_whose_handling_raises_is_answered_and_the_daemon_lives(monkeypatch):
    """`Server.handle` never raises; if a bug made it, the loop answers that request
    with an internal error and serves the next, rather than ending the daemon."""
    from kvpager.errors import InternalError

    with running_server(SMALL) as server, Client(server.endpoint, timeout=10) as c:
        real = server.handle
        calls = []

        def broken(body):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug")
            return real(body)

        monkeypatch.setattr(server, "handle", broken)
        with pytest.raises(InternalError):
            c.stats()
        assert c.stats().num_sequences == 0


def test_a_session_whose_end_raises_in_expiry_is_closed_and_the_daemon_lives(monkeypatch):
    """Expiry ran outside the loop's guard: had ending a silent session raised (a
    bug), the loop's thread would have ended with it, and every healthy client with
    it. Now that session is closed, logged, and the daemon keeps serving."""
    with running_server(SMALL, heartbeat_timeout=0.5) as server, \
            Client(server.endpoint, timeout=10) as healthy:
        silent = Client(server.endpoint, heartbeat=False)
        try:
            silent.allocate([[1, 2, 3]])
            name = silent.session_name
            real = server.pool.release_pins

            def broken(owner):
                if owner == name:
                    raise RuntimeError("a bug")
                return real(owner)

            monkeypatch.setattr(server.pool, "release_pins", broken)
            assert wait_until(lambda: name not in server.sessions.by_name, timeout=10)
            assert server._thread.is_alive()
            [a] = healthy.allocate([[4, 5, 6]])  # still serving
            assert healthy.sequence(a.seq_id).num_tokens == 3
        finally:
            silent.close()


def _refused_stats(server, n: int, items: bytes) -> dict:
    """A raw `stats` request whose argument ``x`` is an array of ``n`` ``items``
    (msgpack bytes), answered `protocol_error`: the error's map."""
    raw = Raw(server.endpoint)
    try:
        rid, status, result = raw.send(b"\x95\x01\x01\xc0\xa5stats\x81\xa1x\xdd" + struct.pack(">I", n) + items)
    finally:
        raw.close()
    assert (status, result["code"]) == (1, "protocol_error"), result
    return result


@pytest.mark.parametrize("empty", [b"\x90", b"\x80"], ids=["arrays", "maps"])
def test_a_request_of_many_empty_containers_is_refused_while_decoding(empty):
    """An empty array or map is one byte on the wire and 56 bytes and more in Python: a
    16 MiB request of them took the daemon 1.2 GB and four seconds of its loop, before
    its session or token was looked at. Now decoding stops at the bound its ids limit
    sets, and a request of as many id lists as that limit allows is still taken."""
    spec = dataclasses.replace(SMALL, num_blocks=1100)
    with running_server(spec, limits=Limits(ids=1000, tokens=1 << 16)) as server, Client(server.endpoint) as c:
        n = 20_000  # (2 x 1000 + 4096 containers at most)
        result = _refused_stats(server, n, empty * n)
        assert "arrays and maps" in result["message"]
        got = c.allocate([[i, i + 1] for i in range(1000)])  # a request of the most id lists it takes
        assert len(got) == 1000 and c.stats().num_sequences == 1000
        c.record_tokens([a.seq_id for a in got], [[] for _ in got])


def _map(n: int, first: int = 0) -> bytes:
    """A msgpack map of ``n`` uint32 keys to nil, as bytes."""
    return b"\xdf" + struct.pack(">I", n) + b"".join(b"\xce" + struct.pack(">I", first + i) + b"\xc0" for i in range(n))


@pytest.mark.parametrize("maps", [1, 400], ids=["one map", "many maps"])
def test_a_request_of_huge_maps_is_refused_while_decoding(maps):
    """Maps were counted as one container each, whatever their entries: one map of
    2.8M int keys in a 16 MiB request took 420 MB and 0.8 s of the daemon's loop
    before its reply, under any argument (hello's unused ``host`` too). A
    request's maps hold argument names: 1,024 entries a map, 16,384 together."""
    with running_server(SMALL) as server, Client(server.endpoint) as c:
        n = 200_000 // maps
        result = _refused_stats(server, maps, b"".join(_map(n, k * n) for k in range(maps)))
        assert "max_map_len" in result["message"] or "entries together" in result["message"], result
        [a] = c.allocate([[1, 2, 3]])  # still serving
        got = c.batch([("append_flat", [a.seq_id], 1, [[9]])] * 64)  # the widest request of maps
        assert len(got) == 64 and c.sequence(a.seq_id).num_tokens == 67


def test_no_file_descriptor_left_for_shared_memory_is_a_typed_error(monkeypatch):
    """At the open files limit (a daemon holding a connection's descriptor each), a
    staging segment the daemon could not open answered `internal` with a traceback."""
    import errno

    import kvpager.shm as shm
    from kvpager.errors import BackendUnavailable

    with running_server(SMALL) as server, Client(server.endpoint, map_pool=False) as c:
        [seq] = c.allocate([list(range(16))])

        def no_fds(*args, **kwargs):
            raise OSError(errno.EMFILE, "Too many open files")

        monkeypatch.setattr(shm._posixshmem, "shm_open", no_fds)
        k = np.zeros((16, SMALL.num_kv_heads, SMALL.head_dim), np.float32)
        with pytest.raises(BackendUnavailable, match="file descriptor"):
            c.remote_write(0, seq.slots, k, k)
        monkeypatch.undo()
        c.remote_write(0, seq.slots, k, k)  # and the next one, with descriptors back, goes through


def test_serve_raises_its_open_files_limit_to_the_hard_limit():
    import resource
    import subprocess
    import sys

    from daemon_helpers import subprocess_env

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"needs a finite hard limit above 256 (soft {soft}, hard {hard})")
    code = ("import resource; from kvpager.server_bind import raise_open_files_limit; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
            "print(*raise_open_files_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    said_soft, said_hard, now_soft, now_hard = map(int, out.stdout.split())
    assert now_soft == said_soft == min(hard, 1 << 20) and now_hard == said_hard == hard
