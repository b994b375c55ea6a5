"""The CPU attention kernel (native/cpu_attention.c, `kvpager.cpu_attention`)
against its NumPy twin (`paged_attention`) and the dense float64 reference,
as the GPU kernels are tested: random tables, poisoned blocks, GQA 1-16,
block sizes 8-64, ragged lengths, multi-token queries, windows, soft caps,
sinks, every storage dtype; and a wrong call refused with nothing written."""

from __future__ import annotations

import math
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import attention, rel_err

from kvpager import KVPool, PoolSpec, cpu_attention
from kvpager.backends.numpy_backend import paged_attention

pytestmark = pytest.mark.skipif(cpu_attention.KERNEL is None, reason="kvpager._cpu_attention was not built")

STORAGE = [np.float32, ml_dtypes.bfloat16, np.float16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2]


def random_pool(rng, lengths, kv_heads, head_dim, block_size, dtype, layers=2, spare=5):
    """A block-major pool [blocks, layers, 2, H, bs, D] of random K/V in
    ``dtype``, every block not in a table poisoned with NaN, and shuffled
    tables (padded with -1 past each sequence's blocks)."""
    need = [-(-n // block_size) for n in lengths]
    blocks = sum(need) + spare
    kv = rng.standard_normal((blocks, layers, 2, kv_heads, block_size, head_dim)).astype(np.float32)
    kv = kv.astype(dtype)
    order = rng.permutation(blocks)
    width = max(need) + 1
    tables = np.full((len(lengths), width), -1, np.int32)
    at = 0
    for b, k in enumerate(need):
        tables[b, :k] = order[at : at + k]
        at += k
    kv[order[at:]] = np.nan
    return kv, tables


def queries(rng, qlens, q_heads, head_dim):
    return rng.standard_normal((int(sum(qlens)), q_heads, head_dim)).astype(np.float32)


def both(kv, layer, q, tables, lens, qlens, scale, **kw):
    lens, qlens = np.asarray(lens, np.int32), np.asarray(qlens, np.int32)
    return (cpu_attention.attend(kv, layer, q, tables, lens, qlens, scale, **kw),
            paged_attention(kv, layer, q, tables, lens, qlens, scale, **kw))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    group=st.sampled_from([1, 2, 3, 4, 7, 8, 12, 16, 20]),
    kv_heads=st.integers(1, 3),
    head_dim=st.sampled_from([16, 32, 64, 80, 128, 72, 40, 24, 12, 20, 100]),
    block_size=st.sampled_from([8, 16, 32, 64]),
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=5),
    multi=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 80)),
    softcap=st.one_of(st.none(), st.floats(5.0, 50.0)),
    sinks=st.booleans(),
)
def test_the_kernel_is_the_twin(seed, group, kv_heads, head_dim, block_size, lengths, multi, window, softcap, sinks):
    rng = np.random.default_rng(seed)
    kv, tables = random_pool(rng, lengths, kv_heads, head_dim, block_size, np.float32)
    qlens = [int(rng.integers(1, n + 1)) if multi else 1 for n in lengths]
    q_heads = kv_heads * group
    q = queries(rng, qlens, q_heads, head_dim)
    sink = rng.standard_normal(q_heads).astype(np.float32) if sinks else None
    out, ref = both(kv, 1, q, tables, lengths, qlens, 1 / math.sqrt(head_dim), window=window, softcap=softcap,
                    sinks=sink)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert np.isfinite(out).all()  # no poisoned block was read
    assert rel_err(out, ref.astype(np.float64)) < 1e-5


