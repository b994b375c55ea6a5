"""Chunked attention (`StepPlan.chunked`) on the GPU against a dense softmax over
each query's chunk: a multi-token step whose sequences cross chunk starts (rows
cut there), and a decode step captured in a CUDA graph whose chunked view is
refilled by the plan's `update` as the sequences cross into their next chunk.
Skips without CuPy, torch or a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import CapturedDecode, cupy_torch_or_skip

cupy, torch = cupy_torch_or_skip()

from test_plan_chunked import dense_chunked  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {"bfloat16": 1e-2, "float32": 1e-5}
HQ = 8


def make(dtype: str, block_size: int) -> KVPool:
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=256, block_size=block_size, dtype=dtype)
    return KVPool(spec, device="cuda:0")


def rand(g: torch.Generator, *shape: int, dtype: str) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(getattr(torch, dtype)).cuda()


def host_kv(pool: KVPool) -> np.ndarray:
    return cupy.asnumpy(pool.backend.kv).view(pool.spec.np_dtype).astype(np.float32)


def rel_err(out: torch.Tensor, ref: np.ndarray) -> float:
    o = out.double().cpu().numpy()
    assert np.isfinite(o).all()
    return float(np.linalg.norm(o - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("block_size,chunk", [(16, 32), (8, 24), (64, 64)])
def test_a_multi_token_step_across_chunk_starts(dtype, block_size, chunk):
    g = torch.Generator().manual_seed(block_size + chunk)
    pool = make(dtype, block_size)
    hkv, d = pool.spec.num_kv_heads, pool.spec.head_dim
    lens = [150, 9, 70, 33, 129]
    allocs = pool.allocate([list(range(7 + i, 7 + i + n)) for i, n in enumerate(lens)])
    ids = [a.seq_id for a in allocs]
    plan = pool.plan(ids, lens, np.concatenate([a.slots for a in allocs]))
    tables, _ = pool.tables(ids)
    for layer in range(2):
        q = rand(g, sum(lens), HQ, d, dtype=dtype)
        k, v = (rand(g, 1, hkv, sum(lens), d, dtype=dtype) for _ in range(2))
        out = plan.write_attend(layer, q.transpose(0, 1)[None], k, v, chunk=chunk)[0]
        ref = dense_chunked(host_kv(pool), layer, q.float().cpu().numpy(), tables, lens, lens, chunk)
        assert rel_err(out, ref) < TOL[dtype]
    pool.check_integrity()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_captured_decode_step_follows_its_sequences_into_their_next_chunks(dtype):
    pool = make(dtype, 16)
    chunk = 32

    def step(plan, q, k, v):  # layer 0 chunked, layer 1 full
        return [plan.write_attend(layer, q[layer].transpose(0, 1)[None], k[layer].transpose(0, 1)[None],
                                  v[layer].transpose(0, 1)[None], chunk=chunk if layer == 0 else None)[0]
                for layer in range(2)]

    # lengths that cross a chunk start at different steps
    cap = CapturedDecode(pool, [30, 31, 5, 63, 95], bucket=8, width=10, num_q_heads=HQ, step=step, seed=5)
    ids, q, plan, graph, outs = cap.ids, cap.q, cap.plan, cap.graph, cap.outs
    assert plan.chunked(chunk) is not plan  # a plan that can be refilled keeps a view of its own
    for n_live in (5, 5, 5, 4, 4, 3):
        ids = ids[:n_live]
        slots = pool.append_flat(ids, 1)
        tables, seq_lens = pool.tables(ids)
        plan.update(tables, seq_lens, None, slots)
        cap.fill(n_live)
        graph.replay()
        torch.cuda.synchronize()
        kv = host_kv(pool)
        ones = [1] * n_live
        for layer in range(2):
            ref = dense_chunked(kv, layer, q[layer, :n_live].float().cpu().numpy(), tables, seq_lens, ones,
                                chunk if layer == 0 else 1 << 20)
            assert rel_err(outs[layer][:n_live], ref) < TOL[dtype]
            assert not outs[layer][n_live:].any()  # padding rows read nothing
    pool.check_integrity()


def test_an_update_a_chunked_view_refuses_refills_nothing():
    """A refillable plan's view, made while every query is in its first chunk, meets a
    step whose chunk starts inside a block (chunks of 24 on blocks of 16): the update
    is refused before the plan or its view changes."""
    from kvpager.errors import InvalidArgument

    pool = make("bfloat16", 16)
    lens = [20, 9]
    allocs = pool.allocate([list(range(3, 3 + n)) for n in lens])
    ids = [a.seq_id for a in allocs]
    plan = pool.plan(ids, None, pool.append_flat(ids, 1), num_rows=4, width=4, num_q_heads=HQ)
    view = plan.chunked(24)
    assert view is not plan and view.seq_lens.tolist() == [21, 10]
    tables, seq_lens = pool.tables(ids)
    with pytest.raises(InvalidArgument, match="chunk start \\(24\\) inside a block of 16"):
        plan.update(tables, seq_lens + np.array([10, 0], np.int32), None, np.full(2, -1, np.int64))
    assert plan.seq_lens.tolist() == [21, 10] and view.seq_lens.tolist() == [21, 10]
    pool.check_integrity()
