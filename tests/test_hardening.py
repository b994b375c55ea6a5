"""Issue 11: sessions that cannot be stolen, a loop that cannot be stalled, a
clear error for every bad input. Each test is an attack that once worked
against a CPU daemon; bounded waits, free endpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
from daemon_helpers import (
    SMALL,
    Raw,
    free_tcp_endpoint,
    ipc_endpoint,
    req,
    running_server,
    subprocess_env,
    wait_until,
)

from kvpager import KVPool, sessions, shm
from kvpager.client import Client
from kvpager.errors import (
    BackendUnavailable,
    InvalidArgument,
    LimitExceeded,
    NotOwner,
    OutOfBlocks,
    RequestTimeout,
    SessionLost,
    Unauthorized,
)
from kvpager.limits import Limits
from kvpager.server import Server
from kvpager.shm import Segment


@pytest.fixture
def server():
    with running_server(SMALL, heartbeat_timeout=30) as s:
        yield s


def test_session_ids_are_never_revealed(server):
    """D1: `sequences` showed each sequence's owner, which was the session id:
    with it another client freed the victim's sequences and ended its session."""
    with Client(server.endpoint) as victim, Client(server.endpoint, heartbeat=False) as thief:
        [a] = victim.allocate([[1, 2, 3]])
        [info] = thief.sequences()
        assert info.owner == victim.session_name and info.owner_pid == os.getpid()
        assert victim.session not in (info.owner, victim.session_name)
        raw = Raw(server.endpoint)
        try:
            for rid, op, args in ((1, "sequences", {}), (2, "stats", {}), (3, "tables", {"seq_ids": [a.seq_id]}),
                                  (4, "hello", {})):
                assert victim.session.encode() not in raw.recv_raw(req(rid, op, args))
            for rid, op in ((5, "free"), (6, "bye")):
                reply = raw.send(req(rid, op, {"seq_ids": [a.seq_id]} if op == "free" else {}, session=info.owner))
                assert reply[2]["code"] == "session_lost"
                assert info.owner not in reply[2]["message"]
        finally:
            raw.close()
        assert victim.sequence(a.seq_id).num_tokens == 3
        victim.heartbeat()  # still open



def _kv(n: int, value: float) -> tuple[np.ndarray, np.ndarray]:
    shape = (n, SMALL.num_kv_heads, SMALL.head_dim)
    return np.full(shape, value, np.float32), np.full(shape, -value, np.float32)


def test_write_needs_ownership_and_published_blocks_are_immutable(server):
    """D2: a session overwrote another session's committed, published block;
    a third client then got that K/V through the prefix cache."""
    prompt = list(range(40))
    with Client(server.endpoint) as victim, Client(server.endpoint, map_pool=False) as thief:
        [a] = victim.allocate([prompt])
        for layer in range(SMALL.num_layers):
            victim.write(layer, a.slots, *_kv(len(a.slots), 1.0))
        victim.commit(a.seq_id)
        [own] = thief.allocate([[7] * 20])
        with pytest.raises(NotOwner, match="not held"):
            thief.remote_write(0, a.slots, *_kv(len(a.slots), 666.0))  # the victim's slots
        with pytest.raises(NotOwner, match="not held"):  # one foreign slot among its own spoils the batch
            thief.remote_write(0, np.concatenate([own.slots, a.slots[-1:]]), *_kv(len(own.slots) + 1, 666.0))
        [hit] = thief.allocate([prompt])  # shares the published blocks, in its own table
        assert hit.num_cached_tokens == 32
        with pytest.raises(NotOwner, match="immutable"):
            thief.remote_write(0, np.arange(hit.block_table[0] * 16, hit.block_table[0] * 16 + 4),
                               *_kv(4, 666.0))
        thief.remote_write(0, own.slots, *_kv(len(own.slots), 2.0))  # its own, unpublished: fine
        thief.remote_write(0, hit.slots, *_kv(len(hit.slots), 2.0))  # the uncached tail: its own
        thief.swap_out(own.seq_id)  # a swapped-out sequence of its own: its blocks are not writable
        with pytest.raises(NotOwner, match="not held"):
            thief.remote_write(0, own.slots, *_kv(len(own.slots), 2.0))
        thief.remote_write(0, hit.slots, *_kv(len(hit.slots), 2.0))
        with Client(server.endpoint) as reader:
            [b] = reader.allocate([prompt])
            k, v = reader.kv(0)
            assert b.block_table[:2] == a.block_table[:2]
            assert (k[list(b.block_table[:2])] == 1.0).all() and (v[list(b.block_table[:2])] == -1.0).all()
        victim.check_integrity()


