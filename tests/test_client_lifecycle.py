"""A worker's `Client` through its daemon's stalls, restarts and its own end
(forks: test_client_forks.py): a staged write that timed out never runs on the
next call's data, a failed reconnect leaves a client that can try again, calls racing `close` get typed
errors, `close` against a stalled daemon is bounded by the timeout, a client
dropped without `close` ends its session, a restarted daemon's old pool
is neither handed out again nor kept mapped, and a sequence id of a session
lost since names no other session's sequence. Each test is a defect that once
held; bounded waits, every daemon stopped."""

from __future__ import annotations

import collections
import gc
import os
import signal
import threading
import time
import weakref

import numpy as np
import pytest
from daemon_helpers import daemon_process, ipc_endpoint, wait_until

from kvpager.client import Client
from kvpager.errors import KVPagerError, RequestTimeout, SessionLost, UnknownSequence

GEOMETRY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--blocks", "96", "--host-blocks", "32",
            "--block-size", "16", "--dtype", "float32", "--device", "cpu"]  # (on any host)


KV = (2, 16)  # kv heads, head dim


pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork() and signals")


def _kv(n: int, value: float) -> np.ndarray:
    return np.full((n, *KV), value, np.float32)


def _block(client: Client, slot: int) -> np.ndarray:
    """The K the mapped pool holds in ``slot``'s block, layer 0."""
    k, _ = client.kv(0)
    return k[int(slot) // client.spec.block_size]


def test_a_staged_write_that_timed_out_never_runs_on_the_next_writes_data():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "30"], endpoint) as proc:
        staged = Client(endpoint, timeout=0.5, map_pool=False)
        reader = Client(endpoint, timeout=5)
        [seq] = staged.allocate([list(range(32))])
        a, b = seq.slots[:16], seq.slots[16:]
        staged.remote_write(0, a, _kv(16, 0.0), _kv(16, 0.0))
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                staged.remote_write(0, a, _kv(16, 1.0), _kv(16, 1.0))  # may still run once the daemon goes on
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        staged.remote_write(0, b, _kv(16, 2.0), _kv(16, 2.0))
        # block a holds what a write into it sent (0 or 1: it ran late, once), never block b's data
        assert set(np.unique(_block(reader, a[0])).tolist()) <= {0.0, 1.0}
        assert set(np.unique(_block(reader, b[0])).tolist()) == {2.0}

        # a staged attend that timed out: its late output must not land on the next write's staged K
        [other] = staged.allocate([list(range(100, 132))])
        a, b = other.slots[:16], other.slots[16:]
        staged.remote_write(0, a, _kv(16, 1.0), _kv(16, 1.0))
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                staged.remote_attend(0, [other.seq_id], np.ones((1, 2, 16), np.float32))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        staged.remote_write(0, b, _kv(16, 2.0), _kv(16, 2.0))
        assert set(np.unique(_block(reader, b[0])).tolist()) == {2.0}
        staged.close()
        reader.close()


def test_a_reconnect_whose_hello_timed_out_can_be_tried_again():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY, endpoint) as proc:
        client = Client(endpoint, timeout=0.5)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(KVPagerError):
                client.reconnect()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        client.stats()  # a raw ZMQError ("Socket operation on non-socket") before
        with pytest.raises(SessionLost):
            client.allocate([[1, 2, 3]])  # no session: the reconnect did not open one
        client.reconnect()
        [seq] = client.allocate([[1, 2, 3]])
        assert len(seq.slots) == 3
        client.close()


def test_calls_racing_close_get_typed_errors():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY, endpoint):
        seen: collections.Counter[str] = collections.Counter()
        for _ in range(8):
            client = Client(endpoint, timeout=5)
            go = threading.Event()

            def hammer(c: Client = client, start: threading.Event = go) -> None:
                start.wait()
                for _ in range(100):
                    try:
                        c.stats()
                    except Exception as e:  # noqa: BLE001 - what it raised is what is counted
                        seen[f"{type(e).__module__}.{type(e).__name__}"] += 1

            threads = [threading.Thread(target=hammer) for _ in range(3)]
            for t in threads:
                t.start()
            go.set()
            time.sleep(0.005)
            client.close()
            for t in threads:
                t.join(20)
        assert set(seen) <= {"kvpager.errors.SessionLost"}, seen


def test_close_against_a_stalled_daemon_is_bounded_by_the_timeout():
    endpoint, _ = ipc_endpoint()
    # heartbeats every 0.3 s (1 s timeout), each waiting up to 1 s for its reply
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "1"], endpoint) as proc:
        client = Client(endpoint, timeout=0.3)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            time.sleep(0.5)  # a beat is in flight, unanswered
            t0 = time.monotonic()
            client.close()
            took = time.monotonic() - t0
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert took < 0.3 * 2 + 0.25, took  # the heartbeat's join and the bye, a timeout each at most


