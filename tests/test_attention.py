"""Paged attention of the NumPy backend against a dense float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reference import TOLERANCE, attention, rel_err

from kvpager import KVPool, PoolSpec


class DenseMirror:
    """A pool plus a dense per-sequence copy of everything written to it."""

    def __init__(self, spec: PoolSpec, rng: np.random.Generator):
        self.pool = KVPool(spec)
        self.spec = spec
        self.rng = rng
        self.dense: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def _kv(self, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        s = self.spec
        shape = (s.num_layers, n, s.num_kv_heads, s.head_dim)
        k = self.rng.standard_normal(shape).astype(s.np_dtype)
        v = self.rng.standard_normal(shape).astype(s.np_dtype)
        return list(zip(k, v))

    def write(self, seq_id: int, slots: np.ndarray) -> None:
        new = self._kv(len(slots))
        for layer, (k, v) in enumerate(new):
            self.pool.write(layer, slots, k, v)
        old = self.dense.get(seq_id)
        if old is None:
            self.dense[seq_id] = new
        else:
            self.dense[seq_id] = [
                (np.concatenate([ok, k]), np.concatenate([ov, v])) for (ok, ov), (k, v) in zip(old, new)
            ]

    def new_seq(self, tokens: list[int]) -> int:
        [a] = self.pool.allocate([tokens])
        assert a.num_cached_tokens == 0
        self.write(a.seq_id, a.slots)
        return a.seq_id

    def extend(self, seq_id: int, n: int) -> None:
        [slots] = self.pool.append(seq_id, n)
        self.write(seq_id, slots)

    def fork(self, seq_id: int, n: int) -> list[int]:
        [kids] = self.pool.fork(seq_id, n)
        for c in kids:
            self.dense[c] = [(k.copy(), v.copy()) for k, v in self.dense[seq_id]]
        return kids

    def check(self, layer: int, seq_ids: list[int], query_lens: list[int], num_q_heads: int) -> float:
        s = self.spec
        total = sum(query_lens)
        q = self.rng.standard_normal((total, num_q_heads, s.head_dim)).astype(s.np_dtype)
        scale = 1.0 / math.sqrt(s.head_dim)
        out = self.pool.attend(layer, seq_ids, q, query_lens)
        assert out.shape == q.shape and out.dtype == s.np_dtype
        refs, start = [], 0
        for sid, ql in zip(seq_ids, query_lens):
            k, v = self.dense[sid][layer]
            refs.append(attention(q[start : start + ql], k, v, scale))
            start += ql
        return rel_err(out, np.concatenate(refs))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (64, 8)])
def test_decode_and_multi_token_match_reference(dtype, block_size, head_dim, group):
    rng = np.random.default_rng([block_size, head_dim, group, len(dtype)])
    kv_heads = 2
    spec = PoolSpec(2, kv_heads, head_dim, num_blocks=128, block_size=block_size, dtype=dtype)
    m = DenseMirror(spec, rng)
    # Lengths straddle block boundaries: exact multiples, one over, one under.
    lengths = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]
    seqs = [m.new_seq(list(rng.integers(0, 1000, n))) for n in lengths]
    # A grown sequence: prompt then appends that cross into new blocks.
    m.extend(seqs[2], 1)
    m.extend(seqs[4], block_size + 3)
    tol = TOLERANCE[dtype]
    for layer in range(2):
        assert m.check(layer, seqs, [1] * len(seqs), kv_heads * group) < tol
    # Multi-token causal queries of different lengths in one batch.
    qlens = [1, 3, block_size, 2, block_size + 4]
    assert m.check(1, seqs, qlens, kv_heads * group) < tol


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_forked_sequences_share_a_prefix(block_size):
    rng = np.random.default_rng(block_size)
    spec = PoolSpec(1, 2, 64, num_blocks=64, block_size=block_size, dtype="float32")
    m = DenseMirror(spec, rng)
    parent = m.new_seq(list(range(2 * block_size + 3)))  # last block partly full
    kids = m.fork(parent, 3)
    for i, c in enumerate(kids):
        m.extend(c, i + 1)  # copy-on-write of the shared last block, then diverge
    m.extend(parent, 2)
    seqs = [parent, *kids]
    assert m.check(0, seqs, [1] * 4, 8) < 1e-5
    assert m.check(0, seqs, [2, 1, 2, 3], 2) < 1e-5
    assert m.pool.stats().shared_blocks == 2  # the two full prefix blocks
    m.pool.check_integrity()


def test_random_shapes():
    rng = np.random.default_rng(7)
    for trial in range(12):
        block_size = int(rng.choice([8, 16, 32]))
        head_dim = int(rng.choice([64, 128]))
        group = int(rng.choice([1, 4, 8]))
        kv_heads = int(rng.integers(1, 3))
        spec = PoolSpec(1, kv_heads, head_dim, num_blocks=256, block_size=block_size, dtype="float32")
        m = DenseMirror(spec, rng)
        seqs = [m.new_seq(list(range(int(rng.integers(1, 5 * block_size))))) for _ in range(int(rng.integers(1, 6)))]
        for s in seqs:
            m.extend(s, int(rng.integers(0, 2 * block_size)))
        qlens = [int(rng.integers(1, min(m.pool.sequence(s).num_tokens, 9) + 1)) for s in seqs]
        err = m.check(0, seqs, qlens, kv_heads * group)
        assert err < 1e-5, (trial, err)


def test_scale_is_applied():
    rng = np.random.default_rng(3)
    spec = PoolSpec(1, 1, 64, num_blocks=16, block_size=8, dtype="float32")
    m = DenseMirror(spec, rng)
    s = m.new_seq(list(range(20)))
    q = rng.standard_normal((1, 2, 64)).astype(np.float32)
    k, v = m.dense[s][0]
    out = m.pool.attend(0, [s], q, scale=0.3)
    assert rel_err(out, attention(q, k, v, 0.3)) < 1e-5
    assert rel_err(out, attention(q, k, v, 1 / 8)) > 1e-3  # the default scale differs