def test_token_ids_out_of_range_change_nothing(server):
    """D3: a token id >= 2**63 passed append; a later commit of two sequences
    failed halfway, after publishing the first one's blocks, and the second
    could never commit again."""
    with Client(server.endpoint) as c:
        a, b = c.allocate([list(range(15)), list(range(100, 115))])
        for bad in ([[1], [2**63]], [[1], [2**64 - 1]], [[1], np.array([2**63], np.uint64)]):
            with pytest.raises(InvalidArgument, match="2\\*\\*63"):
                c.append([a.seq_id, b.seq_id], 1, bad)
        with pytest.raises(InvalidArgument, match="2\\*\\*63"):
            c.append([a.seq_id, b.seq_id], [2, 1], [[1, 2], [2**63]])  # the general path
        assert [c.sequence(s).num_tokens for s in (a.seq_id, b.seq_id)] == [15, 15]
        c.append([a.seq_id, b.seq_id], 1, [[15], [115]])
        assert c.commit([a.seq_id, b.seq_id]) == [1, 1]
        with Client(server.endpoint) as d:
            assert d.cached_tokens([list(range(17)), list(range(100, 117))]) == [16, 16]
        c.check_integrity()


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


def test_requests_and_sessions_are_bounded(server):
    """D4, D5, D9: caps on sequences per session, ids and tokens per request,
    the client name; typed errors that name the setting; nothing changed."""
    with Client(server.endpoint, timeout=30) as c:
        t0 = time.monotonic()
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_IDS") as e:
            c._call("sequences", {"seq_ids": np.arange(1_200_000)})
        assert e.value.limit == "ids" and e.value.maximum == 1 << 16
        assert time.monotonic() - t0 < 5
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_TOKENS"):
            c.allocate([np.zeros(1 << 20, np.uint8), [1]])
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_STAGING"):
            c._call("staging", {"nbytes": (1 << 30) + 1})
        assert c.stats().num_sequences == 0
    with pytest.raises(LimitExceeded, match="KVPAGER_MAX_CLIENT_NAME"):
        Client(server.endpoint, name="x" * 300)
    with running_server(SMALL, limits=Limits(sequences=100, ids=64)) as small, \
            Client(small.endpoint) as c:
        [a] = c.allocate([[1, 2, 3]])
        for _ in range(7):
            [kids] = c.fork(a.seq_id, 14)  # 99 sequences now
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_SEQUENCES"):
            c.fork(a.seq_id, 2)
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_SEQUENCES"):
            c.allocate([[1], [2]])
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_IDS"):
            c.fork(a.seq_id, 65)
        c.free(kids)
        c.fork(a.seq_id, 14)  # room again
        assert c.stats().num_sequences == 99
        c.check_integrity()  # the session's count agrees with the pool


def test_staging_bytes_are_capped_in_all():
    with running_server(SMALL, limits=Limits(staging=4 << 20, staging_total=6 << 20)) as server, \
            Client(server.endpoint) as a, Client(server.endpoint) as b:
        a._stage(4 << 20)
        with pytest.raises(LimitExceeded, match="KVPAGER_MAX_STAGING_TOTAL"):
            b._stage(4 << 20)
        b._stage(1 << 20)
        a.close()  # its buffer goes back
        b._stage(4 << 20)


def test_capacity_is_checked_before_hashing(monkeypatch):
    """D6: share_in_batch hashed a whole 16M-token prompt before finding the
    pool too small; now a prompt that cannot fit is refused before any hashing."""
    with running_server(SMALL, limits=Limits(tokens=1 << 24)) as server, Client(server.endpoint) as c:
        def hashing(*args, **kwargs):
            raise AssertionError("the allocator was asked to hash a prompt that cannot fit")

        monkeypatch.setattr(server.pool, "allocate", hashing)
        with pytest.raises(OutOfBlocks) as e:
            c.allocate([np.zeros(1 << 22, np.uint8)], share_in_batch=True)
        assert e.value.needed == (1 << 22) // SMALL.block_size
        assert e.value.available == SMALL.num_blocks - 1


