"""Shared pieces of the embedded pool's behaviour tests (`test_pool_*.py`): a
small pool, random K/V writes, a sequence's K/V read back through its block
table, and a snapshot of everything an op could change; prefix-cache keys
recomputed from their definition (`chain`) and what the cache holds (`published`)."""

from __future__ import annotations

import hashlib

import numpy as np

from kvpager import KVPool, PoolSpec

BS = 16


def make_pool(num_blocks=64, host=16, dtype="float32", layers=2) -> KVPool:
    return KVPool(PoolSpec(layers, 2, 64, num_blocks=num_blocks, block_size=BS, dtype=dtype, num_host_blocks=host))


def fill(pool: KVPool, slots: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = pool.spec
    for layer in range(s.num_layers):
        k = rng.standard_normal((len(slots), s.num_kv_heads, s.head_dim)).astype(s.np_dtype)
        v = rng.standard_normal((len(slots), s.num_kv_heads, s.head_dim)).astype(s.np_dtype)
        pool.write(layer, slots, k, v)


def seq_kv(pool: KVPool, seq_id: int) -> np.ndarray:
    """Dense K/V of a sequence read back through its block table: [tokens, layers, 2, H, D]."""
    info = pool.sequence(seq_id)
    kv = pool.backend.device_array()
    rows = [kv[info.block_table[p // BS], :, :, :, p % BS] for p in range(info.num_tokens)]
    return np.stack(rows) if rows else np.zeros((0,))


def snapshot(pool: KVPool):
    return pool.stats(), pool.blocks(), [(s.seq_id, s.block_table, s.num_tokens) for s in pool.sequences()]


def chain(tokens, bs: int, salt: bytes = b"") -> list[bytes]:
    """The keys of the full blocks of ``tokens``, from their definition (BLAKE2b over
    the parent key and the block's little-endian int64 ids)."""
    parent = hashlib.blake2b(b"kvpager-root\0" + salt, digest_size=16).digest()
    keys = []
    for i in range(len(tokens) // bs):
        block = np.asarray(tokens[i * bs : (i + 1) * bs], dtype="<i8").tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


def published(pool: KVPool) -> dict[bytes, int]:
    """The prefix cache: key -> block."""
    return dict(pool.manager.pool.cache.key_to_block)
