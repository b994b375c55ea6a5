"""What the replay-budget tests share (test_events_replay_rate.py,
test_events_replay_busy.py; their fixtures `tmpdir_ipc` and `ctx` are in
conftest.py): a test's clock, a publisher
started on it, replay dealers and their reads, bounded by WAIT / QUIET."""

from __future__ import annotations

import os
import time

import numpy as np
import zmq
from daemon_helpers import wait_until

from kvpager.events import EventSink
from kvpager.events_pub import (
    END_SEQ,
    REPLAY_MIN_CHARGE,
    REPLAY_PEERS,
    EventPublisher,
    EventsConfig,
)

C = REPLAY_MIN_CHARGE
WAIT = 5.0  # seconds a message may take to come, at most
QUIET = 0.3  # seconds without a message that say none is coming


class Clock:
    """A monotonic clock that moves only when the test says (binary fractions: exact sums)."""

    def __init__(self) -> None:
        self.t = 1024.0

    def __call__(self) -> float:
        return self.t


def started(d: str, rate: int, clock: Clock) -> EventPublisher:
    ev = EventPublisher(EventsConfig(f"ipc://{d}/ev.sock", replay_rate=rate), block_size=4, clock=clock)
    ev.bind()
    return ev


def publish(ev: EventPublisher, n: int) -> None:
    """``n`` small batches (far under `REPLAY_MIN_CHARGE` each), waited for."""
    want = ev.published + n
    for i in range(n):
        sink = EventSink()
        sink.stored([(ev.published + i).to_bytes(16, "big")], None, np.arange(4))
        ev.publish(time.time(), sink.take())
    assert wait_until(lambda: ev.published >= want, 30, interval=0.002)
    assert all(len(p) < C for _, p in ev._kept)


def dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def ask(s: zmq.Socket, start: int) -> None:
    s.send_multipart([b"", start.to_bytes(8, "big")])


def take(s: zmq.Socket, n: int) -> list[int]:
    """The next ``n`` messages' sequence numbers (-1: the end marker), each waited for."""
    out = []
    for _ in range(n):
        assert s.poll(int(WAIT * 1000)), f"{len(out)} of {n} replay messages came"
        frames = s.recv_multipart()
        out.append(-1 if frames[-2] == END_SEQ else int.from_bytes(frames[-2], "big"))
    return out


def nothing_more(s: zmq.Socket) -> bool:
    return not s.poll(int(QUIET * 1000))


def thread_cpu_s(ev: EventPublisher) -> float:
    """CPU seconds the publisher's thread has used (Linux /proc)."""
    with open(f"/proc/self/task/{ev._thread.native_id}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PROMPT = 1.0  # seconds a busy answer may take at most (the thread looks every 0.05 s)


def full_house(ev: EventPublisher, ctx: zmq.Context, start: int) -> list[zmq.Socket]:
    """`REPLAY_PEERS` dealers whose answers (from ``start``) are under way and
    stay so while the clock stands: the first request spends the saved budget."""
    peers = [dealer(ctx, ev.replay_endpoint) for _ in range(REPLAY_PEERS)]
    ask(peers[0], start)
    assert peers[0].poll(int(WAIT * 1000))  # served alone: the budget is spent (in debt) after it
    for s in peers[1:]:
        ask(s, start)
    assert wait_until(lambda: len(ev._replays) == REPLAY_PEERS, WAIT)
    return peers
