"""Heads wider than one warp of the tensor-core kernels covers (256; Gemma-4's full
layers: 512, and a fitted pool holds its sliding layers at 512 too) attend on
paged_decode_tc.cu and paged_prefill.cu with two warps a tile or query row, each
half the head dim (float32 pools on CUDA cores: paged_decode.cu, a work item per
query token), in float16, bfloat16 and float32, against
the NumPy twin on copies of the same data: decode with and without split-K,
multi-token steps, sliding windows, soft caps, attention sinks, sequences
that share leading blocks (no cascade is taken), and a step plan's write and
attend. Outputs are poisoned (NaN) before each launch.
An FP8 pool of such heads is refused at creation. Skips without CuPy or a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_cascade_helpers import poison_tails, poison_unread  # noqa: E402
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

from kvpager import KVPool, UnsupportedConfiguration  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu

# (dtype, head dim, block size, GQA group)
CASES = [
    ("bfloat16", 512, 16, 2),
    ("float16", 512, 64, 1),
    ("bfloat16", 272, 8, 4),
    ("float32", 512, 16, 2),
    ("bfloat16", 384, 32, 8),
    ("bfloat16", 448, 16, 16),  # a GQA group of 16: both halves of the MMAs' rows hold heads
]


def nan_out(shape, spec, gpu):
    return to_dev(np.full(shape, np.nan, dtype=spec.np_dtype), gpu)


@pytest.mark.parametrize("dtype,d,bs,group", CASES)
def test_decode_matches_numpy(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "wide"))
    seq_lens = np.array([1, bs - 1, bs + 1, 3 * bs + 5, 517, 2100], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    q = (2 * rng.standard_normal((len(seq_lens), hq, d), dtype=np.float32)).astype(spec.np_dtype)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    scale = d**-0.5
    sinks = np.linspace(-1.0, 2.0, hq, dtype=np.float32)
    for window, softcap, sink in ((None, None, None), (40, None, None), (None, 2.0, None), (None, None, sinks)):
        ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap,
                              sinks=sink)
        for splits in (None, 1, 3):
            out = nan_out(q.shape, spec, gpu)
            gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, num_splits=splits,
                       window=window, softcap=softcap, sinks=None if sink is None else cupy.asarray(sink))
            err = rel_err(to_host(out, spec), ref)
            assert err < TOL[dtype], f"window={window} softcap={softcap} sinks={sink is not None} " \
                                     f"num_splits={splits}: {err}"
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group", CASES)
def test_multi_token_matches_numpy(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "wide-mt"))
    seq_lens = np.array([5, bs + 3, 300, 700, 77, 1], dtype=np.int32)
    qlens = np.array([5, 2, 170, 33, 1, 1], dtype=np.int32)  # whole prompts, chunks, decode mixed in
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    q = (2 * rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32)).astype(spec.np_dtype)
    scale = 0.7 * d**-0.5
    sinks = np.linspace(-2.0, 1.5, hq, dtype=np.float32)
    for window, softcap, sink in ((None, None, None), (64, None, None), (None, 2.0, None), (None, None, sinks),
                                  (100, 1.5, sinks)):
        ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap,
                              sinks=sink)
        out = nan_out(q.shape, spec, gpu)
        gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, window=window, softcap=softcap,
                   sinks=None if sink is None else cupy.asarray(sink))
        assert rel_err(to_host(out, spec), ref) < TOL[dtype], (window, softcap, sink is not None)
    gpu.close()


@pytest.mark.parametrize("dtype,d,group", [("bfloat16", 512, 2), ("float16", 272, 16), ("bfloat16", 400, 1)])
def test_long_prompts_of_wide_heads_match_numpy_on_tensor_cores(dtype, d, group):
    """Prompts of many 64-row query tiles over many 32-position K/V tiles (a chunk on
    a cached prefix, a whole prompt, a short one), every block no table names and every
    position past a sequence's length in its last block NaN: the plan runs
    paged_prefill.cu (not a decode item per query token)."""
    rng = np.random.default_rng(seed(dtype, d, group, "wide-long"))
    seq_lens = np.array([1500, 611, 9], dtype=np.int32)
    qlens = np.array([900, 611, 9], dtype=np.int32)
    spec = geometry(dtype, d, 16, int((-(-seq_lens // 16)).sum() * 16) + 64)
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    poison_unread(gpu, spec, tables)
    poison_tails(gpu, spec, tables, seq_lens)
    hq = spec.num_kv_heads * group
    q = (2 * rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32)).astype(spec.np_dtype)
    plan = gpu.plan(tables, seq_lens, qlens, None)
    assert not plan.decode
    for window in (None, 256):
        ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5, window=window)
        out = nan_out(q.shape, spec, gpu)
        gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, d**-0.5, out=out, window=window)
        assert rel_err(to_host(out, spec), ref) < TOL[dtype], window
    gpu.close()


@pytest.mark.parametrize("cascade", [None, True])
def test_a_plan_over_shared_prefixes_writes_and_attends_as_the_twin(cascade):
    """A pool of head dim 512 on the GPU and its NumPy twin: the same prompts (two
    sharing a prefix of 3 blocks), the same K/V written through a step plan, then a
    decode step's write_attend (even asked to cascade, the plan attends plainly)."""
    torch = pytest.importorskip("torch")
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=512, num_blocks=64, block_size=16, dtype="bfloat16")
    gpu, cpu = KVPool(spec, device="cuda:0"), KVPool(spec, device="cpu")
    g = torch.Generator().manual_seed(5)
    system = list(range(48))
    prompts = [system + [100 + i for i in range(n)] for n in (7, 30)] + [list(range(500, 540))]
    outs = {}
    for name, pool in (("gpu", gpu), ("cpu", cpu)):
        g.manual_seed(5)
        allocs = pool.allocate(prompts, share_in_batch=True)
        ids = [a.seq_id for a in allocs]
        lens = [len(a.slots) for a in allocs]
        slots = np.concatenate([np.asarray(a.slots, dtype=np.int64) for a in allocs])
        plan = pool.plan(ids, lens, slots, num_q_heads=8)
        t = int(slots.size)
        for layer in range(2):
            q, k, v = (torch.randn(1, h, t, 512, generator=g).to(torch.bfloat16) for h in (8, 2, 2))
            if name == "gpu":
                q, k, v = q.cuda(), k.cuda(), v.cuda()
            plan.write_attend(layer, q, k, v)
        step = pool.append(ids, 1)
        slots = np.concatenate([np.asarray(s, dtype=np.int64) for s in step])
        plan = pool.plan(ids, [1] * len(ids), slots, num_q_heads=8, cascade=cascade)
        q, k, v = (torch.randn(1, h, len(ids), 512, generator=g).to(torch.bfloat16) for h in (8, 2, 2))
        if name == "gpu":
            q, k, v = q.cuda(), k.cuda(), v.cuda()
        outs[name] = plan.write_attend(1, q, k, v).float().cpu().numpy()
        pool.check_integrity()
    assert rel_err(outs["gpu"], outs["cpu"]) < TOL["bfloat16"]
    gpu.close()


def test_an_fp8_pool_of_wide_heads_is_refused():
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=512, num_blocks=8, block_size=16, dtype="bfloat16",
                    kv_dtype="float8_e4m3")
    with pytest.raises(UnsupportedConfiguration, match="head dims stop at 256"):
        KVPool(spec, device="cuda:0")
