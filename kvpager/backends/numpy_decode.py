"""Decode attention on the CPU backend, many sequences at a time.

`kvpager.backends.numpy_backend.paged_attention` (the NumPy twin of the CUDA
kernels, which the GPU tests compare against) walks the batch a sequence at a
time: a dozen NumPy calls a sequence and layer, which at batch 64 take most of
a CPU decode step's attention. `attend` is what the CPU backend runs: a step
whose every sequence brings one new token, without a sliding window, goes
through `decode`, which gathers the K/V of sequences of similar length into
one padded array and attends them with a few batched matrix products; any
other step goes to the twin. Same float32 math, same results to rounding
(`tests/test_numpy_decode.py` holds them to the twin).
"""

from __future__ import annotations

import numpy as np

from kvpager.backends.numpy_backend import paged_attention

#: float32 bytes of gathered K/V one group of sequences may take (the padded [seqs, blocks, 2, heads,
#: block, dim] array); a longer batch is attended a group at a time
GROUP_BYTES = 64 << 20


def attend(kv: np.ndarray, layer: int, q: np.ndarray, block_tables: np.ndarray, seq_lens: np.ndarray,
           query_lens: np.ndarray, scale: float, *, window: int | None = None, softcap: float | None = None,
           kv_scales: np.ndarray | None = None, sinks: np.ndarray | None = None) -> np.ndarray:
    """`paged_attention`'s contract; `decode` where every sequence brings one token
    and no window applies."""
    if window is None and len(query_lens) > 1 and bool((np.asarray(query_lens) == 1).all()):
        return decode(kv, layer, q, block_tables, seq_lens, scale, softcap=softcap, kv_scales=kv_scales,
                      sinks=sinks)
    return paged_attention(kv, layer, q, block_tables, seq_lens, query_lens, scale, window=window,
                           softcap=softcap, kv_scales=kv_scales, sinks=sinks)


def decode(kv: np.ndarray, layer: int, q: np.ndarray, block_tables: np.ndarray, seq_lens: np.ndarray,
           scale: float, *, softcap: float | None = None, kv_scales: np.ndarray | None = None,
           sinks: np.ndarray | None = None, group_bytes: int = GROUP_BYTES) -> np.ndarray:
    """One query token a sequence (``q`` [B, Hq, D], sequence b's at row b) over each
    sequence's ``seq_lens[b]`` positions. The sequences, in order of length, go in
    groups of at most ``group_bytes`` of gathered K/V (a sequence alone may take
    more); each group's keys past a sequence's length are masked."""
    num_kv_heads, block_size, head_dim = kv.shape[3], kv.shape[4], kv.shape[5]
    num_q_heads = q.shape[1]
    group = num_q_heads // num_kv_heads
    lens = np.asarray(seq_lens, dtype=np.int64)
    blocks = -(-lens // block_size)
    out = np.empty(q.shape, dtype=q.dtype)
    deq = None if kv_scales is None else np.asarray(kv_scales, np.float32)[layer][None, None, :, :, None, None]
    sink = None if sinks is None else np.asarray(sinks, np.float32).reshape(1, num_kv_heads, group, 1)
    per_block = 2 * num_kv_heads * block_size * head_dim * 4
    order = np.argsort(blocks, kind="stable")
    start = 0
    while start < len(order):
        # grow the group while its padded gather (its longest sequence's blocks for each) fits
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * int(blocks[order[stop]]) * per_block <= group_bytes:
            stop += 1
        rows = order[start:stop]
        nb = int(blocks[rows[-1]])
        # a table's entries past its sequence's blocks may hold anything: block 0 read there, masked
        own = np.arange(nb)[None, :] < blocks[rows][:, None]
        tables = np.where(own, block_tables[rows, :nb], 0)
        tiles = kv[tables, layer].astype(np.float32, copy=False)  # [S, nb, 2, H, bs, D]
        if deq is not None:
            tiles *= deq
        s = len(rows)
        kvs = tiles.transpose(2, 0, 3, 1, 4, 5).reshape(2, s, num_kv_heads, nb * block_size, head_dim)
        keys, values = kvs[0], kvs[1]  # [S, H, L, D]
        qs = q[rows].astype(np.float32).reshape(s, num_kv_heads, group, head_dim)
        scores = np.matmul(qs, keys.transpose(0, 1, 3, 2))  # [S, H, G, L]
        scores *= np.float32(scale)
        if softcap is not None:
            scores = np.float32(softcap) * np.tanh(scores / np.float32(softcap))
        past = np.arange(nb * block_size)[None, :] >= lens[rows][:, None]  # [S, L]: no key there
        # padding keys may hold anything (NaN included): masked to -inf, and their values zeroed
        np.copyto(scores, -np.inf, where=past[:, None, None, :])
        values[np.broadcast_to(past[:, None, :, None], values.shape)] = 0
        top = scores.max(axis=-1, keepdims=True)
        if sink is not None:
            top = np.maximum(top, sink)
        scores -= top
        np.exp(scores, out=scores)
        total = scores.sum(axis=-1, keepdims=True)
        if sink is not None:
            total += np.exp(sink - top)
        o = np.matmul(scores, values)  # [S, H, G, D]
        o /= total
        out[rows] = o.reshape(s, num_q_heads, head_dim)
        start = stop
    return out
