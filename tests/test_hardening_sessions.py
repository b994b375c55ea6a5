"""Issue 11, sessions and data: session ids never revealed, another session's
blocks never written, published blocks immutable, token ids out of range
refused before any change, staging segments that cannot be squatted, a retry
that gets the first reply, no orphan of a timed-out allocate, clients of a
restarted daemon on a fresh pool. Each test is an attack that once worked
against a CPU daemon; bounded waits, free endpoints."""

from __future__ import annotations

import hashlib
import os
import re
import time

import msgpack
import numpy as np
import pytest
from daemon_helpers import SMALL, Raw, ipc_endpoint, req, running_server, server_fixture

from kvpager import KVPool, release_count, sessions, shm
from kvpager.client import Client
from kvpager.errors import (
    BackendUnavailable,
    InvalidArgument,
    NotOwner,
    RequestTimeout,
    SessionLost,
)
from kvpager.shm import Segment

server = server_fixture(SMALL, heartbeat_timeout=30)


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
        for bad in ([["a"], [1]], [[1.5], [1]], [[None], [1]]):  # not integers: the pool's typed refusal
            with pytest.raises(InvalidArgument):
                c.append([a.seq_id, b.seq_id], 1, bad)
        with pytest.raises(InvalidArgument):
            c.allocate([["a", "b"], [1, 2]])
        assert [c.sequence(s).num_tokens for s in (a.seq_id, b.seq_id)] == [15, 15]
        assert sorted(s.seq_id for s in c.sequences() if s.owner == c.session_name) == sorted([a.seq_id, b.seq_id])
        c.append([a.seq_id, b.seq_id], 1, [[15], [115]])
        assert c.commit([a.seq_id, b.seq_id]) == [1, 1]
        with Client(server.endpoint) as d:
            assert d.cached_tokens([list(range(17)), list(range(100, 117))]) == [16, 16]
        c.check_integrity()


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


@pytest.mark.parametrize("match_bytes", [8192, 0])
def test_a_retry_gets_the_first_reply(server, monkeypatch, match_bytes):
    """D11: each request carries an id; the same request again (after a
    timeout) gets the first execution's reply and changes nothing more.
    Requests are matched by their bytes up to a size, by a digest above it
    (``match_bytes`` 0: every request by its digest)."""
    from kvpager import server_dispatch

    monkeypatch.setattr(server_dispatch, "_MATCH_BYTES", match_bytes)
    with Client(server.endpoint) as c:
        raw = Raw(server.endpoint)
        try:
            body = req(7, "allocate", {"prompts": [[1, 2, 3]]}, session=c.session)
            first, again = raw.recv_raw(body), raw.recv_raw(body)
            assert first == again
            kept = server.sessions.sessions[c.session].replies[7][0]
            assert kept == (body if match_bytes else hashlib.blake2b(body, digest_size=16).digest())
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


def test_a_late_copy_of_a_request_older_than_the_kept_replies_is_not_run_again(server):
    """A request retried after a timeout goes again on a fresh socket; a copy the
    daemon had already read from the old one can come long after (a loaded loop).
    Past KEPT_REPLIES newer requests its reply was no longer kept, and it ran again:
    under 1-30 ms timeouts, allocates ran two or three times, their sequences held
    for the session's life with no client knowing them. A copy older than every
    kept reply is refused now, nothing run; the newest's copy is still replayed."""
    from kvpager.protocol import KEPT_REPLIES

    with Client(server.endpoint) as c:
        raw = Raw(server.endpoint)
        try:
            bodies = [req(100 + k, "allocate", {"prompts": [[k, k + 1]]}, session=c.session)
                      for k in range(KEPT_REPLIES + 2)]
            replies = [raw.recv_raw(b) for b in bodies]
            before = c.stats().num_sequences
            assert before == KEPT_REPLIES + 2
            for late in bodies[:2]:  # older than every kept reply
                rid, status, result = msgpack.unpackb(raw.recv_raw(late), raw=False)
                assert status == 1 and result["code"] == "invalid_argument", result
                assert "not run again" in result["message"]
            assert raw.recv_raw(bodies[-1]) == replies[-1]  # the newest kept: replayed
            assert c.stats().num_sequences == before
            # the session's next request runs (this session's ids are the raw socket's here: a
            # client's own next id would be older than them)
            assert msgpack.unpackb(raw.recv_raw(req(200, "allocate", {"prompts": [[9, 9]]}, session=c.session)),
                                   raw=False)[1] == 0
            assert c.stats().num_sequences == before + 1
            c.check_integrity()
        finally:
            raw.close()


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


