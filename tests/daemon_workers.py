"""Worker-process bodies for the daemon tests (spawned: importable by name).

K/V and queries are deterministic functions of (seed, layer, position), so
the test process can rebuild the dense K/V and compute references itself."""

from __future__ import annotations

import random
import time

import numpy as np

from kvpager.client import Client
from kvpager.errors import NotSwapped, OutOfBlocks, SequenceSwapped

MAX_POSITIONS = 512


def dense_kv(seed: int, layer: int, n: int, heads: int, dim: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """K and V of positions [0, n) (n <= MAX_POSITIONS): each [n, heads, dim],
    the same values for a position whatever n is."""
    rng = np.random.default_rng([seed, layer])
    kv = rng.standard_normal((2, MAX_POSITIONS, heads, dim)).astype(dtype)
    return kv[0, :n], kv[1, :n]


def query(seed: int, layer: int, tokens: int, heads: int, dim: int, dtype: str) -> np.ndarray:
    return np.random.default_rng([seed, layer, 99]).standard_normal((tokens, heads, dim)).astype(dtype)


def write_positions(client: Client, seed: int, slots: np.ndarray, start: int, total: int) -> None:
    """Write K/V of positions [start, total) into ``slots`` through the mapped pool."""
    spec = client.spec
    for layer in range(spec.num_layers):
        k, v = dense_kv(seed, layer, total, spec.num_kv_heads, spec.head_dim, spec.dtype)
        client.write(layer, slots, k[start:total], v[start:total])


def prefix_writer(endpoint: str, prompt: list[int], seed: int, out, done) -> None:
    """Worker A: allocate the system prompt, write its K/V, commit, hold it until ``done``."""
    with Client(endpoint) as c:
        [a] = c.allocate([prompt])
        write_positions(c, seed, a.slots, 0, len(prompt))
        c.commit(a.seq_id)
        out.put({"seq_id": a.seq_id, "block_table": a.block_table, "session": c.session_name})
        done.wait(60)


def prefix_reader(endpoint: str, tokens: list[int], seed: int, num_q_heads: int, out, done) -> None:
    """Worker B: allocate prompt + suffix, write only the uncached K/V, attend
    locally and remotely (decode and a causal multi-token query)."""
    with Client(endpoint) as c:
        spec = c.spec
        [b] = c.allocate([tokens])
        write_positions(c, seed, b.slots, b.num_cached_tokens, len(tokens))
        c.commit(b.seq_id)
        res = {"seq_id": b.seq_id, "block_table": b.block_table, "cached": b.num_cached_tokens,
               "local": [], "remote": [], "local_multi": [], "remote_multi": []}
        qlen = len(tokens) - b.num_cached_tokens
        for layer in range(spec.num_layers):
            q = query(seed, layer, 1, num_q_heads, spec.head_dim, spec.dtype)
            res["local"].append(c.local_attend(layer, [b.seq_id], q))
            res["remote"].append(c.remote_attend(layer, [b.seq_id], q))
            qm = query(seed, layer, qlen, num_q_heads, spec.head_dim, spec.dtype)
            res["local_multi"].append(c.local_attend(layer, [b.seq_id], qm, [qlen]))
            res["remote_multi"].append(c.remote_attend(layer, [b.seq_id], qm, [qlen]))
        out.put(res)
        done.wait(60)


def holder(endpoint: str, n: int, out) -> None:
    """Allocate ``n`` sequences, report, then sleep until killed."""
    c = Client(endpoint)
    allocs = c.allocate([[i] * 37 for i in range(n)])
    out.put([a.seq_id for a in allocs])
    time.sleep(120)


def random_ops(endpoint: str, seed: int, seconds: float, out) -> None:
    """Many random batched ops for ``seconds``; reports op counts. Errors that are
    ordinary answers (out of blocks, swapped, ...) are counted, others raise."""
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    prefixes = [[7] * 32, [8] * 48]
    with Client(endpoint, timeout=30) as c:
        live: list[int] = []
        swapped: set[int] = set()
        while time.monotonic() < deadline:
            op = rng.choice(["allocate", "append", "append", "fork", "free", "truncate", "swap", "commit", "stats"])
            try:
                if op == "allocate" or not live:
                    op = "allocate"
                    prompts = [rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 40))]
                               for _ in range(rng.randrange(1, 5))]
                    live += [a.seq_id for a in c.allocate(prompts)]
                else:
                    batch = rng.sample(live, min(len(live), rng.randrange(1, 6)))
                    resident = [s for s in batch if s not in swapped]
                    if op == "append" and resident:
                        c.append(resident, rng.randrange(1, 20))
                    elif op == "commit" and resident:
                        c.commit(resident)
                    elif op == "fork" and resident:
                        live += [k for kids in c.fork(resident[:1], rng.randrange(1, 3)) for k in kids]
                    elif op == "free":
                        c.free(batch)
                        live = [s for s in live if s not in batch]
                        swapped -= set(batch)
                    elif op == "truncate" and resident:
                        infos = [c.sequence(s) for s in resident]
                        c.truncate(resident, [rng.randrange(0, i.num_tokens + 1) for i in infos])
                    elif op == "swap":
                        if swapped and rng.random() < 0.5:
                            back = list(swapped)[:2]
                            c.swap_in(back)
                            swapped -= set(back)
                        elif resident:
                            c.swap_out(resident)
                            swapped |= set(resident)
                    else:
                        c.stats()
                counts[op] = counts.get(op, 0) + 1
            except (OutOfBlocks, SequenceSwapped, NotSwapped) as e:
                counts[type(e).__name__] = counts.get(type(e).__name__, 0) + 1
            if len(live) > 24:  # keep the pool from filling for good
                c.free(live[:8])
                swapped -= set(live[:8])
                live = live[8:]
        out.put(counts)
