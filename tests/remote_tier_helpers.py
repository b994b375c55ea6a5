"""What the remote tier's tests share: a pool of two "hosts"' geometry with a tier on
a store, a prefill of random K/V read back through its block table, a flush."""

from __future__ import annotations

import threading
import time

import numpy as np

from kvpager import KVPool, PoolSpec
from kvpager.remote_tier import RemoteTier

SPEC = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=48, block_size=16, dtype="float32")
BS = SPEC.block_size
WAIT = 20.0


def pool(url: str, spec: PoolSpec = SPEC, **tier) -> KVPool:
    tier.setdefault("retry_after", 0.2)
    return KVPool(spec, remote=RemoteTier(url, **tier))


def prefill(p: KVPool, prompt: list[int], seed: int, salt: str = "m") -> tuple[int, np.ndarray]:
    """Allocate, write random K/V for the uncached tokens, commit; the sequence and
    the whole K/V it holds per layer, [layers, 2, tokens, heads, dim]."""
    [a] = p.allocate([prompt], salt=salt)
    rng = np.random.default_rng(seed)
    shape = (len(a.slots), p.spec.num_kv_heads, p.spec.head_dim)
    for layer in range(p.spec.num_layers):
        k, v = rng.standard_normal(shape).astype(p.spec.np_dtype), rng.standard_normal(shape).astype(p.spec.np_dtype)
        p.write(layer, a.slots, k, v)
    p.commit(a.seq_id)
    return a.seq_id, kv_of(p, a.block_table, len(prompt))


def kv_of(p: KVPool, table, n: int) -> np.ndarray:
    """K/V of tokens [0, n) read from the pool through the block table."""
    blocks = np.asarray(table[: -(-n // BS)])
    kv = p.backend.device_array()[blocks]  # [nb, layers, 2, heads, bs, dim]
    return kv.transpose(1, 2, 0, 4, 3, 5).reshape(p.spec.num_layers, 2, -1, p.spec.num_kv_heads,
                                                 p.spec.head_dim)[:, :, :n]


def written(p: KVPool, n: int) -> bool:
    return p.remote.flush(WAIT) and p.remote_stats().written_blocks >= n


def expected_k(tokens: list[int]) -> np.ndarray:
    """K of each position as a function of the tokens up to it (a rolling hash):
    whoever computed a prefix, its K/V is the same, so a restored or shared block
    holds exactly these values."""
    out, h = np.empty(len(tokens), np.float32), 17
    for i, t in enumerate(tokens):
        h = (h * 1_000_003 + t + 1) % 16_777_213
        out[i] = h
    return out


def bounded(fn, limit: float, must: bool = True) -> tuple[float, object]:
    """``fn()`` on a thread, waited for at most ``limit`` seconds: (seconds, its
    result or the exception it raised); fails the test if it is still running
    (unless not ``must``: a cleanup that must not hold a failed test for ever)."""
    out: dict = {}

    def run() -> None:
        try:
            out["r"] = fn()
        except Exception as e:
            out["r"] = e

    t0 = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(limit)
    assert not (must and worker.is_alive()), f"still waiting after {limit} s"
    return time.monotonic() - t0, out.get("r")
