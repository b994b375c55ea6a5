"""FlashInfer as a peer of kvpager in `bench_peers.py`: its page tables, made from
kvpager's, and its wrappers over one layer of kvpager's pool.

FlashInfer's HND paged layout ``[pages, 2, kv_heads, page_size, head_dim]`` is
exactly one layer of kvpager's pool (``pool[:, layer]``), so FlashInfer reads
the very bytes kvpager does: only the page tables are rewritten, as CSR
(``indptr``, ``indices``, ``last_page_len``). The CSR builders are NumPy only
(tested on the CPU); torch and FlashInfer are imported by the functions that
need them, so this module imports anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

WORKSPACE_BYTES = 128 << 20  # FlashInfer's recommended float workspace per wrapper


def load(disabled: bool = False) -> tuple[Any, str]:
    """(the flashinfer module, its version) or (None, why it is absent)."""
    if disabled:
        return None, "absent (--no-flashinfer)"
    try:
        import flashinfer
    except Exception as e:  # not installed, or a dependency missing (apache-tvm-ffi)
        return None, f"absent ({type(e).__name__}: {e})"
    return flashinfer, str(getattr(flashinfer, "__version__", "unknown version"))


def paged_csr(tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> tuple[np.ndarray, ...]:
    """FlashInfer's page table of sequences held in ``tables`` (int [B, W],
    kvpager's block tables) with ``seq_lens`` tokens: (indptr int32 [B + 1],
    indices int32 [sum of pages], last_page_len int32 [B])."""
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    pages = -(-seq_lens // block_size)
    if (seq_lens < 1).any() or (pages > tables.shape[1]).any():
        raise ValueError(f"seq_lens must be in [1, {tables.shape[1] * block_size}]")
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    indices = tables[np.arange(tables.shape[1]) < pages[:, None]].astype(np.int32)  # row-major: in order
    last = (seq_lens - (pages - 1) * block_size).astype(np.int32)
    return indptr, indices, last


def cascade_csr(tables: np.ndarray, seq_lens: np.ndarray, prefix: int,
                block_size: int) -> tuple[np.ndarray, list[tuple[np.ndarray, ...]]]:
    """Two-level cascade tables for a decode step whose sequences share their
    first ``prefix`` tokens (whole blocks) in groups: rows with the same leading
    blocks form a group. Returns (order, levels): FlashInfer's cascade wants
    each group's queries contiguous, so q and the outputs go in ``order`` (a
    permutation of the rows, grouped); each level is (qo_indptr, kv_indptr,
    kv_indices, last_page_len), all int32: level 0 one entry per group (its
    shared blocks), level 1 one per sequence (its blocks after the prefix)."""
    if prefix % block_size or prefix < block_size:
        raise ValueError(f"the shared prefix ({prefix} tokens) must be whole blocks of {block_size}")
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    if (seq_lens <= prefix).any():
        raise ValueError("every sequence must hold tokens after the shared prefix")
    pb = prefix // block_size
    groups, group_of = np.unique(tables[:, :pb], axis=0, return_inverse=True)
    group_of = group_of.reshape(-1)
    order = np.argsort(group_of, kind="stable")
    members = np.bincount(group_of, minlength=len(groups))
    top = (np.concatenate([[0], np.cumsum(members)]).astype(np.int32),
           (np.arange(len(groups) + 1) * pb).astype(np.int32),
           groups.reshape(-1).astype(np.int32),
           np.full(len(groups), block_size, np.int32))
    own = paged_csr(tables[order, pb:], seq_lens[order] - prefix, block_size)
    bottom = (np.arange(len(order) + 1, dtype=np.int32), *own)
    return order, [top, bottom]


def _workspace(torch: Any) -> Any:
    return torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")


def _cuda(torch: Any, *arrays: np.ndarray) -> list[Any]:
    return [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in arrays]


def decode(fi: Any, paged_kv: Any, tables: np.ndarray, seq_lens: np.ndarray, q: Any,
           num_kv_heads: int, block_size: int, scale: float) -> Callable[[], Any]:
    """A call running FlashInfer's tensor-core paged decode of ``q`` ([B, q heads,
    head dim]) over ``paged_kv`` (one pool layer, HND), planned once; it returns
    its (preallocated, NaN-poisoned) output."""
    import torch

    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(_workspace(torch), "HND", use_tensor_cores=True)
    indptr, indices, last = _cuda(torch, *paged_csr(tables, seq_lens, block_size))
    wrapper.plan(indptr, indices, last, q.shape[1], num_kv_heads, q.shape[2], block_size,
                 q_data_type=q.dtype, kv_data_type=paged_kv.dtype, sm_scale=scale)
    out = torch.full_like(q, float("nan"))
    return lambda: wrapper.run(q, paged_kv, out=out)


def prefill(fi: Any, backend: str, paged_kv: Any, tables: np.ndarray, seq_lens: np.ndarray,
            query_lens: np.ndarray, q: Any, num_kv_heads: int, block_size: int,
            scale: float) -> Callable[[], Any]:
    """A call running FlashInfer's paged prefill (``backend`` "fa2" or "fa3") of
    ``q`` ([sum(query_lens), q heads, head dim]: each sequence's last
    ``query_lens`` tokens, causal, the mask aligned to the bottom right as
    kvpager's)."""
    import torch

    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(_workspace(torch), "HND", backend=backend)
    qo_indptr = np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32)
    args = _cuda(torch, qo_indptr, *paged_csr(tables, seq_lens, block_size))
    wrapper.plan(*args, q.shape[1], num_kv_heads, q.shape[2], block_size, causal=True,
                 sm_scale=scale, q_data_type=q.dtype, kv_data_type=paged_kv.dtype)
    out = torch.full_like(q, float("nan"))
    return lambda: wrapper.run(q, paged_kv, out=out)


def cascade(fi: Any, paged_kv: Any, tables: np.ndarray, seq_lens: np.ndarray, prefix: int, q: Any,
            num_kv_heads: int, block_size: int, scale: float) -> tuple[Callable[[], Any], np.ndarray]:
    """A call running FlashInfer's two-level cascade decode
    (`MultiLevelCascadeAttentionWrapper`) over the groups sharing ``prefix``
    tokens, and the row order it takes: the call reads ``q[order]`` (copied
    once, here) and returns the outputs in that order."""
    import torch

    order, levels = cascade_csr(tables, seq_lens, prefix, block_size)
    wrapper = fi.MultiLevelCascadeAttentionWrapper(2, _workspace(torch), "HND")
    per_level = [_cuda(torch, *level) for level in levels]
    wrapper.plan(*[list(x) for x in zip(*per_level)], q.shape[1], num_kv_heads, q.shape[2], block_size,
                 sm_scale=scale, q_data_type=q.dtype, kv_data_type=paged_kv.dtype)
    q_grouped = q[torch.from_numpy(order).to(q.device)].contiguous()
    return (lambda: wrapper.run(q_grouped, paged_kv)), order
