"""A worker's mirror of its block tables (`Client` + `TableMirror`) against the daemon.

After any mix of allocate / append (one and several tokens, copy-on-write
after fork) / fork / truncate / swap / free, the mirror gathers exactly the
tables the daemon's `tables` op answers, attention through it equals the
daemon's, a failed op changes nothing, and a step of attention over every
layer costs no round trip."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_helpers import ipc_endpoint, running_server, wait_until
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvpager.client import Client
from kvpager.errors import (
    InvalidArgument,
    NotSwapped,
    OutOfBlocks,
    ProtocolError,
    RequestTimeout,
    SequenceSwapped,
    SessionLost,
    UnknownSequence,
)
from kvpager.protocol import decode_tables, pack, unpack
from kvpager.spec import PoolSpec

BS = 8
SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=48, block_size=BS,
                dtype="float32", num_host_blocks=12)
WAIT = 30  # seconds: the bound of every wait


@pytest.fixture(scope="module")
def server():
    with running_server(SPEC, heartbeat_timeout=60) as s:
        yield s


@pytest.fixture
def client(server):
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as c:
        yield c


# -- helpers ------------------------------------------------------------------------------
def snapshot(c: Client):
    m = c._mirror
    return (dict(m.rows), set(m.swapped), m.table.table.copy(), m.table.num_blocks.copy(),
            m.table.num_tokens.copy())


def assert_unchanged(before, c: Client) -> None:
    after = snapshot(c)
    assert after[:2] == before[:2]
    for x, y in zip(after[2:], before[2:]):
        np.testing.assert_array_equal(x, y)


def assert_mirrors_daemon(c: Client) -> None:
    """The mirror holds exactly this session's sequences, swapped as the daemon
    says, and gathers the daemon's tables (counted by the daemon, not the mirror)."""
    own = [s for s in c.sequences() if s.owner == c.session_name]
    assert sorted(c._mirror.rows) == [s.seq_id for s in own]
    assert c._mirror.swapped == {s.seq_id for s in own if s.swapped}
    resident = [s.seq_id for s in own if not s.swapped]
    tables, lens = c._mirror.gather(resident)
    want_tables, want_lens = c._call("tables", {"seq_ids": resident})
    assert tables.dtype == want_tables.dtype and lens.dtype == want_lens.dtype
    np.testing.assert_array_equal(tables, want_tables)
    np.testing.assert_array_equal(lens, want_lens)
    for s in own:
        if s.swapped:
            with pytest.raises(SequenceSwapped):
                c.tables([s.seq_id])
            with pytest.raises(SequenceSwapped):
                c._call("tables", {"seq_ids": [s.seq_id]})


def write_random(c: Client, slots, rng) -> None:
    shape = (len(slots), SPEC.num_kv_heads, SPEC.head_dim)
    for layer in range(c.spec.num_layers):
        c.write(layer, slots, rng.standard_normal(shape).astype(np.float32),
                rng.standard_normal(shape).astype(np.float32))


def attend_both(c: Client, ids: list[int], qlens: list[int], rng):
    q = rng.standard_normal((sum(qlens), 4, SPEC.head_dim)).astype(np.float32)
    for layer in range(c.spec.num_layers):
        local = c.local_attend(layer, ids, q, qlens)
        remote = c.remote_attend(layer, ids, q, qlens)
        np.testing.assert_array_equal(local, remote)


def test_decode_tables_checks_its_shapes():
    tables, lens = np.zeros((2, 3), np.int32), np.array([5, 9], np.int32)
    got = decode_tables(unpack(pack([tables, lens])))
    np.testing.assert_array_equal(got[0], tables)
    np.testing.assert_array_equal(got[1], lens)
    for bad in (None, [tables], [tables, lens[:1]], [lens, lens], [tables, [5, 9]]):
        with pytest.raises(ProtocolError):
            decode_tables(bad)


# -- a scripted walk through every op ------------------------------------------------------
def test_every_op_keeps_the_mirror_exact(client):
    c, rng = client, np.random.default_rng(0)
    a, b, e = c.allocate([list(range(10)), list(range(8)), []])
    assert_mirrors_daemon(c)
    write_random(c, np.concatenate([a.slots, b.slots]), rng)
    c.commit([a.seq_id, b.seq_id])
    [kids] = c.fork([a.seq_id], 3)
    assert_mirrors_daemon(c)
    # copy-on-write of the shared, partly filled last block; several tokens; empty
    c.append(kids + [a.seq_id, e.seq_id], [1, 3, 7, 2, 5], [[1], [2, 3, 4], None, None, None])
    assert_mirrors_daemon(c)
    c.append(kids + [b.seq_id])  # decode: a new block for b at its boundary
    assert_mirrors_daemon(c)
    c.append_flat([kids[0]], [0])
    c.truncate([kids[1], kids[2], e.seq_id], [3, 9, 0])
    assert_mirrors_daemon(c)
    c.swap_out([kids[0], b.seq_id])
    assert_mirrors_daemon(c)
    c.append([kids[1]], 6)
    c.swap_in([b.seq_id, kids[0]])
    assert_mirrors_daemon(c)
    attend_both(c, [a.seq_id, b.seq_id, kids[0], kids[1]], [1, 2, 1, 4], rng)
    c.free([kids[2], b.seq_id])
    assert_mirrors_daemon(c)
    c.check_integrity()


