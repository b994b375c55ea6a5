"""A `Client` call left by an exception a signal handler raised while it waited
for its reply (KeyboardInterrupt, an alarm-based timeout), and a client
collected without `close`: the op was sent and runs, so the client treats it
as one that timed out (settled before its next request; the mirror asks the
daemon for the tables it touched), and never writes through slots of a
sequence the daemon freed."""

from __future__ import annotations

import gc
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from daemon_helpers import ipc_endpoint, running_server, wait_until

from kvpager.client import Client
from kvpager.errors import KVPagerError, RequestTimeout, UnknownSequence


class Interrupted(BaseException):
    """What the alarm's handler raises (as KeyboardInterrupt is raised by SIGINT's)."""


def _raise(*_: object) -> None:
    raise Interrupted


@contextmanager
def slow_ops(server, ops: tuple[str, ...], delay: float = 0.5) -> Iterator[None]:
    """``ops`` answered ``delay`` s late, the caller interrupted (SIGALRM, whose
    handler raises `Interrupted`) once the daemon has the request."""
    kept = {op: server._handlers[op] for op in ops}

    def slow(handler):
        def run(session, args):
            os.kill(os.getpid(), signal.SIGALRM)  # (the daemon is a thread of this process)
            time.sleep(delay)
            return handler(session, args)
        return run

    for op in ops:
        server._handlers[op] = slow(kept[op])
    old = signal.signal(signal.SIGALRM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, old)
        server._handlers.update(kept)


def daemon_view(server, client) -> dict[int, list[int]]:
    """The daemon's own tables of the client's session, once the loop went idle."""
    return {s.seq_id: list(s.block_table) for s in client.sequences() if s.owner == client.session_name}


def test_an_interrupted_append_leaves_the_mirror_as_the_daemons_tables():
    """The mirror said 16 tokens in one block while the daemon had appended a
    second block (20 tokens): attention and plans read the wrong slots."""
    with running_server() as server, Client(server.endpoint, timeout=5) as c:
        [a] = c.allocate([[5] * 16])
        with slow_ops(server, ("append",)), pytest.raises(Interrupted):
            c.append(a.seq_id, 4)
        time.sleep(0.6)  # (it ran meanwhile)
        tables, lens = c.tables([a.seq_id])
        assert list(lens) == [20] and [list(tables[0])] == list(daemon_view(server, c).values())
        slots = c.append(a.seq_id)[0]
        assert int(slots[0]) == int(c.tables([a.seq_id])[0][0, 1]) * 16 + 4  # the 21st token's slot
        c.check_integrity()


def test_an_interrupted_allocate_or_fork_frees_what_it_made():
    with running_server() as server, Client(server.endpoint, timeout=5) as c:
        [base] = c.allocate([[5] * 17])
        for make in (lambda: c.allocate([[1] * 64] * 4), lambda: c.fork(base.seq_id, 3)):
            with slow_ops(server, ("allocate", "fork")), pytest.raises(Interrupted):
                make()
            time.sleep(0.6)
            c.stats()  # (the next call settles it)
            assert list(daemon_view(server, c)) == [base.seq_id]
        c.free(base.seq_id)
        assert server.pool.stats().used_blocks == 0


def test_an_interrupted_free_never_writes_into_the_next_owners_block():
    """The free ran on the daemon, the mirror kept the sequence: B got its
    block, and A's mapped write to its old slots landed in B's K/V."""
    with running_server() as server, Client(server.endpoint, timeout=5) as a_cl, \
            Client(server.endpoint, timeout=5) as b_cl:
        [a] = a_cl.allocate([[5] * 16])
        with slow_ops(server, ("free",)), pytest.raises(Interrupted):
            a_cl.free(a.seq_id)
        time.sleep(0.6)
        [b] = b_cl.allocate([[9] * 16])
        zeros = np.zeros((16, 2, 16), np.float32)
        b_cl.write(0, b.slots, zeros, zeros)
        with pytest.raises(UnknownSequence):
            a_cl.tables([a.seq_id])
        sevens = np.full((16, 2, 16), 7, np.float32)
        with pytest.raises(KVPagerError):
            a_cl.write(0, a.slots, sevens, sevens)
        k, _ = b_cl.kv(0)
        assert not np.asarray(k)[int(b_cl.tables([b.seq_id])[0][0, 0])].any()


def _interrupt_once(obj, name):
    """``obj.name`` raises `Interrupted` at its next call (a signal that came once
    the reply was in, while the client followed it), then is itself again."""
    real = getattr(obj, name)

    def once(*args, **kwargs):
        setattr(obj, name, real)
        raise Interrupted

    setattr(obj, name, once)