def test_a_client_dropped_without_close_ends_its_session():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "60"], endpoint):
        def dropped() -> weakref.ref:
            c = Client(endpoint, timeout=5)
            c.allocate([list(range(40))])
            return weakref.ref(c)

        refs = [dropped() for _ in range(3)]
        gc.collect()
        assert all(r() is None for r in refs)  # held for good by its heartbeat thread before
        with Client(endpoint, timeout=5, heartbeat=False) as look:
            # ended by bye, well inside the 60 s heartbeat timeout
            assert wait_until(lambda: look.stats().used_blocks == 0 and len(look.sessions()) == 1, 10)
        assert wait_until(lambda: not any(t.name == "kvpager-heartbeat" for t in threading.enumerate()), 10)


def test_a_process_that_exits_without_close_ends_its_session():
    """A worker script that returns without `close`: its client is never collected,
    and at exit its heartbeat thread (a daemon thread) died before it said bye, so
    the session and its blocks stayed until the heartbeat timeout. Its session ends
    with the process now."""
    import subprocess
    import sys
    import textwrap

    endpoint, _ = ipc_endpoint()
    script = textwrap.dedent(f"""
        from kvpager.client import Client
        worker = Client({endpoint!r}, timeout=5)
        worker.allocate([list(range(40))])
        print("allocated", flush=True)
    """)
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "60"], endpoint), \
            Client(endpoint, timeout=5, heartbeat=False) as look:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "allocated" in done.stdout, done.stderr
        # ended with the process, well inside the 60 s heartbeat timeout
        assert wait_until(lambda: look.stats().used_blocks == 0 and len(look.sessions()) == 1, 5)


def _maps_of(names: set[str]) -> set[str]:
    with open("/proc/self/maps") as f:
        return {name for line in f for name in names if name in line}


def test_a_restarted_daemons_pool_is_not_handed_out_again_nor_kept_mapped():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY, endpoint) as first:
        client = Client(endpoint, timeout=5)
        [seq] = client.allocate([list(range(40))])
        client.write(0, seq.slots, _kv(40, 1.0), _kv(40, 1.0))  # maps the pool
        old = {client.memory["device"]["name"], client.memory["host"]["name"]}
        assert _maps_of(old) == old
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    with daemon_process(GEOMETRY, endpoint):
        with pytest.raises(SessionLost):
            client.stats()
            client.allocate([[1]])
        with pytest.raises(SessionLost):
            client.kv(0)  # the stopped daemon's views, without a word, before
        client.reconnect()
        [seq] = client.allocate([list(range(40))])
        client.write(0, seq.slots, _kv(40, 2.0), _kv(40, 2.0))
        gc.collect()
        assert _maps_of(old) == set()  # the old pool stayed mapped for the process's life
        client.close()


def test_a_free_never_sent_behind_a_timed_out_request_is_sent_after_it():
    """A generation's cleanup free that could not be sent (the client was still settling
    a request that timed out) was dropped: its sequences stayed held for the session's life."""
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "30"], endpoint) as proc:
        client = Client(endpoint, timeout=0.5)
        a, b = client.allocate([list(range(40)), list(range(100, 140))])
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                client.append([a.seq_id], 1)  # unsettled: sent again before the next request
            with pytest.raises(RequestTimeout):
                client.free([a.seq_id, b.seq_id])  # never sent: its settling of the append timed out
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert client.stats().num_sequences == 0 and client.stats().used_blocks == 0
        client.close()


def test_frees_never_sent_go_as_their_callers_made_them():
    """Kept frees were read with int() (a packed batch of 16 ids raised a TypeError, a
    free of [True] or ["3"] the daemon refuses freed sequences 1 and 3) and sent merged
    into one free (over the ids limit, or with another session's id, every one dropped)."""
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "30", "--max-ids", "16"], endpoint) as proc:
        client = Client(endpoint, timeout=0.5)
        other = Client(endpoint, timeout=5)
        [theirs] = other.allocate([[7, 7, 7]])
        mine = [a.seq_id for k in range(3) for a in client.allocate([[k * 12 + i] for i in range(12)])]
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                client.append([mine[0]], 1)  # unsettled: sent again before the next request
            for call in (lambda: client.batch([("free", mine[:16])]),  # packed on the wire
                         lambda: client.free(tuple(mine[16:26])),
                         lambda: client.free(mine[26:36]),  # with the one before: over the ids limit
                         lambda: client.free([True]),  # refused by the daemon: frees nothing
                         lambda: client.free(["3"]),
                         lambda: client.free([theirs.seq_id])):  # another session's: refused alone
                with pytest.raises(RequestTimeout):
                    call()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        client.stats()  # its next call: the kept frees go after the append it settles
        live = {s.seq_id for s in other.sequences()}
        assert live == {theirs.seq_id}, live
        client.close()
        other.close()