def test_a_retry_gets_the_first_reply(server):
    """D11: each request carries an id; the same request again (after a
    timeout) gets the first execution's reply and changes nothing more."""
    with Client(server.endpoint) as c:
        raw = Raw(server.endpoint)
        try:
            body = req(7, "allocate", {"prompts": [[1, 2, 3]]}, session=c.session)
            first, again = raw.recv_raw(body), raw.recv_raw(body)
            assert first == again
            assert c.stats().num_sequences == 1
            [[seq_id, *_]] = msgpack.unpackb(first, raw=False)[2]
            free = req(8, "free", {"seq_ids": [seq_id]}, session=c.session)
            assert raw.send(free)[1] == 0 and raw.send(free)[1] == 0  # not unknown_sequence
            assert c.stats().num_sequences == 0
            # the same id with other arguments is a new request, not a retry
            assert raw.send(req(7, "allocate", {"prompts": [[4]]}, session=c.session))[1] == 0
            assert c.stats().num_sequences == 1
        finally:
            raw.close()


def test_sessions_and_kept_replies_are_bounded():
    """D11 follow-up: a client opening session after session, or sending
    mutating requests with huge replies, cannot grow the daemon's memory
    without bound: hello past the sessions limit is refused (and admits again
    once one closes); replies kept for retries stay within the byte limit, and
    the retry of one too large to keep is told it ran, without running again."""
    limits = Limits(sessions=3, kept=4096)
    with running_server(SMALL, heartbeat_timeout=30, limits=limits) as server:
        clients = [Client(server.endpoint) for _ in range(3)]
        try:
            with pytest.raises(LimitExceeded, match="sessions open at once"):
                Client(server.endpoint)
            clients.pop().close()
            clients.append(Client(server.endpoint))  # a closed one makes room
            c = clients[0]
            raw = Raw(server.endpoint)
            try:
                small = req(21, "allocate", {"prompts": [[1, 2, 3]]}, session=c.session)
                assert raw.recv_raw(small) == raw.recv_raw(small)  # kept: replayed
                big = req(22, "allocate", {"prompts": [list(range(350))] * 2}, session=c.session)
                reply = raw.recv_raw(big)
                assert len(reply) > 4096 and msgpack.unpackb(reply, raw=False)[1] == 0
                before = c.stats().num_sequences
                again = msgpack.unpackb(raw.recv_raw(big), raw=False)
                assert again[1] == 1 and again[2]["code"] == "limit_exceeded" and " ran" in again[2]["message"]
                assert c.stats().num_sequences == before  # not run twice
                session = next(s for s in server.sessions.sessions.values() if s.name == c.session_name)
                assert session.kept_bytes <= 4096
                assert session.kept_bytes == sum(len(r) for _, r in session.replies.values() if r is not None)
            finally:
                raw.close()
        finally:
            for c in clients:
                c.close()


def test_a_timed_out_allocate_leaves_no_orphan(server, monkeypatch):
    """D11: an allocate that timed out on the client still ran later and left
    a sequence holding blocks until the session ended."""
    with Client(server.endpoint) as c:
        real = server._handlers["allocate"]

        def slow(s, a):
            time.sleep(1.0)
            return real(s, a)

        monkeypatch.setitem(server._handlers, "allocate", slow)
        c.timeout = 0.2
        with pytest.raises(RequestTimeout):
            c.allocate([list(range(40))])
        with pytest.raises(RequestTimeout):
            c.fork(12345, 2)  # still busy: the earlier allocate is not settled yet
        monkeypatch.setitem(server._handlers, "allocate", real)
        c.timeout = 10
        assert c.stats().num_sequences == 0  # settled first: the late sequence freed
        assert c.stats().used_blocks == 0
        [a] = c.allocate([[1, 2, 3]])
        [[child]] = c.fork(a.seq_id)
        assert [s.seq_id for s in c.sequences()] == [a.seq_id, child]
        c.check_integrity()


TOKEN = "a-test-token-of-enough-length-0123"


