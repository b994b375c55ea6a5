"""A refused free, truncate, swap-out or release moves no plan's count (`kvpager.plan_guard`).

`KVPool.free` / `truncate` / `swap_out` / `release_before` moved the count of
changes that make step plans stale before their checks ran, so a refused one
(an unknown id, a length past the end, a sequence already swapped out, a
position before what is held) counted as a release. On a daemon that count is
the shared word every mapped worker's plans over other sessions' sequences
follow: each refused request of a careless client made every such plan of
every other worker recheck through the daemon, a `tables` round trip on its
next call. Now the count moves once the change is done, and only then. On an
embedded pool and on a daemon (a thread on a fresh ipc:// endpoint) whose rank
worker plans over its driver's sequence."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from daemon_helpers import running_server

from kvpager import Client, KVPool, PoolSpec
from kvpager.errors import KVPagerError

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=8, dtype="float32",
                num_host_blocks=16)
BS = SPEC.block_size

#: Refused calls, each of a sequence ``seq`` of ``n`` tokens (swapped out first for "swap_out_twice"):
#: (name, the call on a pool or client).
REFUSED = [
    ("free_unknown", lambda p, seq, n: p.free([seq + 1000])),
    ("truncate_past_end", lambda p, seq, n: p.truncate([seq], [n + 1])),
    ("release_past_end", lambda p, seq, n: p.release_before([seq], [n + 5 * BS])),
    ("swap_out_twice", lambda p, seq, n: p.swap_out([seq])),
]


@pytest.mark.parametrize(("name", "call"), REFUSED, ids=[r[0] for r in REFUSED])
def test_an_embedded_pools_refused_release_moves_no_count(name, call):
    with KVPool(SPEC) as pool:
        [a] = pool.allocate([list(range(3 * BS + 2))])
        moves = pool.backend.moves
        if name == "swap_out_twice":
            pool.swap_out([a.seq_id])
        before = moves.count
        with pytest.raises((KVPagerError, ValueError)):
            call(pool, a.seq_id, 3 * BS + 2)
        assert moves.count == before
        if name == "swap_out_twice":
            pool.swap_in([a.seq_id])
        pool.truncate([a.seq_id], [BS])  # and one done moves it
        assert moves.count > before
        pool.check_integrity()


@pytest.mark.parametrize(("name", "call"), REFUSED, ids=[r[0] for r in REFUSED])
def test_another_clients_refused_release_costs_a_workers_plan_no_round_trip(name, call):
    with running_server(SPEC) as server:
        ep = server.endpoint
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker, Client(ep) as careless:
            [x] = driver.allocate([list(range(2 * BS + 3))])
            rng = np.random.default_rng(0)
            driver.write(0, x.slots, *(rng.standard_normal((len(x.slots), 2, 16)).astype(np.float32)
                                       for _ in range(2)))
            plan = worker.plan([x.seq_id])  # over its driver's sequence: follows the daemon's releases
            q = rng.standard_normal((1, 2, 16)).astype(np.float32)
            want = np.asarray(plan.attend(0, q)).copy()
            [c] = careless.allocate([list(range(500, 500 + 3 * BS + 2))])
            if name == "swap_out_twice":
                careless.swap_out([c.seq_id])  # (a release done: before the count)
                plan.attend(0, q)
            calls = []
            wire = worker._call

            def counted(op: str, args: dict[str, Any]) -> Any:
                calls.append(op)
                return wire(op, args)

            worker._call = counted
            for _ in range(3):
                with pytest.raises((KVPagerError, ValueError)):
                    call(careless, c.seq_id, 3 * BS + 2)
                np.testing.assert_array_equal(np.asarray(plan.attend(0, q)), want)
            assert calls == []  # no recheck: nothing changed
            if name == "swap_out_twice":
                careless.swap_in([c.seq_id])
            careless.truncate([c.seq_id], [BS])  # a release done: the next call rechecks
            plan.attend(0, q)
            assert calls, "a release done moved no count"
            server.pool.check_integrity()
