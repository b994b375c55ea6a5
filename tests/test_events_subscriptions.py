"""Hostile subscribers of the KV event stream's PUB socket: what one
subscription message costs the daemon. Each test starts its own daemon as a
subprocess (its memory measured apart from the test's), bounded waits, every
process stopped."""

from __future__ import annotations

import subprocess
import sys
import time

import zmq
from daemon_helpers import daemon_process, ipc_endpoint, wait_until

from kvpager.client import Client

ARGS = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--blocks", "96", "--block-size", "16",
        "--dtype", "float32", "--device", "cpu"]

#: A subscriber (another process: its own copy of the subscription is its business) that sends
#: one subscription of argv[2] bytes to the PUB socket at argv[1] and stays connected.
HOSTILE = """
import sys, time, zmq
s = zmq.Context().socket(zmq.XSUB)
s.connect(sys.argv[1])
time.sleep(0.3)
s.send(b"\\x01" + b"a" * int(sys.argv[2]))
time.sleep(float(sys.argv[3]))
import os; os._exit(0)  # (no teardown of its own trie)
"""


def rss_anon_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


def commits(endpoint: str, n: int, first: int) -> None:
    """``n`` requests that publish a batch each (the publisher's thread reads
    its subscribers' subscriptions as it sends)."""
    with Client(endpoint) as c:
        for i in range(first, first + n):
            [a] = c.allocate([list(range(i, i + 32))])
            c.commit(a.seq_id)
            c.free(a.seq_id)
            time.sleep(0.05)


def test_one_huge_subscription_does_not_grow_the_daemon():
    """ZeroMQ's PUB keeps each subscription as a trie of a node per byte (~45
    bytes of memory each), built on the publisher's thread: one subscription
    of 4 MiB grew the daemon by ~180 MiB (one of 64 MiB by gigabytes, the
    stream stopped while it was built, SIGTERM waited for it). A subscription
    past the topic's length and a few bytes now drops its sender's connection;
    a subscriber sending a real one still gets the stream."""
    endpoint, d = ipc_endpoint()
    events = f"ipc://{d}/ev.sock"
    with daemon_process([*ARGS, "--events-endpoint", events], endpoint) as proc:
        commits(endpoint, 3, 0)
        before = rss_anon_mib(proc.pid)
        hostile = subprocess.Popen([sys.executable, "-c", HOSTILE, events, str(4 << 20), "5"])
        try:
            time.sleep(1.0)  # its subscription sent
            commits(endpoint, 20, 100)
            time.sleep(0.5)
            grown = rss_anon_mib(proc.pid) - before
        finally:
            hostile.kill()
            hostile.wait(10)
        assert grown < 48, f"the daemon grew by {grown:.0f} MiB for one subscription of 4 MiB"
        ctx = zmq.Context()
        try:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(events)
            got: list[bytes] = []

            def batch_came() -> bool:
                commits(endpoint, 1, 1000 + len(got))
                while sub.poll(100):
                    got.append(sub.recv_multipart()[1])
                return bool(got)

            assert wait_until(batch_came, 10), "a subscriber got no batch after the hostile one"
        finally:
            ctx.destroy(linger=0)
        assert proc.poll() is None
