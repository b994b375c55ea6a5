"""Reading through a worker's mirror (`Client` + `TableMirror`): attention and
step plans with no per-layer round trip, equal to the daemon's; what a plan
refuses; other sessions' sequences from the daemon; blocks released by a
worker's window followed by its mirror and plans."""

from __future__ import annotations

import numpy as np
import pytest
from client_plan_helpers import (
    BS,
    SPEC,
    WAIT,
    assert_mirrors_daemon,
    assert_unchanged,
    snapshot,
    write_random,
)
from daemon_helpers import client_fixture, running_server, server_fixture

from kvpager.client import Client
from kvpager.errors import InvalidArgument, SequenceSwapped, UnknownSequence
from kvpager.spec import PoolSpec

server = server_fixture(SPEC, scope="module", heartbeat_timeout=60)


client = client_fixture(timeout=WAIT, heartbeat=False)


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


def test_chunked_attention_here_and_by_the_daemon(server, client):
    """``chunk`` reaches the daemon's attend as the mapped pool's: both equal a dense
    softmax over each query's chunk; a bad chunk is a typed error and changes nothing."""
    from test_plan_chunked import dense_chunked

    rng = np.random.default_rng(11)
    lens = [37, 9, 20]
    seqs = client.allocate([list(range(50 + i, 50 + i + n)) for i, n in enumerate(lens)])
    ids = [s.seq_id for s in seqs]
    write_random(client, np.concatenate([s.slots for s in seqs]), rng)
    qlens = [30, 1, 4]
    q = rng.standard_normal((sum(qlens), 4, SPEC.head_dim)).astype(np.float32)
    local = client.local_attend(1, ids, q, qlens, chunk=16)
    np.testing.assert_array_equal(local, client.remote_attend(1, ids, q, qlens, chunk=16))
    ref = dense_chunked(client.device_array(), 1, q, client.tables(ids)[0], lens, qlens, 16)
    np.testing.assert_allclose(local, ref, rtol=1e-4, atol=1e-5)
    for bad in (12, 0, "16", True):
        with pytest.raises(InvalidArgument):
            client.remote_attend(1, ids, q, qlens, chunk=bad)
    for bad_qlens in ([], [1, 2], [[30, 1, 4]]):  # a ValueError from NumPy's broadcast before
        with pytest.raises(InvalidArgument, match="query_lens has"):
            client.local_attend(1, ids, q, bad_qlens)
    # past int32: the local cast wrapped it into 1 (taken), where the daemon refuses it
    for attend in (client.local_attend, client.remote_attend):
        with pytest.raises(InvalidArgument, match="query_lens"):
            attend(1, ids, q, [(1 << 32) + 30, 1, 4])
    client.free(ids)
    client.check_integrity()



def test_a_plan_over_the_first_tokens_of_prompts_allocated_whole(server, client):
    """``context_lens`` in a worker's plan as in `KVPool.plan`: each part's queries attend
    over their context up to themselves (a dense causal softmax); a bad one is a typed
    error and changes nothing."""
    from test_plan_chunked import dense_chunked

    rng = np.random.default_rng(12)
    lens = [37, 9, 20]
    seqs = client.allocate([list(range(80 + i, 80 + i + n)) for i, n in enumerate(lens)])
    ids = [s.seq_id for s in seqs]
    write_random(client, np.concatenate([s.slots for s in seqs]), rng)
    context, qlens = [21, 9, 4], [5, 2, 4]
    plan = client.plan(ids, qlens, context_lens=context)
    np.testing.assert_array_equal(plan.seq_lens, context)
    q = rng.standard_normal((sum(qlens), 4, SPEC.head_dim)).astype(np.float32)
    ref = dense_chunked(client.device_array(), 0, q, client.tables(ids)[0], context, qlens, 1 << 20)
    np.testing.assert_allclose(plan.attend(0, q), ref, rtol=1e-4, atol=1e-5)
    before = snapshot(client)
    for bad in ([38, 9, 20], [0, 9, 20], [21, 9]):
        with pytest.raises(InvalidArgument, match="context_lens"):
            client.plan(ids, None, context_lens=bad)
    assert_unchanged(before, client)
    client.free(ids)
    client.check_integrity()
