"""Rank workers of a tensor-parallel daemon and their driver (docs/protocol.md,
"Ranks"): a worker's step plan takes slots of its own and its driver's
sequences only (never another session's, nor a published block), checked when
it is made or refilled; a driver's end (bye, or missed heartbeats) ends its
rank workers' sessions with it, and nobody else's; one worker a rank of a
driver; a worker named a driver that is not open is told which session is
missing, and its hello keeps no driver alive."""

from __future__ import annotations

import time

import numpy as np
import pytest
from daemon_helpers import running_server, wait_until

from kvpager import Client, PoolSpec
from kvpager.errors import InvalidArgument, NotOwner, RankTaken, SessionLost

SPEC = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=48, block_size=8, dtype="float32",
                num_host_blocks=16)
HEADS = SPEC.num_kv_heads // 2  # a rank's


def _kv(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((n, HEADS, SPEC.head_dim)).astype(np.float32) for _ in range(2))


def _held(server, rank: int, layer: int, slots) -> tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s K and V at ``slots``, read from the daemon's own storage
    ([tokens, heads, head_dim], as written)."""
    k, v = server.pool.rank(rank).kv(layer)  # [blocks, heads, block_size, head_dim]
    slots = np.asarray(slots, np.int64)
    b, o = slots // SPEC.block_size, slots % SPEC.block_size
    return np.asarray(k[b, :, o]).copy(), np.asarray(v[b, :, o]).copy()


def test_a_rank_workers_plan_takes_slots_of_its_drivers_sequences_only():
    """A worker's plan was made (and refilled) with any slots: its writes then
    overwrote another session's committed K/V, or a block the driver published.
    Both are refused now (`NotOwner`, as the daemon refuses a staged write), the
    plan refilled with them left as it was; slots of the driver's sequences still
    plan and write."""
    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        with Client(ep) as driver, Client(ep, rank=0, driver=driver.session) as worker, \
                Client(ep) as victim, Client(ep, rank=0, driver=victim) as victims:
            n = 2 * SPEC.block_size + 3
            [y] = victim.allocate([list(range(500, 500 + n))])
            vk, vv = _kv(7, n)
            victims.write(0, y.slots, vk, vv)
            victim.commit(y.seq_id)  # the victim's K/V: committed, published
            [x] = driver.allocate([list(range(n))])
            k, v = _kv(1, n)

            # another session's slots, over the driver's sequence (make and refill)
            with pytest.raises(NotOwner, match=f"block {y.slots[0] // SPEC.block_size}"):
                worker.plan([x.seq_id], query_lens=[n], slots=y.slots)
            plan = worker.plan([x.seq_id], query_lens=[n], slots=x.slots)  # the driver's: taken
            with pytest.raises(NotOwner):
                worker.refill(plan, [x.seq_id], query_lens=[n], slots=y.slots)
            plan.write(0, k, v)  # the refused refill changed nothing: it writes x's slots still
            # another session's sequence and its slots: no plan writes there either
            with pytest.raises(NotOwner):
                worker.plan([y.seq_id], query_lens=[n], slots=y.slots)
            worker.plan([y.seq_id], query_lens=[n])  # (attending over it is allowed)
            got = _held(server, 0, 0, y.slots)
            np.testing.assert_array_equal(got[0], vk)
            np.testing.assert_array_equal(got[1], vv)
            got = _held(server, 0, 0, x.slots)
            np.testing.assert_array_equal(got[0], k)
            np.testing.assert_array_equal(got[1], v)

            # the driver's own sequence, once published: its blocks are immutable
            driver.commit(x.seq_id)
            with pytest.raises(NotOwner, match="published"):
                worker.plan([x.seq_id], query_lens=[SPEC.block_size], slots=x.slots[: SPEC.block_size])
            # a decode step of the driver's: its new slot plans and lands
            [slot] = driver.append(x.seq_id, 1)[0]
            k1, v1 = _kv(3, 1)
            plan = worker.plan([x.seq_id], slots=[slot])
            plan.write(1, k1, v1)
            got = _held(server, 0, 1, [slot])
            np.testing.assert_array_equal(got[0], k1)
            server.pool.check_integrity()


def test_a_rank_worker_without_a_driver_writes_into_its_own_sequences_only():
    """A rank worker that names no driver writes into its own sequences (the daemon
    refuses its staged writes elsewhere), but its mapped writes and plans went
    unchecked on a pool of several ranks: into another session's K/V."""
    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        with Client(ep) as victim, Client(ep, rank=1, driver=victim) as victims, Client(ep, rank=1) as loner:
            n = SPEC.block_size + 2
            [y] = victim.allocate([list(range(200, 200 + n))])
            vk, vv = _kv(4, n)
            victims.write(0, y.slots, vk, vv)
            [z] = loner.allocate([list(range(300, 300 + n))])
            k, v = _kv(5, n)
            loner.write(0, z.slots, k, v)  # its own: taken
            loner.plan([z.seq_id], query_lens=[n], slots=z.slots).write(1, k, v)
            with pytest.raises(NotOwner):
                loner.write(0, y.slots, np.zeros_like(k), np.zeros_like(v))
            with pytest.raises(NotOwner):
                loner.plan([y.seq_id], query_lens=[n], slots=y.slots)
            with pytest.raises(NotOwner):
                loner.plan([z.seq_id], query_lens=[n], slots=y.slots)
            np.testing.assert_array_equal(_held(server, 1, 0, y.slots)[0], vk)
            np.testing.assert_array_equal(_held(server, 1, 0, z.slots)[0], k)
            np.testing.assert_array_equal(_held(server, 1, 1, z.slots)[1], v)