@pytest.mark.parametrize("dtype", STORAGE, ids=lambda d: np.dtype(d).name)
def test_every_storage_dtype_against_the_dense_reference(dtype):
    """Each storage dtype's pool (FP8 with per-head scales) against float64
    attention over the same stored values, dequantised; the kernel and the
    twin agree to float32 rounding."""
    rng = np.random.default_rng(7)
    lengths, qlens, heads, d, bs = [1, 37, 130], [1, 5, 17], 2, 64, 16
    kv, tables = random_pool(rng, lengths, heads, d, bs, dtype)
    scales = None
    if np.dtype(dtype).itemsize == 1:
        scales = rng.uniform(0.05, 2.0, (2, 2, heads)).astype(np.float32)
    q = queries(rng, qlens, heads * 4, d)
    out, ref = both(kv, 1, q, tables, lengths, qlens, 0.125, kv_scales=scales)
    assert rel_err(out, ref.astype(np.float64)) < 1e-5
    start = 0
    for b, (n, ql) in enumerate(zip(lengths, qlens)):
        blocks = kv[tables[b, : -(-n // bs)], 1].astype(np.float32)  # [nb, 2, H, bs, D]
        if scales is not None:
            blocks = blocks * scales[1][None, :, :, None, None]
        dense = blocks.transpose(1, 0, 3, 2, 4).reshape(2, -1, heads, d)[:, :n]
        want = attention(q[start : start + ql], dense[0], dense[1], 0.125)
        assert rel_err(out[start : start + ql], want) < 1e-5
        start += ql


def test_a_large_k_scale_scales_the_scores_not_the_queries():
    """Tiny stored K values under a huge FP8 K scale (e5m2 stores down to
    1.5e-5): the dequantised K and the scores are finite, the query times the
    softmax scale and the K scale is not. The kernel scales each score once it
    is summed and gives the twin's finite result (it gave NaN when the
    queries carried the K scale)."""
    rng = np.random.default_rng(11)
    lengths, qlens, heads, d, bs = [40, 90], [1, 3], 2, 64, 16
    kv, tables = random_pool(rng, lengths, heads, d, bs, np.float32)
    kv = (kv * 1e-4).astype(ml_dtypes.float8_e5m2)
    scales = np.ones((2, 2, heads), np.float32)
    scales[:, 0] = 1e38
    q = queries(rng, qlens, heads * 2, d) * 100  # q * 0.125 * 1e38 is past float32's 3.4e38
    out, ref = both(kv, 0, q, tables, lengths, qlens, 0.125, kv_scales=scales)
    assert np.isfinite(ref).all()
    assert np.isfinite(out).all() and rel_err(out, ref.astype(np.float64)) < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_pool_attends_through_the_kernel_in_its_dtype(dtype):
    """KVPool.attend and a step plan (the paths models take) return q's dtype,
    within the dtype's rounding of the twin's float32 result."""
    rng = np.random.default_rng(3)
    spec = PoolSpec(2, 2, 64, num_blocks=40, block_size=16, dtype=dtype)
    pool = KVPool(spec)
    lengths = [20, 75, 3]
    allocs = pool.allocate([list(range(n)) for n in lengths])
    for a, n in zip(allocs, lengths):
        for layer in range(2):
            k = rng.standard_normal((n, 2, 64)).astype(spec.np_dtype)
            pool.write(layer, a.slots, k, (k * 0.5).astype(spec.np_dtype))
    seqs = [a.seq_id for a in allocs]
    q = rng.standard_normal((3, 8, 64)).astype(spec.np_dtype)
    tables, lens = pool.tables(seqs)
    ref = paged_attention(pool.backend.kv, 1, q.astype(np.float32), tables, lens, np.ones(3, np.int32), 0.125)
    for got in (pool.attend(1, seqs, q, scale=0.125), pool.plan(seqs, [1, 1, 1]).attend(1, q, scale=0.125)):
        assert got.dtype == spec.np_dtype
        assert np.array_equal(got, ref.astype(spec.np_dtype)) or rel_err(got, ref.astype(np.float64)) < 1e-2


def test_threads_do_not_change_the_result(monkeypatch):
    """Each (sequence, kv head) is one task whatever the thread count: the
    results are bitwise equal."""
    rng = np.random.default_rng(11)
    lengths = [300, 17, 511, 64, 1000, 2]
    kv, tables = random_pool(rng, lengths, 4, 64, 16, ml_dtypes.bfloat16)
    q = queries(rng, [1, 3, 1, 2, 1, 1], 16, 64)
    outs = []
    for threads in ("1", "2", "7"):
        monkeypatch.setenv("KVPAGER_CPU_THREADS", threads)
        monkeypatch.setattr(cpu_attention, "BYTES_PER_THREAD", 1)
        outs.append(cpu_attention.attend(kv, 0, q, tables, np.asarray(lengths), np.asarray([1, 3, 1, 2, 1, 1]), 0.1))
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def call(kv, q, tables, lens, qlens, out, **kw):
    args = dict(kind=0, lut=None, layer=0, scale=0.125, window=0, softcap=0.0, scales=None, sinks=None, threads=2)
    args.update(kw)
    cpu_attention.KERNEL.attend(kv, args["kind"], args["lut"], args["layer"], q, tables, lens, qlens, out,
                                args["scale"], args["window"], args["softcap"], args["scales"], args["sinks"],
                                args["threads"])


@pytest.mark.parametrize("case, error", [
    ("block out of range", IndexError),
    ("negative block", IndexError),
    ("query rows do not add up", ValueError),
    ("more queries than tokens", ValueError),
    ("table too narrow", ValueError),
    ("layer out of range", ValueError),
    ("head_dim not a multiple of 4", ValueError),
    ("q heads not a multiple of kv heads", ValueError),
    ("out of the wrong shape", ValueError),
    ("int32 lengths", TypeError),
    ("read-only out", (TypeError, ValueError, BufferError)),
    # arrays of another kind, the same item size (read as the right one before)
    ("float32 tables", TypeError),
    ("float64 lengths", TypeError),
    ("uint64 query lengths", TypeError),
    ("int32 queries", TypeError),
    ("int32 sinks", TypeError),
])
def test_a_wrong_call_raises_and_writes_nothing(case, error):
    rng = np.random.default_rng(5)
    d = 22 if case == "head_dim not a multiple of 4" else 32
    kv, tables = random_pool(rng, [40, 9], 2, d, 16, np.float32, spare=0)
    lens, qlens = np.array([40, 9], np.int64), np.array([1, 2], np.int64)
    q = queries(rng, [1, 2], 5 if case == "q heads not a multiple of kv heads" else 4, d)
    out = np.full(q.shape, 7.0, np.float32)
    kw = {}
    if case == "block out of range":
        tables[1, 0] = kv.shape[0]
    elif case == "negative block":
        tables[0, 2] = -1
    elif case == "query rows do not add up":
        qlens = np.array([1, 1], np.int64)
    elif case == "more queries than tokens":
        lens = np.array([40, 1], np.int64)
    elif case == "table too narrow":
        tables = np.ascontiguousarray(tables[:, :2])
    elif case == "layer out of range":
        kw["layer"] = 2
    elif case == "out of the wrong shape":
        out = np.full((3, 4, 16), 7.0, np.float32)
    elif case == "int32 lengths":
        lens = lens.astype(np.int32)
    elif case == "read-only out":
        out.flags.writeable = False
    elif case == "float32 tables":
        tables = tables.astype(np.float32)
    elif case == "float64 lengths":
        lens = lens.astype(np.float64)
    elif case == "uint64 query lengths":
        qlens = qlens.astype(np.uint64)
    elif case == "int32 queries":
        q = q.view(np.int32)
    elif case == "int32 sinks":
        kw["sinks"] = np.zeros(4, np.int32)
    with pytest.raises(error):
        call(kv, q, tables, lens, qlens, out, **kw)
    assert (out == 7.0).all()


def test_what_the_kernel_cannot_take_runs_on_the_twin():
    """head_dim 22 and an int16 pool: `attend` gives exactly the twin's result."""
    rng = np.random.default_rng(2)
    kv, tables = random_pool(rng, [33, 5], 2, 22, 8, np.float32)
    q = queries(rng, [2, 1], 4, 22)
    out, ref = both(kv, 0, q, tables, [33, 5], [2, 1], 0.2)
    assert np.array_equal(out, ref)


def test_native_off_leaves_the_twin():
    """KVPAGER_NATIVE=0 loads no kernel (the setting every compiled part reads)."""
    code = "from kvpager import cpu_attention; print(cpu_attention.KERNEL is None, cpu_attention.load() is None)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "KVPAGER_NATIVE": "0"})
    assert res.stdout.split() == ["True", "True"], res.stderr


def test_a_bad_thread_setting_is_refused(monkeypatch):
    from kvpager.errors import InvalidArgument

    monkeypatch.setenv("KVPAGER_CPU_THREADS", "0")
    with pytest.raises(InvalidArgument, match="KVPAGER_CPU_THREADS"):
        cpu_attention.cpus()


@pytest.mark.parametrize("with_torch", [False, True])
def test_threads_default_to_one_beside_torch(with_torch):
    """Unset KVPAGER_CPU_THREADS: one thread where torch is loaded (its spinning
    OpenMP threads), else every CPU this process may run on."""
    import os

    code = ("import os, sys\n" + ("import torch\n" if with_torch else "") +
            "from kvpager import cpu_attention\nprint(cpu_attention.cpus(), len(os.sched_getaffinity(0)))")
    env = {k: v for k, v in os.environ.items() if k != "KVPAGER_CPU_THREADS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    got, cpus = map(int, res.stdout.split())
    assert got == (1 if with_torch else cpus), res.stderr


@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
def test_every_build_the_cpu_runs_is_the_twin(isa):
    """Each instruction-set build of the task (the import picks the widest),
    over windows, soft caps, sinks, multi-token rows and bfloat16; head dims
    that are no multiple of 16 (or of 8) on the narrower build they take."""
    kernel = cpu_attention.KERNEL
    try:
        kernel.use(isa)
    except ValueError:
        pytest.skip(f"this CPU has no {isa} build")
    try:
        rng = np.random.default_rng(17)
        for dtype, d, group, kw in [(np.float32, 64, 4, {}), (ml_dtypes.bfloat16, 128, 8, {"window": 40}),
                                    (np.float32, 80, 1, {"softcap": 20.0}), (np.float16, 32, 2, {}),
                                    (ml_dtypes.bfloat16, 72, 4, {}), (np.float16, 40, 2, {"window": 30}),
                                    (ml_dtypes.float8_e4m3fn, 12, 3, {}), (np.float32, 100, 2, {"softcap": 9.0})]:
            lengths, qlens = [3, 150, 64, 290], [1, 9, 2, 1]
            kv, tables = random_pool(rng, lengths, 2, d, 16, dtype)
            q = queries(rng, qlens, 2 * group, d)
            out, ref = both(kv, 0, q, tables, lengths, qlens, 0.1, **kw)
            assert np.isfinite(out).all()
            assert rel_err(out, ref.astype(np.float64)) < 1e-5, (dtype, d, kw)
    finally:
        kernel.use(kernel.ISA)


@pytest.mark.parametrize("head_dim", [72, 40, 24, 12, 20, 100, 4])
def test_a_head_dim_of_four_or_eight_runs_on_the_kernel(head_dim):
    """Head dims that are multiples of 4 but not of 16 (72, 40, ...) ran on the
    twin, a Python loop over sequences copying each one's blocks a layer (1.3-1.45x
    transformers' step on a model of head dim 72): the kernel takes them now, on
    the widest build whose registers step through them whole."""
    rng = np.random.default_rng(head_dim)
    lengths, qlens = [5, 70, 200], [1, 3, 1]
    kv, tables = random_pool(rng, lengths, 2, head_dim, 16, np.float32)
    lens, ql = np.asarray(lengths, np.int64), np.asarray(qlens, np.int64)
    assert cpu_attention.prepare(kv, tables, lens, ql) is not None
    q = queries(rng, qlens, 6, head_dim)
    out, ref = both(kv, 1, q, tables, lengths, qlens, head_dim ** -0.5, window=50)
    assert np.isfinite(out).all() and rel_err(out, ref.astype(np.float64)) < 1e-5