def test_tcp_with_a_token():
    """D7: over loopback TCP any local user could read and write others' data."""
    with running_server(SMALL, endpoint=free_tcp_endpoint(), token=TOKEN) as server:
        for token in (None, "", "wrong-token-wrong-token"):
            with pytest.raises(Unauthorized, match="token"):
                Client(server.endpoint, token=token, heartbeat=False)
        raw = Raw(server.endpoint)
        try:
            for rid, op in enumerate(("stats", "sequences", "blocks", "check", "tables", "cached_tokens")):
                args = {"seq_ids": [1]} if op == "tables" else {"prompts": [[1]]} if op == "cached_tokens" else {}
                assert raw.send(req(rid, op, args))[2]["code"] == "unauthorized"
        finally:
            raw.close()
        with Client(server.endpoint, token=TOKEN) as c:
            [a] = c.allocate([[1, 2, 3]])
            assert c.sequence(a.seq_id).num_tokens == 3
    # on loopback a token is optional
    with running_server(SMALL, endpoint=free_tcp_endpoint()) as server, Client(server.endpoint) as c:
        c.stats()


def test_a_token_is_required_beyond_loopback(monkeypatch):
    monkeypatch.delenv("KVPAGER_TOKEN", raising=False)
    for endpoint in ("tcp://0.0.0.0:0", "tcp://*:0"):
        with pytest.raises(InvalidArgument, match="token"):
            Server.create(SMALL, endpoint).bind()
    with running_server(SMALL, endpoint="tcp://0.0.0.0:0", token=TOKEN) as server:
        port = server.endpoint.rsplit(":", 1)[1]
        with Client(f"tcp://127.0.0.1:{port}", token=TOKEN) as c:
            c.stats()


def test_staging_segments_cannot_be_taken_first(server, monkeypatch):
    """D7: staging segment names were predictable, so another user could
    create them first; the next staging request then failed with `internal`."""
    pid, epoch = os.getpid(), server.epoch[:8]
    squatted = [Segment.create(f"kvp{pid}_{epoch}_s{n}", 4096) for n in range(1, 6)]
    try:
        with Client(server.endpoint) as c:
            stage = c._stage(1000)
            assert stage.name not in {s.name for s in squatted}
            assert re.fullmatch(rf"kvp{pid}_{epoch}_s[0-9a-f]{{10}}", stage.name)
            # a name taken every time: a typed error, never `internal`
            monkeypatch.setattr(shm, "random_tag", lambda: "s1")
            monkeypatch.setattr(sessions, "random_tag", lambda: "s1")
            c._staging.close()
            c._staging = None
            with pytest.raises(BackendUnavailable, match="already exists"):
                c._stage(1 << 22)
            c.check_integrity()
    finally:
        for s in squatted:
            s.close()


