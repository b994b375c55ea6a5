"""The CUDA kernels against the NumPy backend, on copies of the same data.

Every output is poisoned (NaN) before the kernel runs, block tables are
shuffled and lengths cross block boundaries. Skips without CuPy or a GPU."""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip  # noqa: E402

cupy = cupy_or_skip()

from kvpager import KernelConfig, KVPool  # noqa: E402
from kvpager.backends.cupy_backend import CupyBackend  # noqa: E402
from kvpager.backends.numpy_backend import NumpyBackend, paged_attention  # noqa: E402
from kvpager.errors import InvalidArgument, UnsupportedConfiguration  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {"bfloat16": 1e-2, "float16": 1e-3, "float32": 1e-5}
DTYPES = ("float16", "bfloat16", "float32")
HEAD_DIMS = (64, 96, 128, 256)
BLOCK_SIZES = (8, 16, 32, 64)
GROUPS = (1, 2, 4, 8, 16)


def _grid_sample() -> list[tuple[str, int, int, int]]:
    """Every dtype with every head dim, block sizes and groups rotated so each
    value of each axis appears several times (24 of the 240 combinations)."""
    cases = []
    for i, dtype in enumerate(DTYPES):
        for j, d in enumerate(HEAD_DIMS):
            cases.append((dtype, d, BLOCK_SIZES[(i + j) % 4], GROUPS[(2 * i + j) % 5]))
            cases.append((dtype, d, BLOCK_SIZES[(i + j + 2) % 4], GROUPS[(2 * i + j + 3) % 5]))
    return cases


GRID = _grid_sample()


def seed(*key: object) -> int:
    return zlib.crc32(repr(key).encode())


def to_dev(a: np.ndarray, be: CupyBackend):
    """A NumPy array in the pool dtype -> CuPy, in the backend's storage dtype."""
    return cupy.asarray(np.ascontiguousarray(a).view(be.dtype))


def to_host(a, spec: PoolSpec) -> np.ndarray:
    return cupy.asnumpy(a).view(spec.np_dtype)


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert np.isfinite(out).all(), "non-finite output (unwritten or broken)"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def make_pair(spec: PoolSpec, rng: np.random.Generator, config: KernelConfig | None = None
              ) -> tuple[CupyBackend, NumpyBackend]:
    """A GPU (its kernels tuned by ``config``) and a CPU backend holding the same random pool."""
    gpu, cpu = CupyBackend(spec, 0, config), NumpyBackend(spec)
    cpu.kv[...] = rng.standard_normal(cpu.kv.shape, dtype=np.float32).astype(spec.np_dtype)
    gpu.kv[...] = to_dev(cpu.kv, gpu)
    return gpu, cpu


