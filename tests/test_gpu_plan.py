"""Step plans on the GPU against the NumPy twin: torch tensors in and out, the
caller's stream, fused projections' views, refusals that write nothing. Skips
without CuPy, torch or a GPU. (Plans refilled in place and captured:
test_gpu_plan_refill.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_torch_or_skip

cupy, torch = cupy_torch_or_skip()

from kvpager import KVPool  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.errors import InvalidArgument  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu


TOL = {"bfloat16": 1e-2, "float16": 2e-3, "float32": 1e-5}


HQ = 8


def make(dtype: str, head_dim: int = 64, kv_dtype: str | None = None) -> KVPool:
    """A pool of 2 layers of 2 K/V heads; ``kv_dtype``: FP8 storage (scales 0.5 and 0.25
    for K and V, every head). torch's CUDA comes up first: a plan made before it knows no
    torch tensors and takes the checked path for them (`cupy_launches.torch_kinds`)."""
    torch.cuda.init()
    scales = None if kv_dtype is None else np.tile(np.float32([0.5, 0.25])[None, :, None], (2, 1, 2))
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=head_dim, num_blocks=256, block_size=16, dtype=dtype,
                    kv_dtype=kv_dtype, kv_scales=scales)
    return KVPool(spec, device="cuda:0")


def rand(g: torch.Generator, *shape: int, dtype: str) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(getattr(torch, dtype)).cuda()


def reference(pool: KVPool, layer: int, q: torch.Tensor, tables, lens, qlens) -> np.ndarray:
    """The NumPy twin over a host copy of the pool, in float64-free float32."""
    kv = cupy.asnumpy(pool.backend.kv).view(pool.spec.np_dtype)
    qn = q.float().cpu().numpy().astype(pool.spec.np_dtype)
    return paged_attention(kv, layer, qn, tables, lens, np.asarray(qlens, np.int32), pool.spec.head_dim**-0.5)


def rel_err(out: torch.Tensor, ref: np.ndarray) -> float:
    o = out.double().cpu().numpy()
    r = ref.astype(np.float64)
    assert np.isfinite(o).all()
    return float(np.linalg.norm(o - r) / np.linalg.norm(r))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_plan_prefill_then_decode_matches_numpy(dtype):
    g = torch.Generator().manual_seed(1)
    pool = make(dtype)
    lens = [16, 31, 47, 5, 64]
    allocs = pool.allocate([list(range(3, 3 + n)) for n in lens])
    ids = [a.seq_id for a in allocs]
    slots = np.concatenate([a.slots for a in allocs])
    plan = pool.plan(ids, lens, slots)
    hkv, d = pool.spec.num_kv_heads, pool.spec.head_dim
    for layer in range(2):
        plan.write(layer, rand(g, sum(lens), hkv, d, dtype=dtype), rand(g, sum(lens), hkv, d, dtype=dtype))
        q = rand(g, sum(lens), HQ, d, dtype=dtype)
        out = plan.attend(layer, q)
        assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.shape == q.shape
        tables, seq_lens = pool.tables(ids)
        assert rel_err(out, reference(pool, layer, q, tables, seq_lens, lens)) < TOL[dtype]
    new = pool.append_flat(ids, 1)
    plan = pool.plan(ids, None, new)
    for layer in range(2):
        plan.write(layer, rand(g, len(ids), hkv, d, dtype=dtype), rand(g, len(ids), hkv, d, dtype=dtype))
        q = rand(g, len(ids), HQ, d, dtype=dtype)
        out = torch.full_like(q, float("nan"))
        assert plan.attend(layer, q, out=out) is out
        tables, seq_lens = pool.tables(ids)
        assert rel_err(out, reference(pool, layer, q, tables, seq_lens, [1] * len(ids))) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_plan_over_the_first_tokens_of_prompts_allocated_whole(dtype):
    """``context_lens``: each part's queries attend over their context up to themselves
    (prefill parts, multi-token and decode-shaped), as the NumPy twin does over those
    lengths; a refilled plan takes them too, and refuses bad ones."""
    g = torch.Generator().manual_seed(2)
    pool = make(dtype)
    lens = [160, 31, 90, 64]
    allocs = pool.allocate([list(range(3, 3 + n)) for n in lens])
    ids = [a.seq_id for a in allocs]
    hkv, d = pool.spec.num_kv_heads, pool.spec.head_dim
    plan = pool.plan(ids, lens, np.concatenate([a.slots for a in allocs]))
    for layer in range(2):
        plan.write(layer, rand(g, sum(lens), hkv, d, dtype=dtype), rand(g, sum(lens), hkv, d, dtype=dtype))
    tables, _ = pool.tables(ids)
    for context, qlens in (([100, 31, 17, 64], [40, 31, 1, 3]), ([129, 2, 90, 1], [1, 1, 1, 1])):
        plan = pool.plan(ids, qlens, context_lens=context)
        q = rand(g, sum(qlens), HQ, d, dtype=dtype)
        assert rel_err(plan.attend(1, q), reference(pool, 1, q, tables, context, qlens)) < TOL[dtype]
    plan = pool.plan(ids)  # a decode step, refilled in place over other contexts
    pool.refill(plan, ids, context_lens=[8, 30, 60, 50])
    q = rand(g, 4, HQ, d, dtype=dtype)
    assert rel_err(plan.attend(0, q), reference(pool, 0, q, tables, [8, 30, 60, 50], [1, 1, 1, 1])) < TOL[dtype]
    with pytest.raises(InvalidArgument, match="context_lens"):
        pool.refill(plan, ids, context_lens=[8, 32, 60, 50])
    with pytest.raises(InvalidArgument, match="query_lens"):
        pool.plan(ids, [9, 1, 2, 4], context_lens=[8, 30, 60, 50])


def test_a_host_bound_decode_step_splits_only_where_its_ctas_miss_sms():
    """An eager (host-bound) decode step whose unsplit CTAs reach every SM runs
    unsplit (no merge launch a layer) and gives the split step's output; a step
    of too few CTAs (one long sequence) still splits, and so does one whose
    layer reads more than `HOST_BOUND_UNSPLIT_BYTES` (the device could outlast the host)."""
    from kvpager import kernels
    from kvpager.backends import cupy_decode

    g = torch.Generator().manual_seed(7)
    spec = PoolSpec(num_layers=1, num_kv_heads=8, head_dim=128, num_blocks=12000, block_size=16,
                    dtype="bfloat16")
    pool = KVPool(spec, device="cuda:0")
    nsm = kernels.num_sms(0)
    many = [a.seq_id for a in pool.allocate([[i % 7 + 2] * (520 + i) for i in range(nsm)])]
    [one] = pool.allocate([[5] * 8000])
    pool.append(many + [one.seq_id], 1)
    kv = pool.backend.kv
    # random bfloat16 K/V made on the device: the top half of float32 normals
    kv[...] = (cupy.random.standard_normal(kv.shape, dtype=cupy.float32).view(cupy.uint32) >> 16).astype(kv.dtype)
    q = rand(g, len(many), 32, 128, dtype="bfloat16")
    eager = pool.plan(many, num_q_heads=32, host_bound=True, cascade=False)
    split = pool.plan(many, num_q_heads=32, num_splits=4, cascade=False)
    assert eager.splits == 1 and split.splits == 4
    a, b = eager.attend(0, q), split.attend(0, q)
    tables, lens = pool.tables(many)
    ref = reference(pool, 0, q, tables, lens, [1] * len(many))
    assert rel_err(a, ref) < TOL["bfloat16"] and rel_err(b, ref) < TOL["bfloat16"]
    alone = pool.plan([one.seq_id], num_q_heads=32, host_bound=True)
    assert alone.splits > 1
    q1 = rand(g, 1, 32, 128, dtype="bfloat16")
    tables, lens = pool.tables([one.seq_id])
    assert rel_err(alone.attend(0, q1), reference(pool, 0, q1, tables, lens, [1])) < TOL["bfloat16"]
    # a CTA per (sequence, kv head) for every SM, but 4,000 positions each: over 64 MiB a layer
    few = [a.seq_id for a in pool.allocate([[3 + i] * 4000 for i in range(nsm // 8 + 1)])]
    pool.append(few, 1)
    assert len(few) * 4001 * spec.bytes_per_token > cupy_decode.HOST_BOUND_UNSPLIT_BYTES
    capped = pool.plan(few, num_q_heads=32, host_bound=True, cascade=False)
    plain = pool.plan(few, num_q_heads=32, cascade=False)
    assert plain.splits > 1 and capped.splits == plain.splits


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_write_attend_on_pointers_is_write_then_attend(dtype):
    """The GPU plan's per-layer hot path (heads-first views of token-major
    memory, launched on their pointers) writes the K/V and returns the output
    that `write` then `attend` give on a twin pool; heads-major memory (a
    contiguous [1, H, T, D]) gives the same result; a refused option writes
    nothing."""
    g = torch.Generator().manual_seed(5)
    pools = [make(dtype), make(dtype)]
    lens = [16, 31, 47, 5]
    ids = [[a.seq_id for a in p.allocate([list(range(3, 3 + n)) for n in lens])] for p in pools]
    slots = [p.append_flat(i, 1) for p, i in zip(pools, ids)]
    assert np.array_equal(*slots)
    plans = [p.plan(i, None, s, num_q_heads=HQ) for p, i, s in zip(pools, ids, slots)]
    t, hkv, d = len(lens), 2, 64
    for layer, heads_major in ((0, False), (1, True)):
        k, v = (rand(g, 1, t, hkv, d, dtype=dtype).transpose(1, 2) for _ in range(2))
        q = rand(g, 1, t, HQ, d, dtype=dtype).transpose(1, 2)
        if heads_major:
            k, v, q = k.contiguous(), v.contiguous(), q.contiguous()
        out = plans[0].write_attend(layer, q, k, v, 0.2)
        plans[1].write(layer, k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous())
        ref = plans[1].attend(layer, q[0].transpose(0, 1).contiguous(), 0.2)
        assert out.shape == (1, t, HQ, d) and out.dtype == q.dtype
        assert torch.equal(out[0], ref)
        tables, seq_lens = pools[0].tables(ids[0])
        kv = cupy.asnumpy(pools[0].backend.kv).view(pools[0].spec.np_dtype)
        qn = q[0].transpose(0, 1).float().cpu().numpy().astype(pools[0].spec.np_dtype)
        twin = paged_attention(kv, layer, qn, tables, seq_lens, np.ones(t, np.int32), 0.2)
        assert rel_err(out[0], twin) < TOL[dtype]
    assert cupy.array_equal(pools[0].backend.kv, pools[1].backend.kv)
    before = pools[0].backend.kv.copy()
    k, v = (rand(g, 1, t, hkv, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    q = rand(g, 1, t, HQ, d, dtype=dtype).transpose(1, 2)
    for bad in (dict(scale=0.0), dict(softcap=-1.0), dict(window=0)):
        with pytest.raises(InvalidArgument):
            plans[0].write_attend(0, q, k, v, **bad)
    assert cupy.array_equal(pools[0].backend.kv, before)


def fused_views(g: torch.Generator, t: int, hkv: int, d: int, layout: str, dtype: str):
    """q, k, v [1, H, T, D] as a model hands them over: "token rows" (one fused projection,
    each token's row the query heads, then K's, then V's: GPTBigCode, Falcon, Phi-3), "head
    rows" (each head's q, k and v side by side: GPT-NeoX; as many K/V heads as query heads
    there, so K and V are every other query head's), "heads-major" (contiguous [1, H, T, D])."""
    if layout == "token rows":
        qkv = rand(g, 1, t, (HQ + 2 * hkv) * d, dtype=dtype)
        return (qkv[..., :HQ * d].view(1, t, HQ, d).transpose(1, 2),
                qkv[..., HQ * d:(HQ + hkv) * d].view(1, t, hkv, d).transpose(1, 2),
                qkv[..., (HQ + hkv) * d:].view(1, t, hkv, d).transpose(1, 2))
    if layout == "head rows":
        qkv = rand(g, 1, t, HQ, 3 * d, dtype=dtype).transpose(1, 2)  # [1, H, T, 3D]
        q, k, v = qkv.chunk(3, dim=-1)
        step = HQ // hkv
        return q, k[:, ::step], v[:, ::step]
    return rand(g, 1, HQ, t, d, dtype=dtype), rand(g, 1, hkv, t, d, dtype=dtype), rand(g, 1, hkv, t, d, dtype=dtype)


@pytest.mark.parametrize("dtype, kv_dtype", [("bfloat16", None), ("float16", None), ("float32", None),
                                             ("bfloat16", "float8_e4m3")])
@pytest.mark.parametrize("new", [1, 3])
@pytest.mark.parametrize("layout", ["token rows", "head rows", "heads-major"])
def test_write_attend_on_a_fused_projection_views_it_in_place(dtype, kv_dtype, new, layout, monkeypatch):
    """q, k and v as views of one fused projection's output (`fused_views`), or heads-major,
    take the hot path (the write launch reads K and V where they lie and copies the query
    rows dense for the attention): the pool and the output equal `write` then `attend` on
    dense copies in a twin pool, bit for bit, for decode and multi-token steps; nothing goes
    the checked way."""
    from kvpager.plan import StepPlan

    g = torch.Generator().manual_seed(11)
    pools = [make(dtype, kv_dtype=kv_dtype), make(dtype, kv_dtype=kv_dtype)]
    lens = [16, 31, 47, 5]
    ids = [[a.seq_id for a in p.allocate([list(range(3, 3 + n)) for n in lens])] for p in pools]
    slots = [p.append_flat(i, new) for p, i in zip(pools, ids)]
    plans = [p.plan(i, [new] * len(lens), s, num_q_heads=HQ) for p, i, s in zip(pools, ids, slots)]
    t, hkv, d = new * len(lens), 2, 64

    def checked_way(*a, **k):
        raise AssertionError("a fused projection's views went the checked way")

    for layer in (0, 1):
        q, k, v = fused_views(g, t, hkv, d, layout, dtype)
        assert not q.transpose(1, 2).is_contiguous() and not k.transpose(1, 2).is_contiguous()
        with monkeypatch.context() as m:
            m.setattr(StepPlan, "write_attend", checked_way)
            out = plans[0].write_attend(layer, q, k, v, 0.2)
        plans[1].write(layer, k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous())
        ref = plans[1].attend(layer, q[0].transpose(0, 1).contiguous(), 0.2)
        assert out.shape == (1, t, HQ, d) and torch.equal(out[0], ref)
        assert cupy.array_equal(pools[0].backend.kv, pools[1].backend.kv)
        # dense views after strided ones (the same plan): no copy of the queries, the same result
        dense = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
        with monkeypatch.context() as m:
            m.setattr(StepPlan, "write_attend", checked_way)
            again = plans[0].write_attend(layer, *dense, 0.2)
        assert torch.equal(again, out)
    if kv_dtype is not None:  # (the FP8 pool's dense path against the twin: test_gpu_fp8.py)
        return
    tables, seq_lens = pools[0].tables(ids[0])
    qn = q[0].transpose(0, 1).float().cpu().numpy().astype(pools[0].spec.np_dtype)
    kv = cupy.asnumpy(pools[0].backend.kv).view(pools[0].spec.np_dtype)
    twin = paged_attention(kv, 1, qn, tables, seq_lens, np.full(len(lens), new, np.int32), 0.2)
    assert rel_err(out[0], twin) < TOL[dtype]


@pytest.mark.parametrize("chunk", [None, 32])
def test_a_plan_made_before_torchs_cuda_takes_the_hot_path_once_torch_tensors_come(chunk, monkeypatch):
    """A plan made while torch's CUDA was not yet up (a program that makes its pool and
    plans before touching torch tensors) could not know torch's tensor kinds: it learns
    them at the first torch tensor it is handed, it and its chunked views, so that call
    and the next take the hot path (never the checked one; a chunked view's launches are
    built at its first call, which goes the checked way), with `write` then `attend`'s
    result on a twin pool, bit for bit."""
    from kvpager.plan import StepPlan

    g = torch.Generator().manual_seed(17)
    pools = [make("bfloat16"), make("bfloat16")]
    lens = [16, 31, 47, 5]
    ids = [[a.seq_id for a in p.allocate([list(range(3, 3 + n)) for n in lens])] for p in pools]
    slots = [p.append_flat(i, 1) for p, i in zip(pools, ids)]
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_initialized", lambda: False)
        plans = [p.plan(i, None, s, num_q_heads=HQ) for p, i, s in zip(pools, ids, slots)]
        if chunk is not None:
            plans[0].chunked(chunk)
    assert plans[0]._torch_type is None  # what such a plan knows of torch
    t, hkv, d = len(lens), 2, 64

    def checked_way(*a, **k):
        raise AssertionError("a plan made before torch's CUDA went the checked way")

    for layer in (0, 1):
        q, k, v = fused_views(g, t, hkv, d, "token rows", "bfloat16")
        with monkeypatch.context() as m:
            if chunk is None or layer:
                m.setattr(StepPlan, "write_attend", checked_way)
            out = plans[0].write_attend(layer, q, k, v, 0.2, chunk=chunk)
        plans[1].write(layer, k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous())
        dense_q = q[0].transpose(0, 1).contiguous()
        ref = plans[1].attend(layer, dense_q, 0.2) if chunk is None else \
            plans[1].chunked(chunk).attend(layer, dense_q, 0.2)
        assert torch.equal(out[0], ref)
        assert cupy.array_equal(pools[0].backend.kv, pools[1].backend.kv)
    assert plans[0]._torch_type is torch.Tensor
    if chunk is not None:
        assert plans[0].chunked(chunk)._torch_type is torch.Tensor


def test_write_attend_refused_for_its_query_or_sinks_writes_nothing():
    """Regression: the checked way of write_attend (any q the fast path does not take)
    wrote the K/V and only then had its attend refuse a q of another dtype or device,
    or sinks on another device or of another shape; a refused call changes nothing."""
    pool = make("bfloat16")
    [a] = pool.allocate([list(range(20))])
    plan = pool.plan([a.seq_id], 20, a.slots, num_q_heads=HQ)
    g = torch.Generator().manual_seed(9)
    k, v = (rand(g, 1, 2, 20, 64, dtype="bfloat16") for _ in range(2))
    q = rand(g, 1, HQ, 20, 64, dtype="bfloat16")
    before = pool.backend.kv.copy()
    for bad_q, sinks, needle in ((q.float(), None, "dtype"), (q.cpu(), None, "is on cpu"),
                                 (q, torch.zeros(HQ + 1), "sinks"), (q, torch.zeros(HQ, dtype=torch.int32), "sinks")):
        with pytest.raises(InvalidArgument, match=needle):
            plan.write_attend(0, bad_q, k, v, sinks=sinks)
        assert cupy.array_equal(pool.backend.kv, before)
    out = plan.write_attend(0, q, k, v)  # the good call still runs
    ref = reference(pool, 0, q[0].transpose(0, 1), *pool.tables([a.seq_id]), [20])
    assert rel_err(out[0], ref) < TOL["bfloat16"]


def test_a_refused_scale_is_not_remembered():
    """Regression: a plan remembered a refused scale as its last one, so the
    same bad scale given again was taken, with the last good one's value."""
    pool = make("bfloat16")
    [a] = pool.allocate([list(range(20))])
    plan = pool.plan([a.seq_id], None, pool.append_flat([a.seq_id], 1), num_q_heads=HQ)
    q = torch.zeros(1, HQ, 64, dtype=torch.bfloat16, device="cuda")
    plan.attend(0, q, 0.5)
    for _ in range(2):
        with pytest.raises(InvalidArgument, match="scale"):
            plan.attend(0, q, -1.0)


def test_plan_checks_tensors_before_launching():
    pool = make("bfloat16")
    [a] = pool.allocate([list(range(20))])
    plan = pool.plan([a.seq_id], 20, a.slots)
    good = torch.zeros(20, 2, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(InvalidArgument, match="dtype"):
        plan.write(0, good.half(), good)
    with pytest.raises(InvalidArgument, match="shape"):
        plan.write(0, good[:5], good[:5])
    with pytest.raises(InvalidArgument, match="layer"):
        plan.write(2, good, good)
    with pytest.raises(InvalidArgument, match="q must be"):
        plan.attend(0, torch.zeros(20, 3, 64, dtype=torch.bfloat16, device="cuda"))
    with pytest.raises(InvalidArgument, match="cuda"):
        plan.attend(0, torch.zeros(20, 4, 64, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgument, match="slot"):
        pool.plan([a.seq_id], 20, np.full(20, 3))  # the null block
