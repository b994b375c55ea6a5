"""Daemon round trips: latency and throughput of `Client` calls against the
same calls on an in-process `KVPool`, beside a bare ZeroMQ + msgpack echo.

    python3 tools/bench_rpc.py            # table
    python3 tools/bench_rpc.py --json     # one JSON object

What is timed (each op checked for correctness first):
- bare: a DEALER -> ROUTER echo of a request-sized msgpack message (the floor);
- heartbeat: a full daemon round trip that does no pool work;
- append x1: `append([seq])`, one decode step of one sequence;
- append x256: one batched decode step of 256 sequences (a list of 256 slot
  arrays back, as `append` returns);
- append_flat x256: the same step with every slot in one array back
  (`append_flat`, what a batched worker takes);
- throughput: N client processes each doing append x1 in a loop;
- raw append x1 / x256: the daemon's append round trip from a bare DEALER
  socket with msgpack, as the echo is timed (no `Client`: its own work, such
  as following its sequences' tables, stays out);
- daemon share: `Server.handle` of the same append requests in this process,
  no socket (decode, ownership check, allocator, encode): what the daemon
  adds to a round trip besides transport and the client's own work.
Sequences are cut back (untimed) every few hundred steps so block tables stay
decode-sized; the in-process column runs the same schedule on a `KVPool`.

    python3 tools/bench_rpc.py --observability [--rounds 5]

compares, in one run, the daemon without and with metrics and KV events
(`serve --metrics-port`, `--events-endpoint`): decode steps (append x1 and
x256) as raw round trips and as `Server.handle`'s share, sent to both
daemons alternately, request by request, so both see the same machine.
Meanwhile (from other processes) another worker commits a prompt on each
daemon every 20 ms, and the observed one has a scraper reading /metrics
every second and a subscriber reading its events. Figures: the median over rounds of each
round's p50, and the median of the rounds' differences (on - off).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from datetime import date

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvpager import KVPool, PoolSpec  # noqa: E402

SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=40_000, block_size=16, dtype="float32")
PROMPT = list(range(100))  # 7 blocks
CUT_EVERY = 256  # steps between (untimed) truncations back to the prompt


def _daemon(endpoint: str, ready, observe: str | None = None) -> None:
    """A daemon; with ``observe`` (a directory) also metrics and KV events there."""
    from kvpager.events_pub import EventsConfig
    from kvpager.server import Server

    extra = dict(metrics_port=0, events=EventsConfig(f"ipc://{observe}/events.sock")) if observe else {}
    server = Server.create(SPEC, endpoint, heartbeat_timeout=60, **extra)
    server.bind()
    ready.put((server.endpoint, server.metrics_port, server.events and server.events.endpoint) if observe
              else server.endpoint)
    server.run()


def _echo(endpoint: str, ready) -> None:
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    reply = msgpack.packb([1, 0, b"\0" * 8])
    while True:
        frames = sock.recv_multipart()
        msg = msgpack.unpackb(frames[1])
        if msg[3] == "stop":
            sock.send_multipart([frames[0], reply])
            return
        sock.send_multipart([frames[0], reply])


def _start(target, endpoint: str, *args):
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=target, args=(endpoint, ready, *args), daemon=True)
    proc.start()
    return proc, ready.get(timeout=60)


def _percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples[len(samples) // 10 :]) * 1e6  # drop warm-up
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _bodies(ids, session, op: str, args: dict, n: int):
    """``n`` packed requests, each with a new request id, as an iterator."""
    from kvpager.protocol import VERSION, pack

    return iter([pack([VERSION, next(ids), session, op, args]) for _ in range(n)])


def _time_steps(step, cut, iters: int) -> list[float]:
    lat = []
    clock = time.perf_counter
    for i in range(iters):
        if i % CUT_EVERY == CUT_EVERY - 1:
            cut()
        t0 = clock()
        step()
        lat.append(clock() - t0)
    return lat


def bare(endpoint: str, iters: int, clients: list[int], seconds: float) -> tuple[tuple[float, float], dict]:
    """Latency and throughput of the bare echo: the floor for everything else."""
    import msgpack
    import zmq

    proc, ep = _start(_echo, endpoint)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep)
    body = msgpack.packb([1, 7, "0123456789abcdef", "append", {"seq_ids": [5]}])
    lat = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sock.send(body)
        msgpack.unpackb(sock.recv())
        lat.append(time.perf_counter() - t0)
    tput = {n: throughput(ep, n, seconds, _bare_throughput_worker) for n in clients}
    sock.send(msgpack.packb([1, 0, None, "stop", {}]))
    sock.recv()
    sock.close()
    proc.join(10)
    return _percentiles(lat), tput


def raw(endpoint: str, iters: int, batch: int) -> dict[str, tuple[float, float]]:
    """Append round trips to the daemon from a bare DEALER socket (no Client)."""
    import msgpack
    import zmq

    from kvpager.protocol import VERSION, pack

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    ids = iter(range(1, 10**9))

    def call(op, args, session=None, body=None):
        sock.send(body or pack([VERSION, next(ids), session, op, args]))
        reply = msgpack.unpackb(sock.recv(), strict_map_key=False)
        assert reply[1] == 0, reply
        return reply[2]

    session = call("hello", {"client": "bench-raw", "pid": os.getpid()})["session"]
    out = {}
    for n in (1, batch):
        seqs = [a[0] for a in call("allocate", {"prompts": [PROMPT] * n}, session)]
        # Every request a new id, packed before the clock starts: the daemon keeps
        # recent replies by request id, and a repeated id would only replay one.
        steps = _bodies(ids, session, "append", {"seq_ids": seqs}, iters + 1)
        cuts = _bodies(ids, session, "truncate", {"seq_ids": seqs, "lengths": len(PROMPT)}, iters // CUT_EVERY + 1)
        assert len(call(None, None, body=next(steps))) == 8 * n, "append returned wrong slots"
        out[f"raw append x{n}"] = _percentiles(_time_steps(
            lambda steps=steps: call(None, None, body=next(steps)),
            lambda cuts=cuts: call(None, None, body=next(cuts)), iters))
    sock.close()
    return out


def pool_ops(pool, batch: int):
    """(single step, cut, batched step, cut, flat batched step) for a KVPool or a
    Client, checked once."""
    [one] = pool.allocate([PROMPT])
    many = [a.seq_id for a in pool.allocate([PROMPT] * batch)]
    n = len(PROMPT)
    [s] = pool.append([one.seq_id])
    assert s.tolist() == [one.block_table[n // 16] * 16 + n % 16], "append returned a wrong slot"
    out = pool.append(many)
    assert len(out) == batch and all(len(x) == 1 for x in out)
    flat = pool.append_flat(many)
    assert flat.tolist() == [int(x[0]) + 1 for x in out], "append_flat returned wrong slots"
    pool.truncate(many, n)
    return (
        lambda: pool.append([one.seq_id]),
        lambda: pool.truncate([one.seq_id], n),
        lambda: pool.append(many),
        lambda: pool.truncate(many, n),
        lambda: pool.append_flat(many),
    )


def latencies(pool, iters: int, batch: int) -> dict[str, tuple[float, float]]:
    step1, cut1, step_b, cut_b, flat_b = pool_ops(pool, batch)
    out = {
        "append x1": _percentiles(_time_steps(step1, cut1, iters)),
        f"append x{batch}": _percentiles(_time_steps(step_b, cut_b, max(200, iters // 20))),
        f"append_flat x{batch}": _percentiles(_time_steps(flat_b, cut_b, max(200, iters // 20))),
    }
    if hasattr(pool, "heartbeat"):
        out["heartbeat"] = _percentiles(_time_steps(pool.heartbeat, lambda: None, iters))
    return out


def _throughput_worker(endpoint: str, seconds: float, start, out) -> None:
    from kvpager.client import Client

    with Client(endpoint, timeout=60, heartbeat=False) as c:
        step, cut, *_ = pool_ops(c, 1)
        start.wait(60)
        n, deadline = 0, time.monotonic() + seconds
        while time.monotonic() < deadline:
            step()
            n += 1
            if n % CUT_EVERY == 0:
                cut()
        out.put(n)


def _bare_throughput_worker(endpoint: str, seconds: float, start, out) -> None:
    import msgpack
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    body = msgpack.packb([1, 7, "0123456789abcdef", "append", {"seq_ids": [5]}])
    start.wait(60)
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.send(body)
        msgpack.unpackb(sock.recv())
        n += 1
    out.put(n)


def throughput(endpoint: str, clients: int, seconds: float, worker=_throughput_worker) -> float:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(endpoint, seconds, start, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    time.sleep(1.0 + 0.25 * clients)  # let every worker connect and warm up (spawn is slow)
    start.set()
    total = sum(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    return total / seconds


def handle_cost(iters: int, batch: int) -> dict[str, tuple[float, float]]:
    """p50 / p99 of `Server.handle` for append requests (no socket)."""
    from kvpager import protocol
    from kvpager.server import Server

    server = Server(KVPool(SPEC), "ipc:///nonexistent/bench.sock")
    ids = iter(range(1, 10**9))

    def call(op, args, session=None):
        reply = protocol.unpack(server.handle(protocol.pack([protocol.VERSION, next(ids), session, op, args])))
        assert reply[1] == 0, reply
        return reply[2]

    session = call("hello", {"client": "bench", "pid": os.getpid()})["session"]
    out = {}
    for n in (1, batch):
        seqs = [a[0] for a in call("allocate", {"prompts": [PROMPT] * n}, session)]
        steps = _bodies(ids, session, "append", {"seq_ids": seqs}, iters + 1)
        cuts = _bodies(ids, session, "truncate", {"seq_ids": seqs, "lengths": len(PROMPT)}, iters // CUT_EVERY + 1)
        assert len(protocol.unpack(server.handle(next(steps)))[2]) == 8 * n, "append returned wrong slots"
        out[f"append x{n}"] = _percentiles(_time_steps(lambda steps=steps: server.handle(next(steps)),
                                                       lambda cuts=cuts: server.handle(next(cuts)), iters))
    return out


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
            steps[mode] = _bodies(ids, session, "append", {"seq_ids": seqs}, iters)
            cuts[mode] = _bodies(ids, session, "truncate", {"seq_ids": seqs, "lengths": len(PROMPT)},
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
    return {mode: {k: _percentiles(v) for k, v in d.items()} for mode, d in lat.items()}


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
    tmp = tempfile.mkdtemp(prefix="kvpo", dir="/tmp")
    runs: dict[str, dict[str, list[tuple[float, float]]]] = {"off": {}, "on": {}}
    watched = {"scrapes": 0, "batches": 0, "commits": 0}
    for r in range(rounds):
        out = handle_ab(iters, batch, tmp)
        observe = f"{tmp}/on{r}"
        os.makedirs(observe)
        off_proc, off_ep = _start(_daemon, f"ipc://{tmp}/off{r}.sock")
        on_proc, (on_ep, port, events) = _start(_daemon, f"ipc://{tmp}/on{r}.sock", observe)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--iters", type=int, default=5000, help="single-op round trips per measurement")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--observability", action="store_true",
                    help="only compare the daemon without and with metrics + KV events")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of that comparison")
    args = ap.parse_args()
    if args.observability:
        res = observability(args.iters, args.batch, args.rounds)
        if args.json:
            print(json.dumps(res, indent=2))
            return
        w = res["watchers"]
        print(f"machine: {res['machine']}; date: {res['date']}; {res['rounds']} rounds; meanwhile {w['commits']} "
              f"commits by another worker, {w['scrapes']} scrapes of /metrics, {w['batches']} event batches read")
        print("| measurement | p50 us, off | p50 us, on | on - off (median of rounds) | p99 us, off | p99 us, on |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in res["rows"]:
            print(f"| {row['measurement']} | {row['off_p50_us']:.1f} | {row['on_p50_us']:.1f} | "
                  f"{row['delta_p50_us']:+.1f} | {row['off_p99_us']:.1f} | {row['on_p99_us']:.1f} |")
        return

    from kvpager.client import Client

    tmp = tempfile.mkdtemp(prefix="kvpb", dir="/tmp")
    embedded = latencies(KVPool(SPEC), args.iters, args.batch)
    handled = handle_cost(args.iters, args.batch)
    rows, result = [], {"machine": f"{os.cpu_count()}-core CPU, {platform.python_implementation()} "
                                   f"{platform.python_version()}", "date": str(date.today()),
                        "in_process": embedded, "daemon_handle": handled, "transports": {}}
    for name, endpoint in (("ipc", f"ipc://{tmp}/bench.sock"), ("tcp", "tcp://127.0.0.1:0")):
        counts = [int(x) for x in args.clients.split(",")] if name == "ipc" else []
        bare_lat, bare_tput = bare(endpoint if name == "tcp" else f"ipc://{tmp}/echo.sock", args.iters,
                                   counts, args.seconds)
        proc, ep = _start(_daemon, endpoint)
        with Client(ep, heartbeat=False) as c:
            warm = time.monotonic() + 1.0  # untimed: let caches, clocks and the scheduler settle
            while time.monotonic() < warm:
                c.heartbeat()
            lat = latencies(c, args.iters, args.batch)
        lat.update(raw(ep, args.iters, args.batch))
        tput = {n: throughput(ep, n, args.seconds) for n in counts}
        proc.terminate()
        proc.join(10)
        result["transports"][name] = {"bare": bare_lat, "daemon": lat, "throughput_ops_s": tput,
                                      "bare_throughput_ops_s": bare_tput}
        rows.append((name, "bare zmq+msgpack echo", bare_lat, None))
        for op, (p50, p99) in lat.items():
            rows.append((name, op, (p50, p99), embedded.get(op)))
        for n, ops in tput.items():
            rows.append((name, f"append x1 throughput, {n} client{'s' * (n > 1)}", (ops, bare_tput[n]), None))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"machine: {result['machine']}; date: {result['date']}")
    print("daemon share, Server.handle without a socket: " + "; ".join(
        f"{op} p50 {p50:.1f} us, p99 {p99:.1f} us" for op, (p50, p99) in handled.items()))
    print("| transport | measurement | p50 us | p99 us | in-process p50 us | daemon / in-process |")
    print("|---|---|---:|---:|---:|---:|")
    for name, what, val, emb in rows:
        if "throughput" in what:
            print(f"| {name} | {what} | {val[0]:,.0f} ops/s | | (bare echo: {val[1]:,.0f} ops/s) | |")
            continue
        p50, p99 = val
        e = f"{emb[0]:.1f} | {p50 / emb[0]:.1f}x" if emb else " | "
        print(f"| {name} | {what} | {p50:.1f} | {p99:.1f} | {e} |")


if __name__ == "__main__":
    main()