def random_tables(rng, spec: PoolSpec, seq_lens: np.ndarray) -> np.ndarray:
    """Disjoint, shuffled blocks (never block 0) per sequence, padded with block 0."""
    need = -(-seq_lens // spec.block_size)
    ids = rng.permutation(np.arange(1, spec.num_blocks))
    assert need.sum() <= len(ids)
    tables = np.zeros((len(seq_lens), int(need.max()) + int(rng.integers(0, 3))), dtype=np.int32)
    start = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[start : start + n]
        start += n
    return tables


def geometry(dtype: str, d: int, bs: int, max_tokens: int, layers: int = 2, kv_heads: int = 2):
    blocks = max_tokens // bs + 16
    return PoolSpec(num_layers=layers, num_kv_heads=kv_heads, head_dim=d, num_blocks=blocks,
                    block_size=bs, dtype=dtype, num_host_blocks=8)


@pytest.mark.parametrize("dtype,d,bs,group", GRID)
def test_decode_matches_reference(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group))
    seq_lens = np.array([1, bs - 1, bs, bs + 1, 3 * bs + 5, 517, 1200], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((len(seq_lens), hq, d), dtype=np.float32).astype(spec.np_dtype)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    scale = d**-0.5
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale)
    for splits in (None, 1, 3):
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, num_splits=splits)
        assert rel_err(to_host(out, spec), ref) < TOL[dtype], f"num_splits={splits}"
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group", GRID)
def test_multi_token_matches_reference(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "mt"))
    seq_lens = np.array([5, bs + 3, 130, 300, 77, 1], dtype=np.int32)
    qlens = np.array([5, 2, 70, 33, 1, 1], dtype=np.int32)  # whole prompt, chunks, decode mixed in
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    q = rng.standard_normal((int(qlens.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
    scale = 0.7 * d**-0.5
    ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, scale)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out)
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("d", range(32, 257, 16))
def test_every_head_dim_matches_reference(d):
    """Every multiple of 16 from 32 to 256 (Phi-2's 80, 112, 160, 192 ...):
    decode with and without split-K and multi-token, the dtype and block size
    rotating."""
    i = d // 16
    dtype, bs, group = DTYPES[i % 3], BLOCK_SIZES[i % 4], GROUPS[i % 5]
    rng = np.random.default_rng(seed(d, "every head dim"))
    seq_lens = np.array([1, bs + 1, 300, 1100], dtype=np.int32)
    qlens = np.array([1, 3, 70, 1], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)
    tables = random_tables(rng, spec, seq_lens)
    hq = spec.num_kv_heads * group
    for ql, splits in ((np.ones(4, np.int32), None), (np.ones(4, np.int32), 3), (qlens, None)):
        q = rng.standard_normal((int(ql.sum()), hq, d), dtype=np.float32).astype(spec.np_dtype)
        ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, ql, d**-0.5)
        out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
        gpu.attend(1, to_dev(q, gpu), tables, seq_lens, ql, d**-0.5, out=out, num_splits=splits)
        assert rel_err(to_host(out, spec), ref) < TOL[dtype], (dtype, bs, group, ql.tolist(), splits)
    k = rng.standard_normal((5, 2, d), dtype=np.float32).astype(spec.np_dtype)
    slots = np.array([3, 40, 41, 100, 7], dtype=np.int64)
    gpu.write(0, slots, to_dev(k, gpu), to_dev(k, gpu))
    cpu.write(0, slots, k, k)
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)
    gpu.close()


@pytest.mark.parametrize("dtype,knobs,splits", [
    ("bfloat16", {"decode_stages": 2}, 3),
    ("bfloat16", {"decode_stages": 4}, 40),    # more splits than the merge has split lanes
    ("bfloat16", {"decode_l2_prefetch": 0}, 2),
    ("bfloat16", {"decode_l2_prefetch": 256}, None),
    ("float32", {"decode_rows": 1}, 3),        # the CUDA-core kernel's rows per iteration
    ("float32", {"decode_rows": 8}, None),
])
def test_decode_variants_match_reference(dtype, knobs, splits):
    d, bs, group = 128, 16, 8
    rng = np.random.default_rng(seed(dtype, knobs, splits))
    seq_lens = np.array([1, 17, 640, 2500], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng)  # the plan's config, not the backend's
    tables = random_tables(rng, spec, seq_lens)
    q = rng.standard_normal((len(seq_lens), 2 * group, d), dtype=np.float32).astype(spec.np_dtype)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, d**-0.5, out=out, num_splits=splits,
               config=KernelConfig(**knobs))
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs,group,hpc,wph,splits", [
    ("bfloat16", 128, 16, 4, 4, 1, None),  # 4 heads per CTA, one warp each (short contexts)
    ("bfloat16", 128, 16, 4, 8, 1, 5),     # 8 heads per CTA, split
    ("bfloat16", 128, 16, 4, 2, 4, 3),     # 2 heads x 4 warps
    ("float16", 64, 8, 16, 4, 1, 3),       # blocks of 8 tokens, two m rows of heads
    ("float16", 256, 32, 2, 8, 1, 2),      # head dim 256: fewer heads per CTA fit
    ("bfloat16", 96, 64, 1, 4, 2, 1),
])
def test_decode_layouts_match_reference(dtype, d, bs, group, hpc, wph, splits):
    """Heads per CTA and warps per head, over 8 kv heads."""
    rng = np.random.default_rng(seed(dtype, d, bs, group, hpc, wph, splits))
    seq_lens = np.array([1, bs + 1, 300, 1700, 2049], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), kv_heads=8)
    gpu, cpu = make_pair(spec, rng, KernelConfig(decode_heads_per_cta=hpc, decode_warps_per_head=wph))
    tables = random_tables(rng, spec, seq_lens)
    qlens = np.ones(len(seq_lens), dtype=np.int32)
    q = rng.standard_normal((len(seq_lens), 8 * group, d), dtype=np.float32).astype(spec.np_dtype)
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, d**-0.5)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, d**-0.5, out=out, num_splits=splits)
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


