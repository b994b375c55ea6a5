"""Workers that write through the mapped pool: the client checks what the daemon
checks of a staged write. A published block (found cached, or filled by a
commit) is immutable; a step plan's slots are the session's own, checked when
it is made or refilled; a worker whose session the daemon ended while it was
stopped writes nothing when it resumes. Each was a write into another
session's K/V before (the daemon's integrity check cannot see it). CPU daemon
in this process, small pools, every daemon stopped."""

from __future__ import annotations

import time

import numpy as np
import pytest
from daemon_helpers import running_server, wait_until

from kvpager.client import Client
from kvpager.errors import InvalidArgument, NotOwner, SessionLost, StalePlan
from kvpager.spec import PoolSpec

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=8, block_size=16, dtype="float32")
BS = SPEC.block_size


def kv(n: int, value: float) -> np.ndarray:
    return np.full((n, SPEC.num_kv_heads, SPEC.head_dim), value, np.float32)


def written(c: Client, alloc, value: float) -> None:
    for layer in range(SPEC.num_layers):
        c.write(layer, alloc.slots, kv(len(alloc.slots), value), kv(len(alloc.slots), value))


def k_of(c: Client, blocks) -> np.ndarray:
    return c.kv(0)[0][list(blocks)].copy()


def test_a_published_block_is_not_written_through_the_mapped_pool():
    with running_server(SPEC) as server, Client(server.endpoint) as a, Client(server.endpoint) as b:
        prompt = list(range(100, 100 + 2 * BS))
        [x] = a.allocate([prompt])
        written(a, x, 1.0)
        a.commit(x.seq_id)
        before = k_of(a, x.block_table)
        [y] = b.allocate([prompt + [7, 8, 9]])  # a prefix hit on a's two published blocks
        assert y.num_cached_tokens == 2 * BS and list(y.block_table[:2]) == list(x.block_table)
        shared = np.arange(int(y.block_table[0]) * BS, int(y.block_table[0] + 1) * BS)
        with pytest.raises(NotOwner, match="published"):
            b.write(0, shared, kv(BS, -6.0), kv(BS, -6.0))
        with pytest.raises(NotOwner, match="published"):  # its owner too, after its commit
            a.write(0, x.slots, kv(len(x.slots), -6.0), kv(len(x.slots), -6.0))
        written(b, y, 2.0)  # its own suffix: written
        assert np.array_equal(k_of(a, x.block_table), before)
        # cut back into the published block and appended: the daemon gives a copy to write
        b.truncate(y.seq_id, BS + 3)
        slots = b.append_flat([y.seq_id], 1)
        assert int(slots[0]) // BS != int(y.block_table[1])
        b.write(0, slots, kv(1, 3.0), kv(1, 3.0))
        assert np.array_equal(k_of(a, x.block_table), before)
        a.check_integrity()


def test_blocks_shared_within_an_allocate_are_written_by_it():
    """Prompts of one allocate sharing leading blocks (``share_in_batch``): the later
    ones count them as cached, but the first writes them: not published yet."""
    with running_server(SPEC) as server, Client(server.endpoint) as a:
        system = list(range(40, 40 + BS))
        x, y = a.allocate([system + [1, 2], system + [3]], share_in_batch=True)
        assert y.num_cached_tokens == BS and y.block_table[0] == x.block_table[0]
        written(a, x, 1.0)
        written(a, y, 2.0)
        a.commit([x.seq_id, y.seq_id])
        with pytest.raises(NotOwner, match="published"):
            written(a, x, 3.0)