def test_swap_in_reply_carries_the_new_tables(client):
    [a] = client.allocate([list(range(10))])
    client.swap_out(a.seq_id)
    got = client._call("swap_in", {"seq_ids": [a.seq_id]})
    want = client._call("tables", {"seq_ids": [a.seq_id]})
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    client._mirror.forget([a.seq_id])  # swapped in behind the mirror's back


def test_swap_in_from_an_older_daemon(server, client, monkeypatch):
    """A daemon whose swap_in answers nil: the client asks for the tables."""
    op = server._handlers["swap_in"]
    monkeypatch.setitem(server._handlers, "swap_in", lambda s, a: op(s, a) and None)
    [a] = client.allocate([list(range(10))])
    client.swap_out([a.seq_id])
    client.swap_in([a.seq_id])
    assert_mirrors_daemon(client)


# -- failures change nothing ----------------------------------------------------------------
def test_failed_ops_leave_the_mirror_unchanged(client):
    c = client
    a, b = c.allocate([list(range(9)), list(range(100, 104))])
    [[kid]] = c.fork([a.seq_id])
    c.swap_out([b.seq_id])
    before = snapshot(c)
    failing = [
        (OutOfBlocks, lambda: c.append([a.seq_id, kid], [2, BS * SPEC.num_blocks])),
        (OutOfBlocks, lambda: c.allocate([[1] * 8, [2] * (BS * SPEC.num_blocks)])),
        (UnknownSequence, lambda: c.append([a.seq_id, 10**6])),
        (UnknownSequence, lambda: c.free([kid, 10**6])),
        (UnknownSequence, lambda: c.truncate([a.seq_id, 10**6], 1)),
        (UnknownSequence, lambda: c.fork([a.seq_id, 10**6])),
        (UnknownSequence, lambda: c.swap_out([a.seq_id, 10**6])),
        (InvalidArgument, lambda: c.append([a.seq_id, a.seq_id])),
        (InvalidArgument, lambda: c.truncate([a.seq_id, kid], [1, 100])),
        (InvalidArgument, lambda: c.append([a.seq_id, kid], [1, 2, 3])),
        (InvalidArgument, lambda: c.fork([a.seq_id], 0)),
        (SequenceSwapped, lambda: c.append([a.seq_id, b.seq_id])),
        (SequenceSwapped, lambda: c.truncate([b.seq_id], 1)),
        (NotSwapped, lambda: c.swap_in([b.seq_id, a.seq_id])),
        (InvalidArgument, lambda: c.free("x")),
    ]
    for error, op in failing:
        with pytest.raises(error):
            op()
        assert_unchanged(before, c)
    assert_mirrors_daemon(c)


def test_swap_out_beyond_the_host_pool_changes_nothing(client):
    seqs = client.allocate([[7] * (BS * 5)] * 3)  # 15 exclusive blocks, 12 host blocks
    before = snapshot(client)
    with pytest.raises(OutOfBlocks):
        client.swap_out([s.seq_id for s in seqs])
    assert_unchanged(before, client)
    assert_mirrors_daemon(client)


def test_an_op_without_an_outcome_forgets_its_sequences(client, monkeypatch):
    """No reply in time, though the daemon applied the append: those sequences'
    tables come from the daemon again, still exact."""
    a, b = client.allocate([list(range(6)), list(range(5))])
    real = client._chan.request

    def applied_then_lost(body, rid, op, timeout):
        reply = real(body, rid, op, timeout)
        if op == "append":
            raise RequestTimeout("no reply (test)")
        return reply

    monkeypatch.setattr(client._chan, "request", applied_then_lost)
    with pytest.raises(RequestTimeout):
        client.append([a.seq_id])
    monkeypatch.undo()
    assert a.seq_id not in client._mirror and b.seq_id in client._mirror
    tables, lens = client.tables([a.seq_id, b.seq_id])  # from the daemon
    want = client._call("tables", {"seq_ids": [a.seq_id, b.seq_id]})
    np.testing.assert_array_equal(tables, want[0])
    assert lens.tolist() == [7, 5]
    client.append([a.seq_id, b.seq_id], [2, 3])  # updates the one it still follows
    np.testing.assert_array_equal(client._mirror.gather([b.seq_id])[0],
                                  client._call("tables", {"seq_ids": [b.seq_id]})[0])
    client.free([a.seq_id])


