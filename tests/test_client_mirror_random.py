"""A worker's mirror of its block tables against the daemon after random op
sequences (hypothesis): allocate, append, fork, truncate, swap, free and
attention, misuse among them; the mirror matches the daemon after every step,
each failed op leaves it unchanged, and no example leaks sequences."""

from __future__ import annotations

import itertools

import numpy as np
from client_plan_helpers import (
    BS,
    SPEC,
    WAIT,
    assert_mirrors_daemon,
    assert_unchanged,
    attend_both,
    snapshot,
    write_random,
)
from daemon_helpers import server_fixture
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvpager.client import Client
from kvpager.errors import (
    InvalidArgument,
    NotSwapped,
    OutOfBlocks,
    SequenceSwapped,
    UnknownSequence,
)

server = server_fixture(SPEC, scope="module", heartbeat_timeout=60)


PROMPTS = st.lists(
    st.builds(lambda cut, rest: list(range(cut)) + rest, st.integers(0, 3 * BS),
              st.lists(st.integers(0, 3), max_size=2 * BS)),
    min_size=1, max_size=3)


class MirrorMachine(RuleBasedStateMachine):
    """Random ops through one Client; the mirror must match the daemon after each.
    Each failed op (out of blocks, misuse) must leave the mirror unchanged."""

    server = None  # set by the test below: one daemon for every example
    examples = itertools.count()

    def __init__(self):
        super().__init__()
        self.c = Client(self.server.endpoint, timeout=WAIT, heartbeat=False)
        self.rng = np.random.default_rng(0)
        # Its own salt: an example never matches blocks an earlier one left in
        # the daemon's prefix cache. Such hits made the same draws use fewer
        # blocks (two equal prompts of a batch without share_in_batch both
        # matched the cached copy), so an op failed with OutOfBlocks in one
        # example and not in another that drew the same choices, and hypothesis
        # stopped the test (FlakyStrategyDefinition: data generation depending
        # on external state).
        self.salt = f"example-{next(self.examples)}"

    def teardown(self):
        self.c.close()

    def _ids(self, data, swapped: bool = False) -> list[int]:
        """Distinct ids of resident (or swapped) sequences; now and then one
        more of the other kind or an unknown id, which makes the op fail."""
        m = self.c._mirror
        pool = sorted(i for i in m.rows if (i in m.swapped) == swapped)
        ids = data.draw(st.lists(st.sampled_from(pool), min_size=1, unique=True)) if pool else []
        if data.draw(st.integers(0, 7)) == 0:
            other = sorted(i for i in m.rows if (i in m.swapped) != swapped) or [10**6]
            ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.sampled_from(other)))
        return ids

    def _try(self, op, *args, **kwargs) -> object:
        before = snapshot(self.c)
        try:
            out = op(*args, **kwargs)
        except (OutOfBlocks, InvalidArgument, SequenceSwapped, NotSwapped, UnknownSequence) as e:
            event(f"{op.__name__}: {type(e).__name__}")
            assert_unchanged(before, self.c)
            return None
        event(f"{op.__name__}: ok")
        return out

    @rule(prompts=PROMPTS, share=st.booleans())
    def allocate(self, prompts, share):
        allocs = self._try(self.c.allocate, prompts, self.salt, share_in_batch=share)
        if allocs:
            write_random(self.c, np.concatenate([a.slots for a in allocs]), self.rng)
            self.c.commit([a.seq_id for a in allocs])

    @precondition(lambda self: self.c._mirror.rows)
    @rule(data=st.data(), n=st.one_of(st.just(1), st.integers(0, 2 * BS + 1), st.lists(st.integers(0, 9))))
    def append(self, data, n):
        ids = self._ids(data)
        if isinstance(n, list):
            n = (n * len(ids))[: len(ids)] if n else 1
        slots = self._try(self.c.append_flat, ids, n)
        if slots is not None and len(slots):
            write_random(self.c, slots, self.rng)

    @precondition(lambda self: self.c._mirror.rows)
    @rule(data=st.data(), n=st.integers(1, 3))
    def fork(self, data, n):
        self._try(self.c.fork, self._ids(data), n)

    @precondition(lambda self: self.c._mirror.rows)
    @rule(data=st.data())
    def truncate(self, data):
        m = self.c._mirror
        ids = self._ids(data)
        lens = [m.table.num_tokens[m.rows[i]] if i in m.rows else 0 for i in ids]
        if ids:  # a length one past the end now and then: InvalidArgument
            self._try(self.c.truncate, ids, [data.draw(st.integers(0, int(n) + (n % 5 == 0))) for n in lens])

    @precondition(lambda self: self.c._mirror.rows)
    @rule(data=st.data())
    def release(self, data):
        m = self.c._mirror
        ids = self._ids(data)
        lens = [m.table.num_tokens[m.rows[i]] if i in m.rows else 0 for i in ids]
        if ids:  # a position one past the end now and then: InvalidArgument
            self._try(self.c.release_before, ids, [data.draw(st.integers(0, int(n) + (n % 5 == 0))) for n in lens])

    @precondition(lambda self: self.c._mirror.rows)
    @rule(data=st.data())
    def swap_out(self, data):
        self._try(self.c.swap_out, self._ids(data))

    @precondition(lambda self: self.c._mirror.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        self._try(self.c.swap_in, self._ids(data, swapped=True))

    @precondition(lambda self: self.c._mirror.rows)
    @rule(data=st.data(), swapped=st.booleans())
    def free(self, data, swapped):
        ids = self._ids(data, swapped)
        if ids:
            self._try(self.c.free, ids + [10**6] if data.draw(st.integers(0, 7)) == 0 else ids)

    @precondition(lambda self: len(self.c._mirror.rows) > len(self.c._mirror.swapped))
    @rule(data=st.data())
    def attend(self, data):
        m = self.c._mirror
        ids = [i for i in self._ids(data) if i in m.rows and i not in m.swapped and m.table.num_tokens[m.rows[i]]
               and not m.table.released[m.rows[i]]]  # full attention: none released
        if ids:
            lens = m.gather(ids)[1]
            attend_both(self.c, ids, [data.draw(st.integers(1, int(n))) for n in lens], self.rng)

    @invariant()
    def mirrors_the_daemon(self):
        assert_mirrors_daemon(self.c)


def test_random_ops_keep_the_mirror_exact(server):
    MirrorMachine.server = server
    run = MirrorMachine.TestCase
    run.settings = settings(max_examples=40, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    try:
        run().runTest()
    finally:
        with Client(server.endpoint, timeout=WAIT, heartbeat=False) as obs:
            obs.check_integrity()
            assert obs.stats().num_sequences == 0, "an example leaked its session's sequences"
