"""Soak with the remote tier and KV events on: the soak test's workers doing
random ops against a daemon whose committed blocks go to a Redis Cluster and
whose KV events go out to replay readers that re-request the whole history
in a loop. One master is paused (SIGSTOP) for a while mid-run; the daemon is
restarted twice (SIGTERM, then SIGKILL) while workers are SIGKILLed and
replaced. No worker bug, no traceback or error in the daemon's log, a
consistent allocator, every session drained, the readers answered."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter

import pytest
import zmq
from daemon_helpers import daemon_process, ipc_endpoint
from redis_helpers import redis_cluster
from soak_helpers import Crew, drained

pytestmark = pytest.mark.slow

SECONDS = 45.0
WORKERS = 16
HEARTBEAT = 2.0
PAUSE = 6.0  # seconds one master is paused, in the second phase
END = (-1).to_bytes(8, "big", signed=True)


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
        crew = Crew(endpoint, WORKERS, SECONDS)
        stop, counts = threading.Event(), Counter()
        readers = [threading.Thread(target=_reader, args=(events + ".replay", stop, counts), daemon=True)
                   for _ in range(4)]
        master = nodes[1].proc.pid
        paused_at: float | None = None  # while the master is paused
        paused_once = False
        results, remote = [], None
        try:
            for phase, sig in enumerate((signal.SIGTERM, signal.SIGKILL, None)):
                with daemon_process(daemon_args, endpoint) as daemon:
                    if phase == 0:
                        for r in readers:
                            r.start()
                    phase_end = min(end, start + (phase + 1) * SECONDS / 3)
                    while time.monotonic() < phase_end:
                        time.sleep(min(2.0, max(0.0, phase_end - time.monotonic())))
                        if phase == 1 and not paused_once:
                            os.kill(master, signal.SIGSTOP)
                            paused_at, paused_once = time.monotonic(), True
                        if paused_at is not None and time.monotonic() - paused_at > PAUSE:
                            os.kill(master, signal.SIGCONT)
                            paused_at = None
                        crew.replace_one(rng)
                    if sig is None:
                        results = crew.results(timeout=90)
                        remote = drained(endpoint, HEARTBEAT + 10, daemon.log)
                        assert not any(" ERROR " in x for x in daemon.log), "".join(daemon.log)
                    else:
                        daemon.send_signal(sig)
                        daemon.wait(30)
        finally:
            if paused_at is not None:
                os.kill(master, signal.SIGCONT)
            stop.set()
            for r in readers:
                if r.is_alive():
                    r.join(10)
            crew.close()
    bugs = [b for r in results for b in r["bugs"]]
    assert not bugs, bugs[:10]
    ok = sum(r["counts"].get("ok", 0) for r in results)
    assert crew.killed >= 5 and ok > 500, (crew.killed, ok)
    assert counts["answers"] > 0 and counts["messages"] > counts["answers"], counts
    assert remote is not None and remote.written_blocks > 0, remote
