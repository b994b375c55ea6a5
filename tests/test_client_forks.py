"""A worker's `Client` across ``fork()``: a forked child's step plan refuses to
write, and its staged write refuses before it stages; a fork while another
thread is in a call leaves the child unblocked. Each test is a defect that once
held; bounded waits, every daemon stopped. (The client's other ends:
test_client_lifecycle.py; a child using its parent's client:
test_hardening_fork.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from daemon_helpers import daemon_process, ipc_endpoint, wait_until
from test_client_lifecycle import GEOMETRY, _block, _kv
from test_hardening_fork import _in_child

from kvpager.client import Client
from kvpager.errors import RequestTimeout

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork() and signals")


def _forked_then(fn, then) -> str:
    """Fork a child that waits until the parent has run ``then()``, then runs ``fn()``
    (what it raised or returned is said); the child is killed past 20 s."""
    said_r, said_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the go, report, leave without the parent's exit handlers
        os.close(said_r)
        os.close(go_w)
        os.read(go_r, 1)
        try:
            said = f"returned {fn()!r}"
        except Exception as e:  # noqa: BLE001 - what it raised is what is reported
            said = f"{type(e).__name__}: {e}"
        os.write(said_w, said.encode())
        os._exit(0)
    os.close(said_w)
    os.close(go_r)
    try:
        then()
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
    if not wait_until(lambda: os.waitpid(pid, os.WNOHANG) != (0, 0), 20):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    said = os.read(said_r, 4096).decode()
    os.close(said_r)
    return said


def test_a_forked_childs_step_plan_refuses_to_write():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY, endpoint):
        parent = Client(endpoint, timeout=5)
        other = Client(endpoint, timeout=5)
        theirs = []

        def free_and_reuse() -> None:  # the parent frees; another session gets the blocks and writes
            parent.free([seq.seq_id])
            theirs[:] = other.allocate([list(range(500, 540))])
            other.write(0, theirs[0].slots, _kv(40, 1.0), _kv(40, 1.0))

        for use in ("plan", "local_write"):
            [seq] = parent.allocate([list(range(40))])
            plan = parent.plan([seq.seq_id], query_lens=[1], slots=seq.slots[-1:])
            slot = seq.slots[-1:]
            if use == "plan":
                said = _forked_then(lambda p=plan: p.write(0, _kv(1, 666.0), _kv(1, 666.0)), free_and_reuse)
            else:
                said = _forked_then(lambda s=slot: parent.local_write(0, s, _kv(1, 666.0), _kv(1, 666.0)),
                                    free_and_reuse)
            # the child's plan wrote through the parent's tables into the other session's block before
            assert said.startswith("InvalidArgument") and "fork" in said, (use, said)
            assert not (_block(other, theirs[0].slots[-1]) == 666.0).any()
            other.free([theirs[0].seq_id])
        other.close()
        parent.close()


def test_a_fork_while_another_thread_is_in_a_call_leaves_the_child_unblocked():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY, endpoint):
        client = Client(endpoint, timeout=1)
        [seq] = client.allocate([list(range(40))])
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                client.append([seq.seq_id], 1)
                client.truncate([seq.seq_id], [40])

        worker = threading.Thread(target=busy)
        worker.start()
        try:
            time.sleep(0.2)
            said = []
            for _ in range(5):  # (the fork lands inside one of the thread's calls most times)
                said.append(_in_child(client.close))
                said.append(_in_child(lambda: client.allocate([[1, 2, 3]])))
        finally:
            stop.set()
            worker.join(10)
        for text, took, _ in said:
            assert took < 5, text
            assert text == "returned None" or text.startswith("InvalidArgument"), text
        assert client.stats().used_blocks >= 3  # the parent's session went on
        client.close()


def test_a_forked_childs_staged_write_refuses_before_it_stages():
    """The child of a worker whose staged write timed out (unsettled, still to run on the
    daemon) stayed blocked in settling it on its parent's socket; and a child's staged
    write filled the staging buffer it shares with its parent before refusing, so the
    parent's pending write stored the child's K/V."""
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY + ["--heartbeat-timeout", "30"], endpoint) as proc:
        staged = Client(endpoint, timeout=0.5, map_pool=False)
        reader = Client(endpoint, timeout=5)
        [seq] = staged.allocate([list(range(16))])
        staged.remote_write(0, seq.slots, _kv(16, 0.5), _kv(16, 0.5))  # (its staging buffer made)
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                staged.remote_write(0, seq.slots, _kv(16, 1.0), _kv(16, 1.0))  # to run once the daemon goes on
            said, took, _ = _in_child(lambda: staged.remote_write(0, seq.slots, _kv(16, 666.0), _kv(16, 666.0)))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert said.startswith("InvalidArgument") and "fork" in said and took < 5, (said, took)
        staged.stats()  # settles the parent's write
        assert set(np.unique(_block(reader, seq.slots[0])).tolist()) == {1.0}
        staged.close()
        reader.close()