def test_an_ipc_endpoint_never_removes_what_is_not_a_socket(tmp_path):
    """D8: `serve --endpoint ipc://PATH` deleted PATH when it was a regular file."""
    precious = tmp_path / "precious.txt"
    precious.write_text("data")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    for path in (precious, link, tmp_path):
        with pytest.raises(InvalidArgument, match="not a socket"):
            Server.create(SMALL, f"ipc://{path}").bind()
    assert precious.read_text() == "data" and link.is_symlink()
    code = subprocess.run(
        [sys.executable, "-m", "kvpager", "serve", "--layers", "1", "--kv-heads", "1", "--head-dim", "16",
         "--blocks", "8", "--device", "cpu", "--endpoint", f"ipc://{precious}"],
        env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert code.returncode != 0 and "not a socket" in code.stderr and "Traceback" not in code.stderr
    assert precious.read_text() == "data"


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


def test_sequences_come_a_page_at_a_time(server):
    """D9: a `sequences` call with a million ids kept the loop busy for 11 s."""
    with Client(server.endpoint) as c, Client(server.endpoint) as d:
        mine = [a.seq_id for a in c.allocate([[]] * 5000)]
        theirs = [a.seq_id for a in d.allocate([[]] * 10)]
        assert [s.seq_id for s in d.sequences()] == sorted(mine + theirs)
        with pytest.raises(LimitExceeded, match="pages"):
            d._call("sequences", {"seq_ids": mine})
        page = d._call("sequences", {"owner": d.session_name, "after": theirs[3], "limit": 4})
        assert [x["seq_id"] for x in page] == theirs[4:8]
        assert len(d._call("sequences", {})) == 4096  # an older client: the first page


def test_clients_of_a_restarted_daemon_reconnect_to_a_fresh_pool():
    """Restart: SessionLost, then a reconnect; nothing cached before the
    restart is served (new epoch, new pool memory, empty prefix cache)."""
    endpoint, _ = ipc_endpoint()
    prompt = list(range(40))
    with running_server(SMALL, endpoint=endpoint, heartbeat_timeout=30):
        c = Client(endpoint)
        [a] = c.allocate([prompt])
        for layer in range(SMALL.num_layers):
            c.write(layer, a.slots, *_kv(len(a.slots), 1.0))
        c.commit(a.seq_id)
        old_epoch, old_memory = c.epoch, c.memory
    with running_server(SMALL, endpoint=endpoint, heartbeat_timeout=30) as second:
        with pytest.raises(SessionLost, match="restarted"):
            c.allocate([prompt])
        c.reconnect()
        try:
            assert c.epoch == second.epoch != old_epoch and c.memory != old_memory
            [b] = c.allocate([prompt])
            assert b.num_cached_tokens == 0 and c.cached_tokens([prompt]) == [0]
            c.write(0, b.slots, *_kv(len(b.slots), 3.0))
            k, _ = second.pool.kv(0)
            assert (k[list(b.block_table[:2])] == 3.0).all()  # the new pool, mapped anew
            assert [s.seq_id for s in c.sequences()] == [b.seq_id]
            c.check_integrity()
        finally:
            c.close()


GEOMETRY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--device", "cpu"]


@pytest.mark.parametrize("args, env", [
    (["serve", *GEOMETRY, "--blocks", "abc"], {}),
    (["serve", *GEOMETRY, "--blocks", "-5"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--endpoint", "tcp://127.0.0.1:99999"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--endpoint", "foo://x"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--heartbeat-timeout", "-1"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--max-ids", "lots"], {}),
    (["serve", *GEOMETRY, "--blocks", "8", "--token-file", "/nonexistent/token"], {}),
    (["serve", *GEOMETRY, "--memory", "1x"], {}),
    (["serve", *GEOMETRY, "--memory", "100T"], {}),  # more than /dev/shm holds
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_HEARTBEAT_TIMEOUT": "soon"}),
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_MAX_MESSAGE": "-3"}),
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_MAX_SEQUENCES": "many"}),
    (["serve", *GEOMETRY, "--blocks", "8"], {"KVPAGER_ENDPOINT": "foo://x"}),
    (["stats"], {"KVPAGER_ENDPOINT": "foo://x"}),
    (["stats"], {"KVPAGER_TIMEOUT": "abc"}),
    (["stats", "--endpoint", "tcp://127.0.0.1:1", "--timeout", "-1"], {}),
    (["seqs", "--endpoint", "ipc:///nonexistent/kv.sock"], {}),
    (["blocks", "--width", "0"], {}),
    (["top", "--interval", "-1"], {}),
])
def test_bad_cli_and_environment_inputs_get_a_clear_error(args, env, tmp_path, monkeypatch):
    """Every bad command-line or environment input: a one-line error, a
    non-zero exit, never a traceback."""
    from click.testing import CliRunner

    from kvpager.cli import main

    monkeypatch.setenv("KVPAGER_RUNTIME_DIR", str(tmp_path / "rt"))
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "rror" in result.output


def test_the_embedded_pool_checks_token_ids_before_any_change():
    """D3 in `KVPool` itself: both append paths refuse an id out of int64 range."""
    pool = KVPool(SMALL)
    a, b = pool.allocate([list(range(15)), list(range(100, 115))])
    for counts, bad in ((1, [[1], [2**63]]), (1, [[1], [-(2**63) - 1]]), ([2, 1], [[1, 2], [2**64 - 1]])):
        with pytest.raises(InvalidArgument):
            pool.append([a.seq_id, b.seq_id], counts, bad)
    assert [pool.sequence(s).num_tokens for s in (a.seq_id, b.seq_id)] == [15, 15]
    pool.append([a.seq_id, b.seq_id], 1, [[15], [115]])
    assert pool.commit([a.seq_id, b.seq_id]) == [1, 1]
    pool.check_integrity()
