"""Hostile subscribers of the KV event stream's PUB socket: what one
subscription message, or a flood of distinct ones, costs the daemon. The
daemon tests start their own daemon as a subprocess (its memory measured
apart from the test's); a publisher in this process for the subscribers that
real consumers are; bounded waits, every process stopped."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import zmq
from daemon_helpers import anon_mib, daemon_process, ipc_endpoint, wait_until

from kvpager.client import Client
from kvpager.errors import InvalidArgument
from kvpager.events import EventSink
from kvpager.events_pub import SUBSCRIPTIONS_MOST, EventPublisher, EventsConfig

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


def commits(endpoint: str, n: int, first: int) -> None:
    """``n`` requests that publish a batch each (the publisher's thread reads
    its subscribers' subscriptions as it sends)."""
    with Client(endpoint) as c:
        for i in range(first, first + n):
            [a] = c.allocate([list(range(i, i + 32))])
            c.commit(a.seq_id)
            c.free(a.seq_id)
            time.sleep(0.05)


def a_subscriber_gets_batches(endpoint: str, events: str, first: int) -> bool:
    """Whether a subscriber of everything that connects now gets a batch (published by
    commits of prompts from token ``first`` on) within 10 s."""
    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(events)
        got: list[bytes] = []

        def batch_came() -> bool:
            commits(endpoint, 1, first + len(got))
            while sub.poll(100):
                got.append(sub.recv_multipart()[1])
            return bool(got)

        return wait_until(batch_came, 10)
    finally:
        ctx.destroy(linger=0)


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
        before = anon_mib(proc.pid)
        hostile = subprocess.Popen([sys.executable, "-c", HOSTILE, events, str(4 << 20), "5"])
        try:
            time.sleep(1.0)  # its subscription sent
            commits(endpoint, 20, 100)
            time.sleep(0.5)
            grown = anon_mib(proc.pid) - before
        finally:
            hostile.kill()
            hostile.wait(10)
        assert grown < 48, f"the daemon grew by {grown:.0f} MiB for one subscription of 4 MiB"
        assert a_subscriber_gets_batches(endpoint, events, 1000), "a subscriber got no batch after the hostile one"
        assert proc.poll() is None


#: A subscriber that sends argv[2] distinct subscriptions of 60 random bytes each to the PUB
#: socket at argv[1], as fast as ZeroMQ takes them, connecting again whenever it is dropped.
FLOOD = """
import os, sys, time, zmq
ctx = zmq.Context()
end = time.monotonic() + float(sys.argv[3])
sent = 0
while sent < int(sys.argv[2]) and time.monotonic() < end:
    s = ctx.socket(zmq.XSUB)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(sys.argv[1])
    for _ in range(5000):
        s.send(b"\\x01" + os.urandom(60))
        sent += 1
    time.sleep(0.05)
    s.close(linger=2000)
time.sleep(max(0.0, end - time.monotonic()))
os._exit(0)
"""


def test_a_flood_of_distinct_subscriptions_does_not_grow_the_daemon():
    """Each distinct subscription is a branch of ZeroMQ's trie (a node a byte,
    ~45 bytes each), kept while its subscriber stays: 200,000 of 60 bytes from
    one subscriber grew the daemon by hundreds of MiB, every batch of the
    stream walking them. The publisher counts the distinct subscriptions its
    socket holds (an XPUB tells each new one); past `SUBSCRIPTIONS_MOST` it
    drops every subscriber (binding again), so the daemon stays bounded; a
    subscriber that connects afterwards gets the stream."""
    endpoint, d = ipc_endpoint()
    events = f"ipc://{d}/ev.sock"
    with daemon_process([*ARGS, "--events-endpoint", events], endpoint) as proc:
        commits(endpoint, 3, 0)
        before = anon_mib(proc.pid)
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, events, "200000", "12"])
        try:
            deadline = time.monotonic() + 12
            first = 100
            while flood.poll() is None and time.monotonic() < deadline:
                commits(endpoint, 5, first)  # batches: the publisher's thread reads the subscriptions
                first += 5
            grown = anon_mib(proc.pid) - before
        finally:
            flood.kill()
            flood.wait(10)
        assert grown < 48, f"the daemon grew by {grown:.0f} MiB for a flood of distinct subscriptions"
        assert any("every subscriber dropped" in line for line in proc.log)  # (said, for the operator)
        assert a_subscriber_gets_batches(endpoint, events, 5000), "a subscriber got no batch after the flood"
        assert proc.poll() is None


