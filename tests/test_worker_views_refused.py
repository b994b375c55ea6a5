"""A careless worker's views of the pool and its plans' chunked views: a chunked
view kept after its plan was dropped (``plan(...).chunked(c)``) read the freed
blocks another sequence held, silently; `Client.kv` handed out views of the
mapped pool after `close`, in a forked child and once the heartbeat thread had
found the session lost (a restarted daemon: the views were the dead daemon's
memory); a free of a plan's sequence in another thread while the plan rechecked
raised KeyError from its attend. Bounded waits, every daemon stopped."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import threading

import numpy as np
import pytest
from daemon_helpers import SMALL, ipc_endpoint, running_server, wait_until
from test_hardening_fork import _in_child

from kvpager import KVPool
from kvpager.client import Client
from kvpager.errors import SessionLost, StalePlan

H, D, BS = SMALL.num_kv_heads, SMALL.head_dim, SMALL.block_size


def _kv(n: int, value: float) -> np.ndarray:
    return np.full((n, H, D), value, np.float32)


def _dropped_plans_view(pool, other) -> None:
    """A view of a dropped plan refuses once its sequence is freed and its blocks are
    another's (it read that sequence's K/V before), and goes on past others' changes."""
    a, b = pool.allocate([list(range(40)), list(range(500, 540))])
    for layer in range(SMALL.num_layers):
        pool.write(layer, a.slots, _kv(40, 1.0), _kv(40, 1.0))
    q = np.ones((1, H, D), np.float32)
    view = pool.plan([a.seq_id], 1).chunked(BS)  # the plan itself dropped at once
    gc.collect()
    np.testing.assert_allclose(view.attend(0, q), 1.0)
    pool.free([b.seq_id])  # another sequence's change: the view goes on
    np.testing.assert_allclose(view.attend(0, q), 1.0)
    pool.free([a.seq_id])
    [c] = other.allocate([list(range(1000, 1040))])
    assert set(c.block_table) & set(a.block_table)  # its blocks are another sequence's now
    for layer in range(SMALL.num_layers):
        other.write(layer, c.slots, _kv(40, 9.0), _kv(40, 9.0))
    with pytest.raises(StalePlan, match="freed"):
        view.attend(0, q)  # (read the other sequence's 9s before)
    other.free([c.seq_id])


def test_a_chunked_view_kept_without_its_plan_refuses_once_its_sequence_is_freed():
    pool = KVPool(SMALL)
    try:
        _dropped_plans_view(pool, pool)
        pool.check_integrity()
    finally:
        pool.close()


def test_a_workers_chunked_view_kept_without_its_plan_refuses_once_its_sequence_is_freed():
    with running_server() as server, Client(server.endpoint) as a, Client(server.endpoint) as other:
        _dropped_plans_view(a, other)
        server.pool.check_integrity()
        assert server.pool.stats().used_blocks == 0


def test_kv_views_are_refused_after_close():
    with running_server() as server:
        c = Client(server.endpoint)
        [a] = c.allocate([list(range(20))])
        c.write(0, a.slots, _kv(20, 1.0), _kv(20, 1.0))  # maps the pool
        c.kv(0)
        c.close()
        for call in (lambda: c.kv(0), c.device_array, c.host_array):
            with pytest.raises(SessionLost, match="closed"):
                call()  # (the views of a pool whose blocks were freed by the bye, before)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_kv_views_are_refused_in_a_forked_child():
    with running_server() as server, Client(server.endpoint) as c:
        [a] = c.allocate([list(range(20))])
        c.write(0, a.slots, _kv(20, 1.0), _kv(20, 1.0))
        for call in (lambda: c.kv(0)[0].shape, lambda: c.device_array().shape):
            said, _, status = _in_child(call)
            assert status == 0 and said.startswith("InvalidArgument") and "fork" in said, said
        np.testing.assert_array_equal(c.kv(0)[0][a.block_table[0], :, 0], 1.0)  # the parent's own still


def test_kv_views_are_refused_once_the_heartbeat_found_a_restarted_daemon():
    endpoint, tmp = ipc_endpoint()
    try:
        with running_server(endpoint=endpoint, heartbeat_timeout=0.6) as first:
            c = Client(endpoint, timeout=2)
            [a] = c.allocate([list(range(20))])
            c.write(0, a.slots, _kv(20, 1.0), _kv(20, 1.0))
            old = c.kv(0)[0]
            assert first is not None
        with running_server(endpoint=endpoint, heartbeat_timeout=0.6):
            assert wait_until(lambda: c._lost, 10)  # its heartbeat was answered session_lost
            with pytest.raises(SessionLost):
                c.kv(0)  # the dead daemon's memory, without a word, before
            with pytest.raises(SessionLost):
                c.device_array()
            del old
            c.reconnect()
            [b] = c.allocate([list(range(20))])
            c.write(0, b.slots, _kv(20, 2.0), _kv(20, 2.0))
            np.testing.assert_array_equal(c.kv(0)[0][b.block_table[0], :, 0], 2.0)
            c.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_free_in_another_thread_while_a_plan_rechecks_is_a_stale_plan_not_a_key_error(monkeypatch):
    """A scheduler thread frees (aborts) a sequence while the model thread's plan
    rechecks its sequences against the mirror: the recheck read the mirror between
    the free's updates (KeyError from `attend`). Now the free waits for the recheck."""
    with running_server() as server, Client(server.endpoint) as c:
        x, y = c.allocate([list(range(40)), list(range(500, 540))])
        plan = c.plan([x.seq_id], 1)
        c.free([y.seq_id])  # moves the count: the plan's next call rechecks
        mirror, main = c._mirror, threading.current_thread()
        real, done, threads = mirror.gather, threading.Event(), []

        def freer() -> None:
            c.free([x.seq_id])
            done.set()

        def gather(ids, *op):
            got = real(ids, *op)
            if threading.current_thread() is main and not threads:
                threads.append(threading.Thread(target=freer))
                threads[0].start()
                done.wait(0.5)  # (the free runs here, between the mirror's reads, unless it waits)
            return got

        monkeypatch.setattr(mirror, "gather", gather)
        q = np.ones((1, H, D), np.float32)
        with contextlib.suppress(StalePlan):
            plan.attend(0, q)  # (KeyError before; now its sequence is still held while it rechecks)
        threads[0].join(10)
        assert done.is_set()
        with pytest.raises(StalePlan, match="freed"):
            plan.attend(0, q)
        server.pool.check_integrity()
        assert server.pool.stats().used_blocks == 0
