"""Sliding windows and logit soft caps in the CUDA kernels (tensor-core and
CUDA-core decode, with and without split-K; multi-token) against the NumPy
twin on copies of the same data. Outputs are poisoned (NaN) before each
launch; the blocks before every window are poisoned too, so a kernel that
reads them fails. Skips without CuPy or a GPU."""

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

from kvpager import InvalidArgument, KVPool  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402

pytestmark = pytest.mark.gpu

# (dtype, head dim, block size, GQA group): both decode kernels, every dtype,
# blocks shorter and longer than the tensor-core kernel's 16-token tile.
CASES = [
    ("bfloat16", 128, 16, 4),
    ("float16", 64, 8, 8),
    ("bfloat16", 256, 32, 2),
    ("float16", 96, 64, 16),
    ("float32", 128, 16, 4),
    ("float32", 64, 8, 1),
]
WINDOWS = (1, 5, 16, 17, 100, 600, 5000)


def poison_before_windows(gpu, cpu, tables, seq_lens, qlens, window, spec):
    """NaN into every whole block before the first position any query of a
    sequence sees (the NumPy twin skips them too); returns how many."""
    dead = []
    for b, (n, ql) in enumerate(zip(seq_lens, qlens)):
        first_seen = max(0, int(n) - int(ql) - window + 1)
        dead += tables[b, : first_seen // spec.block_size].tolist()
    if dead:
        cpu.kv[dead] = np.nan
        gpu.kv[np.asarray(dead)] = to_dev(cpu.kv[dead], gpu)
    return len(dead)


@pytest.mark.parametrize("dtype,d,bs,group", CASES)
def test_decode_windows_and_softcap_match_numpy(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "window"))
    seq_lens = np.array([1, bs - 1, bs + 1, 3 * bs + 5, 517, 1200, 2100], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    # scores of several units, so a soft cap of 2 changes them a lot
    q = (3 * rng.standard_normal((len(seq_lens), hq, d), dtype=np.float32)).astype(spec.np_dtype)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    scale = d**-0.5
    full = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale)
    for window in WINDOWS:
        for softcap in (None, 2.0):
            ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap)
            if window < 600 or softcap:  # the case changes the result: a kernel ignoring it fails
                assert rel_err(ref, full) > 10 * TOL[dtype]
            for splits in (None, 1, 3):
                out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
                gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, num_splits=splits,
                           window=window, softcap=softcap)
                err = rel_err(to_host(out, spec), ref)
                assert err < TOL[dtype], f"window={window} softcap={softcap} num_splits={splits}: {err}"
    # the blocks no query's window reaches are never read
    window = 40
    assert poison_before_windows(gpu, cpu, tables, seq_lens, qlens, window, spec) > 10
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale, window=window)
    for splits in (None, 1, 3):
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, num_splits=splits, window=window)
        assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group", CASES)
def test_multi_token_windows_and_softcap_match_numpy(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "window-mt"))
    seq_lens = np.array([5, bs + 3, 300, 700, 77, 1], dtype=np.int32)
    qlens = np.array([5, 2, 170, 33, 1, 1], dtype=np.int32)  # whole prompts, chunks, decode mixed in
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    q = (3 * rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32)).astype(spec.np_dtype)
    scale = d**-0.5
    for window in WINDOWS:
        for softcap in (None, 2.0):
            ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap)
            out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
            gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, window=window, softcap=softcap)
            err = rel_err(to_host(out, spec), ref)
            assert err < TOL[dtype], f"window={window} softcap={softcap}: {err}"
    window = 64
    assert poison_before_windows(gpu, cpu, tables, seq_lens, qlens, window, spec) > 5
    ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, scale, window=window)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, window=window)
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


