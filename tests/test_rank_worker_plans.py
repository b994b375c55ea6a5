"""A rank worker's step plans over its driver's sequences, or with its driver's
slots (docs/protocol.md, "Ranks"): what they follow (the driver's releases and
commits, read before the plan's tables) and where they may read (the driver's
released entries). Each test failed before its fix. Against a daemon in a
thread on a fresh ipc:// endpoint, of two CPU ranks and of one; the other
sessions' bytes are read back through a mapped `kv(layer)` view."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from daemon_helpers import running_server

from kvpager import Client, PoolSpec
from kvpager.errors import InvalidArgument, NotOwner, StalePlan

SPEC = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=48, block_size=8, dtype="float32",
                num_host_blocks=16)
BS = SPEC.block_size
RANKS = pytest.mark.parametrize("devices", [["cpu", "cpu"], ["cpu"]], ids=["two_ranks", "one_rank"])


def _kv(seed: int, n: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((n, heads, SPEC.head_dim)).astype(np.float32) for _ in range(2))
    return k, v


def _at(client: Client, layer: int, slots: Any) -> tuple[np.ndarray, np.ndarray]:
    """K and V at ``slots`` of ``layer``, read through ``client``'s mapped views (copies)."""
    slots = np.asarray(slots, np.int64)
    b, o = slots // BS, slots % BS
    k, v = client.kv(layer)
    return np.asarray(k[b, :, o]).copy(), np.asarray(v[b, :, o]).copy()


@RANKS
@pytest.mark.parametrize("change", ["free", "commit"])
def test_a_workers_plan_with_its_drivers_slots_follows_the_driver(devices, change):
    """A rank worker's step plan with slots of its driver's sequence (the daemon
    checks them when the plan is made: the driver's, taken). Made over the
    worker's own sequence, the plan followed only the worker's own changes and
    the ended sessions' count (every id mirrored), not the daemon's releases nor
    the driver's commits: after the driver freed the sequence its writes landed
    in the blocks another session held then, and after the driver committed it,
    in published blocks. Slots that are not the plan's own sequences' positions
    are refused when it is made now; a plan over the driver's sequence follows
    both: refused (StalePlan), nothing written."""
    with running_server(SPEC, devices=devices) as server:
        ep = server.endpoint
        heads = SPEC.num_kv_heads // len(devices)
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker, \
                Client(ep) as victim, Client(ep, rank=0, driver=victim) as victims:
            n = BS
            [own] = worker.allocate([list(range(1000, 1000 + n))])  # the worker's own sequence
            [x] = driver.allocate([list(range(n))])
            with pytest.raises(InvalidArgument, match="is not its position"):
                worker.plan([own.seq_id], query_lens=[n], slots=x.slots)  # the driver's slots, its own sequence
            plan = worker.plan([x.seq_id], query_lens=[n], slots=x.slots)  # (checked: the driver's slots)
            mine = _kv(1, n, heads)
            plan.write(0, *mine)
            if change == "free":
                driver.free(x.seq_id)
                [y] = victim.allocate([list(range(500, 500 + n))])
                assert set(y.block_table) & set(x.block_table)  # the freed block, the victim's now
                victims.write(0, y.slots, *_kv(2, n, heads))
                theirs = _at(victims, 0, y.slots)
            else:
                driver.commit(x.seq_id)  # x's full block is published: other sessions read it
                theirs = _at(victims, 0, x.slots)
            with pytest.raises((StalePlan, NotOwner)):
                plan.write(0, *_kv(3, n, heads))
            slots = y.slots if change == "free" else x.slots
            got = _at(victims, 0, slots)
            np.testing.assert_array_equal(got[0], theirs[0])
            np.testing.assert_array_equal(got[1], theirs[1])
            server.pool.check_integrity()


@RANKS
@pytest.mark.parametrize("how", ["release_before", "windowed_hit"])
def test_a_workers_plan_over_its_drivers_released_sequence_refuses_an_attend_past_the_floor(devices, how):
    """The driver released the leading blocks of its sequence (`release_before`, a
    sliding window's): their entries hold the null block. `KVPool.plan`,
    `Client.attend` and `remote_attend` refuse an attend whose queries would read
    them (InvalidArgument: no window given), but a rank worker's step plan over the
    driver's sequences (every plan a TP worker makes) carried no floor (taken from
    the worker's mirror, which holds none of the driver's sequences) and attended
    over the null block's K/V silently; it is read from the plan's tables now. Likewise after the driver's
    windowed prefix hit (`allocate(window=)`), whose entries before the window are null."""
    with running_server(SPEC, devices=devices) as server:
        ep = server.endpoint
        heads = SPEC.num_kv_heads // len(devices)
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker:
            if how == "release_before":
                [x] = driver.allocate([list(range(3 * BS))])
                worker.write(0, x.slots, *_kv(1, 3 * BS, heads))
                driver.release_before(x.seq_id, 2 * BS)
            else:  # a prefix hit of a sliding window (allocate's window): the entries before it null
                [p] = driver.allocate([list(range(4 * BS))])
                worker.write(0, p.slots, *_kv(1, 4 * BS, heads))
                driver.commit(p.seq_id)
                [x] = driver.allocate([list(range(4 * BS)) + [1, 2]], window=BS)
                assert x.block_table[0] == 0 and x.num_cached_tokens == 4 * BS
                worker.write(0, x.slots, *_kv(2, 2, heads))
            q = np.ones((1, heads, SPEC.head_dim), np.float32)
            with pytest.raises(InvalidArgument, match="released"):
                worker.attend(0, [x.seq_id], q)  # (the plain attend refuses)
            plan = worker.plan([x.seq_id], [1])
            with pytest.raises(InvalidArgument, match="released"):
                plan.attend(0, q)
            assert np.isfinite(plan.attend(0, q, window=BS)).all()  # within the window: taken
            server.pool.check_integrity()


def test_a_drivers_commit_during_a_workers_plan_round_trip_is_followed():
    """A rank worker's plan (or refill) over its driver's sequence: the daemon
    checks its slots in the plan's `tables` round trip, and the plan read the
    mapped counts it follows after that round trip. A driver's commit landing
    between the daemon's check and that read was counted as seen: the plan never
    rechecked, and its writes went into the blocks the commit published. The
    counts are read before the round trip now (`KVAccess._follows`); `refill`
    ties the same way (a GPU plan's; not refillable on the CPU)."""
    with running_server(SPEC, devices=["cpu"]) as server:
        ep = server.endpoint
        heads = SPEC.num_kv_heads
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker:
            n = 2 * BS  # two full blocks: both published by the commit
            [x] = driver.allocate([list(range(n))])
            tables = worker._daemon_tables
            fired = []

            def tables_then_commit(*args: Any, **kw: Any) -> Any:
                got = tables(*args, **kw)
                if not fired:  # the driver's commit reaches the daemon just after the worker's check
                    fired.append(driver.commit(x.seq_id))
                return got

            worker._daemon_tables = tables_then_commit
            plan = worker.plan([x.seq_id], query_lens=[n], slots=x.slots)
            worker._daemon_tables = tables
            assert fired
            blocks = np.unique(x.slots // BS)
            assert server.pool.blocks().cached[blocks].all()  # published: other sessions read them
            before = _at(worker, 0, x.slots)
            junk = _kv(99, n, heads)
            with pytest.raises(StalePlan):
                plan.write(0, *junk)
            np.testing.assert_array_equal(_at(worker, 0, x.slots)[0], before[0])
