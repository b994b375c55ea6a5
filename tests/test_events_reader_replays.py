"""`kvpager events`' reader (`Subscription`) asking the replay socket: only the
subscribed topic's batches where the answer names it, and a bounded wait where
the replay socket has no peer to send to (an endpoint that is no ZeroMQ
ROUTER: the send blocked for ever, --idle and --count unheard)."""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq
from daemon_helpers import wait_until

from kvpager.events import EventSink
from kvpager.events_cli import Subscription
from kvpager.events_pub import EventPublisher, EventsConfig


def publisher(d: str, topic: str, fmt: str = "map") -> EventPublisher:
    ev = EventPublisher(EventsConfig(f"ipc://{d}/ev.sock", topic=topic, format=fmt), block_size=4)
    ev.bind()
    for i in range(3):
        sink = EventSink()
        sink.stored([i.to_bytes(16, "big")], None, np.arange(4))
        ev.publish(time.time(), sink.take())
    assert wait_until(lambda: ev.published >= 4, 30, interval=0.01)  # (batch 0: the bind's)
    return ev


def test_a_replay_yields_the_subscribed_topic_only(tmpdir_ipc):
    ev = publisher(tmpdir_ipc, "kvA")
    try:
        for topic, want in (("OTHER", []), ("kv", [0, 1, 2, 3]), ("", [0, 1, 2, 3])):
            with Subscription(ev.endpoint, ev.replay_endpoint, topic, start=0) as sub:
                assert [b.seq for b in sub.replay(0, timeout=5.0)] == want, topic
    finally:
        ev.close()


def test_a_replay_socket_without_a_peer_gives_up_within_its_wait(tmpdir_ipc):
    ev = publisher(tmpdir_ipc, "")
    sub = Subscription(ev.endpoint, ev.replay_endpoint, start=0)
    try:
        # A DEALER that has no peer to send to (what a failed handshake leaves): one that
        # queues nothing until a connection completes, to an endpoint nothing serves.
        sub._replay.close()
        sub._replay = sub._ctx.socket(zmq.DEALER)
        sub._replay.setsockopt(zmq.LINGER, 0)
        sub._replay.setsockopt(zmq.IMMEDIATE, 1)
        sub._replay.connect(f"ipc://{tmpdir_ipc}/nobody.sock")
        got: list[list[int]] = []
        reader = threading.Thread(target=lambda: got.append([b.seq for b in sub.replay(0, timeout=0.3)]),
                                  daemon=True)
        reader.start()
        reader.join(10)
        assert got == [[]], "the replay's send waited past its timeout"
    finally:
        if got:  # (a reader still blocked holds the socket: its context is left to the process)
            sub.close()
        ev.close()


def test_the_cli_refuses_an_in_process_endpoint():
    """``kvpager events --endpoint inproc://x`` waited for nothing and exited 0."""
    from daemon_helpers import run_cli

    for args in (["--endpoint", "inproc://x"], ["--endpoint", "tcp://127.0.0.1:5557", "--replay-endpoint", "inproc://y"]):
        r = run_cli(["events", *args, "--idle", "0.2"])
        assert r.exit_code == 2 and "inproc:// reaches only" in r.output, r.output
