"""`Subscription.replay` (`kvpager events`' reader) when an answer outlasts its wait.

A replay that gave up waiting (its poll timed out while the publisher paced the
answer) or that its caller stopped reading left the rest of that answer in its
DEALER socket; the next replay read it as its own, stopped at its end marker,
and left its own answer behind in turn: the batches past the stale answer were
never yielded (a live batch after them moved the reader on). Budgets and the
test's clock: test_events_replay_rate.py."""

from __future__ import annotations

import pytest
from daemon_helpers import wait_until
from replay_helpers import QUIET, WAIT, C, Clock, publish, started

from kvpager.events_cli import Subscription


def flowing(sub: Subscription, clock: Clock, start: int) -> list[int]:
    """A replay from ``start`` read whole, the test's clock moved on after each batch
    so the publisher's budget lets the next one go."""
    got = []
    for b in sub.replay(start, timeout=WAIT):
        got.append(b.seq)
        clock.t += 100.0
    return got


def moved(clock: Clock) -> bool:
    clock.t += 100.0
    return True


@pytest.mark.parametrize("how", ["timed out", "stopped reading"])
def test_a_replay_left_part_way_leaves_nothing_for_the_next(tmpdir_ipc, how):
    clock = Clock()
    ev = started(tmpdir_ipc, 32 * C, clock)  # a saved budget of ~3 messages, then paced by the clock
    sub = None
    try:
        publish(ev, 9)  # batches 0..9 (0: the bind's AllBlocksCleared)
        sub = Subscription(ev.endpoint, ev.replay_endpoint)
        replay = sub.replay(0, timeout=QUIET)
        if how == "timed out":  # the clock stands: the answer stops after the saved budget
            first = [b.seq for b in replay]
        else:
            first = [next(replay).seq]
            replay.close()
        assert first and first == list(range(len(first))) and first[-1] < 9
        assert wait_until(lambda: moved(clock) and not ev._replays, WAIT, interval=0.02)  # the rest of the
        # first answer goes out, a few messages each time the clock moves, to a reader no longer asking
        publish(ev, 4)  # batches 10..13
        clock.t += 1000.0
        assert flowing(sub, clock, sub.last + 1) == list(range(first[-1] + 1, 14))
        assert not sub._replay.poll(int(QUIET * 1000))  # (it ended on its own end marker: nothing left over)
    finally:
        if sub is not None:
            sub.close()
        ev.close()