def test_two_threads_first_kv_map_the_pool_once(monkeypatch):
    """`kv` is not serialized with the client's calls: two threads' first calls both
    found nothing mapped and mapped the pool twice (one mapping handed out, then
    dropped for the other's)."""
    import kvpager.client_kv as client_kv

    mapped = []

    def slow_map(spec, memory):
        mapped.append(threading.get_ident())
        time.sleep(0.2)  # (both threads inside at once, were the mapping not guarded)
        return real(spec, memory)

    real = client_kv.map_pool
    monkeypatch.setattr(client_kv, "map_pool", slow_map)
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY, endpoint), Client(endpoint, timeout=5) as client:
        start, views = threading.Barrier(2, timeout=10), []

        def first_kv():
            start.wait()
            views.append(client.kv(0)[0])

        threads = [threading.Thread(target=first_kv) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(mapped) == 1 and len(views) == 2
        assert np.shares_memory(views[0], views[1])


@pytest.mark.parametrize("map_pool", [True, False], ids=["mapped", "staged"])
def test_an_id_of_a_session_lost_since_reads_no_other_sessions_sequence(map_pool):
    """A restarted daemon gives out the same ids again: after `reconnect` a client's
    old sequence id read another session's new sequence as its own (its table by
    `tables`, its K/V by `attend`), silently. Refused now (its changes of the id
    too, as unknown, where the daemon's `not_owner` said that another session
    holds it); the client's new sequences, and another Client's reads of the
    other's, go on."""
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY, endpoint) as first:
        a = Client(endpoint, timeout=5, map_pool=map_pool)
        [old] = a.allocate([list(range(20))])
        a.write(0, old.slots, _kv(20, 1.0), _kv(20, 1.0))
        first.kill()
        first.wait(30)
    with daemon_process(GEOMETRY, endpoint), Client(endpoint, timeout=5) as b:
        [theirs] = b.allocate([list(range(100, 120))])
        assert theirs.seq_id == old.seq_id and list(theirs.slots) == list(old.slots)
        b.write(0, theirs.slots, _kv(20, 42.0), _kv(20, 42.0))
        with pytest.raises(SessionLost):
            a.stats()
        a.reconnect()
        q = np.ones((1, *KV), np.float32)
        for read in (lambda: a.tables([old.seq_id]), lambda: a.attend(0, [old.seq_id], q),
                     lambda: a.sequence(old.seq_id)):
            with pytest.raises(UnknownSequence, match="lost since"):
                read()
        # and so do its changes (the daemon's not_owner said that another session holds the id now)
        for change in (lambda: a.free([old.seq_id]), lambda: a.append(old.seq_id, 1),
                       lambda: a.fork(old.seq_id, 1), lambda: a.truncate([old.seq_id], [1])):
            with pytest.raises(UnknownSequence, match="lost since"):
                change()
        [mine] = a.allocate([list(range(7))])  # its new session's own go on
        assert a.tables([mine.seq_id])[1].tolist() == [7]
        assert b.tables([theirs.seq_id])[1].tolist() == [20]
        a.close()


def test_a_closed_client_that_read_an_id_of_its_lost_session_goes_with_its_last_reference():
    """Its UnknownSequence, held by a name in the frame that raised it, made a cycle
    (error, traceback, frame) that kept the closed client, its pool's mapping and
    descriptors, until the collector's next full pass: a worker that reconnected
    and read a stale id each round held up to ten closed clients. A closed client
    keeps no mapping by itself either."""
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "60"], endpoint):
        def stale_read() -> weakref.ref:
            c = Client(endpoint, timeout=5)
            [a] = c.allocate([list(range(40))])
            c.write(0, a.slots, _kv(len(a.slots), 1.0), _kv(len(a.slots), 1.0))
            c.reconnect()
            with pytest.raises(UnknownSequence, match="lost since"):
                c.tables([a.seq_id])
            c.close()
            assert c._mapped is None
            return weakref.ref(c)

        gc.collect()
        gc.disable()
        try:
            refs = [stale_read() for _ in range(3)]
            assert all(r() is None for r in refs)
        finally:
            gc.enable()


@pytest.mark.parametrize("close_first", [False, True])
def test_a_forked_childs_copy_of_a_client_without_heartbeats_never_ends_the_parents_session(close_first):
    """The copy's finalizer (a client without a heartbeat thread collected without
    close says bye) was armed in the child too: the child dropping its copy, or
    closing it, ended the parent's session and freed its sequences."""
    import warnings

    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "60"], endpoint):
        c = Client(endpoint, timeout=5, heartbeat=False)
        [a] = c.allocate([list(range(20))])
        with warnings.catch_warnings():  # (Python 3.12 on warns of a fork beside threads)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            try:
                if close_first:
                    c.close()
                ref = weakref.ref(c)
                del c
                gc.collect()
                time.sleep(0.5)  # (a thread a finalizer started would have said bye by now)
            finally:
                os._exit(0 if ref() is None else 7)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert c.sequence(a.seq_id).num_tokens == 20  # the parent's session and sequence live on
        c.close()