@pytest.mark.parametrize("where", ["call", "mirror"])
def test_a_free_or_truncate_interrupted_after_its_reply_never_reaches_the_next_owners_blocks(where):
    """The signal came after the reply (as the call returned, or while the mirror
    followed it): only an interrupted wait made the mirror forget, so it kept the
    freed sequence's slots (a mapped write landed in another session's blocks)
    and the truncated sequence's old length (attention read blocks given away)."""
    with running_server() as server, Client(server.endpoint, timeout=5) as a_cl, \
            Client(server.endpoint, timeout=5) as b_cl:
        [a, t] = a_cl.allocate([[5] * 16, [6] * 40])
        if where == "call":
            real_call = a_cl._call

            def late(op, args):  # the reply taken, then the signal
                real_call(op, args)
                a_cl._call = real_call
                raise Interrupted

            a_cl._call = late
        else:
            _interrupt_once(a_cl._mirror, "freed")
        with pytest.raises(Interrupted):
            a_cl.free(a.seq_id)
        if where == "call":
            a_cl._call = late
        else:
            _interrupt_once(a_cl._mirror, "truncated")
        with pytest.raises(Interrupted):
            a_cl.truncate(t.seq_id, 1)
        got = b_cl.allocate([[9] * 16, [8] * 32])
        zeros = np.zeros((48, 2, 16), np.float32)
        b_cl.write(0, np.concatenate([g.slots for g in got]), zeros, zeros)
        with pytest.raises(UnknownSequence):
            a_cl.tables([a.seq_id])
        assert list(a_cl.tables([t.seq_id])[1]) == [1]  # the daemon's length, not the mirror's 40
        sevens = np.full((16, 2, 16), 7, np.float32)
        with pytest.raises(KVPagerError):
            a_cl.write(0, a.slots, sevens, sevens)
        with pytest.raises(KVPagerError):
            a_cl.write(0, t.slots[16:32], sevens, sevens)
        k, _ = b_cl.kv(0)
        tables, lens = b_cl.tables([g.seq_id for g in got])
        assert not np.asarray(k)[tables[tables > 0]].any()
        a_cl.check_integrity()


def test_a_batch_interrupted_while_the_mirror_follows_it_forgets_its_sequences():
    with running_server() as server, Client(server.endpoint, timeout=5) as c:
        [a, b] = c.allocate([[5] * 16, [6] * 20])
        _interrupt_once(c._mirror, "freed")
        with pytest.raises(Interrupted):
            c.batch([("append_flat", [b.seq_id], 4), ("free", [a.seq_id])])
        with pytest.raises(UnknownSequence):
            c.tables([a.seq_id])
        tables, lens = c.tables([b.seq_id])
        assert list(lens) == [24] and [list(tables[0])] == [daemon_view(server, c)[b.seq_id]]


def test_a_call_keeps_its_timeout_while_signals_come_every_few_milliseconds():
    """A blocking receive bounded by RCVTIMEO began its whole wait again after
    each signal: with a handler run every 50 ms, a call with a 1 s timeout to a
    daemon that did not answer waited until the daemon did (3 s here; for ever
    where it never does)."""
    with running_server() as server, Client(server.endpoint, timeout=1.0) as c:
        kept = server._handlers["stats"]

        def stalled(session, args):
            time.sleep(3.0)
            return kept(session, args)

        server._handlers["stats"] = stalled
        old = signal.signal(signal.SIGALRM, lambda *_: None)
        signal.setitimer(signal.ITIMER_REAL, 0.05, 0.05)
        try:
            t0 = time.monotonic()
            with pytest.raises(RequestTimeout):
                c.stats()
            took = time.monotonic() - t0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            server._handlers["stats"] = kept
        assert took < 2.5, took
        time.sleep(2.5)  # (the stalled request done)
        assert c.stats().num_sequences == 0


def test_after_reconnect_an_id_left_without_an_outcome_is_not_read_as_another_sessions():
    """An append found the daemon gone (the mirror forgot the sequence): after the
    daemon restarted and `reconnect`, a read of that id answered the sequence a
    new session got with it."""
    endpoint, _ = ipc_endpoint()
    with running_server(endpoint=endpoint) as first:
        c = Client(first.endpoint, timeout=1.0)
        [a] = c.allocate([[1] * 20])
    with pytest.raises(KVPagerError):  # (DaemonUnavailable: the daemon is gone)
        c.append(a.seq_id)
    with running_server(endpoint=endpoint) as srv, Client(srv.endpoint) as other:
        [o] = other.allocate([[3] * 40])
        assert o.seq_id == a.seq_id
        with pytest.raises(KVPagerError):  # SessionLost
            c.stats()
        c.reconnect()
        for read in (lambda: c.tables([a.seq_id]), lambda: c.sequence(a.seq_id),
                     lambda: c.attend(0, [a.seq_id], np.ones((1, 2, 16), np.float32))):
            with pytest.raises(UnknownSequence):
                read()
        c.close()


@pytest.mark.parametrize("heartbeat", [True, False])
def test_a_client_collected_without_close_ends_its_session_at_once(heartbeat):
    """One without a heartbeat thread held its sequences until the heartbeat timeout."""
    with running_server(heartbeat_timeout=30.0) as server:
        c = Client(server.endpoint, heartbeat=heartbeat)
        c.allocate([[1] * 64])
        del c
        gc.collect()
        assert wait_until(lambda: len(server.sessions) == 0, timeout=10, interval=0.02)  # (not at 30 s)
        assert server.pool.stats().num_sequences == 0