# -- reading ----------------------------------------------------------------------------------
def test_a_step_over_32_layers_is_one_round_trip():
    spec = PoolSpec(num_layers=32, num_kv_heads=2, head_dim=8, num_blocks=64, block_size=BS, dtype="float32")
    rng = np.random.default_rng(1)
    with running_server(spec, heartbeat_timeout=60) as server, \
            Client(server.endpoint, timeout=WAIT, heartbeat=False) as c:
        seqs = c.allocate([list(range(n)) for n in (5, 9, 12, 3)])
        ids = [s.seq_id for s in seqs]
        write_random(c, np.concatenate([s.slots for s in seqs]), rng)
        [[kid]] = c.fork([ids[0]])
        ids.append(kid)
        tables_ops = []
        tables = server._handlers["tables"]
        server._handlers["tables"] = lambda s, a: tables_ops.append(a) or tables(s, a)
        before = server.requests
        slots = c.append_flat(ids)  # copy-on-write for the fork, a new block for 12
        for layer in range(spec.num_layers):
            shape = (len(ids), spec.num_kv_heads, spec.head_dim)
            c.write(layer, slots, rng.standard_normal(shape).astype(np.float32),
                    rng.standard_normal(shape).astype(np.float32))
            c.attend(layer, ids, rng.standard_normal((len(ids), 4, spec.head_dim)).astype(np.float32))
        assert server.requests - before == 1 and tables_ops == []
        q = rng.standard_normal((len(ids), 4, spec.head_dim)).astype(np.float32)
        np.testing.assert_array_equal(c.attend(31, ids, q), c.remote_attend(31, ids, q))

        before = server.requests  # the same step through a plan
        slots = c.append_flat(ids)
        plan = c.plan(ids, slots=slots)
        for layer in range(spec.num_layers):
            shape = (len(ids), spec.num_kv_heads, spec.head_dim)
            plan.write(layer, rng.standard_normal(shape).astype(np.float32),
                       rng.standard_normal(shape).astype(np.float32))
            plan.attend(layer, rng.standard_normal((len(ids), 4, spec.head_dim)).astype(np.float32))
        assert server.requests - before == 1 and tables_ops == []


def test_plan_from_the_mirror_equals_the_daemon(server, client):
    """A prefill-and-decode step planned here: plan.write puts K/V where the
    daemon reads it, plan.attend equals the daemon's attention."""
    c, rng = client, np.random.default_rng(2)
    seqs = c.allocate([list(range(n)) for n in (13, 8, 20)])
    ids = [s.seq_id for s in seqs]
    write_random(c, np.concatenate([s.slots for s in seqs]), rng)
    c.commit(ids)
    [kids] = c.fork([ids[2]], 2)
    c.swap_out([ids[1]])
    c.swap_in([ids[1]])
    step, qlens = ids + kids, [1, 3, 1, 8, 2]
    slots = c.append_flat(step, qlens)  # copy-on-write for both children
    before = server.requests
    plan = c.plan(step, qlens, slots)
    tables, lens = c.tables(step)
    np.testing.assert_array_equal(plan.tables, tables)
    np.testing.assert_array_equal(plan.seq_lens, lens)
    outs = []
    for layer in range(SPEC.num_layers):
        shape = (sum(qlens), SPEC.num_kv_heads, SPEC.head_dim)
        plan.write(layer, rng.standard_normal(shape).astype(np.float32),
                   rng.standard_normal(shape).astype(np.float32))
        q = rng.standard_normal((sum(qlens), 4, SPEC.head_dim)).astype(np.float32)
        outs.append((q, plan.attend(layer, q, scale=0.3)))
    assert server.requests == before
    for layer, (q, out) in enumerate(outs):
        np.testing.assert_array_equal(out, c.remote_attend(layer, step, q, qlens, scale=0.3))


