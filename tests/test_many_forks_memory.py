"""Many forks of one long sequence: a client's 65,535 forks of a 4,063-block
sequence (266M block-table entries, inside every default limit) made one free
(or the session's end, or its expiry) build about 32 bytes of temporaries an
entry (8 GiB: an OOM kill of the daemon and every session with it) and hold the
loop 21 s; an integrity check, and a staged write's check of what its session
holds, gathered every entry at once too. Each now goes over a run of rows at a
time (`BlockTable.row_chunks`): its temporaries are one run's, not the whole
table's. Measured with tracemalloc (NumPy reports its buffers to it) against
half of one int64 copy of every entry (the old free took four copies)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from daemon_helpers import SMALL, running_server

from kvpager import KVPool, PoolSpec
from kvpager.client import Client

BS = 16
SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=4200, block_size=BS, dtype="float32")
FORKS = 2048


def _peak(call) -> int:
    """Bytes ``call()`` allocated at its peak, above what was held before it."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        call()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


@pytest.fixture
def forked():
    """A pool with one 4,000-block sequence and FORKS children of it (8.2M entries),
    and the bytes of one int64 copy of every entry."""
    pool = KVPool(SPEC)
    [a] = pool.allocate([list(range(4000 * BS))])
    pool.commit([a.seq_id])
    [kids] = pool.fork(a.seq_id, FORKS)
    return pool, a.seq_id, kids, 8 * 4000 * (FORKS + 1)


def test_a_free_of_many_forks_of_a_long_sequence_holds_one_run_of_rows(forked):
    pool, parent, kids, one_copy = forked
    assert _peak(lambda: pool.free(kids)) < one_copy / 2
    assert pool.stats().num_sequences == 1
    pool.check_integrity()
    pool.free([parent])
    assert pool.stats().used_blocks == 0
    pool.check_integrity()


def test_an_integrity_check_over_many_forks_holds_one_run_of_rows(forked):
    pool, _, kids, one_copy = forked
    assert _peak(pool.check_integrity) < one_copy / 2
    pool.truncate([kids[-1]], [3999 * BS])
    pool.manager.table.table[pool.manager.rows[kids[-1]], 3999] = 7  # an entry past a row's end
    with pytest.raises(Exception, match="past a row's end"):
        pool.check_integrity()


def test_a_staged_write_beside_many_forks_checks_what_its_session_holds_a_run_at_a_time():
    """The daemon's check of a staged write (`StagingOps._held`) gathered every
    table of the session at once; by runs now, and the write still lands only in
    the session's own blocks."""
    with running_server(SPEC, heartbeat_timeout=30) as srv, Client(srv.endpoint, timeout=60, map_pool=False) as c:
        [a] = c.allocate([list(range(4000 * BS + 3))])
        c.commit([a.seq_id])
        c.fork(a.seq_id, FORKS)
        [b] = c.allocate([[1, 2, 3]])
        slot = int(c.tables([b.seq_id])[0][0, 0]) * BS + 2
        k = np.full((1, SPEC.num_kv_heads, SPEC.head_dim), 5.0, np.float32)
        peak = _peak(lambda: c.write(0, [slot], k, k))
        assert peak < 8 * 4000 * (FORKS + 1) / 2
        assert (srv.pool.backend.device_array()[slot // BS, 0, 0, :, slot % BS] == 5.0).all()
        c.check_integrity()


def test_small_pools_are_untouched_by_runs():
    """A run of rows is the whole batch where it is small: the common case's path."""
    pool = KVPool(SMALL)
    seqs = pool.allocate([list(range(n)) for n in (5, 40, 17)])
    table = pool.manager.table
    rows = np.array([pool.manager.rows[s.seq_id] for s in seqs])
    assert [r.tolist() for r in table.row_chunks(rows)] == [rows.tolist()]
    assert [r.tolist() for r in table.row_chunks(rows, most=3)] == [[x] for x in rows.tolist()]
    assert [len(r) for r in table.row_chunks(np.arange(10), width=3, most=9)] == [3, 3, 3, 1]
