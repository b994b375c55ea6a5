"""Worker-process bodies for the tensor-parallel daemon tests (spawned:
importable by name). A rank worker opens `Client(rank=r)`, then runs the
commands the test sends: write its heads' share of deterministic K/V, attend
with its query heads (a step plan, local and remote attention), or hand back
its mapped storage. The K/V of a write is a function of (seed, layer,
position) over all heads (`daemon_workers.dense_kv`), so the test rebuilds
it for the NumPy twin."""

from __future__ import annotations

import traceback

import numpy as np
from daemon_workers import dense_kv, query

from kvpager.client import Client

WAIT = 240.0  # a bound: GPU workers compile kernels on their first attend


def heads_of(rank: int, per: int) -> slice:
    return slice(rank * per, (rank + 1) * per)


def rank_worker(endpoint: str, rank: int, device: str | None, inbox, outbox, driver: str | None = None) -> None:
    """Serve commands until "stop"; every reply is (tag, payload). ``driver``: the
    driver session's secret, which binds this worker's writes to its sequences."""
    try:
        if device is not None:  # a GPU worker: its rank's GPU is its current device
            import cupy

            cupy.cuda.Device(int(device.split(":")[1])).use()
        with Client(endpoint, rank=rank, driver=driver) as c:
            outbox.put(("hello", {"rank": c.rank, "ranks": c.ranks, "heads": c.spec.num_kv_heads,
                                  "pool_heads": c.pool_spec.num_kv_heads, "kind": c.memory["kind"],
                                  "device": c.device}))
            while True:
                cmd = inbox.get(timeout=WAIT)
                if cmd[0] == "stop":
                    break
                outbox.put(_run(c, rank, cmd))
    except Exception:
        outbox.put(("error", traceback.format_exc()))


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _run(c: Client, rank: int, cmd: tuple):
    spec, pool = c.spec, c.pool_spec
    h = heads_of(rank, spec.num_kv_heads)
    if cmd[0] == "write":  # K/V of positions [start, total) of content ``seed`` into ``slots``
        _, seed, slots, start, total = cmd
        for layer in range(spec.num_layers):
            k, v = dense_kv(seed, layer, total, pool.num_kv_heads, spec.head_dim, spec.dtype)
            c.write(layer, np.asarray(slots), np.ascontiguousarray(k[start:total, h]),
                    np.ascontiguousarray(v[start:total, h]))
        c.synchronize()
        return ("written", None)
    if cmd[0] == "attend":  # each sequence's last qlens tokens, this rank's query heads
        _, seed, seq_ids, qlens, num_q_heads = cmd
        hq = heads_of(rank, num_q_heads // (pool.num_kv_heads // spec.num_kv_heads))
        plan = c.plan(seq_ids, qlens)
        out = {"plan": [], "local": [], "remote": []}
        for layer in range(spec.num_layers):
            q = np.ascontiguousarray(query(seed, layer, sum(qlens), num_q_heads, spec.head_dim, spec.dtype)[:, hq])
            qd = q
            if c.gpu:
                import cupy

                qd = cupy.asarray(q)
            out["plan"].append(_host(plan.attend(layer, qd)))
            out["local"].append(_host(c.attend(layer, seq_ids, qd, qlens)))
            out["remote"].append(_host(c.remote_attend(layer, seq_ids, q, qlens)))
        return ("attended", out)
    if cmd[0] == "dump":  # this rank's mapped device pool (and host pool on the CPU)
        host = None if c.gpu else c.host_array().copy()
        return ("dump", (_host(c.device_array()).copy(), host))
    raise ValueError(f"unknown command {cmd[0]!r}")
