"""Recently checked batches (`RecentBatches`): a decode loop's repeated ids find
their rows by one comparison, for several batches in turn (a daemon's
workers, pipelined micro-batches), and never reach a stale row or another
session's sequences. The reference is the same pool remembering no batch."""

from __future__ import annotations

import numpy as np
from daemon_helpers import Raw, server_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_packed_ids import SMALL, SPEC, call, state

from kvpager import KVPool
from kvpager.client import Client
from kvpager.errors import InvalidArgument, NotOwner, UnknownSequence
from kvpager.recent_batches import RecentBatches
from kvpager.seq_lookup import ANY_OWNER

server = server_fixture(SMALL, heartbeat_timeout=30)


def rows(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def test_recent_batches_keep_the_newest_per_owner_and_forget_on_clear():
    r = RecentBatches(size=2)
    a, b, c = rows(1, 2), rows(3), rows(4, 5)
    r.put([10, 11], "s1", a)
    assert not a.flags.writeable  # shared with every later call that sends these ids
    r.put(b"\x01" * 8, "s1", b)
    assert r.get([10, 11], "s1") is a
    assert r.get([10, 11], "s2") is None  # checked for another owner: not this one's
    assert r.get(np.array([10, 11], np.int64).tobytes(), "s1") is None  # packed is another key
    assert r.get([10, 11]) is a  # rows are the same whoever asks
    r.put([12], "s1", c)  # the least recently used ([8 x 1] bytes) goes
    assert r.get(b"\x01" * 8, "s1") is None and r.get([10, 11], "s1") is a and r.get([12], "s1") is c
    r.clear()
    assert len(r) == 0 and r.get([10, 11]) is None


def test_a_size_of_zero_remembers_nothing():
    r = RecentBatches(size=0)
    assert r.put([1], None, rows(3)).tolist() == [3]
    assert r.get([1], None) is None and len(r) == 0


def test_the_key_is_kept_as_sent_not_as_later_changed():
    """A caller's list changed after the call must not change what it keyed."""
    r = RecentBatches()
    ids = [5, 6]
    r.put(ids, ANY_OWNER, rows(0, 1))
    ids.append(7)
    assert r.get([5, 6], ANY_OWNER) is not None and r.get([5, 6, 7], ANY_OWNER) is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_interleaved_batches_equal_a_pool_that_remembers_none(data):
    """Property: several batches stepped in turn (packed and list ids), with
    frees, forks, truncates and commits between them, give the same slots,
    errors and state as a pool that looks every batch up again."""
    pools = [KVPool(SPEC), KVPool(SPEC)]
    pools[1].manager.recent = RecentBatches(size=0)
    n = data.draw(st.integers(2, 14), label="sequences")
    prompts = [[7] * data.draw(st.integers(1, 9)) + [k] for k in range(n)]
    live = [a.seq_id for a in pools[0].allocate(prompts)]
    assert live == [a.seq_id for a in pools[1].allocate(prompts)]
    batches = [data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True)) for _ in range(3)]
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        op = data.draw(st.sampled_from(["append", "append", "append", "tables", "commit", "truncate", "free", "fork"]))
        sub = data.draw(st.sampled_from(batches))
        packed = data.draw(st.booleans())
        outs = []
        for pool in pools:
            ids = np.array(sub, np.int64) if packed and op in ("append", "commit") else list(sub)
            try:
                if op == "append":
                    outs.append(pool.append_flat(ids).tolist())
                elif op == "tables":
                    outs.append([x.tolist() for x in pool.tables(ids)])
                elif op == "commit":
                    outs.append(pool.commit(ids))
                elif op == "truncate":
                    pool.truncate(ids, [max(1, pool.sequence(s).num_tokens - 2) for s in ids])
                    outs.append(None)
                elif op == "free":
                    pool.free(ids[:1])
                    outs.append(None)
                else:
                    outs.append(pool.fork(ids[:1]))
            except (UnknownSequence, InvalidArgument) as e:  # a freed id: both refuse alike
                outs.append(("refused", type(e).__name__, str(e)))
        assert outs[0] == outs[1], op
        assert state(pools[0]) == state(pools[1]), op
        if op == "fork" and outs[0][0] != "refused":
            batches.append(list(outs[0][0]))
    for p in pools:
        p.check_integrity()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batches_of_two_owners_in_turn_never_pass_another_owners_sequences(data):
    """Property: two owners' decode steps (append, record_tokens, commit, packed or
    listed) in any order, with batches that may mix their sequences, frees and new
    sequences between: an op passes exactly when every sequence of its batch is
    the caller's (the owners kept here, independently), refuses with NotOwner
    otherwise, and gives what a pool that remembers no batch gives."""
    pools = [KVPool(SPEC), KVPool(SPEC)]
    pools[1].manager.recent = RecentBatches(size=0)
    owner_of: dict[int, str] = {}

    def allocate(owner: str, n: int) -> None:
        got = [[a.seq_id for a in p.allocate([[3, int(owner == "a"), k] for k in range(n)], owner=owner)] for p in pools]
        assert got[0] == got[1]
        owner_of.update(dict.fromkeys(got[0], owner))

    allocate("a", data.draw(st.integers(1, 6)))
    allocate("b", data.draw(st.integers(1, 6)))
    batches = [data.draw(st.lists(st.sampled_from(sorted(owner_of)), min_size=1, max_size=6, unique=True))
               for _ in range(4)]
    for _ in range(data.draw(st.integers(1, 30), label="steps")):
        op = data.draw(st.sampled_from(["append", "append", "record", "commit", "free", "allocate"]))
        caller = data.draw(st.sampled_from(["a", "b"]))
        if op == "allocate":
            allocate(caller, 1)
            continue
        sub = data.draw(st.sampled_from(batches))
        ids = np.array(sub, np.int64) if data.draw(st.booleans()) else list(sub)
        outs = []
        for pool in pools:
            try:
                if op == "append":
                    outs.append(pool.append_flat(ids, owner=caller).tolist())
                elif op == "record":
                    pool.record_tokens(ids, [[9]] * len(sub), owner=caller)
                    outs.append(None)
                elif op == "commit":
                    outs.append(pool.commit(ids, owner=caller))
                else:
                    pool.free(sub[:1])
                    outs.append(None)
            except (NotOwner, UnknownSequence, InvalidArgument) as e:
                outs.append(("refused", type(e).__name__))
        assert outs[0] == outs[1], op
        assert state(pools[0]) == state(pools[1]), op
        live = all(s in owner_of for s in sub)
        if op == "free":
            assert (outs[0] is None) == (sub[0] in owner_of)
            owner_of.pop(sub[0], None)
        elif not live:
            assert outs[0] == ("refused", "UnknownSequence"), (op, outs[0])
        elif any(owner_of[s] != caller for s in sub):
            assert outs[0] == ("refused", "NotOwner"), (op, caller, sub)
        elif op in ("append", "commit"):
            assert outs[0][0] != "refused", (op, outs[0])
    for p in pools:
        p.check_integrity()


