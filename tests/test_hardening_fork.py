"""Workers that fork: a child using its parent's `Client` (a ZeroMQ socket cannot
cross ``fork()``) gets a typed error at once, not a call blocked for good, and
its ``close`` ends neither the parent's socket nor its session; a daemon run in
a process that forks keeps its shared memory when the child exits. Each test is
a defect that once held; bounded waits, every daemon stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from daemon_helpers import daemon_process, ipc_endpoint, subprocess_env

from kvpager.client import Client

GEOMETRY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--blocks", "32", "--block-size", "16",
            "--dtype", "float32", "--device", "cpu"]  # (fork semantics: the CPU backend on any host)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")


def _in_child(fn) -> tuple[str, float, int]:
    """Run ``fn`` in a forked child: (what it said, seconds it took, exit status); the
    child is killed past 20 s."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's exit handlers
        os.close(read)
        t0 = time.monotonic()
        try:
            said = f"returned {fn()!r}"
        except Exception as e:  # noqa: BLE001 - what it raised is what is reported
            said = f"{type(e).__name__}: {e}"
        os.write(write, f"{time.monotonic() - t0:.3f}|{said}".encode())
        os._exit(0)
    os.close(write)
    t0 = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > 20:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(read)
            return "killed: still blocked after 20 s", 20.0, -9
        time.sleep(0.05)
    out = os.read(read, 4096).decode()
    os.close(read)
    took, _, said = out.partition("|")
    return said, float(took or 0), os.waitstatus_to_exitcode(status)


def test_a_forked_child_using_its_parents_client_is_refused_at_once():
    endpoint, _ = ipc_endpoint()
    with daemon_process(GEOMETRY, endpoint):
        c = Client(endpoint, timeout=2)
        try:
            [a] = c.allocate([list(range(20))])
            said, took, status = _in_child(c.stats)
            assert said.startswith("InvalidArgument") and "fork" in said and took < 1, said
            x = np.zeros((len(a.slots), 2, 16), np.float32)
            said, took, _ = _in_child(lambda: c.write(0, a.slots, x, x))  # the mapped pool: no write either
            assert said.startswith("InvalidArgument") and "fork" in said, said
            said, took, status = _in_child(c.close)  # leaving a `with` block in the child
            assert said == "returned None" and took < 1 and status == 0, said
            assert c.stats().num_sequences == 1  # the parent's socket and session go on
            c.write(0, a.slots, x, x)
        finally:
            c.close()


_FORKING_DAEMON = """
import glob, os, subprocess, sys
from kvpager.server import Server
from kvpager.spec import PoolSpec
spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=32, block_size=16, dtype="float32",
                num_host_blocks=8)
server = Server.create(spec, sys.argv[1]).start()
mine = lambda: sorted(glob.glob(f"/dev/shm/kvp{os.getpid()}_*"))
before = mine()
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a helper child that ends normally: its exit handlers run
os.waitpid(pid, 0)
worker = ("import numpy as np, sys; from kvpager.client import Client\\n"
          "c = Client(sys.argv[1]); [a] = c.allocate([[1, 2, 3]])\\n"
          "x = np.ones((3, 2, 16), np.float32); c.write(0, a.slots, x, x); c.close(); print('mapped')")
got = subprocess.run([sys.executable, "-c", worker, sys.argv[1]], capture_output=True, text=True, timeout=60)
print(len(before), before == mine(), got.stdout.strip(), got.stderr.strip()[-200:])
server.stop()
print(mine())
"""


def test_a_daemon_in_a_process_that_forks_keeps_its_shared_memory():
    """The segments' creator unlinks them (at close, or its exit); a forked child
    inherited the finalizers and unlinked the running daemon's pool at its own exit:
    workers connecting later found no segment to map."""
    endpoint, _ = ipc_endpoint()
    out = subprocess.run([sys.executable, "-c", _FORKING_DAEMON, endpoint], capture_output=True, text=True,
                         timeout=120, env=subprocess_env())
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    count, kept, worker = lines[0].split(" ", 2)
    assert int(count) >= 2 and kept == "True" and worker.startswith("mapped"), lines[0]
    assert lines[1] == "[]"  # and the daemon's own stop unlinks them
