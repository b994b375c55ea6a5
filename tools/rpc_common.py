"""What `bench_rpc.py`'s measurements share: the pool (`SPEC`), the prompt and
the cut schedule, a daemon in a spawned process, packed requests, timed steps
and their p50 / p99, and the checked decode-step ops of a `KVPool` or a
`Client` (`pool_ops`, `step_ops`)."""

from __future__ import annotations

import multiprocessing as mp
import time

import numpy as np

from kvpager import PoolSpec

SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=40_000, block_size=16, dtype="float32")
PROMPT = list(range(100))  # 7 blocks
CUT_EVERY = 256  # steps between (untimed) truncations back to the prompt


def run_daemon(endpoint: str, ready, observe: str | None = None) -> None:
    """A daemon; with ``observe`` (a directory) also metrics and KV events there."""
    from kvpager.events_pub import EventsConfig
    from kvpager.server import Server

    extra = dict(metrics_port=0, events=EventsConfig(f"ipc://{observe}/events.sock")) if observe else {}
    server = Server.create(SPEC, endpoint, heartbeat_timeout=60, **extra)
    server.bind()
    ready.put((server.endpoint, server.metrics_port, server.events and server.events.endpoint) if observe
              else server.endpoint)
    server.run()


def spawn(target, endpoint: str, *args):
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=target, args=(endpoint, ready, *args), daemon=True)
    proc.start()
    return proc, ready.get(timeout=60)


def percentiles(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples[len(samples) // 10 :]) * 1e6  # drop warm-up
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def bodies(ids, session, op: str, args: dict, n: int):
    """``n`` packed requests, each with a new request id, as an iterator."""
    from kvpager.protocol import VERSION, pack

    return iter([pack([VERSION, next(ids), session, op, args]) for _ in range(n)])


def time_steps(step, cut, iters: int) -> list[float]:
    lat = []
    clock = time.perf_counter
    for i in range(iters):
        if i % CUT_EVERY == CUT_EVERY - 1:
            cut()
        t0 = clock()
        step()
        lat.append(clock() - t0)
    return lat


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


def step_ops(pool, batch: int, staggered: bool = False):
    """(a pipelined decode step of ``batch`` sequences as three calls: `append_flat` of
    one slot each without ids, `record_tokens` of one id each, `commit`; the same step
    as one `batch` request, or None where the pool has none; cut) for a KVPool or a
    Client, checked once. ``staggered``: the prompts' lengths differ (100 + i % 16),
    so every step one in 16 sequences completes a block (a commit publishes it) and
    one in 16 starts a new one, as in a running batch; otherwise all sequences
    cross a block boundary in the same step, one step in 16."""
    prompts = [PROMPT + PROMPT[: i % 16] for i in range(batch)] if staggered else [PROMPT] * batch
    many = [a.seq_id for a in pool.allocate(prompts)]
    toks = [[7]] * batch
    n = [len(p) for p in prompts] if staggered else len(PROMPT)

    def calls():
        pool.append_flat(many)
        pool.record_tokens(many, toks)
        return pool.commit(many)

    batched = None
    if "batch" in getattr(pool, "ops", ()):
        def batched():
            return pool.batch([("append_flat", many, 1), ("record_tokens", many, toks), ("commit", many)])

        slots, recorded, published = batched()
        assert len(slots) == batch and recorded is None and len(published) == batch, "batch answered wrongly"
    assert len(calls()) == batch
    pool.truncate(many, n)
    return calls, batched, lambda: pool.truncate(many, n)
