"""What the cascade and wgmma GPU tests share (imported by the test modules,
after `gpu_helpers.cupy_or_skip`): step layouts with nested shared prefixes,
their block tables, a GPU / CPU backend pair holding the same random pool
(FP8 too), and NaN in every block a step must not read."""

from __future__ import annotations

import cupy
import numpy as np
from gpu_kernel_helpers import to_dev

from kvpager.backends.cupy_backend import CupyBackend
from kvpager.backends.numpy_backend import NumpyBackend
from kvpager.spec import PoolSpec


def layout(rng, bs, qlens, levels=2, prefix=None):
    """Sequence lengths and the shared blocks of each sequence's table (block
    counts by group), for len(qlens) sequences: the first 60% share a prefix of
    ``prefix`` positions (whole blocks; by default 512, or 2,048 in one level),
    the first 30% a second one of three blocks (levels=2), the next 20% another
    prefix of three blocks, the rest nothing. Own parts ragged (0 to 3 blocks +
    5 positions)."""
    n = len(qlens)
    big = (prefix or (2048 if levels == 1 else 512)) // bs
    groups = [(range(0, int(0.6 * n)), big)]
    if levels == 2:
        groups.append((range(0, int(0.3 * n)), 3))
    groups.append((range(int(0.6 * n), int(0.8 * n)), 3))
    own = rng.integers(0, 3 * bs + 6, n)
    shared_blocks = np.zeros(n, np.int64)
    for rows, nb in groups:
        shared_blocks[list(rows)] += nb
    seq_lens = (shared_blocks * bs + own + qlens).astype(np.int32)
    return groups, seq_lens


def tables_for(rng, spec, groups, seq_lens):
    """Block tables: each group's blocks at its leading columns, fresh blocks after (ids shuffled)."""
    bs = spec.block_size
    n = len(seq_lens)
    need = -(-seq_lens.astype(np.int64) // bs)
    ids = iter(rng.permutation(np.arange(1, spec.num_blocks)).tolist())
    tables = np.zeros((n, int(need.max()) + 1), np.int32)
    col = np.zeros(n, np.int64)
    for rows, nb in groups:
        blocks = [next(ids) for _ in range(nb)]
        for r in rows:
            tables[r, col[r] : col[r] + nb] = blocks
            col[r] += nb
    for r in range(n):
        tables[r, col[r] : need[r]] = [next(ids) for _ in range(int(need[r] - col[r]))]
    return tables


def make_pair(spec, rng):
    """A GPU and a CPU backend holding the same random pool (FP8: random stored values)."""
    gpu, cpu = CupyBackend(spec, 0), NumpyBackend(spec)
    cpu.kv[...] = (rng.standard_normal(cpu.kv.shape, dtype=np.float32) * (8 if spec.is_fp8 else 1)
                   ).astype(spec.kv_np_dtype)
    dst = gpu.kv.view(cupy.uint8)
    dst[...] = cupy.asarray(cpu.kv.view(np.uint8)).reshape(dst.shape)
    return gpu, cpu


def spec_for(kv_dtype, dtype, d, bs, seq_lens, rng):
    blocks = int((-(-seq_lens.astype(np.int64) // bs)).sum()) + 16
    scales = None if kv_dtype is None else rng.uniform(0.01, 0.2, (2, 2, 2))
    return PoolSpec(num_layers=2, num_kv_heads=2, head_dim=d, num_blocks=blocks, block_size=bs, dtype=dtype,
                    kv_dtype=kv_dtype, kv_scales=scales)


def run(plan, gpu, q, layer, **kw):
    out = cupy.asarray(np.full(q.shape, np.nan, dtype=q.dtype).view(gpu.dtype))
    plan.attend(layer, cupy.asarray(q.view(gpu.dtype)), out=out, **kw)
    return cupy.asnumpy(out).view(q.dtype)


def poison_unread(gpu, spec, tables: np.ndarray) -> None:
    """NaN into every block no table names (block 0, the tables' padding, among them)."""
    unread = np.setdiff1d(np.arange(spec.num_blocks), tables[tables > 0])
    nan = np.full((len(unread), *gpu.kv.shape[1:]), np.nan, dtype=spec.np_dtype)
    gpu.kv[cupy.asarray(unread)] = to_dev(nan, gpu)


def poison_tails(gpu, spec, tables: np.ndarray, seq_lens: np.ndarray) -> None:
    """NaN into the positions past each sequence's length in its last block (every layer,
    K and V): a kernel that reads a whole block must still not let them in."""
    bs = spec.block_size
    for table, n in zip(tables, seq_lens.tolist()):
        if n % bs:
            gpu.kv[int(table[(n - 1) // bs]), :, :, :, n % bs:] = np.nan
