"""Soak: 32 worker processes doing random ops for a minute against a daemon
that is restarted twice (SIGTERM, then SIGKILL) while workers are SIGKILLed
and replaced. No internal error, a consistent allocator, nothing leaked."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from daemon_helpers import daemon_process, ipc_endpoint, subprocess_env, wait_until
from soak_helpers import Crew, drained

from kvpager.client import Client

pytestmark = pytest.mark.slow

SECONDS = 60.0
WORKERS = 32
HEARTBEAT = 2.0
DAEMON = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--blocks", "768",
          "--host-blocks", "64", "--device", "cpu", "--heartbeat-timeout", str(HEARTBEAT)]


def test_soak_with_kills_and_restarts():
    endpoint, _ = ipc_endpoint()
    rng = random.Random(11)
    start = time.monotonic()
    end = start + SECONDS
    crew = Crew(endpoint, WORKERS, SECONDS)
    try:
        for phase, stop in enumerate((signal.SIGTERM, signal.SIGKILL, None)):
            with daemon_process(DAEMON, endpoint) as daemon:
                phase_end = min(end, start + (phase + 1) * SECONDS / 3)
                while time.monotonic() < phase_end:
                    time.sleep(min(3.0, max(0.0, phase_end - time.monotonic())))
                    crew.replace_one(rng)
                if stop is None:
                    results = crew.results(timeout=60)
                    drained(endpoint, HEARTBEAT + 5, daemon.log)  # the killed workers' sessions time out
                else:
                    daemon.send_signal(stop)
                    daemon.wait(30)
    finally:
        crew.close()
    killed = crew.killed
    totals = sum((Counter(r["counts"]) for r in results), Counter())
    print(f"soak: {killed} workers killed, 2 daemon restarts; ops {dict(totals)}")
    bugs = [b for r in results for b in r["bugs"]]
    assert not bugs, bugs[:10]
    ok = sum(r["counts"].get("ok", 0) for r in results)
    assert killed >= 10 and ok > 1000, (killed, ok)
    assert sum(r["counts"].get("unavailable", 0) + r["counts"].get("lost", 0) for r in results) > 0


def test_sigkilled_workers_blocks_come_back_within_the_heartbeat_timeout():
    """A worker killed with SIGKILL: its blocks are free again within the
    heartbeat timeout + 1 s."""
    endpoint, _ = ipc_endpoint()
    with daemon_process(DAEMON, endpoint), Client(endpoint) as obs:
        code = (f"from kvpager.client import Client; import time; c = Client({endpoint!r}); "
                "c.allocate([list(range(64))] * 4); print('ready', flush=True); time.sleep(60)")
        worker = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE, text=True)
        try:
            assert worker.stdout.readline().strip() == "ready"
            assert obs.stats().used_blocks == 16
            worker.kill()
            killed = time.monotonic()
            assert wait_until(lambda: obs.stats().used_blocks == 0, timeout=HEARTBEAT + 10, interval=0.02)
            assert time.monotonic() - killed <= HEARTBEAT + 1.0
        finally:
            worker.kill()
            worker.wait(10)
