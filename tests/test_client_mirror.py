"""A worker's mirror of its block tables (`Client` + `TableMirror`) against the daemon, op by op.

After a scripted walk through allocate / append (one and several tokens,
copy-on-write after fork) / fork / truncate / swap / free, the mirror gathers
exactly the tables the daemon's `tables` op answers and attention through it
equals the daemon's; a failed op changes nothing; an op without an outcome,
a closed, lost or expired session drop what the mirror followed."""

from __future__ import annotations

import numpy as np
import pytest
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
from daemon_helpers import client_fixture, ipc_endpoint, running_server, server_fixture, wait_until

from kvpager.client import Client
from kvpager.errors import (
    InvalidArgument,
    NotOwner,
    NotSwapped,
    OutOfBlocks,
    ProtocolError,
    RequestTimeout,
    SequenceSwapped,
    SessionLost,
    UnknownSequence,
)
from kvpager.protocol import decode_tables, pack, unpack

server = server_fixture(SPEC, scope="module", heartbeat_timeout=60)


client = client_fixture(timeout=WAIT, heartbeat=False)


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


def test_a_group_swapped_out_and_in_keeps_the_mirror_exact(client):
    """A parent and its forks swapped out in one call leave nothing on the device;
    swapped in together they share their prefix again, under new ids."""
    c, rng = client, np.random.default_rng(1)
    [a] = c.allocate([list(range(3 * BS + 2))])
    write_random(c, a.slots, rng)
    [kids] = c.fork([a.seq_id], 2)
    c.append(kids, [BS, 2])
    group = [a.seq_id, *kids]
    used = c.stats().used_blocks
    tables, lens = c.tables(group)
    distinct = {int(b) for t, n in zip(tables, lens) for b in t[: -(-int(n) // BS)]}
    c.swap_out(group)
    assert c.stats().used_blocks == used - len(distinct)  # none left on the device
    assert_mirrors_daemon(c)
    c.swap_in(group)
    assert c.stats().used_blocks == used
    tables = c.tables(group)[0]
    assert (tables[:, :3] == tables[0, :3]).all()
    assert_mirrors_daemon(c)
    attend_both(c, group, [1, 2, 1], rng)
    c.free(group)
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


def lose_replies_of(client, monkeypatch, lost: str) -> None:
    """The daemon applies each ``lost`` request, but its reply never comes (RequestTimeout)."""
    real = client._chan.request

    def applied_then_lost(body, rid, op, timeout):
        reply = real(body, rid, op, timeout)
        if op == lost:
            raise RequestTimeout("no reply (test)")
        return reply

    monkeypatch.setattr(client._chan, "request", applied_then_lost)


def test_an_op_without_an_outcome_forgets_its_sequences(client, monkeypatch):
    """No reply in time, though the daemon applied the append: those sequences'
    tables come from the daemon again, still exact."""
    a, b = client.allocate([list(range(6)), list(range(5))])
    lose_replies_of(client, monkeypatch, "append")
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


def test_a_batch_without_an_outcome_forgets_every_sequence_it_named(client, monkeypatch):
    """A batch the daemon applied but whose reply was lost: every sequence any of
    its ops named is forgotten (tables from the daemon again, exact); others stay."""
    seqs = [a.seq_id for a in client.allocate([list(range(5))] * 20)]
    other = client.allocate([list(range(3))])[0].seq_id
    lose_replies_of(client, monkeypatch, "batch")
    with pytest.raises(RequestTimeout):
        client.batch([("append_flat", seqs, 1), ("commit", seqs[:3])])
    monkeypatch.undo()
    assert not any(s in client._mirror for s in seqs) and other in client._mirror
    tables, lens = client.tables(seqs)  # from the daemon: the append was applied
    assert lens.tolist() == [6] * 20
    client.free(seqs + [other])


# -- the session's end ----------------------------------------------------------------------
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


# -- ids the daemon takes in any form the client reads ------------------------------------------
def test_ids_mixing_ints_and_numpy_integers_keep_the_mirror_exact(server):
    """A list mixing ints and NumPy integers (the wire carries both as ints) is read
    as the daemon reads it, in every op and in a batch: the mirror follows (it once
    stayed behind, and after a free a write into the freed block, since another
    session's, was taken locally and changed that session's K/V)."""
    with Client(server.endpoint, timeout=WAIT) as c, Client(server.endpoint, timeout=WAIT) as other:
        a, b = (x.seq_id for x in c.allocate([list(range(16)), list(range(100, 116))]))
        c.append([a, np.int64(b)], 3)
        assert_mirrors_daemon(c)
        c.append_flat((np.int32(a), b), 1)
        [[kid]] = c.fork([np.uint16(a)], 1)
        c.truncate([kid, np.int64(b)], [5, 17])
        assert_mirrors_daemon(c)
        c.swap_out([np.int64(kid), b])
        c.swap_in([b, np.int64(kid)])
        assert_mirrors_daemon(c)
        c.batch([("append_flat", [a, np.int64(kid)]), ("release_before", [np.int64(a)], [16]),
                 ("free", [np.int64(kid)])])
        assert_mirrors_daemon(c)
        c.free([a, np.int64(b)])
        assert_mirrors_daemon(c)
        mine = other.allocate([list(range(500, 516))])[0]
        k = np.full((16, SPEC.num_kv_heads, SPEC.head_dim), -1.0, np.float32)
        freed = np.arange(16) + int(mine.block_table[0]) * BS
        with pytest.raises(NotOwner):  # a block of another session's sequence now
            c.write(0, freed, k, k)
        assert not (other.kv(0)[0][mine.block_table[0]] == -1.0).any()
        other.free([mine.seq_id])


def test_ids_the_mirror_cannot_read_make_it_lose_track(client, monkeypatch):
    """Where the daemon takes ids that the client cannot read (none known today:
    simulated), the mirror drops everything rather than keep tables that no longer
    hold: the daemon's answer from then on, nothing raised after the op ran."""
    import kvpager.client_seqs as seqs

    c = client
    a, b = (x.seq_id for x in c.allocate([list(range(20)), list(range(40))]))
    monkeypatch.setattr(seqs, "read_ids", lambda v: (None, v))
    monkeypatch.setattr(seqs, "id_list", lambda v: None)
    c.append([a, b], 2)
    assert c._mirror.incomplete and not c._mirror.rows
    np.testing.assert_array_equal(c.tables([a, b])[1], [22, 42])
    c.free([a])
    monkeypatch.undo()
    np.testing.assert_array_equal(c.tables([b])[1], [42])
    with pytest.raises(UnknownSequence):
        c.tables([a])
    c.free([b])


def test_ids_as_an_object_array_keep_the_mirror_exact(server):
    """Ids as an object array of ints (as `KVPool` takes them): a commit so given
    published the blocks while the mirror recorded nothing, and a write into them
    was taken locally, changing what another session's prefix hit read; a batch so
    given was refused whole (the array sent as it was)."""
    with Client(server.endpoint, timeout=WAIT) as c, Client(server.endpoint, timeout=WAIT) as other:
        prompt = list(range(300, 316))
        [a] = c.allocate([prompt])
        k = np.ones((16, SPEC.num_kv_heads, SPEC.head_dim), np.float32)
        for layer in range(SPEC.num_layers):
            c.write(layer, a.slots, k, k)
        c.commit(np.array([a.seq_id], dtype=object))
        assert_mirrors_daemon(c)
        assert c.sequence(a.seq_id).num_committed == 16
        with pytest.raises(NotOwner):  # published: another session may read it
            c.write(0, a.slots, 7 * k, 7 * k)
        [hit] = other.allocate([prompt + [1]])
        assert hit.num_cached_tokens == 16 and (other.kv(0)[0][hit.block_table[0]] == 1.0).all()
        [b] = c.allocate([list(range(400, 420))])
        ids = np.array([a.seq_id, b.seq_id], dtype=object)
        assert len(c.batch([("append_flat", ids, 1), ("commit", ids), ("free", ids)])) == 3
        assert_mirrors_daemon(c)
        assert a.seq_id not in c._mirror and c.stats().num_sequences == 1  # (other's)
        other.free([hit.seq_id])


def test_a_commit_without_an_outcome_forgets_its_sequences(client, monkeypatch):
    """A commit the daemon ran whose reply was lost: the mirror did not know its
    blocks were published, and took a write into them."""
    [a] = client.allocate([list(range(600, 616))])
    lose_replies_of(client, monkeypatch, "commit")
    with pytest.raises(RequestTimeout):
        client.commit([a.seq_id])
    monkeypatch.undo()
    assert a.seq_id not in client._mirror
    k = np.ones((16, SPEC.num_kv_heads, SPEC.head_dim), np.float32)
    with pytest.raises(NotOwner):
        client.write(0, a.slots, k, k)
    client.free([a.seq_id])
