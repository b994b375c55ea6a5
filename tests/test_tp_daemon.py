"""A daemon of two tensor-parallel ranks in host memory (`kvpager serve
--devices cpu,cpu`): one worker process per rank writes and attends over its
heads of one allocator's blocks, against a one-rank NumPy pool of all heads
(tests/tp_helpers.py); what hello tells each kind of client; bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from daemon_helpers import daemon_process, ipc_endpoint, running_server, subprocess_env
from tp_helpers import run_scenario

from kvpager import Client, InvalidArgument, PoolSpec
from kvpager.cli import main

SPEC = PoolSpec(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=48, block_size=8, dtype="float32",
                num_host_blocks=16)
GEOMETRY = ["--layers", "2", "--kv-heads", "4", "--head-dim", "16", "--block-size", "8", "--dtype", "float32",
            "--blocks", "48", "--host-blocks", "16", "--device", "cpu"]


def test_two_rank_workers_through_serve_match_the_numpy_twin():
    endpoint, _ = ipc_endpoint()
    with daemon_process([*GEOMETRY[:-2], "--devices", "cpu,cpu"], endpoint) as proc:
        out = run_scenario(endpoint, SPEC, [None, None], num_q_heads=8, rtol=1e-5, atol=1e-6)
        assert [h["kind"] for h in out["hellos"]] == ["shm", "shm"]
        assert any("tensor-parallel: 2 ranks" in line for line in proc.log)
        res = CliRunner().invoke(main, ["stats", "--json", "--endpoint", endpoint], catch_exceptions=False)
        st = json.loads(res.output)
        assert st["ranks"] == 2 and st["bytes_per_block"] == SPEC.bytes_per_block
        assert st["bytes_per_block_per_rank"] == SPEC.bytes_per_block // 2
        text = CliRunner().invoke(main, ["stats", "--endpoint", endpoint], catch_exceptions=False).output
        assert "2 ranks: each holds 4.0 KiB per block" in text


def test_four_ranks_one_head_each():
    with running_server(SPEC, devices=["cpu"] * 4) as server:
        run_scenario(server.endpoint, SPEC, [None] * 4, num_q_heads=4, rtol=1e-5, atol=1e-6)
        server.pool.check_integrity()


def test_what_hello_tells_each_client_and_bad_ranks():
    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        with Client(ep) as old, Client(ep, rank=0) as r0:
            [a] = old.allocate([list(range(10))])  # sequence ops need no rank
            assert (old.ranks, old.rank, old.spec) == (2, None, SPEC)
            assert (r0.ranks, r0.rank, r0.pool_spec) == (2, 0, SPEC)
            assert r0.spec == SPEC.replace(num_kv_heads=2) and r0.kv(0)[0].shape == (48, 2, 8, 16)
            # a client that names no rank maps nothing and is told why
            for call in (lambda: old.kv(0), lambda: old.device_array()):
                with pytest.raises(InvalidArgument, match=r"Client\(rank=r\)"):
                    call()
            k = np.zeros((10, 4, 16), np.float32)
            with pytest.raises(InvalidArgument, match=r"2 tensor-parallel ranks.*Client\(rank=r\)"):
                old.write(0, a.slots, k, k)  # goes remote: the daemon refuses
            with pytest.raises(InvalidArgument, match="rank"):
                old.remote_attend(0, [a.seq_id], np.zeros((1, 4, 16), np.float32))
            # a rank's remote write lands in its own heads' storage only
            [b] = r0.allocate([list(range(50, 60))])
            k2 = np.full((10, 2, 16), 3.0, np.float32)
            r0.remote_write(1, b.slots, k2, 2 * k2)
            blocks = list(b.block_table)
            rank0, rank1 = (server.pool.backend.ranks[r].kv for r in (0, 1))
            assert (rank0[blocks, 1, 0, :, :2] == 3).all() and (rank0[blocks, 1, 1, :, :2] == 6).all()
            assert not rank0[blocks, 0].any() and not rank1[blocks].any()
            sessions = len(server.sessions)
            for bad in (2, 5):
                with pytest.raises(InvalidArgument, match=r"hello: rank must be an int in \[0, 2\)"):
                    Client(ep, rank=bad)
            for bad in (-1, True, "1"):
                with pytest.raises(InvalidArgument, match="rank must be an int"):
                    Client(ep, rank=bad)
            assert len(server.sessions) == sessions  # a refused hello opened nothing
    # one rank: rank 0 is the whole pool, as a client that names none
    with running_server(SPEC) as server, Client(server.endpoint, rank=0) as c, Client(server.endpoint) as plain:
        assert (c.ranks, c.rank, c.spec, c.memory["kind"]) == (1, 0, SPEC, "shm")
        assert (plain.ranks, plain.rank, plain.spec) == (1, None, SPEC)
        with pytest.raises(InvalidArgument, match=r"\[0, 1\)"):
            Client(server.endpoint, rank=1)


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpager", "serve", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)


def test_serve_refuses_bad_rank_settings():
    endpoint, _ = ipc_endpoint()
    base = [*GEOMETRY[:-2], "--endpoint", endpoint]
    cases = [
        (["--devices", "cpu,cpu,cpu"], "cannot be split over 3 ranks"),
        (["--devices", "cuda:0,cuda:0"], "appears twice"),
        (["--devices", "cpu,cuda:0"], "must all be 'cpu'"),
        (["--devices", "cpu,cpu", "--device", "cpu"], "not both"),
        (["--devices", "cpu,cpu", "--ranks", "4"], "--ranks 4 but --devices names 2"),
        (["--device", "cpu", "--ranks", "3"], "cannot be split over 3 ranks"),
    ]
    for extra, message in cases:
        res = run_serve(*base, *extra)
        assert res.returncode != 0 and message in res.stderr, (extra, res.stderr[-2000:])


def test_serve_ranks_and_memory_per_device():
    endpoint, _ = ipc_endpoint()
    args = [*GEOMETRY[:10], "--memory", str(40 * SPEC.bytes_per_block), "--device", "cpu", "--ranks", "2"]
    with daemon_process(args, endpoint), Client(endpoint, rank=1) as c:
        # the CPU is one device: its budget is split between the ranks, half of each block each
        assert c.ranks == 2 and c.pool_spec.num_blocks == 40
        assert c.spec.bytes_per_block * 2 == SPEC.bytes_per_block


def test_memory_is_each_gpus_budget(monkeypatch):
    """--memory on a TP group: each GPU gives its budget, the tightest decides;
    a rank holds 1/R of every block, so the pool holds R times what one GPU fits."""
    from kvpager import sizing
    from kvpager.serve_options import build_spec

    free = {"cuda:0": 80 << 30, "cuda:1": 40 << 30}
    monkeypatch.setattr(sizing, "gpu_free_bytes", lambda device: free[device])
    opts = dict(model="llama-3-70b", layers=None, kv_heads=None, head_dim=None, dtype=None, block_size=None,
                blocks=None, memory="0.5", host_blocks=None, host_memory=None)
    spec = build_spec(opts, "cuda:0", ["cuda:0", "cuda:1"])
    per_rank = spec.bytes_per_block // 2  # 2.5 MiB of a 5 MiB block
    assert spec.num_blocks == (20 << 30) // per_rank == 8192
    assert build_spec(opts, "cuda:1").num_blocks == (20 << 30) // spec.bytes_per_block  # one GPU holds all heads
    opts["kv_heads"] = 3
    with pytest.raises(InvalidArgument, match="cannot be split over 2 ranks"):
        build_spec(opts, "cuda:0", ["cuda:0", "cuda:1"])


def test_metrics_name_the_ranks():
    from test_metrics import scrape

    with running_server(SPEC, devices=["cpu", "cpu"], metrics_port=0) as server:
        got = scrape(server.metrics_port)
        assert got[("kvpager_ranks", frozenset())] == 2
        [info] = [labels for name, labels in got if name == "kvpager_info"]
        assert ("device", "cpu,cpu") in info


def test_a_rank_worker_without_the_mapping_writes_into_its_drivers_sequences():
    """A rank session's staged `write` takes rank r's heads (docs/protocol.md, "Ranks")
    into the sequences its driver holds, as a mapped rank worker's does: it was
    refused (no sequence of its own session), so a worker that could not map the
    pool could not serve a rank. Blocks no sequence holds, and published ones, are not."""
    from kvpager.errors import NotOwner

    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        with Client(ep) as driver, Client(ep, rank=0, map_pool=False, driver=driver) as r0, \
                Client(ep, rank=1, driver=driver.session) as r1:
            [a] = driver.allocate([list(range(2 * SPEC.block_size + 3))])
            heads = SPEC.num_kv_heads // 2
            rng = np.random.default_rng(3)
            k = rng.standard_normal((len(a.slots), heads, SPEC.head_dim)).astype(np.float32)
            v = rng.standard_normal((len(a.slots), heads, SPEC.head_dim)).astype(np.float32)
            r0.write(0, a.slots, k, v)  # staged, through the daemon
            r1.write(0, a.slots, k, v)  # mapped
            q = rng.standard_normal((1, 4, SPEC.head_dim)).astype(np.float32)
            assert np.array_equal(r0.attend(0, [a.seq_id], q), r1.attend(0, [a.seq_id], q))
            free = next(b for b in range(1, SPEC.num_blocks) if b not in a.block_table)
            with pytest.raises(NotOwner, match="not held by any sequence of this session or its driver"):
                r0.write(0, np.arange(free * SPEC.block_size, free * SPEC.block_size + 3), k[:3], v[:3])
            driver.commit(a.seq_id)
            with pytest.raises(NotOwner, match="published"):
                r0.write(0, a.slots[:3], k[:3], v[:3])
            driver.check_integrity()


def test_a_client_that_names_a_rank_writes_into_no_other_sessions_sequences():
    """On a pool of several ranks a rank session's staged write went into any
    sequence's blocks: any client with the socket said hello with a rank and
    overwrote another session's K/V. Now a rank worker writes into its own
    sequences and those of the driver it names (that session's secret); a
    driver that is not open, or named without a rank, is refused at hello."""
    from kvpager.errors import NotOwner, SessionLost

    with running_server(SPEC, devices=["cpu", "cpu"]) as server:
        ep = server.endpoint
        with Client(ep) as victim, Client(ep, rank=1, driver=victim) as worker, Client(ep, rank=1) as stranger, \
                Client(ep) as other:
            [a] = victim.allocate([list(range(10))])
            heads = SPEC.num_kv_heads // 2
            ones = np.ones((len(a.slots), heads, SPEC.head_dim), np.float32)
            worker.write(0, a.slots, ones, ones)  # (mapped)
            worker.remote_write(0, a.slots, ones, ones)  # (staged: the daemon checks it)
            with pytest.raises(NotOwner, match="not held by any sequence of this session"):
                stranger.remote_write(0, a.slots, 0 * ones, 0 * ones)
            with Client(ep, rank=0, driver=other, map_pool=False) as others, pytest.raises(NotOwner):
                others.remote_write(0, a.slots, 0 * ones, 0 * ones)  # another session's worker
            k = worker.kv(0)[0]  # [blocks, heads, block_size, head_dim]: the victim's first block, all ones
            np.testing.assert_array_equal(np.asarray(k[a.block_table[0]]), 1.0)  # nothing overwritten
            with pytest.raises(SessionLost):
                Client(ep, rank=0, driver="not-a-session")
            with pytest.raises(InvalidArgument, match="driver"):
                Client(ep, driver=victim)  # (no rank)
            victim.check_integrity()


def _kv(seed: int, n: int, heads: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((n, heads, SPEC.head_dim)).astype(np.float32) for _ in range(2))


def test_a_rank_worker_past_its_session_writes_nothing():
    """A rank worker writes its heads into its driver's sequences through the
    mapped pool, its slots unchecked here (they are the driver's); but closed,
    told its session is lost, or stopped past the heartbeat timeout with its
    driver (the daemon then gave their blocks to another session), it wrote on
    into them, where a one-rank worker gets SessionLost (docs/protocol.md,
    "Trust"). Each now gets SessionLost, and the other session's K/V stays."""
    import time

    from kvpager.errors import SessionLost

    heads = SPEC.num_kv_heads // 2
    with running_server(SPEC, devices=["cpu", "cpu"], heartbeat_timeout=1.0) as server:
        ep = server.endpoint
        driver = Client(ep, heartbeat=False)  # (driver and worker stopped together: no beats)
        worker = Client(ep, rank=0, driver=driver, heartbeat=False)
        [x] = driver.allocate([list(range(12))])
        k, v = _kv(1, 12, heads)
        worker.write(0, x.slots, k, v)
        time.sleep(2.5)  # both sessions expire; their blocks are free
        with Client(ep) as victim, Client(ep, rank=0, driver=victim) as victim_worker:
            [y] = victim.allocate([list(range(500, 512))])
            assert list(y.block_table) == list(x.block_table)  # the same blocks, another session's now
            vk, vv = _kv(2, 12, heads)
            victim_worker.write(0, y.slots, vk, vv)
            with pytest.raises(SessionLost):
                worker.write(0, x.slots, np.zeros_like(k), np.zeros_like(v))  # the stopped worker resumes
            with pytest.raises(SessionLost):  # (and once it knows)
                worker.write(0, x.slots, np.zeros_like(k), np.zeros_like(v))
            worker.close()
            with pytest.raises(SessionLost, match="closed"):
                worker.write(0, x.slots, np.zeros_like(k), np.zeros_like(v))
            held = np.asarray(victim_worker.kv(0)[0][y.block_table[0]])  # [heads, block_size, dim]
            assert np.array_equal(held.transpose(1, 0, 2), vk[: SPEC.block_size])
        driver.close()
        server.pool.check_integrity()


def test_a_rank_worker_follows_its_driver_across_a_restart():
    """A rank worker given its driver's Client, after the daemon restarted and the
    driver reconnected: its own reconnect sent the driver's first secret, which no
    daemon knew, and failed for good. It names the driver's current session now,
    and writes into the driver's new sequences."""
    import shutil

    from daemon_helpers import wait_until

    from kvpager.errors import SessionLost
    from kvpager.server import Server

    endpoint, tmp = ipc_endpoint()
    server = Server.create(SPEC, endpoint, devices=["cpu", "cpu"]).start()
    try:
        driver = Client(endpoint, timeout=5)
        worker = Client(endpoint, rank=1, driver=driver, timeout=5)
        server.stop()
        server = Server.create(SPEC, endpoint, devices=["cpu", "cpu"]).start()
        for c in (driver, worker):
            with pytest.raises(SessionLost):
                assert wait_until(lambda c=c: c.stats() is None, 10)  # (until the restart is seen)
        driver.reconnect()
        worker.reconnect()
        [x] = driver.allocate([list(range(12))])
        k, v = _kv(3, 12, SPEC.num_kv_heads // 2)
        worker.write(0, x.slots, k, v)
        held = np.asarray(worker.kv(0)[0][x.block_table[0]])  # rank 1's heads of the driver's block
        assert np.array_equal(held.transpose(1, 0, 2), k[: SPEC.block_size])
        worker.close()
        driver.close()
        server.pool.check_integrity()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_one_rank_daemons_worker_with_a_driver_writes_mapped_as_staged():
    """A one-rank daemon takes rank 0 and a driver: the worker's staged writes into
    its driver's sequences were taken, its mapped writes (and a plan's slots)
    refused as foreign ("slots kept from before a free"). Both paths are taken now,
    the same K/V landing; into another session's sequence the staged write is
    still refused by the daemon."""
    from kvpager.errors import NotOwner

    with running_server(SPEC) as server:
        ep = server.endpoint
        with Client(ep) as driver, Client(ep, rank=0, driver=driver) as worker, Client(ep) as other:
            [x] = driver.allocate([list(range(12))])
            [y] = other.allocate([list(range(100, 112))])
            k, v = _kv(4, 12, SPEC.num_kv_heads)
            worker.write(0, x.slots, k, v)
            plan = worker.plan([x.seq_id], query_lens=[12], slots=x.slots)
            plan.write(1, k, v)
            held = np.asarray(worker.kv(0)[0][x.block_table[0]])
            assert np.array_equal(held.transpose(1, 0, 2), k[: SPEC.block_size])
            assert np.array_equal(np.asarray(worker.kv(1)[0][x.block_table[0]]), held)
            with pytest.raises(NotOwner):
                worker.remote_write(0, y.slots, k, v)
            server.pool.check_integrity()
