"""Load: 16 client processes run random batched ops at once; afterwards every
block is accounted for and the allocator's invariants hold."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import time

from daemon_helpers import running_server
from daemon_workers import random_ops

from kvpager.client import Client
from kvpager.spec import PoolSpec

SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=768, block_size=16,
                dtype="float32", num_host_blocks=256)
WORKERS = 16
SECONDS = 4.0  # of ops per worker; start-up of 16 spawned interpreters comes on top
WAIT = 180


def test_sixteen_clients_of_random_ops():
    ctx = mp.get_context("spawn")
    with running_server(SPEC, heartbeat_timeout=60) as server:
        out = ctx.Queue()
        procs = [ctx.Process(target=random_ops, args=(server.endpoint, seed, SECONDS, out))
                 for seed in range(WORKERS)]
        for p in procs:
            p.start()
        results = []
        try:
            with Client(server.endpoint, timeout=60) as obs:
                deadline = time.monotonic() + WAIT
                while len(results) < WORKERS and time.monotonic() < deadline:
                    obs.check_integrity()  # invariants hold mid-run too
                    with contextlib.suppress(queue.Empty):
                        results.append(out.get(timeout=0.5))
                assert len(results) == WORKERS
                for p in procs:
                    p.join(WAIT)
                assert [p.exitcode for p in procs] == [0] * WORKERS
                st = obs.stats()
                assert st.num_sequences == 0 and st.used_blocks == 0
                assert st.free_blocks + st.evictable_blocks == st.total_blocks
                assert st.host_free_blocks == st.host_total_blocks
                obs.check_integrity()
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(10)
        total = sum(sum(r.values()) for r in results)
        assert total > WORKERS * 20, results  # each worker got real work done
        assert server.requests > total
