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


def _daemon(endpoint: str, ready) -> None:
    from kvpager.server import Server

    server = Server.create(SPEC, endpoint, heartbeat_timeout=60)
    server.bind()
    ready.put(server.endpoint)
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


def _start(target, endpoint: str):
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=target, args=(endpoint, ready), daemon=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--iters", type=int, default=5000, help="single-op round trips per measurement")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    ap.add_argument("--clients", default="1,4,16")
    args = ap.parse_args()

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
