"""The replay budget of the KV event publisher: answers share a rate of bytes
a second (each message counting at least `REPLAY_MIN_CHARGE`) and requests
are read at most `REPLAY_REQUESTS` a second, so replay readers cannot keep
the publisher's thread busy (and the daemon's loop short of the GIL); a
request past the `REPLAY_PEERS` answers under way gets the end marker at once.

A test's clock drives the budgets (`EventPublisher(..., clock=)`): frozen, it
refills nothing, so what a reader gets is exactly what the budget allows,
whatever the machine's speed; each step of it allows a known amount more.
Waits are bounded; a "nothing more came" check can only pass late, never fail
by slowness."""

from __future__ import annotations

import os
import time

import pytest
import zmq
from daemon_helpers import wait_until
from replay_helpers import (
    QUIET,
    WAIT,
    C,
    Clock,
    ask,
    dealer,
    nothing_more,
    publish,
    started,
    take,
    thread_cpu_s,
)

from kvpager import env
from kvpager.errors import InvalidArgument
from kvpager.events_pub import (
    REPLAY_BATCHES,
    REPLAY_BURST_S,
    REPLAY_BYTES,
    REPLAY_PAUSE_S,
    REPLAY_PEERS,
    REPLAY_RATE,
    REPLAY_REQUESTS,
    EventsConfig,
    TokenBucket,
)


def test_a_replay_goes_out_at_the_budget_in_order_and_the_thread_sleeps_over_it(tmpdir_ipc, ctx):
    """1 MiB/s with 16 KiB a message: 64 messages a second. The saved budget
    (0.1 s: 6.4 messages) lets 7 go at once (the last into debt), then each
    1/16 s of the clock lets 4 more; nothing moves while the clock stands, and
    the thread sleeps meanwhile; every batch comes in order, then the end."""
    clock = Clock()
    ev = started(tmpdir_ipc, 64 * C, clock)
    try:
        publish(ev, 40)  # batches 1..40 after batch 0
        s = dealer(ctx, ev.replay_endpoint)
        ask(s, 0)
        got = take(s, 7)
        assert got == list(range(7)) and nothing_more(s)
        cpu = thread_cpu_s(ev) if os.path.exists("/proc/self/task") else None
        time.sleep(1.0)  # over budget with an answer under way: sleeping, not spinning
        if cpu is not None:
            assert thread_cpu_s(ev) - cpu < 0.3
        assert nothing_more(s)
        while len(got) < 41:
            clock.t += 1 / 16
            step = take(s, min(4, 41 - len(got)))
            got += step
        assert got == list(range(41))
        clock.t += 1 / 16
        assert take(s, 1) == [-1] and nothing_more(s)  # the end marker, charged like a batch
    finally:
        ev.close()


def test_live_batches_go_out_while_the_replay_budget_is_spent(tmpdir_ipc, ctx):
    """Live batches neither wait for the replay budget nor count against it:
    with the clock frozen and an answer stopped by the budget, each new batch
    still reaches a subscriber at once, and the answer gets no more."""
    clock = Clock()
    ev = started(tmpdir_ipc, 64 * C, clock)
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(ev.endpoint)
        publish(ev, 300)
        s = dealer(ctx, ev.replay_endpoint)
        ask(s, 0)
        assert take(s, 7) == list(range(7)) and nothing_more(s)
        deadline = time.monotonic() + 10  # a SUB sees nothing sent before its subscription arrived
        while not sub.poll(100):
            assert time.monotonic() < deadline, "the subscriber never received a batch"
            publish(ev, 1)
        while sub.poll(100):
            sub.recv_multipart()
        for i in range(50):
            publish(ev, 1)
            assert sub.poll(int(WAIT * 1000)), f"live batch {i} held"
            _, seq, _ = sub.recv_multipart()
            assert int.from_bytes(seq, "big") == ev.published - 1
        assert nothing_more(s)
        clock.t += 1 / 16
        assert take(s, 4) == list(range(7, 11))
    finally:
        ev.close()


def test_peers_share_the_budget_in_turns_and_each_gets_all_in_order(tmpdir_ipc, ctx):
    """Two answers under way take turns (the one served goes to the back), so
    neither waits for the other to finish; both arrive whole, each in order."""
    clock = Clock()
    ev = started(tmpdir_ipc, 64 * C, clock)
    try:
        publish(ev, 39)  # 40 batches: 0..39
        a, b = dealer(ctx, ev.replay_endpoint), dealer(ctx, ev.replay_endpoint)
        ask(a, 0)
        assert take(a, 7) == list(range(7))  # a alone: the saved budget
        ask(b, 10)
        got: dict[zmq.Socket, list[int]] = {a: list(range(7)), b: []}
        poller = zmq.Poller()
        poller.register(a, zmq.POLLIN)
        poller.register(b, zmq.POLLIN)
        left = 30 + 33 + 2  # b's batches, the rest of a's, two end markers
        steps = 0
        while left:
            clock.t += 1 / 16
            steps += 1
            for _ in range(min(4, left)):  # a step's budget, whoever takes it
                ready = dict(poller.poll(int(WAIT * 1000)))
                assert ready, f"nothing came at step {steps}"
                s = a if a in ready else b
                [seq] = take(s, 1)
                if seq != -1:
                    got[s].append(seq)
                left -= 1
            if steps <= 2:
                assert not poller.poll(int(QUIET * 1000))  # no more than the step's budget
            if steps == 2:  # b's turn came while a was far from done
                assert got[b] and len(got[a]) < 40
        assert got[a] == list(range(40)) and got[b] == list(range(10, 40))
        assert nothing_more(a) and nothing_more(b)
    finally:
        ev.close()


