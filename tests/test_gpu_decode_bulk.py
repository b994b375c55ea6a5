"""paged_decode_bulk.cu (decode by bulk copies of whole blocks, head pairs in one
MMA tile; compute capability 9.0) against the NumPy twin: GQA 1-4, block sizes
8-64, head dims 64-256, 2-8 kv heads, ragged lengths, split-K, windows, soft
caps, a cascade's own parts. Outputs are poisoned (NaN) before each launch, and
so is every pool row no query may read (unused blocks, block 0 the tables pad
with, the positions past each sequence's end in its last block), so a kernel
that reads or sums a row it should not fails. Skips without CuPy, a GPU or
compute capability 9.0."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_kernel_helpers import (  # noqa: E402
    TOL,
    geometry,
    make_pair,
    random_tables,
    rel_err,
    seed,
    to_dev,
    to_host,
)

from kvpager import KernelConfig, UnsupportedConfiguration  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.kernels import compute_capability  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(compute_capability(0)[0] != 9, reason="paged_decode_bulk.cu needs sm_90")]

BULK = KernelConfig(decode_kernel="bulk")
SEQ_LENS = np.array([1, 17, 640, 2500, 33, 4099], dtype=np.int32)


def poison_unread(gpu, cpu, tables, seq_lens, spec):
    """NaN into every pool row no sequence reads: unused blocks (block 0 among them)
    and the rows past each sequence's end in its last block."""
    used = np.zeros(spec.num_blocks, dtype=bool)
    for b, n in enumerate(seq_lens):
        used[tables[b, : -(-int(n) // spec.block_size)]] = True
    cpu.kv[~used] = np.nan
    for b, n in enumerate(seq_lens):
        if n % spec.block_size:
            cpu.kv[tables[b, int(n) // spec.block_size], :, :, :, int(n) % spec.block_size:] = np.nan
    gpu.kv[...] = to_dev(cpu.kv, gpu)


def bulk_pair(dtype, d, bs, group, kv_heads, key, seq_lens=SEQ_LENS):
    rng = np.random.default_rng(seed(dtype, d, bs, group, kv_heads, key))
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), kv_heads=kv_heads)
    gpu, cpu = make_pair(spec, rng, BULK)
    tables = random_tables(rng, spec, seq_lens)
    poison_unread(gpu, cpu, tables, seq_lens, spec)
    q = rng.standard_normal((len(seq_lens), kv_heads * group, d), dtype=np.float32).astype(spec.np_dtype)
    return rng, spec, gpu, cpu, tables, q


@pytest.mark.parametrize("dtype,d,bs,group,kv_heads", [
    ("bfloat16", 128, 16, 4, 8),
    ("float16", 128, 16, 4, 8),
    ("bfloat16", 128, 8, 4, 8),      # a stage spans two blocks
    ("bfloat16", 128, 64, 2, 4),     # a block spans four stages
    ("float16", 64, 32, 1, 2),
    ("bfloat16", 256, 16, 2, 6),     # head dim 256: 2 heads of 6 per CTA, piece by piece
    ("float16", 96, 16, 4, 8),
    ("bfloat16", 256, 8, 2, 8),
])
@pytest.mark.parametrize("splits", [None, 1, 3, 40])
def test_bulk_decode_matches_numpy(dtype, d, bs, group, kv_heads, splits):
    _, spec, gpu, cpu, tables, q = bulk_pair(dtype, d, bs, group, kv_heads, splits)
    qlens = np.ones(len(SEQ_LENS), dtype=np.int32)
    ref = paged_attention(cpu.kv, 1, q, tables, SEQ_LENS, qlens, d**-0.5)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(1, to_dev(q, gpu), tables, SEQ_LENS, qlens, d**-0.5, out=out, num_splits=splits, config=BULK)
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group", [("bfloat16", 128, 16, 4), ("float16", 64, 8, 2)])
def test_bulk_decode_windows_and_softcap(dtype, d, bs, group):
    _, spec, gpu, cpu, tables, q = bulk_pair(dtype, d, bs, group, 4, "window")
    qlens = np.ones(len(SEQ_LENS), dtype=np.int32)
    for window in (1, 5, 16, 17, 100, 600, 5000):
        for softcap in (None, 2.0):
            ref = paged_attention(cpu.kv, 1, q, tables, SEQ_LENS, qlens, d**-0.5, window=window, softcap=softcap)
            for splits in (None, 3):
                out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
                gpu.attend(1, to_dev(q, gpu), tables, SEQ_LENS, qlens, d**-0.5, out=out, num_splits=splits,
                           window=window, softcap=softcap, config=BULK)
                err = rel_err(to_host(out, spec), ref)
                assert err < TOL[dtype], f"window={window} softcap={softcap} num_splits={splits}: {err}"
    gpu.close()


def test_bulk_decode_long_context_many_splits():
    """One long sequence split across every SM (the 1 x 128k shape, shorter), and the
    planner's own split count."""
    lens = np.array([40_000], dtype=np.int32)
    _, spec, gpu, cpu, tables, q = bulk_pair("bfloat16", 128, 16, 4, 8, "long", lens)
    qlens = np.ones(1, dtype=np.int32)
    ref = paged_attention(cpu.kv, 1, q, tables, lens, qlens, 0.125)
    for splits in (None, 132, 77):
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        gpu.attend(1, to_dev(q, gpu), tables, lens, qlens, 0.125, out=out, num_splits=splits, config=BULK)
        assert rel_err(to_host(out, spec), ref) < TOL["bfloat16"], splits
    gpu.close()


def test_auto_takes_bulk_for_long_contexts_only():
    from kvpager.backends.cupy_decode import decode_shape

    _, spec, gpu, *_ = bulk_pair("bfloat16", 128, 16, 4, 8, "auto", np.array([10], dtype=np.int32))
    auto = KernelConfig()
    long_ = decode_shape(spec, 4, 16, auto.decode_bulk_min_context, 132, auto, compute_capability(0))
    short = decode_shape(spec, 4, 16, auto.decode_bulk_min_context - 1, 132, auto, compute_capability(0))
    assert (long_.file, short.file) == ("paged_decode_bulk.cu", "paged_decode_tc.cu")
    gpu.close()


def test_bulk_refuses_what_it_cannot_read():
    """GQA groups over 4 (and FP8 pools, odd kv head counts: `bulk_refusal`) are refused
    when asked for by name, and "auto" takes the mma kernel for them."""
    _, spec, gpu, cpu, tables, _ = bulk_pair("bfloat16", 128, 16, 4, 2, "refuse", np.array([100], np.int32))
    q = to_dev(np.zeros((1, 16, 128), dtype=spec.np_dtype), gpu)  # GQA group 8
    with pytest.raises(UnsupportedConfiguration, match="groups up to 4"):
        gpu.attend(1, q, tables, np.array([100], np.int32), np.ones(1, np.int32), 0.1, config=BULK)
    out = gpu.attend(1, q, tables, np.array([100], np.int32), np.ones(1, np.int32), 0.1,
                     config=KernelConfig(decode_bulk_min_context=0))
    assert np.isfinite(to_host(out, spec).astype(np.float32)).all()
    gpu.close()
