"""A daemon stopped and continued (SIGSTOP / SIGCONT: a paused VM, a debugger, a
swapped-out host) under clients that time out: a healthy session whose beat
waited in the socket during the stop is not expired; a stopped daemon whose
queue of connections the timed-out clients filled is a timeout, not a gone
daemon (its late allocate was then never freed); after a timed-out append that
ran, the slot the daemon gave is written (the mirror's stale mark of its block
refused it). Each was found by a randomized driver that stalled the daemon;
each test fails before its fix. Bounded waits, every daemon stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import numpy as np
import pytest
from daemon_helpers import daemon_process, ipc_endpoint

from kvpager.client import Client
from kvpager.errors import DaemonUnavailable, KVPagerError, NotOwner, RequestTimeout, SessionLost

GEOMETRY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--blocks", "64", "--block-size", "16",
            "--dtype", "float32", "--device", "cpu"]

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")


def test_a_beat_that_waited_through_a_stop_keeps_its_session():
    beat, stall = 2.0, 1.8  # stopped for less than the heartbeat timeout
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", str(beat)], endpoint) as proc:
        for trial in range(6):  # (before: expired in about half the trials)
            c = Client(endpoint, timeout=0.5, heartbeat=False, name=f"t{trial}")
            c.allocate([[1, 2, 3]])
            c.heartbeat()
            t0 = time.monotonic()
            time.sleep(0.6)
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                time.sleep(beat / 3 - 0.6)
                with pytest.raises(RequestTimeout):
                    c.heartbeat()  # its beat waits in the socket for the daemon
                while time.monotonic() < t0 + 0.6 + stall:
                    time.sleep(0.005)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(0.2)
            try:
                c.heartbeat()
            except SessionLost:
                pytest.fail(f"trial {trial}: expired after a {stall} s stop, its beat queued meanwhile")
            c.close()


def test_a_stopped_daemon_is_a_timeout_and_a_late_allocate_is_freed():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "60"], endpoint) as proc:
        victim = Client(endpoint, timeout=1.0, name="victim")
        noisy = [Client(endpoint, timeout=0.3, name=f"noisy{i}") for i in range(3)]
        stop = threading.Event()

        def spam(c: Client) -> None:  # each timed-out call reopens its socket and probes the endpoint
            while not stop.is_set():
                with contextlib.suppress(KVPagerError):
                    c.heartbeat()

        os.kill(proc.pid, signal.SIGSTOP)
        threads = [threading.Thread(target=spam, args=(c,), daemon=True) for c in noisy]
        try:
            for t in threads:
                t.start()
            time.sleep(6.0)  # the listener's queue of connections fills
            with pytest.raises(RequestTimeout):  # DaemonUnavailable ("gone") before
                victim.allocate([[1, 2, 3, 4, 5]])
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            os.kill(proc.pid, signal.SIGCONT)
        victim.heartbeat()  # settles the allocate: run late, its sequence is freed
        assert [s for s in victim.sequences() if s.owner == victim.session_name] == []
        for c in [*noisy, victim]:
            c.close()


def test_the_slot_a_timed_out_append_was_given_is_written():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "30"], endpoint) as proc, \
            Client(endpoint, timeout=0.5) as c:
        [a] = c.allocate([list(range(200, 216))])
        k = np.ones((16, 2, 16), np.float32)
        for layer in range(2):
            c.write(layer, a.slots, k, -k)
        c.commit([a.seq_id])  # its full block published
        c.truncate([a.seq_id], [10])  # into it: the daemon takes it out of the cache
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                c.append([a.seq_id], 1, token_ids=[[999]])  # runs once the daemon goes on
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        tables, lens = c.tables([a.seq_id])  # the daemon's (the mirror forgot the sequence)
        assert int(lens[0]) == 11
        slot = np.array([int(tables[0][0]) * 16 + 10], np.int64)
        assert not c.blocks().cached[int(tables[0][0])]
        for layer in range(2):  # NotOwner ("published in the prefix cache") before
            c.write(layer, slot, np.full((1, 2, 16), 7, np.float32), np.full((1, 2, 16), -7, np.float32))
        kv, _ = c.kv(0)
        assert (kv[int(tables[0][0]), :, 10] == 7).all()


def test_an_op_found_gone_and_settled_later_is_not_trusted_by_the_mirror():
    """A truncate the client found the daemon gone for (its socket file moved aside while
    the daemon was stopped) is settled once the daemon answers, and runs; the mirror
    still held the blocks it freed, and a write into them overwrote another session's K/V."""
    endpoint, _ = ipc_endpoint()
    path = endpoint[len("ipc://"):]
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "30"], endpoint) as proc:
        c = Client(endpoint, timeout=1.0, heartbeat=False, name="victim")
        [a] = c.allocate([list(range(100, 140))])  # 40 tokens: 3 blocks
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                c.heartbeat()  # its socket reopened
            os.rename(path, path + ".aside")  # the probe finds no socket file: "gone"
            with pytest.raises(DaemonUnavailable):
                c.truncate([a.seq_id], [5])
        finally:
            if os.path.exists(path + ".aside"):
                os.rename(path + ".aside", path)
            os.kill(proc.pid, signal.SIGCONT)
        c.heartbeat()  # settles the truncate: it runs now
        tables, lens = c.tables([a.seq_id])
        assert int(lens[0]) == 5 and list(map(int, tables[0])) == [a.block_table[0]]
        other = Client(endpoint, timeout=2.0, heartbeat=False, name="other")
        [b] = other.allocate([list(range(500, 540))])
        stale = np.asarray(a.slots[16:], np.int64)  # the blocks the truncate gave back
        with pytest.raises(NotOwner):
            c.write(0, stale, np.full((24, 2, 16), 666, np.float32), np.full((24, 2, 16), 666, np.float32))
        kv, _ = other.kv(0)
        assert not any((kv[blk] == 666).any() for blk in b.block_table)
        other.close()
        c.close()


def test_a_clients_own_long_request_is_not_its_silence():
    """A session was heard from when its request was read, not when it was
    answered: a client without a heartbeat thread whose own request held the
    loop past the heartbeat timeout got SessionLost at its next call, 3 ms
    after the reply ("missed heartbeats")."""
    from daemon_helpers import SMALL, running_server

    with running_server(SMALL, heartbeat_timeout=0.5) as server:
        c = Client(server.endpoint, timeout=5, heartbeat=False)
        [a] = c.allocate([[1, 2, 3]])
        kept = server._handlers["fork"]

        def slow(session, args):
            time.sleep(1.5)  # the loop held three heartbeat timeouts by the client's own request
            return kept(session, args)

        server._handlers["fork"] = slow
        try:
            [[child]] = c.fork(a.seq_id)
        finally:
            server._handlers["fork"] = kept
        time.sleep(0.05)  # (the loop's expiry pass after the request)
        assert c.sequence(child).num_tokens == 3  # its session open
        c.close()