def test_decode_short_contexts_take_four_heads_per_cta():
    """The planner's layout choice: 4 heads per CTA only for short contexts with CTAs to spare."""
    from kvpager.backends.cupy_decode import decode_layout

    c = KernelConfig()
    assert decode_layout(8, 128, 2, 64, 256, 132, c) == (4, 1)
    assert decode_layout(8, 128, 2, 64, 4096, 132, c) == (1, 4)
    assert decode_layout(8, 128, 2, 8, 256, 132, c) == (1, 4)
    assert decode_layout(2, 128, 2, 512, 100, 132, c) == (2, 1)


@pytest.mark.parametrize("dtype,d,bs,group", [("float16", 128, 16, 4), ("bfloat16", 64, 8, 16)])
def test_multi_token_one_mtile_per_warp(dtype, d, bs, group):
    rng = np.random.default_rng(seed(dtype, d, bs, group, "mt1"))
    seq_lens = np.array([300, 77, 129], dtype=np.int32)
    qlens = np.array([70, 77, 1], dtype=np.int32)
    spec = geometry(dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs))
    gpu, cpu = make_pair(spec, rng, KernelConfig(prefill_mt=1))
    tables = random_tables(rng, spec, seq_lens)
    q = rng.standard_normal((int(qlens.sum()), spec.num_kv_heads * group, d),
                            dtype=np.float32).astype(spec.np_dtype)
    ref = paged_attention(cpu.kv, 0, q, tables, seq_lens, qlens, d**-0.5)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(0, to_dev(q, gpu), tables, seq_lens, qlens, d**-0.5, out=out)
    assert rel_err(to_host(out, spec), ref) < TOL[dtype]
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs", [(t, d, bs) for (t, d, bs, _) in GRID[::2]])
def test_write_matches_reference(dtype, d, bs):
    rng = np.random.default_rng(seed(dtype, d, bs, "w"))
    spec = geometry(dtype, d, bs, 40 * bs, layers=3, kv_heads=4)
    gpu, cpu = CupyBackend(spec, 0), NumpyBackend(spec)
    cpu.kv[...] = np.nan
    gpu.kv[...] = to_dev(cpu.kv, gpu)
    n = 3 * bs + 7
    slots = rng.choice(np.arange(bs, spec.num_blocks * bs), size=n, replace=False).astype(np.int64)
    slots[rng.choice(n, size=5, replace=False)] = -1
    shape = (n, spec.num_kv_heads, d)
    k = rng.standard_normal(shape, dtype=np.float32).astype(spec.np_dtype)
    v = rng.standard_normal(shape, dtype=np.float32).astype(spec.np_dtype)
    cpu.write(2, slots, k, v)
    gpu.write(2, slots, to_dev(k, gpu), to_dev(v, gpu))
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)
    gpu.close()


