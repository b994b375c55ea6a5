"""Careless rank workers naming their driver (docs/protocol.md, "Ranks"): a
driver named by its public session name (``Client.session_name``, what
`kvpager sessions` lists) instead of its secret was told `session_lost`
("the driver ... is not open ... said bye, missed heartbeats or the daemon
restarted"), so a worker that reconnects on `SessionLost` asked again for
good. It is `invalid_argument` now, naming the mistake; nothing opens.
A worker's reconnect to a daemon restarted with another rank count took the
new rank's heads as they came (its attends read another head's K/V): refused
now, naming both counts, the new session ended."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_helpers import running_server

from kvpager import Client, PoolSpec
from kvpager.errors import InvalidArgument, SessionLost

SPEC = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=48, block_size=8, dtype="float32",
                num_host_blocks=16)


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]], ids=["one rank", "two ranks"])
def test_a_driver_named_by_its_public_name_is_invalid_not_lost(devices):
    with running_server(SPEC, devices=devices) as server:
        ep = server.endpoint
        with Client(ep) as driver:
            sessions = len(server.sessions)
            with pytest.raises(InvalidArgument, match="public name.*secret") as e:
                Client(ep, rank=0, driver=driver.session_name, timeout=5)
            assert not isinstance(e.value, SessionLost)
            assert len(server.sessions) == sessions  # nothing opened
            # the secret (or the Client) serves, and writes land in the driver's sequence
            [x] = driver.allocate([list(range(12))])
            with Client(ep, rank=0, driver=driver.session, timeout=5) as worker:
                k = np.ones((12, worker.spec.num_kv_heads, SPEC.head_dim), np.float32)
                worker.write(0, x.slots, k, k)
            name = driver.session_name
        # a public name of a session that ended: still no secret, still no retry finds it open
        with pytest.raises(InvalidArgument, match="public name"):
            Client(ep, rank=0, driver=name, timeout=5)
        # a secret that is not open is session_lost, as it was
        with pytest.raises(SessionLost, match="driver"):
            Client(ep, rank=0, driver="x" * 22, timeout=5)
        assert len(server.sessions) == 0
        server.pool.check_integrity()
        assert server.pool.stats().num_sequences == 0


def test_a_worker_reconnecting_to_a_daemon_of_another_rank_count_is_refused():
    """A worker of rank 1 of 2 (kv heads 2, 3) reconnected to the daemon restarted
    with 4 ranks and became rank 1 of 4 (kv head 1) without a word: its `spec`
    changed under it, and an attend with its shard's query heads read another
    head's K/V (4 query heads over 1 kv head: accepted). Its writes are refused
    only by their shape. A reconnect that would change the heads the worker
    serves should be refused, naming the rank counts."""
    import shutil

    from daemon_helpers import ipc_endpoint, wait_until

    from kvpager.server import Server

    endpoint, tmp = ipc_endpoint()
    server = Server.create(SPEC, endpoint, devices=["cpu", "cpu"]).start()
    clients = []
    try:
        driver = Client(endpoint, timeout=5)
        worker = Client(endpoint, rank=1, driver=driver, timeout=5)
        clients += [driver, worker]
        heads = worker.spec.num_kv_heads
        server.stop()
        server = Server.create(SPEC, endpoint, devices=["cpu"] * 4).start()
        for c in clients:
            with pytest.raises(SessionLost):
                assert wait_until(lambda c=c: c.stats() is None, 10)  # (until the restart is seen)
        driver.reconnect()
        try:
            with pytest.raises(InvalidArgument, match="ranks"):
                worker.reconnect()
        finally:
            assert worker.spec.num_kv_heads == heads
    finally:
        for c in clients:
            c.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_sessions_say_which_rank_of_which_driver_each_worker_serves():
    """`kvpager sessions` listed a tensor-parallel daemon's sessions with nothing
    to tell a driver from its rank workers: an operator could not see which
    session served which rank of which driver (`SessionInfo.rank`, `.driver`)."""
    from daemon_helpers import run_cli

    with running_server(SPEC, devices=["cpu", "cpu"]) as server, Client(server.endpoint) as driver, \
            Client(server.endpoint, rank=1, driver=driver, timeout=5) as worker, Client(server.endpoint) as look:
        got = {s.name: (s.rank, s.driver) for s in look.sessions()}
        assert got == {driver.session_name: (None, None), worker.session_name: (1, driver.session_name),
                       look.session_name: (None, None)}
        r = run_cli(["sessions", "--endpoint", server.endpoint])
        assert r.exit_code == 0, r.output
        row = next(line for line in r.output.splitlines() if line.split()[:1] == [worker.session_name])
        assert row.split()[-2:] == ["1", driver.session_name] and "rank" in r.output.splitlines()[0]


def test_a_hello_that_fails_after_its_session_opened_ends_it(monkeypatch):
    """A hello whose pool memory could not be exported (a GPU's CUDA IPC handles
    refused) left its session open with no client knowing its secret: a rank
    worker's rank was held (`RankTaken` to every retry) until its heartbeats ran
    out. The session is ended with the failed hello now."""
    from kvpager import server_ops
    from kvpager.errors import InternalError

    real, fails = server_ops.hello_memory, iter([True])

    def export(server, rank):
        if next(fails, False):
            raise RuntimeError("the export failed")
        return real(server, rank)

    with running_server(SPEC, devices=["cpu", "cpu"]) as server, Client(server.endpoint) as driver:
        monkeypatch.setattr(server_ops, "hello_memory", export)
        with pytest.raises(InternalError):
            Client(server.endpoint, rank=1, driver=driver, timeout=5)
        assert len(server.sessions) == 1
        with Client(server.endpoint, rank=1, driver=driver, timeout=5) as worker:  # (RankTaken before)
            assert worker.rank == 1
