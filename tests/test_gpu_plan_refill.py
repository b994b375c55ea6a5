"""Step plans on the GPU refilled in place, against the NumPy twin: a decode
step captured in a CUDA graph and replayed over new block tables, lengths and
slots as the eager step runs; plans built and updated while the GPU is busy
reading their own tables; a refilled plan staying checked, a stale one writing
nothing. Skips without CuPy, torch or a GPU. (Plans made and run:
test_gpu_plan.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import CapturedDecode, cupy_torch_or_skip

cupy, torch = cupy_torch_or_skip()

from test_gpu_plan import HQ, TOL, make, rand, reference, rel_err  # noqa: E402

from kvpager.errors import InvalidArgument  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_captured_decode_step_replays_new_tables_like_the_eager_step(dtype):
    pool = make(dtype)

    def step(plan, q, k, v):
        return [(plan.write(layer, k[layer], v[layer]), plan.attend(layer, q[layer]))[1] for layer in range(2)]

    # appends cross block boundaries at different steps
    width = 8
    cap = CapturedDecode(pool, [15, 16, 33, 50, 7], bucket=8, width=width, num_q_heads=HQ, step=step, seed=2)
    ids, q, k, plan, graph, outs = cap.ids, cap.q, cap.k, cap.plan, cap.graph, cap.outs
    for n_live in (5, 5, 4, 3):  # new tables and lengths each time, then fewer sequences
        ids = ids[:n_live]
        slots = pool.append_flat(ids, 1)
        tables, seq_lens = pool.tables(ids)
        plan.update(tables, seq_lens, None, slots)
        cap.fill(n_live)
        graph.replay()
        torch.cuda.synchronize()
        eager = pool.plan(ids, None, slots)
        kv = cupy.asnumpy(pool.backend.kv).view(pool.spec.np_dtype)
        blocks, offsets = np.divmod(slots, pool.spec.block_size)
        for layer in range(2):  # the replay wrote this step's K/V at this step's slots
            stored = kv[blocks, layer, 0, :, offsets].astype(np.float32)
            assert np.array_equal(stored, k[layer, :n_live].float().cpu().numpy())
            expect = eager.attend(layer, q[layer, :n_live].contiguous())
            ref = reference(pool, layer, q[layer, :n_live], tables, seq_lens, [1] * n_live)
            assert rel_err(outs[layer][:n_live], ref) < TOL[dtype]
            assert rel_err(expect, ref) < TOL[dtype]
            assert not outs[layer][n_live:].any()  # padding rows read nothing
    too_wide = np.zeros((1, width + 1), np.int32)
    with pytest.raises(InvalidArgument, match="capacity"):
        plan.update(too_wide, np.array([1], np.int32), None, np.array([-1]))
    pool.check_integrity()


def test_plans_built_and_updated_while_the_gpu_is_busy_read_their_own_tables():
    """Uploads are asynchronous copies from pinned buffers: a plan refilled in
    place, or a new plan in a buffer another plan just released, while the GPU
    is still busy with earlier work, must still attend over its own step."""
    g = torch.Generator().manual_seed(3)
    pool = make("float16")
    hkv, d = pool.spec.num_kv_heads, pool.spec.head_dim
    allocs = pool.allocate([list(range(3, 3 + n)) for n in (40, 70, 9, 33)])
    ids = [a.seq_id for a in allocs]
    slots = np.concatenate([a.slots for a in allocs])
    plan = pool.plan(ids, [40, 70, 9, 33], slots)
    for layer in range(2):
        plan.write(layer, rand(g, 152, hkv, d, dtype="float16"), rand(g, 152, hkv, d, dtype="float16"))
    steps = []
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # the GPU stays busy while the host builds every plan below
    for i in range(6):
        sub = ids[i % 4:] + ids[: i % 4]  # another order each step: other tables, other lengths
        tables, lens = pool.tables(sub)
        q = rand(g, len(sub), HQ, d, dtype="float16")
        if i % 2:  # refill the previous plan in place, its last upload maybe not run yet
            plan.update(tables, lens)
        else:  # a new plan, maybe in the buffer of one just released
            plan = pool.plan(sub)
        steps.append((plan.attend(i % 2, q), i % 2, q, tables, lens))
    torch.cuda.synchronize()
    for out, layer, q, tables, lens in steps:
        assert rel_err(out, reference(pool, layer, q, tables, lens, [1] * 4)) < TOL["float16"]


def test_a_refilled_plan_stays_checked_and_a_stale_one_writes_nothing():
    """`KVPool.refill` refills a decode plan in place from sequence ids and keeps
    it tied to them: after one is freed and its blocks taken by another sequence,
    the plan's write, attend and write_attend refuse (`StalePlan`) and the other
    sequence's K/V is untouched; refilled again, it matches the NumPy twin."""
    from kvpager.errors import StalePlan

    g = torch.Generator().manual_seed(5)
    pool = make("bfloat16")
    spec = pool.spec
    seqs = pool.allocate([list(range(n)) for n in (40, 70, 33)])
    ids = [s.seq_id for s in seqs]
    for s in seqs:
        for layer in range(spec.num_layers):
            pool.write(layer, s.slots, rand(g, len(s.slots), 2, spec.head_dim, dtype="bfloat16"),
                       rand(g, len(s.slots), 2, spec.head_dim, dtype="bfloat16"))
    slots = np.ravel(pool.append(ids))
    plan = pool.plan(ids, None, slots, num_rows=4, width=16, num_q_heads=HQ)
    kv = rand(g, 4, 2, spec.head_dim, dtype="bfloat16")  # a row a padding row: the plan's capacity
    plan.write(0, kv, kv)
    slots = np.ravel(pool.append(ids))
    pool.refill(plan, ids, None, slots)
    plan.write(0, kv, kv)
    pool.free([ids[1]])
    other = pool.allocate([list(range(500, 570))])[0]
    assert set(other.block_table) & set(seqs[1].block_table)
    pool.write(0, other.slots, rand(g, 70, 2, spec.head_dim, dtype="bfloat16"),
               rand(g, 70, 2, spec.head_dim, dtype="bfloat16"))
    torch.cuda.synchronize()
    before = cupy.asnumpy(pool.backend.kv).copy()
    q = rand(g, 4, HQ, spec.head_dim, dtype="bfloat16")
    with pytest.raises(StalePlan):
        plan.write(0, torch.full_like(kv, 7.0), torch.full_like(kv, 7.0))
    with pytest.raises(StalePlan):
        plan.attend(0, q)
    with pytest.raises(StalePlan):
        plan.write_attend(0, q.transpose(0, 1)[None], kv.transpose(0, 1)[None], kv.transpose(0, 1)[None])
    torch.cuda.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(pool.backend.kv), before)
    keep = [ids[0], ids[2]]  # refilled over the sequences left: checked again, and right
    slots = np.ravel(pool.append(keep))
    pool.refill(plan, keep, None, slots)
    plan.write(0, kv, kv)
    out = plan.attend(0, q)[:2]
    tables, lens = pool.tables(keep)
    torch.cuda.synchronize()
    assert rel_err(out, reference(pool, 0, q[:2], tables, lens, [1, 1])) < TOL["bfloat16"]
