"""A daemon's workers' step plans used after their sequences changed under them
(`kvpager.plan_guard` over a `Client`'s mapped pool): a stale plan never writes
into another worker's blocks; a plan whose block was copied on write refuses; a
plan survives other workers' changes and not its own commit; a closed client's
plan refuses; a plan over another session's sequence rechecks through the
daemon; slots kept from before a free are refused; a mirror that lost a
sequence still writes its slots. (The embedded pool's: test_stale_plan.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from client_plan_helpers import SPEC, WAIT
from daemon_helpers import client_fixture, server_fixture
from test_stale_plan import (
    cow_after_plan,
    kv,
    q,
    taken_by_another,
)

from kvpager.client import Client
from kvpager.errors import StalePlan

server = server_fixture(SPEC, scope="module", heartbeat_timeout=60)


client = client_fixture(timeout=WAIT, heartbeat=False)


def test_a_workers_stale_plan_does_not_write_into_another_workers_blocks(server, client):
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as other:
        (a,) = client.allocate([list(range(16))])
        plan = client.plan([a.seq_id], [16], a.slots)
        plan.write(0, kv(16, SPEC), kv(16, SPEC))
        client.free([a.seq_id])
        mine, theirs = taken_by_another(other, a.block_table, 16)
        k, v = other.kv(0)
        before = (np.array(k[list(mine.block_table)]), np.array(v[list(mine.block_table)]))
        with pytest.raises(StalePlan):
            plan.write(0, kv(16, SPEC, 7.0), kv(16, SPEC, 7.0))
        with pytest.raises(StalePlan):
            plan.attend(0, q(16, SPEC))
        np.testing.assert_array_equal(k[list(mine.block_table)], before[0])
        np.testing.assert_array_equal(v[list(mine.block_table)], before[1])
        other.free([x.seq_id for x in theirs])


@pytest.mark.parametrize("both", [True, False])
def test_a_workers_plan_whose_block_was_copied_on_write_refuses(server, client, both):
    """As embedded: the worker's mirror follows the append's copy (its count moves)."""
    plan, a, old = cow_after_plan(client, both)
    assert old not in client.tables([a.seq_id])[0][0]
    with pytest.raises(StalePlan):
        plan.write(0, kv(1, SPEC, 7.0), kv(1, SPEC, 7.0))
    client.free([s.seq_id for s in client.sequences() if s.owner == client.session_name])


def test_a_workers_plan_survives_another_workers_changes_and_not_its_own_commit(server, client):
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as other:
        (a,) = client.allocate([list(range(16))])
        (b,) = other.allocate([list(range(500, 516))])
        plan = client.plan([a.seq_id], [16], a.slots)
        other.free([b.seq_id])
        other.allocate([list(range(600, 640))])
        plan.write(0, kv(16, SPEC), kv(16, SPEC))  # another session's frees: no change of its own
        plan.write(1, kv(16, SPEC), kv(16, SPEC))
        client.commit([a.seq_id])
        with pytest.raises(StalePlan, match="committed"):
            plan.write(0, kv(16, SPEC, 7.0), kv(16, SPEC, 7.0))
        # a batch's commit too, and a fresh plan of the next step goes on
        slots = client.append_flat([a.seq_id])
        step = client.plan([a.seq_id], None, slots)
        step.write(0, kv(1, SPEC), kv(1, SPEC))
        client.batch([("commit", [a.seq_id])])
        with pytest.raises(StalePlan):
            step.write(0, kv(1, SPEC), kv(1, SPEC))
        client.free([a.seq_id])


def test_a_workers_plan_refuses_once_its_client_is_closed(server):
    c = Client(server.endpoint, timeout=WAIT, heartbeat=False)
    (a,) = c.allocate([list(range(900, 909))])
    plan = c.plan([a.seq_id], [9], a.slots)
    c.close()
    with pytest.raises(Exception) as e:
        plan.write(0, kv(9, SPEC), kv(9, SPEC))
    assert type(e.value).__name__ in {"SessionLost", "StalePlan"}


def test_a_workers_plan_over_another_sessions_sequence_rechecks_through_the_daemon(server, client):
    """A plan over sequences this worker does not mirror (another session's, read
    through the daemon's tables) rechecks them through the daemon when this
    worker's own sequences change."""
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as other:
        (theirs,) = other.allocate([list(range(3_000, 3_020))])
        for layer in range(SPEC.num_layers):
            other.write(layer, theirs.slots, kv(20, SPEC), kv(20, SPEC))
        plan = client.plan([theirs.seq_id], None, None)  # attend only
        plan.attend(0, q(1, SPEC))
        (mine,) = client.allocate([list(range(4_000, 4_005))])
        client.free([mine.seq_id])  # this worker's change: the plan rechecks, theirs unchanged
        plan.attend(0, q(1, SPEC))
        other.free([theirs.seq_id])
        (mine,) = client.allocate([list(range(4_100, 4_105))])
        client.free([mine.seq_id])
        with pytest.raises(StalePlan, match="freed"):
            plan.attend(0, q(1, SPEC))


# -- a worker's writes without a plan ------------------------------------------------------------


def test_a_workers_write_with_slots_kept_from_before_a_free_is_refused(server, client):
    """`Client.write` into the mapped pool takes only slots of this session's
    resident sequences, as the daemon's staged write does: slots kept from before
    a free (or a swap-out) would land in another worker's blocks."""
    from kvpager.errors import NotOwner

    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as other:
        (a,) = client.allocate([list(range(5_000, 5_016))])
        client.write(0, a.slots, kv(16, SPEC), kv(16, SPEC))  # its own: taken
        client.free([a.seq_id])
        mine, theirs = taken_by_another(other, a.block_table, 16)
        k, v = other.kv(0)
        before = (np.array(k[list(mine.block_table)]), np.array(v[list(mine.block_table)]))
        with pytest.raises(NotOwner, match="no resident sequence of this session"):
            client.write(0, a.slots, kv(16, SPEC, 7.0), kv(16, SPEC, 7.0))
        np.testing.assert_array_equal(k[list(mine.block_table)], before[0])
        np.testing.assert_array_equal(v[list(mine.block_table)], before[1])
        (b,) = client.allocate([list(range(5_100, 5_110))])  # swapped out: its blocks are not its own
        client.write(0, b.slots, kv(10, SPEC), kv(10, SPEC))
        client.swap_out([b.seq_id])
        with pytest.raises(NotOwner):
            client.write(0, b.slots, kv(10, SPEC), kv(10, SPEC))
        client.swap_in([b.seq_id])
        client.free([b.seq_id])
        other.free([x.seq_id for x in theirs])


def test_a_worker_whose_mirror_lost_a_sequence_still_writes_its_slots(server, client):
    """A sequence forgotten by the mirror (its op had no clear outcome) is still
    the session's: its slots are found in the daemon's tables."""
    (a,) = client.allocate([list(range(6_000, 6_020))])
    (b,) = client.allocate([list(range(6_100, 6_110))])
    client.free([b.seq_id])  # a release: a's slots are no longer known at once, found in its table
    client.write(0, a.slots, kv(20, SPEC), kv(20, SPEC))
    client._mirror.forget([a.seq_id])
    client.write(0, a.slots, kv(20, SPEC), kv(20, SPEC))
    client.write(1, a.slots, kv(20, SPEC), kv(20, SPEC))
    client.free([a.seq_id])
