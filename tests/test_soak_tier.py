"""Soak with the remote tier and KV events on: the soak test's workers doing
random ops against a daemon whose committed blocks go to a Redis Cluster and
whose KV events go out to replay readers that re-request the whole history
in a loop. One master is paused (SIGSTOP) for a while mid-run; the daemon is
restarted twice (SIGTERM, then SIGKILL) while workers are SIGKILLed and
replaced. No worker bug, no traceback or error in the daemon's log, a
consistent allocator, every session drained, the readers answered."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import zmq
from daemon_helpers import daemon_process, ipc_endpoint, subprocess_env, wait_until
from redis_helpers import redis_cluster

from kvpager.client import Client

pytestmark = pytest.mark.slow

SECONDS = 45.0
WORKERS = 16
HEARTBEAT = 2.0
PAUSE = 6.0  # seconds one master is paused, in the second phase
END = (-1).to_bytes(8, "big", signed=True)


def _worker(endpoint: str, seed: int, seconds: float) -> subprocess.Popen:
    code = f"import soak_workers; soak_workers.main({endpoint!r}, {seed}, {seconds})"
    return subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)


def _reader(replay: str, stop: threading.Event, counts: Counter) -> None:
    """Asks for every kept batch again and again, reading each answer to its end
    marker (or for 2 s), over a new DEALER each time."""
    ctx = zmq.Context.instance()
    while not stop.is_set():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(replay)
        sock.send_multipart([b"", (0).to_bytes(8, "big")])
        until = time.monotonic() + 2.0
        while time.monotonic() < until and not stop.is_set():
            if sock.poll(100):
                frames = sock.recv_multipart()
                counts["messages"] += 1
                if len(frames) >= 2 and frames[-2] == END:
                    counts["answers"] += 1
                    break
        sock.close()


def test_soak_with_the_tier_and_events():
    rng = random.Random(26)
    with redis_cluster(3, node_timeout_ms=60_000) as nodes:  # no failover while a master is paused
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in nodes)
        endpoint, _ = ipc_endpoint()
        events = endpoint + ".events"
        daemon_args = ["--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32",
                       "--blocks", "768", "--host-blocks", "64", "--device", "cpu",
                       "--heartbeat-timeout", str(HEARTBEAT), "--remote", url, "--remote-timeout", "0.1",
                       "--events-endpoint", events]
        start = time.monotonic()
        end = start + SECONDS
        workers = [_worker(endpoint, k, SECONDS) for k in range(WORKERS)]
        stop, counts = threading.Event(), Counter()
        readers = [threading.Thread(target=_reader, args=(events + ".replay", stop, counts), daemon=True)
                   for _ in range(4)]
        paused = None  # when the master was paused
        killed, results, remote = 0, [], None
        try:
            for phase, sig in enumerate((signal.SIGTERM, signal.SIGKILL, None)):
                with daemon_process(daemon_args, endpoint) as daemon:
                    if phase == 0:
                        for r in readers:
                            r.start()
                    phase_end = min(end, start + (phase + 1) * SECONDS / 3)
                    while time.monotonic() < phase_end:
                        time.sleep(min(2.0, max(0.0, phase_end - time.monotonic())))
                        if phase == 1 and paused is None:
                            os.kill(nodes[1].proc.pid, signal.SIGSTOP)
                            paused = time.monotonic()
                        if paused is not None and paused > 0 and time.monotonic() - paused > PAUSE:
                            os.kill(nodes[1].proc.pid, signal.SIGCONT)
                            paused = 0.0
                        victim = rng.randrange(len(workers))
                        if workers[victim].poll() is None and time.monotonic() < end - 5:
                            workers[victim].kill()
                            workers[victim].wait(10)
                            killed += 1
                            workers[victim] = _worker(endpoint, 1000 + killed, end - time.monotonic())
                    if sig is None:
                        results = [json.loads(w.communicate(timeout=90)[0].strip().splitlines()[-1])
                                   for w in workers]
                        with Client(endpoint, timeout=30) as obs:
                            obs.check_integrity()
                            assert wait_until(lambda: obs.stats().num_sequences == 0, timeout=HEARTBEAT + 10)
                            obs.check_integrity()
                            remote = obs.remote_stats()
                        bad = [x for x in daemon.log if "Traceback" in x or " ERROR " in x]
                        assert not bad, "".join(daemon.log)
                    else:
                        daemon.send_signal(sig)
                        daemon.wait(30)
        finally:
            if paused:
                os.kill(nodes[1].proc.pid, signal.SIGCONT)
            stop.set()
            for r in readers:
                if r.is_alive():
                    r.join(10)
            for w in workers:
                if w.poll() is None:
                    w.kill()
                    w.wait(10)
    bugs = [b for r in results for b in r["bugs"]]
    assert not bugs, bugs[:10]
    ok = sum(r["counts"].get("ok", 0) for r in results)
    assert killed >= 5 and ok > 500, (killed, ok)
    assert counts["answers"] > 0 and counts["messages"] > counts["answers"], counts
    assert remote is not None and remote.written_blocks > 0, remote
