"""`bench_rpc.py`'s default measurements: the bare ZeroMQ + msgpack echo (the
floor), daemon round trips through a `Client` and from a bare DEALER socket,
the same ops in process, throughput of N client processes, and
`Server.handle`'s share without a socket."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
from rpc_common import (
    CUT_EVERY,
    PROMPT,
    SPEC,
    bodies,
    percentiles,
    pool_ops,
    spawn,
    step_ops,
    time_steps,
)

from kvpager import KVPool


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


def bare(endpoint: str, iters: int, clients: list[int], seconds: float) -> tuple[tuple[float, float], dict]:
    """Latency and throughput of the bare echo: the floor for everything else."""
    import msgpack
    import zmq

    proc, ep = spawn(_echo, endpoint)
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
    return percentiles(lat), tput


class RawSession:
    """A session on the daemon from a bare DEALER socket with msgpack (no `Client`)."""

    def __init__(self, endpoint: str, name: str):
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = iter(range(1, 10**9))
        self.session = None
        self.session = self.call("hello", {"client": name, "pid": os.getpid()})["session"]

    def call(self, op: str | None, args: dict | None, body: bytes | None = None):
        """One round trip (``body``: a request packed beforehand); the reply's result, checked."""
        import msgpack

        from kvpager.protocol import VERSION, pack

        self.sock.send(body or pack([VERSION, next(self.ids), self.session, op, args]))
        reply = msgpack.unpackb(self.sock.recv(), strict_map_key=False)
        assert reply[1] == 0, reply
        return reply[2]

    def decode_steps(self, n: int, iters: int, packed: bool = False):
        """``n`` new sequences and their decode steps: (appends, cuts back to the prompt),
        each request with a new id, packed before the clock starts (the daemon keeps
        recent replies by request id, and a repeated id would only replay one); the
        first append is made and checked. ``packed``: the ids as one int64 array (as
        a `Client` sends a batch), else a list of ints."""
        seqs = [a[0] for a in self.call("allocate", {"prompts": [PROMPT] * n})]
        ids = np.array(seqs, dtype=np.int64) if packed else seqs
        steps = bodies(self.ids, self.session, "append", {"seq_ids": ids}, iters + 1)
        cuts = bodies(self.ids, self.session, "truncate", {"seq_ids": seqs, "lengths": len(PROMPT)},
                      iters // CUT_EVERY + 1)
        assert len(self.call(None, None, next(steps))) == 8 * n, "append returned wrong slots"
        return steps, cuts


def raw(endpoint: str, iters: int, batch: int) -> dict[str, tuple[float, float]]:
    """Append round trips to the daemon from a bare DEALER socket (no Client); the
    batch's ids packed, as a `Client` sends them."""
    daemon = RawSession(endpoint, "bench-raw")
    out = {}
    for n in (1, batch):
        steps, cuts = daemon.decode_steps(n, iters, packed=n > 1)
        out[f"raw append x{n}"] = percentiles(time_steps(
            lambda steps=steps: daemon.call(None, None, next(steps)),
            lambda cuts=cuts: daemon.call(None, None, next(cuts)), iters))
    daemon.sock.close()
    return out


def paired(endpoint: str, echo_endpoint: str, iters: int, batch: int) -> dict[str, tuple[float, float]]:
    """The bare echo and the daemon's raw append of ``batch`` sequences, timed in
    pairs (one echo round trip, then one append, over and over), so both see the
    machine in the same state: on a shared or busy host, an echo timed minutes
    before the appends is not their floor. The pairs take turns between the
    append with packed ids (as a `Client` sends a batch) and with a list of ids;
    each append follows its own echo (a daemon request right after another one
    runs warm, and would look cheaper). Also the per-pair differences (append -
    echo), the daemon's cost over the transport."""
    import msgpack
    import zmq

    proc, ep = spawn(_echo, echo_endpoint)
    echo = zmq.Context.instance().socket(zmq.DEALER)
    echo.setsockopt(zmq.LINGER, 0)
    echo.connect(ep)
    daemon = RawSession(endpoint, "bench-paired")
    forms = {"packed ids": daemon.decode_steps(batch, iters, packed=True),
             "list ids": daemon.decode_steps(batch, iters, packed=False)}
    ping = msgpack.packb([1, 7, "0123456789abcdef", "append", {"seq_ids": [5]}])
    clock = time.perf_counter
    bare: dict[str, list[float]] = {name: [] for name in forms}
    appends: dict[str, list[float]] = {name: [] for name in forms}
    for i in range(iters):
        if i % CUT_EVERY == CUT_EVERY - 1:
            for _, cuts in forms.values():
                daemon.call(None, None, next(cuts))
        for name, (steps, _) in forms.items():
            t0 = clock()
            echo.send(ping)
            msgpack.unpackb(echo.recv())
            t1 = clock()
            daemon.call(None, None, next(steps))
            t2 = clock()
            bare[name].append(t1 - t0)
            appends[name].append(t2 - t1)
    echo.send(msgpack.packb([1, 0, None, "stop", {}]))
    echo.recv()
    echo.close()
    daemon.sock.close()
    proc.join(10)
    out = {"paired: bare echo": percentiles(bare["packed ids"] + bare["list ids"])}
    for name, lat in appends.items():
        out[f"paired: raw append x{batch}, {name}"] = percentiles(lat)
        out[f"paired: raw append x{batch}, {name} - echo, per pair"] = percentiles(
            [a - b for a, b in zip(lat, bare[name])])
    return out


def latencies(pool, iters: int, batch: int) -> dict[str, tuple[float, float]]:
    step1, cut1, step_b, cut_b, flat_b = pool_ops(pool, batch)
    out = {
        "append x1": percentiles(time_steps(step1, cut1, iters)),
        f"append x{batch}": percentiles(time_steps(step_b, cut_b, max(200, iters // 20))),
        f"append_flat x{batch}": percentiles(time_steps(flat_b, cut_b, max(200, iters // 20))),
    }
    calls, batched, cut = step_ops(pool, batch)
    many = max(200, iters // 20)
    out[f"step x{batch}: append, record_tokens, commit"] = percentiles(time_steps(calls, cut, many))
    if batched is not None:
        out[f"step x{batch}: the same as one batch"] = percentiles(time_steps(batched, cut, many))
    calls, batched, cut = step_ops(pool, batch, staggered=True)
    out[f"step x{batch}, staggered lengths: three calls"] = percentiles(time_steps(calls, cut, many))
    if batched is not None:
        out[f"step x{batch}, staggered lengths: one batch"] = percentiles(time_steps(batched, cut, many))
    if hasattr(pool, "heartbeat"):
        out["heartbeat"] = percentiles(time_steps(pool.heartbeat, lambda: None, iters))
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
    """p50 / p99 of `Server.handle` for append requests (no socket); the batch's
    ids packed, as a `Client` sends them, and as a list."""
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
    for n, form in ((1, "list"), (batch, "packed"), (batch, "list")):
        seqs = [a[0] for a in call("allocate", {"prompts": [PROMPT] * n}, session)]
        sent = np.array(seqs, dtype=np.int64) if form == "packed" else seqs
        steps = bodies(ids, session, "append", {"seq_ids": sent}, iters + 1)
        cuts = bodies(ids, session, "truncate", {"seq_ids": seqs, "lengths": len(PROMPT)}, iters // CUT_EVERY + 1)
        assert len(protocol.unpack(server.handle(next(steps)))[2]) == 8 * n, "append returned wrong slots"
        name = f"append x{n}" if n == 1 else f"append x{n} ({form} ids)"
        out[name] = percentiles(time_steps(lambda steps=steps: server.handle(next(steps)),
                                           lambda cuts=cuts: server.handle(next(cuts)), iters))
    return out