def test_plan_layers_with_and_without_windows_and_an_updated_plan():
    """One plan, layers alternating between a sliding window and full attention
    (as Gemma-2/3 and Mistral-style layouts), then the plan updated in place
    over longer sequences: each call matches the twin."""
    torch = pytest.importorskip("torch")
    from kvpager.spec import PoolSpec

    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=256, block_size=16, dtype="bfloat16")
    pool = KVPool(spec, device="cuda:0")
    rng = np.random.default_rng(11)
    allocs = pool.allocate([rng.integers(0, 1000, n).tolist() for n in (90, 300, 41)])
    ids = [a.seq_id for a in allocs]
    for layer in range(2):
        for a in allocs:
            k, v = (torch.randn(len(a.slots), 2, 64).to(torch.bfloat16).cuda() for _ in range(2))
            pool.write(layer, a.slots, k, v)
    plan = pool.plan(ids, num_rows=4, width=32)
    g = torch.Generator().manual_seed(2)
    for step in range(2):
        tables, lens = pool.tables(ids)
        kv = cupy.asnumpy(pool.backend.kv).view(spec.np_dtype)
        for layer, window, softcap in ((0, 32, 30.0), (1, None, None), (0, None, 1.5), (1, 7, None)):
            q = (3 * torch.randn(4, 8, 64, generator=g)).to(torch.bfloat16)  # a row per plan row
            out = plan.attend(layer, q.cuda(), window=window, softcap=softcap)[:3]  # row 4 pads
            ref = paged_attention(kv, layer, q[:3].float().numpy().astype(spec.np_dtype), tables, lens,
                                  np.ones(3, np.int32), 64**-0.5, window=window, softcap=softcap)
            assert rel_err(out.float().cpu().numpy(), ref) < TOL["bfloat16"], (step, layer, window, softcap)
        slots = pool.append_flat(ids, 20)  # longer: the same plan refilled in place
        for layer in range(2):
            k, v = (torch.randn(len(slots), 2, 64).to(torch.bfloat16).cuda() for _ in range(2))
            pool.write(layer, slots, k, v)
        plan.update(*pool.tables(ids))
    # blocks released before the window: the updated plan knows each sequence's first held position
    tables, lens = pool.tables(ids)
    pool.release_before(ids, [int(n) - 40 for n in lens])
    tables, lens = pool.tables(ids)
    plan.update(tables, lens)
    q = torch.randn(4, 8, 64, generator=g).to(torch.bfloat16)
    with pytest.raises(InvalidArgument, match="released its blocks"):
        plan.attend(1, q.cuda())
    out = plan.attend(1, q.cuda(), window=32)[:3]
    kv = cupy.asnumpy(pool.backend.kv).view(spec.np_dtype)
    ref = paged_attention(kv, 1, q[:3].float().numpy().astype(spec.np_dtype), tables, lens,
                          np.ones(3, np.int32), 64**-0.5, window=32)
    assert rel_err(out.float().cpu().numpy(), ref) < TOL["bfloat16"]
    pool.check_integrity()


@pytest.mark.parametrize("window", [(1 << 32) + 5, (1 << 64) - 1])
def test_a_window_past_every_position_is_full_attention(window):
    """The kernels take the window as an int32: one of 2**32 + 5 reached them as 5
    (a short window, silently) before windows were capped at the longest possible
    sequence, which cuts nothing."""
    torch = pytest.importorskip("torch")
    from kvpager.spec import PoolSpec

    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=64, num_blocks=64, block_size=16, dtype="float32")
    pool = KVPool(spec, device="cuda:0")
    allocs = pool.allocate([list(range(3, 3 + n)) for n in (90, 33)])
    g = torch.Generator().manual_seed(5)
    for a in allocs:
        k, v = (torch.randn(len(a.slots), 2, 64, generator=g).cuda() for _ in range(2))
        pool.write(0, a.slots, k, v)
    ids = [a.seq_id for a in allocs]
    plan = pool.plan(ids, [90, 33])
    q = torch.randn(123, 8, 64, generator=g).cuda()
    full = plan.attend(0, q)
    assert torch.equal(plan.attend(0, q, window=window), full)
    assert not torch.equal(plan.attend(0, q, window=5), full)
    step = pool.plan(ids)  # decode, split or not
    assert torch.equal(step.attend(0, q[:2], window=window), step.attend(0, q[:2]))
