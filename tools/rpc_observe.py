"""`bench_rpc.py --observability`: the daemon without and with metrics + KV
events, both running at once and timed alternately, request by request
(`Server.handle` in process, then raw round trips to two daemons), while other
processes commit, scrape /metrics and read the event stream."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import tempfile
import time
from datetime import date

import numpy as np
from rpc_common import CUT_EVERY, PROMPT, SPEC, bodies, percentiles, run_daemon, spawn

from kvpager import KVPool


def _ab_steps(calls: dict, iters: int, batch: int, what: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Decode steps (append x1, x``batch``) on two daemons, ``calls[mode](body)``
    answering a packed request with the reply's bytes, timed alternately
    request by request (the order swapped every step), so both see the same
    machine at the same moments. {mode: {measurement: (p50, p99)}}."""
    from kvpager import protocol

    ids = iter(range(1, 10**9))

    def call(mode, op, args, session=None):
        reply = protocol.unpack(calls[mode](protocol.pack([protocol.VERSION, next(ids), session, op, args])))
        assert reply[1] == 0, reply
        return reply[2]

    sessions = {mode: call(mode, "hello", {"client": "bench", "pid": os.getpid()})["session"] for mode in calls}
    lat: dict[str, dict[str, list[float]]] = {mode: {} for mode in calls}
    clock = time.perf_counter
    for n in (1, batch):
        steps, cuts = {}, {}
        for mode, session in sessions.items():
            seqs = [a[0] for a in call(mode, "allocate", {"prompts": [PROMPT] * n}, session)]
            steps[mode] = bodies(ids, session, "append", {"seq_ids": seqs}, iters)
            cuts[mode] = bodies(ids, session, "truncate", {"seq_ids": seqs, "lengths": len(PROMPT)},
                                 iters // CUT_EVERY + 1)
            assert len(protocol.unpack(calls[mode](next(steps[mode])))[2]) == 8 * n, "append returned wrong slots"
            lat[mode][f"{what} append x{n}"] = []
        order = (list(calls), list(calls)[::-1])
        for i in range(1, iters):
            for mode in order[i % 2]:
                if i % CUT_EVERY == 0:
                    calls[mode](next(cuts[mode]))
                body = next(steps[mode])
                t0 = clock()
                calls[mode](body)
                lat[mode][f"{what} append x{n}"].append(clock() - t0)
    return {mode: {k: percentiles(v) for k, v in d.items()} for mode, d in lat.items()}


def handle_ab(iters: int, batch: int, tmp: str) -> dict[str, dict[str, tuple[float, float]]]:
    """`Server.handle` (no socket) on two servers in this process, without and
    with metrics + KV events (bound: their HTTP and events threads run)."""
    from kvpager.events_pub import EventsConfig
    from kvpager.server import Server

    servers = {"off": Server(KVPool(SPEC), f"ipc://{tmp}/ab-off.sock"),
               "on": Server(KVPool(SPEC), f"ipc://{tmp}/ab-on.sock", metrics_port=0,
                            events=EventsConfig(f"ipc://{tmp}/ab-events.sock"))}
    try:
        for server in servers.values():
            server.bind()
        return _ab_steps({mode: server.handle for mode, server in servers.items()}, iters, batch, "handle")
    finally:
        for server in servers.values():
            server.close()


def raw_ab(endpoints: dict[str, str], iters: int, batch: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Round trips from bare DEALER sockets to two daemons, alternately."""
    import zmq

    socks = {}
    for mode, ep in endpoints.items():
        sock = socks[mode] = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep)

    def caller(sock):
        def call(body: bytes) -> bytes:
            sock.send(body)
            return sock.recv()
        return call

    try:
        return _ab_steps({mode: caller(sock) for mode, sock in socks.items()}, iters, batch, "raw")
    finally:
        for sock in socks.values():
            sock.close()


def _background(endpoint: str, metrics_port: int | None, events: str | None, stop, out) -> None:
    """What else happens during the comparison, in a process of its own (its
    threads must not share the timing process's interpreter): another worker
    committing a 4-block prompt every 20 ms on the daemon (events to publish,
    in both runs) and, on the observed daemon, a Prometheus-like scraper
    (/metrics every second) and a KV event subscriber. Puts its counts on
    ``out`` once ``stop`` is set."""
    import threading
    import urllib.request

    import zmq

    from kvpager.client import Client

    counts = {"commits": 0, "scrapes": 0, "batches": 0}

    def commit():
        with Client(endpoint, heartbeat=False) as c:
            while not stop.wait(0.02):
                n = counts["commits"]
                [a] = c.allocate([list(range(n * 64, n * 64 + 64))])
                c.commit([a.seq_id])
                c.free([a.seq_id])
                counts["commits"] += 1

    def scrape():
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
                assert b"kvpager_requests_total" in r.read()
            counts["scrapes"] += 1
            if stop.wait(1.0):
                return

    def subscribe():
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(events)
        while not stop.is_set():
            if sub.poll(100):
                sub.recv_multipart()
                counts["batches"] += 1
        sub.close(0)

    jobs = (commit, scrape, subscribe) if metrics_port is not None else (commit,)
    threads = [threading.Thread(target=f, daemon=True) for f in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(counts)


def observability(iters: int, batch: int, rounds: int) -> dict:
    """The daemon without and with metrics + KV events, ``rounds`` times: both
    daemons run at once and are timed alternately (`_ab_steps`)."""
    sockets = tempfile.TemporaryDirectory(prefix="kvpo", dir="/tmp")  # removed when done (or collected)
    tmp = sockets.name
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {"off": {}, "on": {}}
    watched = {"scrapes": 0, "batches": 0, "commits": 0}
    for r in range(rounds):
        out = handle_ab(iters, batch, tmp)
        observe = f"{tmp}/on{r}"
        os.makedirs(observe)
        off_proc, off_ep = spawn(run_daemon, f"ipc://{tmp}/off{r}.sock")
        on_proc, (on_ep, port, events) = spawn(run_daemon, f"ipc://{tmp}/on{r}.sock", observe)
        ctx = mp.get_context("spawn")
        stop, counts = ctx.Event(), ctx.Queue()
        background = [ctx.Process(target=_background, args=(ep, p, e, stop, counts), daemon=True)
                      for ep, p, e in ((off_ep, None, None), (on_ep, port, events))]
        for b in background:
            b.start()
        time.sleep(1.0)  # spawned: let them start
        try:
            for mode, d in raw_ab({"off": off_ep, "on": on_ep}, iters, batch).items():
                out[mode].update(d)
        finally:
            stop.set()
            for _ in background:
                for k, n in counts.get(timeout=60).items():
                    watched[k] += n
            for b in background:
                b.join(10)
            for proc in (off_proc, on_proc):
                proc.terminate()
                proc.join(10)
        for mode, d in out.items():
            for k, v in d.items():
                runs[mode].setdefault(k, []).append(v)
    sockets.cleanup()
    result = {"machine": f"{os.cpu_count()}-core CPU, {platform.python_implementation()} "
                         f"{platform.python_version()}", "date": str(date.today()), "rounds": rounds,
              "watchers": watched, "rows": []}
    for k in runs["off"]:
        off = float(np.median([p50 for p50, _ in runs["off"][k]]))
        on = float(np.median([p50 for p50, _ in runs["on"][k]]))
        off99 = float(np.median([p99 for _, p99 in runs["off"][k]]))
        on99 = float(np.median([p99 for _, p99 in runs["on"][k]]))
        # each round times both daemons together: the median of the rounds' differences
        delta = float(np.median([a[0] - b[0] for a, b in zip(runs["on"][k], runs["off"][k])]))
        result["rows"].append({"measurement": k, "off_p50_us": off, "on_p50_us": on, "delta_p50_us": delta,
                               "off_p99_us": off99, "on_p99_us": on99,
                               "on_p50_each_round": [p for p, _ in runs["on"][k]],
                               "off_p50_each_round": [p for p, _ in runs["off"][k]]})
    return result