def test_a_drivers_bye_ends_its_rank_workers():
    """A driver that said bye left its rank workers' sessions open, holding their
    own sequences and staging, and a mapped worker wrote on into the driver's
    freed blocks, given meanwhile to another session. The workers' sessions end
    with the driver's now: each gets `SessionLost` naming its driver, what they
    held is freed, and the other sessions go on."""
    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        driver = Client(ep)
        w0 = Client(ep, rank=0, driver=driver, heartbeat=False)  # (told by the mapped count, not a beat)
        w1 = Client(ep, rank=1, driver=driver.session, map_pool=False)
        with Client(ep) as other, Client(ep, rank=0, driver=other) as others:
            n = SPEC.block_size + 1
            [x] = driver.allocate([list(range(n))])
            k, v = _kv(1, n)
            w0.write(0, x.slots, k, v)
            w1.write(0, x.slots, k, v)  # (staged)
            mine = list(range(900, 900 + SPEC.block_size + 1))
            [own] = w1.allocate([mine])  # a worker's own sequence, and a pin
            w1.commit(own.seq_id)
            assert w1.pin([mine]) == [SPEC.block_size]
            sessions = len(server.sessions)
            driver.close()
            assert wait_until(lambda: len(server.sessions) == sessions - 3, 5)
            [y] = other.allocate([list(range(700, 700 + n))])
            assert sorted(y.block_table) == sorted(x.block_table)  # the driver's blocks, the other's now
            ok, ov = _kv(2, n)
            others.write(0, y.slots, ok, ov)
            with pytest.raises(SessionLost, match=f"driver.*{driver.session_name}"):
                w0.write(0, x.slots, np.zeros_like(k), np.zeros_like(v))  # mapped: told before it writes
            with pytest.raises(SessionLost, match=f"driver.*{driver.session_name}"):
                w1.write(0, x.slots, np.zeros_like(k), np.zeros_like(v))
            np.testing.assert_array_equal(_held(server, 0, 0, y.slots)[0], ok)
            assert [s.seq_id for s in other.sequences() if s.owner == w1.session_name] == []  # freed with it
            assert own.seq_id not in server.pool.sequence_ids()
            assert other.stats().pinned_blocks == 0
            others.write(0, y.slots, ok, ov)  # the other driver's worker goes on
            server.pool.check_integrity()
        w0.close()
        w1.close()


