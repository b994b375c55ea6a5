"""FP8 pools on the GPU against the NumPy twin: quantisation in kv_write.cu
(bit for bit, saturation included), tensor-core decode (split-K, head layouts,
windows, soft caps), multi-token prefill, a shared prefix planned with and
without a cascade, and block copies / swaps / remote-tier staging keeping the
bytes. Outputs are poisoned (NaN) before each kernel; tables are shuffled and
lengths ragged. Skips without CuPy or a GPU of compute capability 8.9+."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip  # noqa: E402

cupy = cupy_or_skip()

from kvpager import KernelConfig, KVPool, kernels  # noqa: E402
from kvpager.backends.cupy_backend import CupyBackend  # noqa: E402
from kvpager.backends.numpy_backend import NumpyBackend, paged_attention  # noqa: E402
from kvpager.plan import make_plan  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu

if kernels.compute_capability(0) < (8, 9):
    pytest.skip("FP8 pools need compute capability 8.9 or later", allow_module_level=True)

TOL = {"bfloat16": 1e-2, "float16": 1e-3}
KV = ("float8_e4m3", "float8_e5m2")
# (kv dtype, compute dtype, head dim, block size, group): each axis value several times
GRID = [(KV[i % 2], ("bfloat16", "float16")[(i // 2) % 2], d, bs, g)
        for i, (d, bs, g) in enumerate([(128, 16, 4), (128, 32, 8), (64, 8, 16), (256, 64, 1), (96, 16, 2),
                                        (80, 8, 4), (48, 64, 8), (128, 16, 16), (256, 8, 2), (112, 32, 1),
                                        (128, 16, 7), (64, 32, 12), (64, 16, 71), (128, 8, 24)])]


def seed(*key: object) -> int:
    return zlib.crc32(repr(key).encode())


def geometry(kv_dtype: str, dtype: str, d: int, bs: int, max_tokens: int, kv_heads: int = 2,
             rng: np.random.Generator | None = None) -> PoolSpec:
    scales = None if rng is None else rng.uniform(0.01, 0.2, (2, 2, kv_heads))
    return PoolSpec(num_layers=2, num_kv_heads=kv_heads, head_dim=d, num_blocks=max_tokens // bs + 16,
                    block_size=bs, dtype=dtype, num_host_blocks=8, kv_dtype=kv_dtype, kv_scales=scales)


def make_pair(spec: PoolSpec, rng: np.random.Generator, config: KernelConfig | None = None
              ) -> tuple[CupyBackend, NumpyBackend]:
    """A GPU (its kernels tuned by ``config``) and a CPU backend holding the same random FP8 pool."""
    gpu, cpu = CupyBackend(spec, 0, config), NumpyBackend(spec)
    cpu.kv[...] = (rng.standard_normal(cpu.kv.shape, dtype=np.float32) * 8).astype(spec.kv_np_dtype)
    gpu.kv[...] = cupy.asarray(cpu.kv.view(np.uint8))
    return gpu, cpu


def to_dev(a: np.ndarray, be: CupyBackend):
    return cupy.asarray(np.ascontiguousarray(a).view(be.dtype))


def to_host(a, spec: PoolSpec) -> np.ndarray:
    return cupy.asnumpy(a).view(spec.np_dtype)


def kv_bytes(be) -> np.ndarray:
    kv = be.kv
    return cupy.asnumpy(kv) if isinstance(kv, cupy.ndarray) else kv.view(np.uint8)


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    out = np.asarray(out, dtype=np.float64)
    assert np.isfinite(out).all(), "non-finite output (unwritten or broken)"
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def random_tables(rng, spec: PoolSpec, seq_lens: np.ndarray) -> np.ndarray:
    need = -(-seq_lens // spec.block_size)
    ids = rng.permutation(np.arange(1, spec.num_blocks))
    tables = np.zeros((len(seq_lens), int(need.max()) + int(rng.integers(0, 3))), dtype=np.int32)
    start = 0
    for b, n in enumerate(need):
        tables[b, :n] = ids[start : start + n]
        start += n
    return tables


def check_attend(gpu, cpu, spec, rng, seq_lens, qlens, group, splits=None, window=None, softcap=None):
    tables = random_tables(rng, spec, seq_lens)
    q = rng.standard_normal((int(qlens.sum()), spec.num_kv_heads * group, spec.head_dim),
                            dtype=np.float32).astype(spec.np_dtype)
    scale = spec.head_dim**-0.5
    ref = paged_attention(cpu.kv, 1, q, tables, seq_lens, qlens, scale, window=window, softcap=softcap,
                          kv_scales=spec.scales)
    out = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), gpu)
    gpu.attend(1, to_dev(q, gpu), tables, seq_lens, qlens, scale, out=out, num_splits=splits,
               window=window, softcap=softcap)
    err = rel_err(to_host(out, spec), ref)
    assert err < TOL[spec.dtype], (err, splits, window, softcap)


@pytest.mark.parametrize("kv_dtype,dtype,d,bs,group", GRID)
def test_write_quantises_as_the_twin(kv_dtype, dtype, d, bs, group):
    rng = np.random.default_rng(seed(kv_dtype, dtype, d, bs, "write"))
    spec = geometry(kv_dtype, dtype, d, bs, 64 * bs, rng=rng)
    gpu, cpu = CupyBackend(spec, 0), NumpyBackend(spec)
    n = 3 * bs + 5
    slots = rng.permutation(np.arange(bs, spec.num_blocks * bs))[:n].astype(np.int64)
    slots[[1, 7]] = -1  # padding: skipped
    big = 60000.0 if dtype == "float16" else 1e6  # past both formats' ranges: saturates
    for layer in range(2):
        k = (rng.standard_normal((n, 2, d), dtype=np.float32) * rng.choice([0.01, 1, 300], (n, 1, 1)))
        k[0, 0, :4] = [big, -big, 1e-9, 0.0]
        v = rng.standard_normal((n, 2, d), dtype=np.float32) * 20
        k, v = k.astype(spec.np_dtype), v.astype(spec.np_dtype)
        gpu.write(layer, slots, to_dev(k, gpu), to_dev(v, gpu))
        cpu.write(layer, slots, k, v)
    np.testing.assert_array_equal(kv_bytes(gpu), kv_bytes(cpu))
    # and through a step plan's packed write launch
    plan = make_plan(gpu, np.arange(1, 5, dtype=np.int32)[None], [4 * bs], [n], slots)
    k2 = rng.standard_normal((n, 2, d), dtype=np.float32).astype(spec.np_dtype)
    plan.write(1, to_dev(k2, gpu), to_dev(-k2, gpu))
    cpu.write(1, slots, k2, -k2)
    np.testing.assert_array_equal(kv_bytes(gpu), kv_bytes(cpu))
    gpu.close()


@pytest.mark.parametrize("kv_dtype,dtype,d,bs,group", GRID)
def test_decode_matches_twin(kv_dtype, dtype, d, bs, group):
    rng = np.random.default_rng(seed(kv_dtype, dtype, d, bs, group, "decode"))
    seq_lens = np.array([1, bs - 1, bs, bs + 1, 3 * bs + 5, 517, 1200], dtype=np.int32)
    spec = geometry(kv_dtype, dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), rng=rng)
    gpu, cpu = make_pair(spec, rng)
    ones = np.ones(len(seq_lens), dtype=np.int32)
    for splits in (None, 1, 3):
        check_attend(gpu, cpu, spec, rng, seq_lens, ones, group, splits)
    check_attend(gpu, cpu, spec, rng, seq_lens, ones, group, 2, window=37, softcap=20.0)
    check_attend(gpu, cpu, spec, rng, seq_lens, ones, group, None, window=2 * bs + 3)
    gpu.close()


@pytest.mark.parametrize("kv_dtype,dtype,d,bs,group", GRID)
def test_prefill_matches_twin(kv_dtype, dtype, d, bs, group):
    rng = np.random.default_rng(seed(kv_dtype, dtype, d, bs, group, "prefill"))
    seq_lens = np.array([5, bs + 3, 130, 300, 77, 1], dtype=np.int32)
    qlens = np.array([5, 2, 70, 33, 1, 1], dtype=np.int32)
    spec = geometry(kv_dtype, dtype, d, bs, int((-(-seq_lens // bs)).sum() * bs), rng=rng)
    gpu, cpu = make_pair(spec, rng)
    check_attend(gpu, cpu, spec, rng, seq_lens, qlens, group)
    check_attend(gpu, cpu, spec, rng, seq_lens, qlens, group, window=40, softcap=15.0)
    gpu.close()


@pytest.mark.parametrize("hpc,wph,splits,d", [(4, 1, None, 128), (8, 1, 5, 128), (2, 4, 3, 64), (4, 2, 1, 80)])
def test_decode_layouts_match_twin(hpc, wph, splits, d):
    rng = np.random.default_rng(seed(hpc, wph, splits, d, "layouts"))
    seq_lens = np.array([1, 17, 300, 1700, 2049], dtype=np.int32)
    spec = geometry("float8_e4m3", "bfloat16", d, 16, int((-(-seq_lens // 16)).sum() * 16), kv_heads=8, rng=rng)
    gpu, cpu = make_pair(spec, rng, KernelConfig(decode_heads_per_cta=hpc, decode_warps_per_head=wph))
    check_attend(gpu, cpu, spec, rng, seq_lens, np.ones(5, np.int32), 4, splits)
    gpu.close()


@pytest.mark.parametrize("knobs", [{"decode_stages": 2}, {"decode_stages": 4}, {"decode_l2_prefetch": 0},
                                   {"prefill_mt": 1}])
def test_kernel_knobs_match_twin(knobs):
    rng = np.random.default_rng(seed(knobs))
    seq_lens = np.array([3, 40, 640, 2500], dtype=np.int32)
    spec = geometry("float8_e5m2", "float16", 128, 16, int((-(-seq_lens // 16)).sum() * 16), rng=rng)
    gpu, cpu = make_pair(spec, rng, KernelConfig(**knobs))
    check_attend(gpu, cpu, spec, rng, seq_lens, np.ones(4, np.int32), 8, 3)
    check_attend(gpu, cpu, spec, rng, seq_lens, np.array([3, 20, 64, 1], np.int32), 8)
    gpu.close()


def test_shared_prefixes_cascade():
    """Forked sequences share a long prefix: an FP8 plan does not cascade a step this
    small by itself, a forced cascade does, and both answer as the twin."""
    rng = np.random.default_rng(6)
    spec = geometry("float8_e4m3", "float16", 128, 16, 4096, rng=rng)
    gpu_pool, cpu_pool = KVPool(spec, device="cuda:0"), KVPool(spec)
    prompt = list(range(1000))
    ks = [rng.standard_normal((1000, 2, 128), dtype=np.float32).astype(np.float16) for _ in range(2)]
    ids = []
    for pool in (gpu_pool, cpu_pool):
        a = pool.allocate([prompt])[0]
        for layer, k in enumerate(ks):
            x = cupy.asarray(k) if pool is gpu_pool else k
            pool.write(layer, a.slots, x, -x)
        ids.append([a.seq_id, *pool.fork(a.seq_id, 7)[0]])
    gpu_pool.synchronize()
    np.testing.assert_array_equal(kv_bytes(gpu_pool.backend), kv_bytes(cpu_pool.backend))
    q = rng.standard_normal((8, 8, 128), dtype=np.float32).astype(np.float16)
    want = cpu_pool.plan(ids[1], 1).attend(0, q)
    plan = gpu_pool.plan(ids[0], 1)
    out = cupy.asnumpy(plan.attend(0, cupy.asarray(q)))
    assert plan.shared_prefixes is None
    assert rel_err(out, want) < TOL["float16"]
    forced = gpu_pool.plan(ids[0], 1, cascade=True)
    out = cupy.asnumpy(forced.attend(0, cupy.asarray(q)))
    assert forced.shared_prefixes is not None
    assert rel_err(out, want) < TOL["float16"]
    gpu_pool.close()


def test_copy_on_write_swap_and_staging_keep_bytes():
    rng = np.random.default_rng(7)
    spec = geometry("float8_e5m2", "float16", 64, 8, 512, rng=rng)
    gpu, cpu = KVPool(spec, device="cuda:0"), KVPool(spec)
    for pool in (gpu, cpu):
        r = np.random.default_rng(8)
        a = pool.allocate([list(range(21))])[0]
        for layer in range(2):
            k = r.standard_normal((21, 2, 64), dtype=np.float32).astype(np.float16)
            pool.write(layer, a.slots, *(([cupy.asarray(k)] * 2) if pool is gpu else [k, k]))
        child = pool.fork(a.seq_id, 1)[0][0]
        pool.append(child, 1)  # copy-on-write of the shared last block
        pool.swap_out(a.seq_id)
        pool.swap_in(a.seq_id)
    gpu.synchronize()
    np.testing.assert_array_equal(kv_bytes(gpu.backend), kv_bytes(cpu.backend))
    blocks = np.array([1, 2, 3], dtype=np.int64)
    out = np.zeros((3, spec.bytes_per_block), np.uint8)
    gpu.backend.read_blocks(blocks, out)
    np.testing.assert_array_equal(out, kv_bytes(cpu.backend)[blocks].reshape(3, -1))
    gpu.backend.write_blocks(np.array([10, 11, 12], np.int64), [bytes(r) for r in out])
    np.testing.assert_array_equal(kv_bytes(gpu.backend)[[10, 11, 12]].reshape(3, -1), out)
    gpu.close()


@pytest.mark.parametrize("kv_dtype", KV)
def test_transformers_on_a_gpu_fp8_pool_matches_the_cpu_twin(kv_dtype):
    """A small Llama in float16 on the GPU, its K/V in an FP8 GPU pool: the logits of a
    prefill and of decode steps against the same model on the CPU over an FP8 NumPy pool
    (same scales), within 1% of the logit spread (float16 and float32 math differ)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from test_hf_fp8 import run, tokens

    from kvpager.hf import calibrate_kv_scales, spec_for_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, initializer_range=0.02,
        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    cpu_model = transformers.LlamaForCausalLM(config).eval()
    gpu_model = transformers.LlamaForCausalLM(config).eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model = gpu_model.to("cuda", torch.float16)
    scales = calibrate_kv_scales(cpu_model, tokens(64, 2), kv_dtype)
    prompt, feed = tokens(100, 1), tokens(5, 3)
    gpu_pool = KVPool(spec_for_model(gpu_model, 64, 16, dtype=torch.float16, kv_dtype=kv_dtype, kv_scales=scales),
                      device="cuda:0")
    cpu_pool = KVPool(spec_for_model(cpu_model, 64, 16, dtype=torch.float16, kv_dtype=kv_dtype, kv_scales=scales))
    got = run(gpu_model, gpu_pool, prompt, feed, torch.float16)
    want = run(cpu_model, cpu_pool, prompt, feed, torch.float16)
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 0.01 * float(w.max() - w.min())
    gpu_pool.close()


def test_calibration_of_a_gpu_model_matches_the_cpu_twin():
    """Scales calibrated on a GPU model (its pass over a temporary GPU pool) match those of
    the same float32 model on the CPU (latent attention: K/V only the attention function
    sees)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_hf_fp8 import latent_model, tokens

    from kvpager.hf import calibrate_kv_scales

    cpu_model = latent_model()
    want = calibrate_kv_scales(cpu_model, tokens(40, 5))
    got = calibrate_kv_scales(cpu_model.to("cuda"), tokens(40, 5))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3)
