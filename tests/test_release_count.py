"""The daemon's count of releases (`kvpager.release_count.ReleaseCount`): what a mapped
worker's step plan over another session's sequences follows (`kvpager.plan_guard.Foreign`),
so that it refuses once that session releases them; mapped read-only; a daemon
that cannot make it, or a worker that cannot map it, still serves."""

from __future__ import annotations

import numpy as np
import pytest
from client_plan_helpers import SPEC, WAIT
from daemon_helpers import client_fixture, server_fixture
from test_stale_plan import kv, q, taken_by_another

from kvpager.client import Client
from kvpager.errors import StalePlan

server = server_fixture(SPEC, scope="module", heartbeat_timeout=60)
client = client_fixture(timeout=WAIT, heartbeat=False)


def test_a_workers_plan_over_another_sessions_sequence_refuses_once_that_session_frees_it(server, client):
    """With no change of this worker's own: the daemon's count of releases, mapped
    read-only by its workers, moves at the other session's free, and the plan
    rechecks through the daemon. Before, it read the blocks' next holder's K/V."""
    with Client(server.endpoint, timeout=WAIT, heartbeat=False) as other:
        (theirs,) = other.allocate([list(range(3_200, 3_220))])
        for layer in range(SPEC.num_layers):
            other.write(layer, theirs.slots, kv(20, SPEC), kv(20, SPEC))
        plan = client.plan([theirs.seq_id], None, None)  # attend only
        query = q(1, SPEC)
        want = plan.attend(0, query)
        other.commit([theirs.seq_id])  # a commit releases nothing: no recheck needed
        (gone,) = other.allocate([list(range(3_300, 3_310))])
        other.free([gone.seq_id])  # a release of another sequence: the plan rechecks, and goes on
        np.testing.assert_array_equal(plan.attend(0, query), want)
        np.testing.assert_array_equal(plan.chunked(8).attend(0, query),
                                      client.plan([theirs.seq_id], None, None).chunked(8).attend(0, query))
        other.free([theirs.seq_id])
        _, taken = taken_by_another(other, theirs.block_table, 20)
        with pytest.raises(StalePlan, match="freed"):
            plan.attend(0, query)
        with pytest.raises(StalePlan, match="freed"):
            plan.chunked(8).attend(0, query)  # its chunked view follows the same counts
        other.free([x.seq_id for x in taken])


def test_the_daemons_count_of_releases_is_mapped_read_only(server, client):
    from kvpager.release_count import map_release_count

    handle = client.memory["releases"]
    count = map_release_count(handle)
    before = int(count[0])
    (a,) = client.allocate([list(range(3_400, 3_420))])
    client.commit([a.seq_id])  # a commit releases nothing: plans over others' sequences need no recheck
    assert int(count[0]) == before
    client.free([a.seq_id])
    assert int(count[0]) == before + 1
    with pytest.raises(ValueError, match="read-only"):
        count[0] = 0


def test_a_count_of_releases_that_cannot_be_mapped_leaves_the_worker_serving(caplog):
    """A hello that names a count no segment here holds (a GPU pool mapped from a
    container of another /dev/shm) maps nothing, says so, and plans follow the
    worker's own count as before."""
    from kvpager.release_count import map_release_count

    with caplog.at_level("WARNING", logger="kvpager.shm"):
        assert map_release_count({"name": "kvp1_00000000_mnotthere", "offset": 0, "size": 8}) is None
    assert "cannot be mapped here" in caplog.text
    assert map_release_count(None) is None and map_release_count({"name": 5}) is None


def test_a_daemon_that_cannot_make_its_count_of_releases_still_serves(monkeypatch, caplog):
    """A daemon whose count of releases cannot be made (no room or no /dev/shm: a GPU
    daemon needs none otherwise) says so and serves; its workers' plans over other
    sessions' sequences follow their own counts, as before the count."""
    import errno

    from daemon_helpers import running_server

    import kvpager.server_ranks as server_ranks

    def no_room(epoch):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(server_ranks, "ReleaseCount", no_room)
    with caplog.at_level("WARNING", logger="kvpager.server"), running_server(SPEC) as daemon:
        assert "no count of releases" in caplog.text
        with Client(daemon.endpoint, timeout=WAIT, heartbeat=False) as a, \
                Client(daemon.endpoint, timeout=WAIT, heartbeat=False) as b:
            assert "releases" not in a.memory
            (s,) = a.allocate([list(range(3_500, 3_510))])
            for layer in range(SPEC.num_layers):
                a.write(layer, s.slots, kv(10, SPEC), kv(10, SPEC))
            plan = b.plan([s.seq_id], None, None)
            assert np.isfinite(plan.attend(0, q(1, SPEC))).all()
            assert daemon.releases is None and daemon.pool.backend.moves.shared is None
            a.free([s.seq_id])  # the pool's releases move its own count alone
