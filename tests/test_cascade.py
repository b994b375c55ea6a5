"""The shared-prefix planner (`kvpager.cascade`) on block tables made by real
pool operations (prefix-cache hits, forks, copy-on-write): every segment's
members hold the same blocks over it, only whole blocks before each query are
shared, and attending to the segments and to each sequence's own positions
separately, then merging by log-sum-exp, gives plain paged attention (the
NumPy twin) -- so the positions are covered exactly once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager import KVPool, PoolSpec
from kvpager.backends.numpy_backend import paged_attention
from kvpager.cascade import find_shared_prefixes, worth_it

BS = 8


def partial(kv, layer, q_row, table, lo, hi, scale):
    """(output normalised over positions [lo, hi), natural-log-sum-exp) per query head."""
    pos = np.arange(lo, hi)
    blocks, offs = table[pos // BS], pos % BS
    k = kv[blocks, layer, 0][np.arange(len(pos)), :, offs].astype(np.float64)  # [n, H, D]
    v = kv[blocks, layer, 1][np.arange(len(pos)), :, offs].astype(np.float64)
    hq, hkv = q_row.shape[0], k.shape[1]
    qg = q_row.astype(np.float64).reshape(hkv, hq // hkv, -1)
    s = np.einsum("hgd,nhd->hgn", qg, k) * scale
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    o = np.einsum("hgn,nhd->hgd", p, v) / p.sum(-1, keepdims=True)
    return o.reshape(hq, -1), (m[..., 0] + np.log(p.sum(-1))).reshape(hq)


def cascade_attention(kv, layer, q, tables, lens, shared, scale):
    """The cascade's decomposition in float64: each row's segments and own part, merged."""
    out = np.empty(q.shape, np.float64)
    seg_of = [[] for _ in lens]
    for row, start, end, moff, count, _level in shared.segments.tolist():
        for m in shared.members[moff : moff + count]:
            seg_of[m].append((row, start, end))
    for b, n in enumerate(lens.tolist()):
        parts = [partial(kv, layer, q[b], tables[row], s, e, scale) for row, s, e in seg_of[b]]
        parts.append(partial(kv, layer, q[b], tables[b], int(shared.own_start[b]), n, scale))
        lse = np.stack([p[1] for p in parts])  # [parts, H]
        w = np.exp(lse - lse.max(0))
        out[b] = sum(wi[:, None] * p[0] for wi, p in zip(w, parts)) / w.sum(0)[:, None]
    return out


def build(ops, seed):
    """A pool after prefix-cache hits, forks and appends driven by ``ops``; the
    K/V random. Returns (pool, sequence ids)."""
    rng = np.random.default_rng(seed)
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=512, block_size=BS, dtype="float32")
    pool = KVPool(spec)
    system = rng.integers(0, 50, 40).tolist()  # 5 blocks
    ids = []
    for kind, n in ops:
        if kind == "prompt":  # the system prompt, maybe cut, and its own tokens
            [a] = pool.allocate([system[: 8 * (n % 6)] + rng.integers(50, 99, 1 + n).tolist()])
            pool.commit([a.seq_id])
            ids.append(a.seq_id)
        elif kind == "fork" and ids:
            ids += pool.fork([ids[n % len(ids)]], 1 + n % 3)[0]
        elif kind == "append" and ids:
            pool.append([ids[n % len(ids)]], 1 + n % 20)
    if ids:
        pool.append(ids, 1)  # the decode step's query tokens
    kv = pool.backend.kv
    kv[...] = rng.standard_normal(kv.shape).astype(np.float32)
    return pool, ids


OPS = st.lists(st.tuples(st.sampled_from(["prompt", "prompt", "fork", "append"]), st.integers(0, 40)),
               min_size=1, max_size=14)


@settings(max_examples=60, deadline=None)
@given(OPS, st.integers(0, 2**16))
def test_segments_are_shared_and_the_cascade_equals_plain_attention(ops, seed):
    pool, ids = build(ops, seed)
    if not ids:
        return
    tables, lens = pool.tables(ids)
    shared = find_shared_prefixes(tables, lens, BS)
    if shared is None:
        # nothing shared: no two sequences hold the same first whole block
        firsts = [t[0] for t, n in zip(tables.tolist(), lens.tolist()) if (n - 1) // BS >= 1]
        assert len(set(firsts)) == len(firsts)
        return
    own_end = np.zeros(len(ids), np.int64)
    for row, start, end, moff, count, _level in shared.segments.tolist():
        members = shared.members[moff : moff + count]
        assert count >= 2 and row in members and start % BS == 0 and end % BS == 0 and end > start
        cols = slice(start // BS, end // BS)
        assert (tables[members, cols] == tables[row, cols]).all()  # the same blocks
        assert ((lens[members] - 1) // BS * BS >= end).all()  # whole blocks before every query
        assert (own_end[members] == start).all()  # nested: starts where the level above ended
        own_end[members] = end
    assert np.array_equal(own_end, shared.own_start)
    q = np.random.default_rng(seed).standard_normal((len(ids), 4, 16)).astype(np.float32)
    plain = paged_attention(pool.backend.kv, 0, q, tables, lens, np.ones(len(ids), np.int32), 0.25)
    got = cascade_attention(pool.backend.kv, 0, q, tables, lens, shared, 0.25)
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-5)


def test_a_system_prompt_and_forks_make_two_levels():
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=256, block_size=BS, dtype="float32")
    pool = KVPool(spec)
    system = list(range(100, 164))  # 8 blocks
    [first] = pool.allocate([system + [1, 2, 3]])
    pool.commit([first.seq_id])
    others = [a.seq_id for a in pool.allocate([system + [7] * (5 + i) for i in range(5)])]
    pool.append([others[0]], 20)  # a conversation of 25 own tokens: 3 whole blocks of its own
    forks = pool.fork([others[0]], 3)[0]
    ids = [first.seq_id, *others, *forks]
    pool.append(ids, 1)
    tables, lens = pool.tables(ids)
    shared = find_shared_prefixes(tables, lens, BS)
    segs = shared.segments.tolist()
    assert shared.levels == 2
    # level 0: the system prompt's 8 blocks, shared by all 9; level 1: others[0]'s 3 own
    # whole blocks (positions 64-88), shared with its 3 forks
    assert [(s, e, c, lv) for _, s, e, _, c, lv in segs] == [(0, 64, 9, 0), (64, 88, 4, 1)]
    assert sorted(shared.members[segs[1][3] : segs[1][3] + 4].tolist()) == [1, 6, 7, 8]
    assert shared.saved == 8 * 64 + 3 * 24
    assert worth_it(shared, lens, 4096, min_saved_bytes=0)
    assert not worth_it(shared, lens, 4096, min_saved_bytes=(8 * 64 + 3 * 24) * 4096 + 1)
    assert not worth_it(shared, lens, 4096, min_saved_bytes=0, min_fraction=0.9)


def test_no_sharing_and_partial_blocks_are_never_shared():
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=64, block_size=BS, dtype="float32")
    pool = KVPool(spec)
    ids = [a.seq_id for a in pool.allocate([[i] * 20 for i in range(4)])]
    tables, lens = pool.tables(ids)
    assert find_shared_prefixes(tables, lens, BS) is None
    # a fork shares the parent's blocks, but the block holding the query is never a segment's
    [a] = pool.allocate([list(range(15))])
    kid = pool.fork([a.seq_id], 1)[0][0]
    pool.append([a.seq_id, kid], 1)  # 16 tokens: the query sits in block 1, block 0 is whole
    tables, lens = pool.tables([a.seq_id, kid])
    shared = find_shared_prefixes(tables, lens, BS)
    assert shared.segments[:, 1:3].tolist() == [[0, 8]]
    assert shared.own_start.tolist() == [8, 8]


def test_a_host_bound_step_cascades_only_from_two_gib_spared_a_layer():
    from kvpager.cascade import HOST_BOUND_MIN_SAVED

    bs, per_position = 16, 2 * 8 * 128 * 2  # K and V of 8 kv heads of head dim 128, bfloat16
    for n, shared_blocks, host_bound_pays in ((64, 128, False), (256, 256, True)):
        tables = np.concatenate([np.tile(np.arange(1, shared_blocks + 1), (n, 1)),
                                 np.arange(shared_blocks + 1, shared_blocks + 1 + n)[:, None]], axis=1)
        lens = np.full(n, shared_blocks * bs + 2)
        found = find_shared_prefixes(tables.astype(np.int32), lens, bs)
        assert found.saved == (n - 1) * shared_blocks * bs
        assert worth_it(found, lens, per_position)
        assert worth_it(found, lens, per_position, min_saved_bytes=HOST_BOUND_MIN_SAVED) == host_bound_pays