def test_requests_are_read_at_most_their_rate(tmpdir_ipc, ctx):
    """A crowd of requests is read `REPLAY_PEERS` at once, then
    `REPLAY_REQUESTS` a second; the rest wait in their peers' sockets, none
    is lost. (The byte budget is large here: it does not bind.)"""
    clock = Clock()
    ev = started(tmpdir_ipc, 1 << 30, clock)
    try:
        peers = [dealer(ctx, ev.replay_endpoint) for _ in range(100)]
        for s in peers:
            ask(s, 1 << 40)  # past the end: the answer is the end marker alone

        total = [0]

        def answered() -> int:
            for s in peers:
                if s.poll(0):
                    assert take(s, 1) == [-1]
                    total[0] += 1
            return total[0]

        assert wait_until(lambda: answered() >= REPLAY_PEERS, WAIT)
        time.sleep(QUIET)
        assert answered() == REPLAY_PEERS
        clock.t += 1 / 64  # 15.625 more requests
        assert wait_until(lambda: answered() >= REPLAY_PEERS + 15, WAIT)
        time.sleep(QUIET)
        assert answered() == REPLAY_PEERS + 15
        clock.t += 1.0
        assert wait_until(lambda: answered() >= 100, WAIT)
    finally:
        ev.close()


def test_a_catch_up_at_the_default_rate_is_quick(tmpdir_ipc, ctx):
    """The default budget (64 MiB/s, 4,096 small batches a second) is far
    above a daemon's usual publish rate: a subscriber that missed 1,000
    batches has them in about 0.15 s of the clock (400 at once), and the
    whole kept history goes out in a few seconds."""
    assert REPLAY_RATE * REPLAY_BURST_S / C >= 400
    assert (REPLAY_BATCHES * C + REPLAY_BYTES) / REPLAY_RATE <= 4
    clock = Clock()
    ev = started(tmpdir_ipc, REPLAY_RATE, clock)
    try:
        publish(ev, 999)
        s = dealer(ctx, ev.replay_endpoint)
        s.setsockopt(zmq.RCVHWM, 0)
        ask(s, 0)
        got = take(s, 410)  # 6.4 MiB saved: 409.6 messages, the last into debt
        assert nothing_more(s)
        steps = 0
        while len(got) < 1001:
            clock.t += 1 / 64  # 1 MiB: 64 messages
            steps += 1
            got += take(s, min(64, 1001 - len(got)))
        assert got == [*range(1000), -1] and steps == 10  # 0.16 s of the clock
    finally:
        ev.close()


def test_token_bucket():
    b = TokenBucket(rate=100, burst=10, now=5.0)
    assert b.refill(5.0) == 10 and b.wait() == 0
    b.take(25)  # into debt: one spend bigger than the bucket still goes
    assert b.tokens == -15 and b.wait() == pytest.approx(0.15) and b.wait(1.0) == pytest.approx(0.16)
    assert b.refill(5.1) == pytest.approx(-5)
    assert b.refill(4.0) == pytest.approx(-5)  # time never runs back
    assert b.refill(100.0) == 10  # saved up to the burst only
    assert REPLAY_PAUSE_S >= 0.005 and REPLAY_REQUESTS <= 10_000


def test_replay_rate_settings(monkeypatch, tmpdir_ipc):
    assert EventsConfig(f"ipc://{tmpdir_ipc}/e").replay_rate == REPLAY_RATE
    assert EventsConfig(f"ipc://{tmpdir_ipc}/e", replay_rate=1).replay_rate == 1
    for bad in (0, -1, 1.5, True, "64M", None):
        with pytest.raises(InvalidArgument, match="replay rate"):
            EventsConfig(f"ipc://{tmpdir_ipc}/e", replay_rate=bad)
    monkeypatch.delenv("KVPAGER_EVENTS_REPLAY_RATE", raising=False)
    assert env.events_replay_rate() is None
    monkeypatch.setenv("KVPAGER_EVENTS_REPLAY_RATE", "8M")
    assert env.events_replay_rate() == 8 << 20
    for bad in ("0", "x", "-5"):
        monkeypatch.setenv("KVPAGER_EVENTS_REPLAY_RATE", bad)
        with pytest.raises(InvalidArgument, match="KVPAGER_EVENTS_REPLAY_RATE"):
            env.events_replay_rate()
