"""Shared-prefix (cascade) decode attention on the GPU against the NumPy twin
and against the same plan without the cascade: prefixes shared through the
prefix cache and by forks (two levels), GQA groups 1-16, block sizes 8-64,
split-K of the own part, soft caps, and a windowed call (which runs without
the cascade). Outputs are poisoned (NaN) first. Skips without CuPy or a GPU."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import cupy_or_skip

cupy = cupy_or_skip()

from gpu_kernel_helpers import TOL, rel_err, seed, to_dev, to_host  # noqa: E402

from kvpager import InvalidArgument, KVPool  # noqa: E402
from kvpager.backends.numpy_backend import paged_attention  # noqa: E402
from kvpager.spec import PoolSpec  # noqa: E402

pytestmark = pytest.mark.gpu

CASES = [  # (dtype, head dim, block size, GQA group)
    ("bfloat16", 128, 16, 4),
    ("float16", 64, 8, 1),
    ("bfloat16", 256, 32, 16),
    ("float16", 96, 64, 8),
    ("bfloat16", 80, 16, 2),
    ("float16", 128, 16, 7),  # groups not a power of two (Qwen2.5-7B's 7, StarCoder2's 12)
    ("bfloat16", 64, 32, 12),
    ("bfloat16", 64, 16, 29),  # past 16: the own parts decode in chunks of 16 heads
]


def shared_pool(dtype, d, bs, rng):
    """A GPU pool with a system prompt shared by 12 sequences (3 of them forks
    of one conversation, which share its own blocks too) and 3 sequences of
    their own; every slot holds random K/V. Returns (pool, ids)."""
    spec = PoolSpec(num_layers=2, num_kv_heads=2, head_dim=d, num_blocks=4096 // bs + 64, block_size=bs,
                    dtype=dtype)
    pool = KVPool(spec, device="cuda:0")
    system = rng.integers(0, 1000, 40 * bs + 3).tolist()  # 40 whole blocks and a partial one
    [first] = pool.allocate([system + [1]])
    pool.commit([first.seq_id])
    allocs = pool.allocate([system + rng.integers(1000, 2000, int(n)).tolist() for n in rng.integers(1, 5 * bs, 8)])
    allocs += pool.allocate([rng.integers(0, 1000, int(n)).tolist() for n in (5, 3 * bs, 9 * bs + 1)])
    ids = [first.seq_id] + [a.seq_id for a in allocs]
    conv = ids[1]
    pool.append([conv], 4 * bs)  # a conversation: whole blocks of its own, shared with its forks
    ids += pool.fork([conv], 3)[0]
    pool.append(ids, 1)  # the step's query tokens
    kv = pool.backend.kv
    kv[...] = to_dev(rng.standard_normal(kv.shape, dtype=np.float32).astype(spec.np_dtype), pool.backend)
    return pool, ids


def decode_case(dtype, d, bs, group, tag):
    """`shared_pool`'s step with random queries: (pool, ids, tables, lengths,
    K/V on the host, query heads, q on the host)."""
    rng = np.random.default_rng(seed(dtype, d, bs, group, tag))
    pool, ids = shared_pool(dtype, d, bs, rng)
    tables, lens = pool.tables(ids)
    hq = pool.spec.num_kv_heads * group
    q = rng.standard_normal((len(ids), hq, d), dtype=np.float32).astype(pool.spec.np_dtype)
    return pool, ids, tables, lens, to_host(pool.backend.kv, pool.spec), hq, q


@pytest.mark.parametrize("dtype,d,bs,group", CASES)
def test_cascade_matches_numpy_and_plain_plan(dtype, d, bs, group):
    pool, ids, tables, lens, kv, hq, q = decode_case(dtype, d, bs, group, "cascade")
    spec = pool.spec
    ones = np.ones(len(ids), np.int32)
    for splits in (None, 3):
        plan = pool.plan(ids, cascade=True, num_splits=splits, num_q_heads=hq)
        shared = plan.shared_prefixes
        assert shared is not None and shared.levels == 2
        plain = pool.plan(ids, cascade=False, num_splits=splits)
        for layer, softcap in ((0, None), (1, None), (1, 3.0)):
            ref = paged_attention(kv, layer, q, tables, lens, ones, d**-0.5, softcap=softcap)
            got, want = (to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), pool.backend) for _ in range(2))
            plan.attend(layer, to_dev(q, pool.backend), out=got, softcap=softcap)
            plain.attend(layer, to_dev(q, pool.backend), out=want, softcap=softcap)
            assert rel_err(to_host(got, spec), ref) < TOL[dtype], (splits, layer, softcap)
            assert rel_err(to_host(got, spec), to_host(want, spec)) < TOL[dtype]
        # a sliding window is not cascaded: the plan runs its plain launches
        ref = paged_attention(kv, 1, q, tables, lens, ones, d**-0.5, window=3 * bs)
        got = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), pool.backend)
        plan.attend(1, to_dev(q, pool.backend), out=got, window=3 * bs)
        assert rel_err(to_host(got, spec), ref) < TOL[dtype]
        # and the cascade again after it
        got = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), pool.backend)
        plan.attend(0, to_dev(q, pool.backend), out=got)
        assert rel_err(to_host(got, spec), paged_attention(kv, 0, q, tables, lens, ones, d**-0.5)) < TOL[dtype]
    pool.close()


def test_cascade_is_automatic_only_when_it_pays():
    """Chosen when the K/V bytes it spares rereading are large (64 sequences of
    an 8-kv-head model sharing 2,048 positions: 0.5 GB a layer), not for a small
    step (8 sequences sharing 64 positions), never when nothing is shared; in a
    host-bound step only from 2 GiB a layer (256 sequences sharing 4,096)."""
    rng = np.random.default_rng(4)
    spec = PoolSpec(num_layers=1, num_kv_heads=8, head_dim=128, num_blocks=1024, block_size=16, dtype="bfloat16")
    pool = KVPool(spec, device="cuda:0")
    system = rng.integers(0, 1000, 2048).tolist()
    [first] = pool.allocate([system + [1]])
    pool.commit([first.seq_id])
    big = [a.seq_id for a in pool.allocate([system + [2, i] for i in range(64)])]
    small_prompt = rng.integers(0, 1000, 64).tolist()
    [head] = pool.allocate([small_prompt + [1]])
    pool.commit([head.seq_id])
    small = [a.seq_id for a in pool.allocate([small_prompt + [3, i] for i in range(8)])]
    alone = [a.seq_id for a in pool.allocate([rng.integers(0, 9, 300).tolist() for _ in range(4)])]
    long_prompt = rng.integers(0, 1000, 4096).tolist()
    [lead] = pool.allocate([long_prompt + [1]])
    pool.commit([lead.seq_id])
    wide = [a.seq_id for a in pool.allocate([long_prompt + [4, i] for i in range(256)])]
    pool.append(big + small + alone + wide, 1)
    assert pool.plan(big, num_q_heads=32).shared_prefixes is not None
    # a host-bound (eager) step: 0.5 GB spared a layer is not enough, 4.3 GB is
    assert pool.plan(big, num_q_heads=32, host_bound=True).shared_prefixes is None
    assert pool.plan(wide, num_q_heads=32, host_bound=True).shared_prefixes is not None
    assert pool.plan(big, num_q_heads=32, host_bound=True, cascade=True).shared_prefixes is not None
    with pytest.raises(InvalidArgument, match="host_bound"):
        pool.plan(big, num_q_heads=32, host_bound=1)
    assert pool.plan(small, num_q_heads=32).shared_prefixes is None
    assert pool.plan(small, num_q_heads=32, cascade=True).shared_prefixes is not None
    assert pool.plan(alone, num_q_heads=32, cascade=True).shared_prefixes is None  # nothing shared
    assert pool.plan(big, num_q_heads=32, cascade=False).shared_prefixes is None
    # a plan with capacities (CUDA graphs) cascades too, sized for later steps
    padded = pool.plan(big, num_q_heads=32, num_rows=96, width=160)
    assert padded.shared_prefixes is not None
    tables, lens = pool.tables(small)
    padded.update(tables, lens)  # nothing worth it is required of an update: it refills what fits
    assert padded.shared_prefixes is not None
    tables, lens = pool.tables(alone)
    padded.update(tables, lens)
    assert padded.shared_prefixes is None
    pool.close()


def test_captured_cascade_step_replays_updated_prefixes():
    """A decode step captured in a CUDA graph with its cascade, replayed after
    `update` over new tables: the same sharing with longer own parts, fewer
    sequences, more groups than its tables hold (it runs without the cascade),
    nothing shared, and the first sharing again. Each replay equals the twin;
    padding rows stay zero."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed("captured cascade"))
    dtype, d, bs, group = "bfloat16", 128, 16, 4
    pool, ids = shared_pool(dtype, d, bs, rng)
    spec = pool.spec
    hq, bucket, width = spec.num_kv_heads * group, 32, 64
    q = torch.zeros(bucket, hq, d, dtype=torch.bfloat16, device="cuda")
    outs = [torch.zeros_like(q) for _ in range(2)]
    plan = pool.plan(ids, num_rows=bucket, width=width, num_q_heads=hq, cascade=True)
    assert plan.shared_prefixes is not None and plan.shared_prefixes.levels == 2

    def step():
        plan.attend(0, q, out=outs[0])
        plan.attend(1, q, out=outs[1], softcap=3.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def replay(live, cascades):
        pool.append(live, 1)
        tables, lens = pool.tables(live)
        plan.update(tables, lens)
        assert (plan.shared_prefixes is not None) == cascades
        n = len(live)
        q.zero_()
        q[:n] = torch.from_numpy(rng.standard_normal((n, hq, d), dtype=np.float32)).to(q)
        for out in outs:
            out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        kv = to_host(pool.backend.kv, spec)
        qn = q[:n].float().cpu().numpy()
        for layer, softcap in ((0, None), (1, 3.0)):
            ref = paged_attention(kv, layer, qn, tables, lens, np.ones(n, np.int32), d**-0.5, softcap=softcap)
            assert rel_err(outs[layer][:n].float().cpu().numpy(), ref) < TOL[dtype], (n, cascades, layer)
            assert not outs[layer][n:].any()

    replay(ids, True)
    replay(ids[:10], True)
    # eight new pairs (a prompt and its fork) sharing their first blocks: more segments than the tables hold
    pairs = [a.seq_id for a in pool.allocate([rng.integers(3000, 9000, 3 * bs + 2).tolist() for _ in range(8)])]
    pairs += [f for p in pairs for f in pool.fork([p], 1)[0]]
    replay(ids + pairs, False)
    replay(pairs[:8], False)  # nothing shared
    replay(ids, True)
    pool.check_integrity()
    pool.close()


@pytest.mark.parametrize("dtype,d,bs,group", CASES)
def test_warp_and_cta_merges_agree(dtype, d, bs, group):
    """The merge of a few partial slots a row, a warp per row (merge_splits_warp)
    and a CTA per row (merge_splits), after split decodes and two-level cascades:
    both equal the NumPy twin and each other (head dims that are not a multiple
    of 32 always merge a CTA per row)."""
    from kvpager.kernel_config import DEFAULT

    pool, ids, tables, lens, kv, hq, q = decode_case(dtype, d, bs, group, "merge")
    spec = pool.spec
    rows = len(ids) * hq
    ref = paged_attention(kv, 0, q, tables, lens, np.ones(len(ids), np.int32), d**-0.5)
    unfused = DEFAULT.replace(decode_merge_fused_splits=0)  # a split decode ends with the merge launch
    configs = {"warp": unfused.replace(merge_warp_max_parts=8, merge_warp_min_rows=0),
               "cta": unfused.replace(merge_warp_max_parts=0)}
    warps = 0
    for cascade, splits in ((True, None), (True, 3), (False, 3), (False, 8)):
        outs = {}
        for name, config in configs.items():
            plan = pool.plan(ids, cascade=cascade, num_splits=splits, num_q_heads=hq, config=config)
            merge = plan._attn[hq][-1]
            parts = merge.args[3].value
            warp = name == "warp" and d % 32 == 0 and parts <= 8
            assert merge.grid[0] == (-(-rows // 8) if warp else rows), (name, cascade, splits, parts)
            warps += warp
            got = to_dev(np.full(q.shape, np.nan, dtype=spec.np_dtype), pool.backend)
            plan.attend(0, to_dev(q, pool.backend), out=got)
            outs[name] = to_host(got, spec)
            assert rel_err(outs[name], ref) < TOL[dtype], (name, cascade, splits)
        assert rel_err(outs["warp"], outs["cta"]) < TOL[dtype]
    assert warps or d % 32, "no merge ran a warp per row"
    pool.close()
