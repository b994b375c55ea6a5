"""A worker's `Client` when its daemon is gone or stalled, and a client that would
be copied: the pool calls of a client that had not mapped the pool yet say the
daemon is gone (then that the session is lost), clients left open at exit wait
one second together for a stalled daemon, and a copy or a pickle is refused by
name. Each test is a defect that once held; bounded waits, every daemon stopped."""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from daemon_helpers import (
    SMALL,
    daemon_process,
    ipc_endpoint,
    running_server,
    subprocess_env,
    wait_until,
)

from kvpager.client import Client
from kvpager.errors import DaemonUnavailable, InvalidArgument, SessionLost

GEOMETRY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--blocks", "96", "--host-blocks", "32",
            "--block-size", "16", "--dtype", "float32", "--device", "cpu"]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs signals")


def _pool_calls(client: Client, seq) -> dict:
    one = np.ones((1, 2, 16), np.float32)
    return {
        "write": lambda: client.write(0, np.asarray(seq.slots[:1]), one, one),
        "attend": lambda: client.attend(0, [seq.seq_id], one),
        "kv": lambda: client.kv(0),
        "plan": lambda: client.plan([seq.seq_id]),
    }


def test_an_unmapped_clients_pool_calls_say_its_daemon_is_gone_then_its_session_lost():
    """A client maps the pool at its first write, attend, kv view or plan. One that
    had not yet, whose daemon then stopped (or was killed and started again), got
    `InvalidArgument: shared memory segment ... does not exist` from each, as if the
    caller had named a bad segment, even once it knew its session lost: a caller
    that reconnects on `SessionLost` took it for its own mistake."""
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "1"], endpoint) as first:
        client = Client(endpoint, timeout=5)
        [seq] = client.allocate([list(range(20))])
        first.send_signal(signal.SIGTERM)
        first.wait(30)
        for call in _pool_calls(client, seq).values():
            with pytest.raises(DaemonUnavailable, match="pool memory is gone"):
                call()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "1"], endpoint):
        assert wait_until(lambda: client._lost, 10)  # its heartbeat found the session gone
        for call in _pool_calls(client, seq).values():
            with pytest.raises(SessionLost, match="reconnect"):
                call()
        client.reconnect()
        [seq] = client.allocate([list(range(20))])
        one = np.full((20, 2, 16), 3.0, np.float32)
        client.write(0, seq.slots, one, one)
        assert float(client.attend(0, [seq.seq_id], np.ones((1, 2, 16), np.float32))[0, 0, 0]) == 3.0
        client.close()


def test_clients_left_open_at_exit_wait_for_a_stalled_daemon_one_second_together():
    """A process that exits with clients open says bye for each, each waiting for
    its heartbeat thread and then its bye: against a stopped daemon that was about
    2 s a client, 13 s for a process of 8 (documented: at most 1 s)."""
    endpoint, _ = ipc_endpoint()
    script = textwrap.dedent(f"""
        import sys
        from kvpager.client import Client
        clients = [Client({endpoint!r}, timeout=10) for _ in range(6)]
        print("open", flush=True)
        sys.stdin.readline()
        print("exiting", flush=True)
    """)
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "60"], endpoint) as daemon:
        worker = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=subprocess_env())
        try:
            assert worker.stdout.readline().strip() == "open"
            daemon.send_signal(signal.SIGSTOP)
            try:
                worker.stdin.write("\n")
                worker.stdin.flush()
                assert worker.stdout.readline().strip() == "exiting"
                t0 = time.monotonic()
                worker.wait(30)
                took = time.monotonic() - t0
            finally:
                daemon.send_signal(signal.SIGCONT)
            assert took < 3.0, f"{took:.1f} s to exit with 6 clients open against a stopped daemon"
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)


def test_a_client_is_neither_copied_nor_pickled():
    """A copy shared the session, its socket and its heartbeat thread: closing the
    copy closed the original's socket, whose next call raised zmq's own error; a
    pickle or a deep copy raised a TypeError about a lock. Refused by name, the
    client untouched."""
    with running_server(SMALL) as server, Client(server.endpoint, timeout=5) as client:
        [seq] = client.allocate([[1, 2, 3]])
        for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(InvalidArgument, match="cannot be copied or pickled"):
                attempt(client)
        client.append(seq.seq_id, 1)
        assert client.sequence(seq.seq_id).num_tokens == 4