@pytest.mark.parametrize("op", ["allocate", "fork"])
def test_a_timed_out_op_whose_reply_was_too_large_to_keep_leaves_no_orphan(monkeypatch, op):
    """As above, with a reply over the session's kept-reply bytes: the retry
    that settles it was told "ran, but too large to keep" and freed nothing,
    so the sequences it made stayed with the session, unknown to the client.
    Now the daemon keeps their ids instead of the reply, the retry's error
    carries them, and the client frees them."""
    from kvpager.limits import Limits

    with running_server(SMALL, limits=Limits(kept=2048)) as srv, Client(srv.endpoint) as c:
        [parent] = c.allocate([[5] * 3])
        real = srv._handlers[op]

        def slow(s, a):
            time.sleep(1.0)
            return real(s, a)

        monkeypatch.setitem(srv._handlers, op, slow)
        c.timeout = 0.2
        with pytest.raises(RequestTimeout):
            if op == "allocate":  # a reply of several KiB: its slots
                c.allocate([list(range(8 * SMALL.block_size)) for _ in range(4)])
            else:  # a reply of 600 child ids
                c.fork(parent.seq_id, 600)
        time.sleep(1.2)  # it ran meanwhile
        monkeypatch.setitem(srv._handlers, op, real)
        c.timeout = 10
        assert [s.seq_id for s in c.sequences()] == [parent.seq_id]  # settled first: the late sequences freed
        c.check_integrity()


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
            # and the new daemon's count of releases, the old one's mapping dropped
            assert c.memory["releases"] != old_memory["releases"]
            assert old_memory["releases"]["name"] not in release_count._counts
            before = int(c._releases[0])
            c.free([b.seq_id])
            assert int(c._releases[0]) == before + 1
            [b] = c.allocate([prompt])
            assert [s.seq_id for s in c.sequences()] == [b.seq_id]
            c.check_integrity()
        finally:
            c.close()


def test_a_heartbeat_thread_that_outlives_reconnect_ends_at_its_next_wake_up(monkeypatch):
    """`reconnect` waits 5 s for the heartbeat thread, then the next hello makes a new
    stop event; a thread whose beat was still in flight (beats wait up to a third of
    the heartbeat timeout) then read that new event, unset, and beat on: a second
    thread for good. Here its beat is held until the client's event is replaced, as
    such a reconnect leaves it: it ends at its next wake-up."""
    import threading

    from daemon_helpers import running_server

    from kvpager.channel import Channel

    inside, gate = threading.Event(), threading.Event()
    real = Channel.request

    def held(self, body, rid, op, timeout):
        if op == "heartbeat" and not gate.is_set():
            inside.set()
            gate.wait(10)
        return real(self, body, rid, op, timeout)

    monkeypatch.setattr(Channel, "request", held)
    with running_server(heartbeat_timeout=0.3) as server:
        c = Client(server.endpoint)
        try:
            old = c._hb
            assert inside.wait(10)  # its beat in flight
            c._hb_stop.set()
            c._hb_stop = threading.Event()  # (the next session's, made by its hello)
            gate.set()
            old.join(2)
            assert not old.is_alive()
        finally:
            c._hb_stop.set()
            c.close()


def test_a_retry_of_a_fork_too_large_to_keep_runs_once_and_kept_bytes_stay_true():
    """The ids a fork made are kept when its reply is too large to keep: counted
    8 bytes each, 1,000 of them passed a 2 KiB limit, and the entry just kept
    was evicted at once, so the retry ran the fork again (2,000 children). And
    an entry replaced under the same request id took only a kept reply's bytes
    off the count: it drifted up to the limit and every later reply was
    dropped as soon as it was kept (retries ran twice)."""
    from kvpager.limits import Limits
    from kvpager.server_dispatch import _kept_bytes

    with running_server(SMALL, limits=Limits(kept=2048)) as srv, Client(srv.endpoint) as c:
        [p] = c.allocate([[5] * 3])
        raw = Raw(srv.endpoint)
        try:
            body = req(77, "fork", {"seq_ids": [p.seq_id], "n": 1000}, session=c.session)
            first, again = raw.send(body), raw.send(body)
            assert first[1] == 0 and again[1] == 1 and again[2]["code"] == "limit_exceeded"
            assert len(again[2]["details"]["created"]) == 1000
            assert c.stats().num_sequences == 1001  # ran once
            session = next(s for s in srv.sessions.by_name.values() if s.name == c.session_name)
            for rid, n in ((90, 200), (90, 1), (91, 1), (91, 300)):  # the same ids, other bytes
                assert raw.send(req(rid, "allocate", {"prompts": [[7] * n]}, session=c.session))[1] == 0
                assert session.kept_bytes == sum(map(_kept_bytes, session.replies.values()))
            small = req(92, "allocate", {"prompts": [[8]]}, session=c.session)
            assert raw.send(small) == raw.send(small)  # kept: replayed, not run again
            assert c.stats().num_sequences == 1001 + 5
        finally:
            raw.close()
        c.check_integrity()
