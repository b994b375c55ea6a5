"""`StepPlan.write_attend`, one layer of a model in transformers' heads-first
layout, on the NumPy plan: the same K/V in the pool and the same output as
`write` then `attend` on [tokens, heads, head_dim] tensors, with windows and
soft caps, and a refusal before anything is written. The GPU plan's pointer
path: tests/test_gpu_plan.py."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager import InvalidArgument, KVPool, PoolSpec

torch = pytest.importorskip("torch")


def two_pools(dtype: str) -> tuple[KVPool, KVPool, list[int], list[int], np.ndarray]:
    """Two pools holding the same prompts, and one step of new tokens (2 / 1 / 3 a
    sequence) appended in each: (pool a, pool b, seq ids, query lens, slots)."""
    spec = PoolSpec(2, 2, 16, num_blocks=64, block_size=8, dtype=dtype)
    pools = []
    for _ in range(2):
        pool = KVPool(spec)
        allocs = pool.allocate([list(range(n)) for n in (5, 17, 30)])
        pools.append((pool, [a.seq_id for a in allocs]))
    qlens = [2, 1, 3]
    (a, ids), (b, ids_b) = pools
    assert ids == ids_b
    slots = a.append_flat(ids, qlens)
    assert np.array_equal(slots, b.append_flat(ids, qlens))
    return a, b, ids, qlens, slots


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_attend_is_write_then_attend_on_heads_first_views(dtype):
    a, b, ids, qlens, slots = two_pools(dtype)
    tdtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(3)
    t, hkv, hq, d = sum(qlens), 2, 8, 16
    plan_a, plan_b = a.plan(ids, qlens, slots), b.plan(ids, qlens, slots)
    for layer, (window, softcap) in enumerate([(None, None), (4, 3.0)]):
        # token-major projections viewed heads first, as a model's attention gives them
        k = torch.randn(1, t, hkv, d, generator=g).to(tdtype).transpose(1, 2)
        v = torch.randn(1, t, hkv, d, generator=g).to(tdtype).transpose(1, 2)
        q = torch.randn(1, t, hq, d, generator=g).to(tdtype).transpose(1, 2)
        out = plan_a.write_attend(layer, q, k, v, 0.3, window=window, softcap=softcap)
        plan_b.write(layer, k[0].transpose(0, 1), v[0].transpose(0, 1))
        ref = plan_b.attend(layer, q[0].transpose(0, 1), 0.3, window=window, softcap=softcap)
        assert isinstance(out, torch.Tensor) and out.dtype == tdtype and out.shape == (1, t, hq, d)
        assert torch.equal(out[0], ref)
    assert np.array_equal(a.backend.kv.view(np.uint8), b.backend.kv.view(np.uint8))


def test_a_refused_write_attend_writes_nothing():
    a, _, ids, qlens, slots = two_pools("float32")
    plan = a.plan(ids, qlens, slots)
    before = a.backend.kv.copy()
    t = sum(qlens)
    k = torch.ones(1, 2, t, 16)
    with pytest.raises(InvalidArgument, match="q must be"):
        plan.write_attend(0, torch.ones(1, 3, t, 16), k, k)  # 3 query heads over 2 kv heads
    with pytest.raises(InvalidArgument, match="shape"):
        plan.write_attend(0, torch.ones(1, 8, t, 16), k[:, :, :1], k[:, :, :1])
    q = torch.ones(1, 8, t, 16)
    for bad in (dict(scale=0.0), dict(softcap=-1.0), dict(window=0)):
        with pytest.raises(InvalidArgument):
            plan.write_attend(0, q, k, k, **bad)
    with pytest.raises(InvalidArgument, match=r"\[1, heads"):
        plan.write_attend(0, q[0], k, k)
    assert np.array_equal(a.backend.kv, before)