def test_a_freed_row_taken_by_a_new_sequence_is_not_reached_through_an_older_batch():
    """Batches A and B remembered; a sequence of A is freed and its row goes to a
    new sequence. A's ids are then unknown (not the new sequence's row), and B's
    step still lands in B's own blocks."""
    pool = KVPool(SPEC)
    seqs = [a.seq_id for a in pool.allocate([[1, 2, 3]] * 8)]
    a, b = np.array(seqs[:4], np.int64), np.array(seqs[4:], np.int64)
    pool.append_flat(a)
    first_b = pool.append_flat(b)
    pool.free([seqs[0]])
    [new] = pool.allocate([[9, 9, 9, 9, 9]])
    try:
        pool.append_flat(a)
        raise AssertionError("a freed id in a remembered batch was accepted")
    except UnknownSequence as e:
        assert e.seq_id == seqs[0]
    assert (pool.append_flat(b) == first_b + 1).all()
    assert pool.sequence(new.seq_id).num_tokens == 5
    pool.check_integrity()


def test_a_remembered_batch_of_one_session_is_refused_to_another(server):
    """Sessions A and B step their own batches in turn, so both stay remembered;
    B sending A's packed ids (A's batch not the newest) is refused with NotOwner
    and changes nothing; both go on stepping."""
    a, b = Raw(server.endpoint), Raw(server.endpoint)
    try:
        sa = call(a, 1, None, "hello", {"client": "a", "pid": 1})[0]["session"]
        sb = call(b, 1, None, "hello", {"client": "b", "pid": 2})[0]["session"]
        ida = np.array([x[0] for x in call(a, 2, sa, "allocate", {"prompts": [[1, 2, 3]] * 20})[0]], np.int64)
        idb = np.array([x[0] for x in call(b, 2, sb, "allocate", {"prompts": [[4, 5, 6]] * 20})[0]], np.int64)
        for rid in range(3, 6):
            assert call(a, rid, sa, "append", {"seq_ids": ida})[1] is None
            assert call(b, rid, sb, "append", {"seq_ids": idb})[1] is None
        before = state(server.pool)
        for rid, op in enumerate(("append", "commit"), start=10):
            assert call(b, rid, sb, op, {"seq_ids": ida})[1] == NotOwner.code, op
            assert state(server.pool) == before
        slots, err = call(a, 20, sa, "append", {"seq_ids": ida})
        assert err is None and len(slots) == 8 * 20
        server.pool.check_integrity()
    finally:
        a.close()
        b.close()


def test_two_clients_stepping_in_turn_see_their_own_tables(server):
    """Two workers' decode loops interleaved through the daemon give each the
    slots an embedded pool gives for the same steps, and each worker's mirror
    holds the daemon's own tables."""
    ref = KVPool(SMALL)
    with Client(server.endpoint, heartbeat=False) as c1, Client(server.endpoint, heartbeat=False) as c2:
        s1 = [a.seq_id for a in c1.allocate([[1, 2, 3]] * 17)]
        s2 = [a.seq_id for a in c2.allocate([[1, 2, 3, 4]] * 17)]
        r1 = [a.seq_id for a in ref.allocate([[1, 2, 3]] * 17)]
        r2 = [a.seq_id for a in ref.allocate([[1, 2, 3, 4]] * 17)]
        for _ in range(20):
            assert c1.append_flat(s1).tolist() == ref.append_flat(r1).tolist()
            assert c2.append_flat(s2).tolist() == ref.append_flat(r2).tolist()
        for c, s, r in ((c1, s1, r1), (c2, s2, r2)):
            for want in (ref.tables(r), server.pool.tables(s)):
                assert all((g == w).all() for g, w in zip(c.tables(s), want))