@pytest.mark.parametrize("unroll", [16, 4, 1])
def test_copy_launch_shapes_match_reference(unroll):
    rng = np.random.default_rng(unroll)
    spec = PoolSpec(num_layers=3, num_kv_heads=2, head_dim=128, num_blocks=64, block_size=16,
                    dtype="bfloat16", num_host_blocks=4)  # 3 x 1024 vectors a block: partial chunks
    gpu, cpu = make_pair(spec, rng, KernelConfig(copy_unroll=unroll))
    ids = rng.permutation(np.arange(1, 64))
    pairs = np.stack([ids[:30], ids[30:60]], axis=1).astype(np.int64)
    cpu.copy_blocks(pairs)
    gpu.copy_blocks(pairs)
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)
    gpu.close()


@pytest.mark.parametrize("dtype,d,bs", [("bfloat16", 128, 16), ("float32", 64, 8), ("float16", 256, 64)])
def test_copy_and_swap_match_reference(dtype, d, bs):
    rng = np.random.default_rng(7)
    spec = PoolSpec(num_layers=3, num_kv_heads=2, head_dim=d, num_blocks=64, block_size=bs,
                    dtype=dtype, num_host_blocks=40)
    gpu, cpu = make_pair(spec, rng)
    ids = rng.permutation(np.arange(1, 64))
    pairs = np.stack([ids[:20], ids[20:40]], axis=1).astype(np.int64)
    cpu.copy_blocks(pairs)
    gpu.copy_blocks(pairs)
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)

    cpu.host_kv[...] = np.nan
    gpu.host_array()[...] = np.nan
    out_pairs = np.stack([rng.permutation(np.arange(1, 64))[:25], rng.permutation(40)[:25]], 1)
    cpu.swap_out(out_pairs)
    gpu.swap_out(out_pairs)
    assert same_bits(gpu.host_array(), cpu.host_kv)

    in_pairs = np.stack([out_pairs[:, 1], rng.permutation(np.arange(1, 64))[:25]], 1)
    cpu.kv[in_pairs[:, 1]] = np.nan
    gpu.kv[...] = to_dev(cpu.kv, gpu)
    cpu.swap_in(in_pairs)
    gpu.swap_in(in_pairs)
    assert same_bits(to_host(gpu.kv, spec), cpu.kv)
    gpu.close()


def test_bad_arguments_never_launch():
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=64, num_blocks=8, block_size=8,
                    dtype="float16", num_host_blocks=4)
    gpu = CupyBackend(spec, 0)
    q = cupy.zeros((1, 4, 64), dtype=cupy.float16)
    one = np.ones(1, dtype=np.int32)
    with pytest.raises(InvalidArgument):
        gpu.attend(0, q, np.array([[8]], dtype=np.int32), one, one, 0.1)
    with pytest.raises(InvalidArgument):
        gpu.attend(0, q, np.array([[1]], dtype=np.int32), np.array([9], dtype=np.int32), one, 0.1)
    with pytest.raises(UnsupportedConfiguration):
        gpu.attend(0, cupy.zeros((1, 6, 64), dtype=cupy.float16), np.array([[1]], dtype=np.int32),
                   one, one, 0.1)
    kv = cupy.zeros((1, 2, 64), dtype=cupy.float16)
    with pytest.raises(InvalidArgument):
        gpu.write(0, np.array([64], dtype=np.int64), kv, kv)
    with pytest.raises(InvalidArgument):
        gpu.copy_blocks(np.array([[1, 2], [3, 2]], dtype=np.int64))
    with pytest.raises(InvalidArgument):
        gpu.swap_out(np.array([[1, 4]], dtype=np.int64))
    gpu.close()
    for bad in (dict(head_dim=72), dict(head_dim=272), dict(block_size=128)):
        with pytest.raises(UnsupportedConfiguration):
            CupyBackend(spec.replace(**bad), 0)


def test_ipc_handle_and_identity():
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=64, num_blocks=4, block_size=8)
    gpu = CupyBackend(spec, 0)
    assert gpu.device == "cuda:0"
    assert gpu.slab_nbytes == spec.device_bytes
    assert len(gpu.ipc_handle()) == 64
    assert gpu.device_uuid().startswith("GPU-")
    gpu.close()