def test_a_plans_slots_are_its_sessions_own():
    with running_server(SPEC) as server, Client(server.endpoint) as a, Client(server.endpoint) as b:
        [x] = a.allocate([list(range(BS + 4))])
        written(a, x, 1.0)
        before = k_of(a, x.block_table)
        [y] = b.allocate([list(range(500, 503))])
        with pytest.raises(NotOwner, match="no resident sequence of this session"):
            b.plan([y.seq_id], slots=x.slots[:1])
        with pytest.raises(NotOwner, match="no resident sequence of this session"):
            b.plan([x.seq_id], slots=x.slots[-1:])  # another session's sequences: attend only
        plan = b.plan([y.seq_id], slots=y.slots[-1:])
        with pytest.raises(NotOwner):
            b.refill(plan, [y.seq_id], slots=x.slots[-1:])
        assert np.array_equal(k_of(a, x.block_table), before)
        b.plan([x.seq_id]).attend(0, np.ones((1, 2, SPEC.head_dim), np.float32))  # reading is fine
        a.check_integrity()


def taken_over(server, x, other: Client):
    """Past the stalled session's timeout (0.5 s), once the daemon ended it:
    ``other`` allocates every block, ``x``'s among them, writes and commits
    them; its allocation and the K its blocks hold."""
    time.sleep(0.6)
    assert wait_until(lambda: len(server.sessions) == 1, timeout=10)
    [y] = other.allocate([list(range(900, 900 + 7 * BS))])
    assert set(x.block_table) <= set(y.block_table)
    written(other, y, 5.0)
    other.commit(y.seq_id)
    return y, k_of(other, y.block_table)


@pytest.mark.parametrize("how", ["before its first write", "through a plan"])
def test_a_worker_stopped_past_its_timeout_writes_nothing_by_any_path(how):
    """The count of ended sessions was first read when the pool was mapped (a worker
    stopped before its first write took its own end as seen), and a step plan's writes
    never looked at it: both wrote into blocks given to another session."""
    with running_server(SPEC, heartbeat_timeout=0.5) as server:
        stalled = Client(server.endpoint, heartbeat=False)
        other = Client(server.endpoint)
        try:
            [x] = stalled.allocate([list(range(2 * BS))])
            plan = stalled.plan([x.seq_id], [2 * BS], x.slots) if how == "through a plan" else None
            y, before = taken_over(server, x, other)
            with pytest.raises(SessionLost):
                if plan is None:
                    stalled.write(0, x.slots, kv(len(x.slots), -7.0), kv(len(x.slots), -7.0))
                else:
                    plan.write(0, kv(len(x.slots), -7.0), kv(len(x.slots), -7.0))
            assert np.array_equal(k_of(other, y.block_table), before)
        finally:
            stalled.close()
            other.close()


