"""The replay publisher under a full house (`REPLAY_PEERS` answers under way):
a request past them gets the end marker at once, and busy answers to peers
that never read or are gone cost nothing more. Budgets and the test's clock:
test_events_replay_rate.py."""

from __future__ import annotations

import logging
import time

import pytest
import zmq
from daemon_helpers import wait_until
from replay_helpers import (
    PROMPT,
    QUIET,
    WAIT,
    C,
    Clock,
    ask,
    dealer,
    full_house,
    nothing_more,
    publish,
    started,
    take,
)

from kvpager.events_cli import Subscription
from kvpager.events_pub import (
    END_SEQ,
    REPLAY_PEERS,
    EventPublisher,
    EventsConfig,
)


@pytest.mark.parametrize("fmt", ["map", "array"])
def test_a_request_past_the_answers_under_way_gets_the_end_at_once(tmpdir_ipc, ctx, fmt):
    """With `REPLAY_PEERS` answers under way, one request more got no answer at
    all: a REQ reader waited out its own timeout, and `kvpager events` its 2 s.
    Now it gets the end marker alone at once (framed as any answer's end), the
    answers under way lose nothing and arrive whole and in order, and the
    reader asking again later gets a whole answer."""
    clock = Clock()
    ev = EventPublisher(EventsConfig(f"ipc://{tmpdir_ipc}/ev.sock", format=fmt, replay_rate=64 * C),
                        block_size=4, clock=clock)
    ev.bind()
    sub = None
    try:
        publish(ev, 9)  # batches 0..9
        peers = full_house(ev, ctx, 0)
        first = peers[0]
        got = {s: [] for s in peers}
        got[first] = take(first, 7)  # the saved budget: 6.4 messages, the last into debt
        assert got[first] == list(range(7)) and nothing_more(first)
        end = [b"", END_SEQ, b""] if fmt == "map" else [END_SEQ, b""]

        clock.t += 1 / 512  # ~2 requests read (all 64 tokens went at once); the budget stays in debt
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(ev.replay_endpoint)
        t0 = time.monotonic()
        req.send((0).to_bytes(8, "big"))
        assert req.poll(int(WAIT * 1000)), "a request past the answers under way got no answer"
        assert time.monotonic() - t0 < PROMPT
        assert req.recv_multipart() == end

        clock.t += 1 / 512
        sub = Subscription(ev.endpoint, ev.replay_endpoint)  # `kvpager events`'s reader
        t0 = time.monotonic()
        assert list(sub.replay(0, timeout=WAIT)) == []
        assert time.monotonic() - t0 < PROMPT
        assert len(ev._replays) == REPLAY_PEERS and all(nothing_more(s) for s in peers[:2])

        poller = zmq.Poller()
        for s in peers:
            poller.register(s, zmq.POLLIN)
        done: set[zmq.Socket] = set()
        deadline = time.monotonic() + 60
        while len(done) < len(peers):  # each second of the clock lets ~7 messages go
            assert time.monotonic() < deadline, f"{len(done)} of {len(peers)} answers ended"
            clock.t += 1.0
            for s, _ in poller.poll(100):
                while s.poll(0):
                    [seq] = take(s, 1)
                    assert s not in done
                    if seq == -1:
                        done.add(s)
                    else:
                        got[s].append(seq)
        assert got[first] == list(range(10)) and all(got[s] == list(range(10)) for s in peers[1:])
        clock.t += 1.0  # room again: the reader turned away asks again and gets it all
        again = dealer(ctx, ev.replay_endpoint)
        ask(again, 5)
        assert take(again, 6) == [*range(5, 10), -1]
    finally:
        if sub is not None:
            sub.close()
        ev.close()


def test_busy_answers_to_peers_that_never_read_or_are_gone_cost_nothing_more(tmpdir_ipc, ctx, caplog):
    """Requests past the answers under way from peers gone before their
    answer (its send fails at once: `ROUTER_MANDATORY`), and a flood of them
    from a peer that reads none: each gets a few bytes at most, never waited
    for, and nothing fails; the thread goes on (a live batch still goes out,
    another reader still gets its end at once) and the answers under way stay.
    (A byte budget of 1 byte/s stays in debt whatever the clock does.)"""
    caplog.set_level(logging.DEBUG, logger="kvpager.events")
    clock = Clock()
    ev = started(tmpdir_ipc, 1, clock)
    try:
        peers = full_house(ev, ctx, 0)
        gone = [dealer(ctx, ev.replay_endpoint) for _ in range(5)]
        for s in gone:
            ask(s, 0)
        flood = ctx.socket(zmq.DEALER)
        flood.setsockopt(zmq.LINGER, 0)
        flood.setsockopt(zmq.SNDHWM, 0)
        flood.setsockopt(zmq.RCVHWM, 1)
        flood.connect(ev.replay_endpoint)
        n = 3000
        for _ in range(n):
            ask(flood, 0)
        time.sleep(QUIET)  # the requests are in (no request budget: none is read yet)
        for s in gone:
            s.close()
        requests = ev._requests
        for _ in range(n // REPLAY_PEERS - 2):  # each step of the clock lets 62.5 requests be read
            clock.t += 1 / 16
            assert wait_until(lambda: requests._last == clock.t and requests.tokens < 1, WAIT, interval=0.002)
        assert ev._thread.is_alive() and len(ev._replays) == REPLAY_PEERS
        publish(ev, 1)  # the thread is not stuck
        clock.t += 1 / 16
        other = dealer(ctx, ev.replay_endpoint)
        t0 = time.monotonic()
        ask(other, 0)
        assert take(other, 1) == [-1] and time.monotonic() - t0 < PROMPT
        assert len(ev._replays) == REPLAY_PEERS and take(peers[0], 1) == [0]
        while flood.poll(0):
            assert flood.recv_multipart()[-2:] == [END_SEQ, b""]
        assert sum("answered with the end" in r.getMessage() for r in caplog.records) >= 64 * 40
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        ev.close()
