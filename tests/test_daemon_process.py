"""The daemon as a separate process, and workers that die without saying bye."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import pytest
from daemon_helpers import daemon_process, ipc_endpoint, running_server, subprocess_env, wait_until
from daemon_workers import holder

from kvpager.client import Client
from kvpager.errors import DaemonUnavailable

WAIT = 120


def test_sigkilled_worker_leaks_nothing():
    ctx = mp.get_context("spawn")
    with running_server(heartbeat_timeout=2.0) as server:
        out = ctx.Queue()
        worker = ctx.Process(target=holder, args=(server.endpoint, 5, out))
        worker.start()
        try:
            ids = out.get(timeout=WAIT)
            with Client(server.endpoint) as obs:
                assert {s.seq_id for s in obs.sequences()} == set(ids)
                assert obs.stats().used_blocks == 5 * 3
                os.kill(worker.pid, signal.SIGKILL)
                worker.join(WAIT)
                # freed within the heartbeat timeout (plus the expiry sweep period)
                assert wait_until(lambda: obs.stats().num_sequences == 0, timeout=30)
                st = obs.stats()
                assert st.used_blocks == 0 and st.free_blocks + st.evictable_blocks == st.total_blocks
                obs.check_integrity()
        finally:
            if worker.is_alive():
                worker.kill()
                worker.join(10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_subprocess_shuts_down_cleanly(sig):
    endpoint, d = ipc_endpoint()
    args = ["--model", "tiny", "--blocks", "64", "--host-memory", "256K", "--device", "cpu",
            "--heartbeat-timeout", "2"]
    with daemon_process(args, endpoint) as proc:
        with Client(endpoint) as c:
            assert c.spec.num_layers == 2 and c.spec.num_blocks == 64 and c.spec.num_host_blocks == 8
            segments = [c.memory["device"]["name"], c.memory["host"]["name"]]
            [a] = c.allocate([list(range(20))])
            k, v = c.kv(0)
            assert k.shape == (64, 2, 16, 64)
            c.check_integrity()
        assert all(os.path.exists(f"/dev/shm/{s}") for s in segments)
        proc.send_signal(sig)
        assert proc.wait(WAIT) == 0
    assert not os.path.exists(endpoint[len("ipc://"):])
    assert not any(os.path.exists(f"/dev/shm/{s}") for s in segments)
    assert any("shutting down" in line for line in proc.log)
    with pytest.raises(DaemonUnavailable):
        Client(endpoint, timeout=1)


def test_serve_refuses_a_loose_runtime_dir(tmp_path):
    rt = tmp_path / "rt"
    rt.mkdir(mode=0o755)
    os.chmod(rt, 0o755)
    env = subprocess_env()
    env["KVPAGER_RUNTIME_DIR"] = str(rt)
    env.pop("KVPAGER_ENDPOINT", None)
    r = subprocess.run([sys.executable, "-m", "kvpager", "serve", "--model", "tiny", "--blocks", "8",
                        "--device", "cpu"], env=env, capture_output=True, text=True, timeout=WAIT)
    assert r.returncode != 0 and "mode 755" in r.stderr


def test_serve_geometry_options():
    from kvpager.serve_options import build_spec, parse_size

    assert parse_size("4G") == 4 << 30 and parse_size("512k") == 512 << 10 and parse_size("100") == 100
    base = dict(model=None, layers=4, kv_heads=2, head_dim=64, block_size=None, dtype="float16",
                blocks=None, memory="1M", host_blocks=None, host_memory="512K")
    spec = build_spec(base)
    assert spec.num_blocks == (1 << 20) // spec.bytes_per_block and spec.num_host_blocks == spec.num_blocks // 2
    spec = build_spec({**base, "model": "llama-3-8b", "layers": None, "kv_heads": None, "head_dim": None,
                       "dtype": None, "memory": None, "blocks": 10, "host_memory": None, "host_blocks": 3})
    assert (spec.num_layers, spec.dtype, spec.num_blocks, spec.num_host_blocks) == (32, "bfloat16", 10, 3)