def test_plan_refuses_what_the_daemon_would(server, client):
    a, b = client.allocate([list(range(5)), list(range(9))])
    client.swap_out([b.seq_id])
    with pytest.raises(SequenceSwapped):
        client.plan([a.seq_id, b.seq_id])
    with pytest.raises(UnknownSequence):
        client.plan([a.seq_id, 10**6])
    with pytest.raises(InvalidArgument):
        client.plan([a.seq_id], query_lens=[6])
    with pytest.raises(InvalidArgument):
        client.plan([a.seq_id], slots=np.array([BS, BS + 1]))
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as other:  # reading is open to all
        plan = other.plan([a.seq_id], 2)
        assert plan.seq_lens.tolist() == [5] and plan.query_lens.tolist() == [2]


def test_other_sessions_sequences_come_from_the_daemon(server, client):
    [mine] = client.allocate([list(range(6))])
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as other:
        [theirs] = other.allocate([list(range(50, 61))])
        tables, lens = client.tables([mine.seq_id, theirs.seq_id])
        assert lens.tolist() == [6, 11]
        np.testing.assert_array_equal(tables[1, :3], theirs.block_table)
        with pytest.raises(UnknownSequence):
            client.tables([mine.seq_id, 10**6])


def test_close_clears_the_mirror(server):
    c = Client(server.endpoint, timeout=WAIT, heartbeat=False)
    [a] = c.allocate([[1, 2, 3]])
    c.close()
    assert len(c._mirror) == 0
    with pytest.raises(SessionLost):
        c.tables([a.seq_id])


def test_lost_session_clears_the_mirror():
    """A restarted daemon: the heartbeat notices, the mirror is not read again,
    and the next call says why and drops it."""
    endpoint, _ = ipc_endpoint()
    with running_server(SPEC, endpoint=endpoint, heartbeat_timeout=0.6):
        c = Client(endpoint, timeout=WAIT)
        [a] = c.allocate([[1, 2, 3]])
    with running_server(SPEC, endpoint=endpoint, heartbeat_timeout=0.6):
        assert wait_until(lambda: c._lost, WAIT)
        with pytest.raises(SessionLost, match="restarted"):
            c.tables([a.seq_id])
        assert len(c._mirror) == 0
        c.close()


def test_expired_session_fails_the_next_op_and_clears_the_mirror():
    with running_server(SPEC, heartbeat_timeout=0.5) as server:
        c = Client(server.endpoint, timeout=WAIT, heartbeat=False)
        [a] = c.allocate([[1, 2, 3]])
        with Client(server.endpoint, timeout=WAIT) as obs:
            assert wait_until(lambda: obs.stats().num_sequences == 0, WAIT)
        with pytest.raises(SessionLost):
            c.append([a.seq_id])
        assert len(c._mirror) == 0
        with pytest.raises(SessionLost):
            c.tables([a.seq_id])
        c.close()


# -- random op sequences ------------------------------------------------------------------------
PROMPTS = st.lists(
    st.builds(lambda cut, rest: list(range(cut)) + rest, st.integers(0, 3 * BS),
              st.lists(st.integers(0, 3), max_size=2 * BS)),
    min_size=1, max_size=3)


class MirrorMachine(RuleBasedStateMachine):
    """Random ops through one Client; the mirror must match the daemon after each.
    Each failed op (out of blocks, misuse) must leave the mirror unchanged."""

    server = None  # set by the test below: one daemon for every example

    def __init__(self):
        super().__init__()
        self.c = Client(self.server.endpoint, timeout=WAIT, heartbeat=False)
        self.rng = np.random.default_rng(0)

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
        allocs = self._try(self.c.allocate, prompts, None, share_in_batch=share)
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



def test_released_blocks_through_a_worker(server, client):
    """A worker releases blocks its windows passed: the daemon frees them, the
    worker's mirror and plans follow, and a plan that would read them is refused."""
    rng = np.random.default_rng(3)
    # tokens no earlier test committed: no block of it is cached, so each release frees one
    [a] = client.allocate([list(range(70_000, 70_000 + 5 * BS + 3))])
    write_random(client, a.slots, rng)
    free = client.stats().free_blocks
    assert client.release_before([a.seq_id], [4 * BS]) == [4]
    assert client.stats().free_blocks == free + 4
    assert_mirrors_daemon(client)
    plan = client.plan([a.seq_id])
    q = rng.standard_normal((1, 4, client.spec.head_dim)).astype(client.spec.np_dtype)
    window = BS + 3  # the query at 5 * BS + 2 sees from 4 * BS on
    got = plan.attend(0, q, window=window)
    np.testing.assert_allclose(got, server.pool.attend(0, [a.seq_id], q, window=window), rtol=1e-6)
    with pytest.raises(InvalidArgument, match="released"):
        plan.attend(0, q)
    with pytest.raises(InvalidArgument, match="released"):
        client.remote_attend(0, [a.seq_id], q)
    client.free([a.seq_id])