def test_pool_end_to_end_matches_cpu():
    """The same ops through KVPool on cuda:0 and on the CPU give the same bytes
    (write, copy-on-write, swap round trip) and the same attention."""
    rng = np.random.default_rng(3)
    dtype = "bfloat16" if storage_ok("bfloat16") else "float16"
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=128, num_blocks=96, block_size=16,
                    dtype=dtype, num_host_blocks=64)
    pools = [KVPool(spec, device="cuda:0"), KVPool(spec, device="cpu")]

    def put(i, a):
        return cupy.asarray(a) if i == 0 else a

    prompts = [list(rng.integers(0, 1000, n)) for n in (40, 17, 100)]
    allocs = [p.allocate(prompts) for p in pools]
    assert [a.slots.tolist() for a in allocs[0]] == [a.slots.tolist() for a in allocs[1]]
    for layer in range(spec.num_layers):
        for a in allocs[1]:
            k, v = (rng.standard_normal((len(a.slots), 2, 128), dtype=np.float32).astype(spec.np_dtype)
                    for _ in range(2))
            for i, p in enumerate(pools):
                p.write(layer, a.slots, put(i, k), put(i, v))
    ids = [a.seq_id for a in allocs[1]]
    for p in pools:
        p.commit(ids)
    kids = [p.fork(ids[0], 2)[0] for p in pools]
    assert kids[0] == kids[1]
    new_slots = [p.append(kids[0], 3) for p in pools]  # shared, partly filled last block: CoW
    assert [s.tolist() for s in new_slots[0]] == [s.tolist() for s in new_slots[1]]
    for layer in range(spec.num_layers):
        for s in new_slots[1]:
            k, v = (rng.standard_normal((len(s), 2, 128), dtype=np.float32).astype(spec.np_dtype)
                    for _ in range(2))
            for i, p in enumerate(pools):
                p.write(layer, s, put(i, k), put(i, v))
    pools[0].synchronize()
    assert same_bits(cupy.asnumpy(pools[0].backend.device_array()).view(spec.np_dtype),
                     pools[1].backend.device_array())

    for p in pools:
        p.swap_out([ids[2]])
    assert same_bits(pools[0].backend.host_array(), pools[1].backend.host_array())
    for p in pools:
        p.swap_in([ids[2]])
    pools[0].synchronize()
    after = cupy.asnumpy(pools[0].backend.device_array())
    assert same_bits(after.view(spec.np_dtype), pools[1].backend.device_array())

    seqs = ids + kids[0]
    q = rng.standard_normal((len(seqs), 8, 128), dtype=np.float32).astype(spec.np_dtype)
    outs = [p.attend(1, seqs, put(i, q)) for i, p in enumerate(pools)]
    assert rel_err(cupy.asnumpy(outs[0]).view(spec.np_dtype), outs[1]) < TOL[dtype]
    qlens = [7, 17, 30, 3, 1]
    q = rng.standard_normal((sum(qlens), 8, 128), dtype=np.float32).astype(spec.np_dtype)
    outs = [p.attend(0, seqs, put(i, q), query_lens=qlens) for i, p in enumerate(pools)]
    assert rel_err(cupy.asnumpy(outs[0]).view(spec.np_dtype), outs[1]) < TOL[dtype]
    for p in pools:
        p.check_integrity()
        p.close()


def storage_ok(dtype: str) -> bool:
    """Whether CuPy here holds ``dtype`` natively (bfloat16 needs a recent CuPy)."""
    try:
        cupy.empty(1, dtype=PoolSpec(1, 1, 64, 2, dtype=dtype).np_dtype)
        return True
    except Exception:
        return False


def test_grid_sample_covers_every_value():
    for axis, values in enumerate((DTYPES, HEAD_DIMS, BLOCK_SIZES, GROUPS)):
        assert {c[axis] for c in GRID} == set(values)
    assert len(set(GRID)) == len(GRID)
    assert len(list(itertools.product(DTYPES, HEAD_DIMS, BLOCK_SIZES, GROUPS))) == 240