def test_a_drivers_expiry_ends_its_workers_and_no_one_else():
    """A driver stopped past its heartbeat timeout: its healthy workers (beating)
    are ended with it, told why; a healthy client and another driver's worker are not."""
    with running_server(SPEC, devices=["cpu", "cpu"], heartbeat_timeout=1.0) as server:
        ep = server.endpoint
        driver = Client(ep, heartbeat=False)  # (stopped: no beats)
        worker = Client(ep, rank=1, driver=driver)
        with Client(ep) as healthy, Client(ep, rank=1, driver=healthy) as theirs:
            assert wait_until(lambda: len(server.sessions) == 2, 10)
            time.sleep(1.0)  # (a few of the survivors' beats more)
            with pytest.raises(SessionLost, match=f"driver.*{driver.session_name}"):
                worker.stats()
            healthy.stats()
            theirs.stats()
            assert {s.name for s in healthy.sessions()} == {healthy.session_name, theirs.session_name}
        worker.close()
        driver.close()


def test_one_worker_a_rank_of_a_driver():
    """Two workers claimed one rank of one driver (each writing the same heads of
    the same blocks). The second is refused (`RankTaken`, naming who serves it),
    opening nothing; another rank, or the same rank of another driver, is taken;
    the rank is free again once its worker is gone. A driver that serves a rank
    itself (its own rank 0 worker) holds that rank."""
    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        with Client(ep) as driver, Client(ep) as other, Client(ep, rank=0, driver=driver) as first:
            sessions = len(server.sessions)
            with pytest.raises(RankTaken, match=f"rank 0 of session {driver.session_name}.*{first.session_name}"):
                Client(ep, rank=0, driver=driver.session)
            assert issubclass(RankTaken, InvalidArgument)
            assert len(server.sessions) == sessions  # nothing opened
            first.stats()  # the first goes on
            with Client(ep, rank=1, driver=driver), Client(ep, rank=0, driver=other):
                pass
            first.close()
            with Client(ep, rank=0, driver=driver) as second:  # the first is gone: free again
                assert second.rank == 0
        with Client(ep, rank=0) as lead:  # the rank-0 worker is the driver
            with pytest.raises(RankTaken, match=f"rank 0 of session {lead.session_name}"):
                Client(ep, rank=0, driver=lead)
            with Client(ep, rank=1, driver=lead) as helper:
                assert helper.rank == 1


def test_a_worker_naming_a_driver_not_open():
    """A worker whose driver is not open was told "this session is not open" (its
    own, it read), and each such hello reset the driver's heartbeat clock: a dead
    driver lived on while workers kept asking. The driver now expires on time and
    the hello names the driver as the missing session."""
    with running_server(SPEC, devices=["cpu", "cpu"], heartbeat_timeout=1.0) as server:
        ep = server.endpoint
        driver = Client(ep, heartbeat=False)
        name, secret = driver.session_name, driver.session
        deadline = time.monotonic() + 4.0
        refused = None
        while time.monotonic() < deadline and refused is None:
            try:
                Client(ep, rank=0, driver=secret, heartbeat=False).close()
            except SessionLost as e:
                refused = e
            time.sleep(0.3)
        assert refused is not None, f"session {name} never expired"
        assert "driver" in str(refused) and "not open" in str(refused)
        with Client(ep) as look:
            assert name not in {s.name for s in look.sessions()}
        driver.close()


def test_a_reconnect_while_the_session_is_open_ends_it_first():
    """`reconnect()` called while its session was open (no SessionLost seen) left
    that session to its heartbeat timeout: its sequences held, and a rank
    worker's new hello refused (`RankTaken`, its own old session serving the
    rank). It says bye for it first now."""
    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        with Client(ep) as driver, Client(ep, rank=1, driver=driver) as worker, Client(ep) as plain:
            plain.allocate([[1, 2, 3]])
            worker.allocate([[4, 5, 6]])
            old = {worker.session_name, plain.session_name}
            assert driver.stats().num_sequences == 2
            worker.reconnect()
            plain.reconnect()
            assert not old & {s.name for s in driver.sessions()}
            assert driver.stats().num_sequences == 0
            [x] = driver.allocate([list(range(5))])
            worker.write(0, x.slots, *_kv(3, 5))  # the new session serves the rank