def test_blocks_back_from_swap_in_are_written_again():
    """A block this session once committed (published), freed, then given back by a
    swap-in as an uncommitted block (a chunked prefill preempted mid-way): its old
    mark held, and a write the daemon takes was refused here."""
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=8, block_size=16, dtype="float32",
                    num_host_blocks=8)

    def kv1(n: int, value: float) -> np.ndarray:
        return np.full((n, 1, 8), value, np.float32)

    with running_server(spec) as server, Client(server.endpoint) as c:
        [a] = c.allocate([list(range(1000, 1000 + 2 * BS))])
        c.write(0, a.slots, kv1(len(a.slots), 1.0), kv1(len(a.slots), 1.0))
        c.commit(a.seq_id)
        c.free(a.seq_id)
        [b] = c.allocate([list(range(2000, 2040))])  # three blocks, prefilled in chunks
        c.write(0, b.slots[:BS], kv1(BS, 2.0), kv1(BS, 2.0))
        c.commit(b.seq_id, BS)
        c.swap_out(b.seq_id)
        c.allocate([list(range(3000, 3000 + 4 * BS))])  # takes the free blocks: a's come back to b
        c.swap_in(b.seq_id)
        tables, _ = c.tables([b.seq_id])
        rest = np.array([int(tables[0][p // BS]) * BS + p % BS for p in range(BS, 40)], np.int64)
        assert set((rest // BS).tolist()) & set(a.block_table)  # (the case: blocks a held, given back to write)
        c.write(0, rest, kv1(len(rest), 3.0), kv1(len(rest), 3.0))
        c.check_integrity()


def test_a_batch_of_tables_past_the_message_limit_is_asked_in_parts():
    """`Client.tables` of sequences its mirror lacks (another session's) asks the
    daemon, whose reply is bounded by its message limit: the client asks in halves."""
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=600, block_size=16, dtype="float32")
    with running_server(spec, max_message_bytes=1 << 16) as server, Client(server.endpoint) as a, \
            Client(server.endpoint) as b:
        allocs = a.allocate([list(range(3, 3 + 300 * 16))] + [[7]] * 63)
        ids = [x.seq_id for x in allocs]
        want_tables, want_lens = a.tables(ids)  # (its own: the mirror)
        got_tables, got_lens = b.tables(ids)
        assert np.array_equal(got_tables, want_tables) and np.array_equal(got_lens, want_lens)
        b.plan(ids).attend(0, np.ones((64, 2, SPEC.head_dim), np.float32))


def test_a_worker_stopped_past_its_timeout_writes_nothing_when_it_resumes():
    """A worker paused longer than the heartbeat timeout (here: one without a
    heartbeat thread, idle): the daemon ended its session and gave its blocks to
    another; its next write went into them before anything told it its session
    was over. The daemon's count of the sessions it ended, mapped with the pool,
    moved: the write asks first."""
    with running_server(SPEC, heartbeat_timeout=0.5) as server:
        stalled = Client(server.endpoint, heartbeat=False)
        other = Client(server.endpoint)
        try:
            [x] = stalled.allocate([list(range(2 * BS))])
            written(stalled, x, 1.0)
            time.sleep(0.6)
            assert wait_until(lambda: len(server.sessions) == 1, timeout=10)
            [y] = other.allocate([list(range(900, 900 + 7 * BS))])  # every block, the stalled one's too
            assert set(x.block_table) <= set(y.block_table)
            written(other, y, 5.0)
            other.commit(y.seq_id)
            before = k_of(other, y.block_table)
            with pytest.raises(SessionLost):
                stalled.write(0, x.slots, kv(len(x.slots), -7.0), kv(len(x.slots), -7.0))
            assert np.array_equal(k_of(other, y.block_table), before)
            other.check_integrity()
        finally:
            stalled.close()
            other.close()


@pytest.mark.parametrize("chunk", [None, 8 * BS])  # (a chunk that begins in the released blocks)
def test_attention_through_the_mapped_pool_never_reads_released_entries(chunk):
    """A sequence that released its leading blocks (a sliding window) holds
    the null block there. KVPool.attend and the daemon's attend refuse a
    window that would read them; the client's own attention over the mapped
    pool read the null block's K/V silently (wrong outputs, no error)."""
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=16, block_size=BS, dtype="float32")
    with running_server(spec) as server, Client(server.endpoint) as c:
        assert c.map_pool
        [a] = c.allocate([list(range(5 * BS))])
        c.release_before([a.seq_id], [4 * BS])
        q = np.ones((1, 4, 16), np.float32)
        for window in (None, 2 * BS):
            with pytest.raises(InvalidArgument, match="released its blocks"):
                c.attend(0, [a.seq_id], q, window=window, chunk=chunk)
            with pytest.raises(InvalidArgument, match="released its blocks"):
                c.remote_attend(0, [a.seq_id], q, window=window, chunk=chunk)
        c.attend(0, [a.seq_id], q, window=BS)  # within what it holds
        c.check_integrity()


@pytest.mark.parametrize("how", ["write", "plan", "attend", "staged attend"])
def test_a_worker_whose_session_ended_reads_and_writes_nothing_of_the_next_one(how, monkeypatch):
    """A worker stopped past its timeout, then reconnected: its slots from the
    lost session were taken for its own (the check's memo, count of changes
    and slot bytes, outlived the session: the new mirror's count starts
    again), its plan from then was taken (a fresh allocate gives the same
    ids, tables and slots), its attention over its own sequence read the
    blocks another session holds now, and a staging segment the daemon
    unlinked meanwhile was an InvalidArgument instead of SessionLost."""
    from kvpager import shm

    with running_server(SPEC, heartbeat_timeout=0.5) as server:
        stalled = Client(server.endpoint, heartbeat=False)
        other = Client(server.endpoint)
        try:
            prompt = list(range(2 * BS))
            [x] = stalled.allocate([prompt])
            written(stalled, x, 1.0)
            plan = stalled.plan([x.seq_id], [2 * BS], x.slots)
            q = np.ones((1, 2 * SPEC.num_kv_heads, SPEC.head_dim), np.float32)
            if how == "staged attend":
                real = shm.Segment.attach

                def late(*args, **kwargs):  # stopped between the staging reply and its attach
                    time.sleep(0.6)
                    assert wait_until(lambda: len(server.sessions) == 1, timeout=10)
                    return real(*args, **kwargs)

                monkeypatch.setattr(shm.Segment, "attach", late)
                with pytest.raises(SessionLost):
                    stalled.remote_attend(0, [x.seq_id], q)
                return
            y, before = taken_over(server, x, other)
            if how == "attend":
                with pytest.raises(SessionLost):
                    stalled.attend(0, [x.seq_id], q)
                return
            with pytest.raises(SessionLost):
                stalled.stats()
            stalled.reconnect()
            if how == "write":
                with pytest.raises(NotOwner):
                    stalled.write(0, x.slots, kv(len(x.slots), -7.0), kv(len(x.slots), -7.0))
            else:
                other.free([y.seq_id])  # (its blocks stay cached, their K/V kept)
                stalled.allocate([prompt])  # (its sequence id and slots again, maybe)
                with pytest.raises(StalePlan, match="earlier session"):
                    plan.write(0, kv(len(x.slots), -7.0), kv(len(x.slots), -7.0))
            assert np.array_equal(k_of(other, y.block_table), before)
        finally:
            stalled.close()
            other.close()


def test_a_block_shared_within_an_allocate_is_published_by_its_sharers_commit():
    """Prompts of one allocate sharing a leading block (``share_in_batch``): the first
    writes it; a commit of the second alone publishes it (the daemon counts the
    second's cache hits alone as committed). A mapped write into it is then refused,
    as the daemon refuses a staged one, and another session's hit reads what was
    committed."""
    with running_server(SPEC) as server, Client(server.endpoint) as a, Client(server.endpoint) as b:
        system = list(range(40, 40 + BS))
        x, y = a.allocate([system + [1, 2], system + [3]], share_in_batch=True)
        assert y.num_cached_tokens == BS and y.block_table[0] == x.block_table[0]
        written(a, x, 1.0)
        written(a, y, 2.0)
        a.commit([y.seq_id])
        before = k_of(a, x.block_table[:1])
        with pytest.raises(NotOwner, match="published"):
            a.write(0, x.slots[:BS], kv(BS, 9.0), kv(BS, 9.0))
        [z] = b.allocate([system + [5]])
        assert z.num_cached_tokens == BS and z.block_table[0] == x.block_table[0]
        assert np.array_equal(k_of(b, z.block_table[:1]), before)
        a.check_integrity()


def test_a_forks_published_block_stays_known_across_a_swap():
    """A block a fork shares with its parent, published by the fork's commit: the
    parent's swap-out and swap-in leave it on the device (the fork holds it), still
    published, so a mapped write into it stays refused."""
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=8, block_size=16, dtype="float32",
                    num_host_blocks=8)
    with running_server(spec) as server, Client(server.endpoint) as a:
        [x] = a.allocate([list(range(300, 300 + BS + 1))])
        written(a, x, 1.0)
        [[child]] = a.fork([x.seq_id])
        a.commit([child])
        with pytest.raises(NotOwner, match="published"):
            a.write(0, x.slots[:BS], kv(BS, 9.0), kv(BS, 9.0))
        a.swap_out([x.seq_id])
        a.swap_in([x.seq_id])
        tables, _ = a.tables([x.seq_id])
        assert int(tables[0][0]) == int(x.block_table[0])  # (the case: the shared block stayed)
        with pytest.raises(NotOwner, match="published"):
            a.write(0, x.slots[:BS], kv(BS, 9.0), kv(BS, 9.0))
        a.check_integrity()