def test_subscribers_as_they_come_are_never_dropped_and_a_dropped_one_comes_back(tmp_path):
    """Forty subscribers of the topic, of everything and of the topic's prefixes
    (what real ones send) hold a handful of distinct subscriptions: none dropped.
    Past `SUBSCRIPTIONS_MOST` distinct ones every subscriber is dropped, and a
    SUB socket connects again by itself: it gets the batches published after."""
    d = tmp_path
    ev = EventPublisher(EventsConfig(f"ipc://{d}/ev.sock", topic="kv"), block_size=16)
    ev.bind(cap=64)
    ctx = zmq.Context()
    try:
        subs = []
        for i in range(40):
            s = ctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, [b"", b"k", b"kv"][i % 3])
            s.connect(ev.endpoint)
            subs.append(s)

        def everyone_gets(first: int) -> bool:
            publish_one(ev)
            return all(any(int.from_bytes(m[1], "big") >= first for m in drain(s)) for s in subs)

        assert wait_until(lambda: everyone_gets(1), 10)
        assert ev.subscribers_dropped == 0 and len(ev._subscriptions) <= 3
        flood_until_dropped(ctx, ev, b"kv")
        after = ev.published
        assert wait_until(lambda: everyone_gets(after), 15), "a dropped subscriber did not come back"
        assert len(ev._subscriptions) <= 3
    finally:
        ctx.destroy(linger=0)
        ev.close()


def flood_until_dropped(ctx: zmq.Context, ev: EventPublisher, prefix: bytes) -> None:
    """Past `SUBSCRIPTIONS_MOST` distinct subscriptions (``prefix`` and a number) from
    one XSUB socket, until ``ev`` drops every subscriber."""
    flood = ctx.socket(zmq.XSUB)
    flood.setsockopt(zmq.LINGER, 0)
    flood.connect(ev.endpoint)
    for i in range(SUBSCRIPTIONS_MOST + 10):
        flood.send(b"\x01" + prefix + i.to_bytes(4, "big"))
    assert wait_until(lambda: (publish_one(ev), ev.subscribers_dropped)[1] >= 1, 10)
    flood.close()


def publish_one(ev: EventPublisher) -> None:
    sink = EventSink()
    sink.cleared()
    ev.publish(time.time(), sink.take())
    time.sleep(0.02)


def drain(sock: zmq.Socket) -> list[list[bytes]]:
    got = []
    while sock.poll(0):
        got.append(sock.recv_multipart())
    return got


def test_a_publisher_that_cannot_bind_again_keeps_its_batches_and_binds_later(tmp_path):
    """Dropping every subscriber binds the socket again; where that bind fails (its
    path taken meanwhile) the thread kept sending on the closed socket, every batch
    an error. Now its batches are kept for replay unsent and the bind is tried
    again a second later."""
    ev = EventPublisher(EventsConfig(f"ipc://{tmp_path}/ev.sock"), block_size=16)
    ev.bind()
    bind, failed = ev._bind, []

    def fails_once(*args: Any) -> zmq.Socket:
        if not failed:
            failed.append(1)
            raise InvalidArgument("cannot bind the KV events endpoint (taken)")
        return bind(*args)

    ev._bind = fails_once
    ctx = zmq.Context()
    try:
        flood_until_dropped(ctx, ev, b"")
        n = ev.published
        publish_one(ev)
        assert wait_until(lambda: ev.published > n, 5)  # numbered and kept while unbound
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(ev.endpoint)
        assert wait_until(lambda: (publish_one(ev), drain(sub))[1] != [], 10), "never bound again"
        assert failed and ev._kept[-1][0] == ev.published - 1
    finally:
        ctx.destroy(linger=0)
        ev.close()
