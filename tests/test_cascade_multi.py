"""The shared-prefix planner (`kvpager.cascade`) for multi-token steps (chunked
prefill on a cached prefix, speculative verification): on tables made by real
pool operations (prefix-cache hits, forks, appends) and ragged query lengths
1-40, every segment ends before each member's first query position, its rows
(`query_rows`) are exactly every query token of every member, and attending to
the segments for those rows and to each sequence's own positions (causal), then
merging by log-sum-exp, gives plain causal paged attention (the NumPy twin).
The tile-read counts that decide whether it pays are checked against a count
of the kernels' tiles one by one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager import KVPool, PoolSpec
from kvpager.backends.numpy_backend import paged_attention
from kvpager.cascade import find_shared_prefixes, multi_token_worth_it, query_rows, tile_positions

BS = 8


def partial(kv, q_row, table, lo, hi, scale, softcap):
    """(output normalised over positions [lo, hi), natural-log-sum-exp) per query head, float64."""
    pos = np.arange(lo, hi)
    blocks, offs = table[pos // BS], pos % BS
    k = kv[blocks, 0, 0][np.arange(len(pos)), :, offs].astype(np.float64)  # [n, H, D]
    v = kv[blocks, 0, 1][np.arange(len(pos)), :, offs].astype(np.float64)
    hq, hkv = q_row.shape[0], k.shape[1]
    qg = q_row.astype(np.float64).reshape(hkv, hq // hkv, -1)
    s = np.einsum("hgd,nhd->hgn", qg, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    m = s.max(axis=-1, keepdims=True)
    p = np.exp(s - m)
    o = np.einsum("hgn,nhd->hgd", p, v) / p.sum(-1, keepdims=True)
    return o.reshape(hq, -1), (m[..., 0] + np.log(p.sum(-1))).reshape(hq)


def cascade_attention(kv, q, tables, lens, qlens, shared, scale, softcap=None):
    """The multi-token cascade's decomposition in float64, row by row as the kernels
    read it: segment partials for the rows `query_rows` lists, own parts causal."""
    rows = query_rows(shared, qlens)
    seq_of = np.repeat(np.arange(len(lens)), qlens)
    pos_of = np.concatenate([np.arange(n - ql, n) for n, ql in zip(lens.tolist(), qlens.tolist())])
    parts: list[list] = [[] for _ in range(len(q))]
    for trow, start, end, moff, count, _level in rows.segments.tolist():
        for r in rows.members[moff : moff + count].tolist():
            assert end <= lens[seq_of[r]] - qlens[seq_of[r]]  # before the row's sequence's first query
            parts[r].append(partial(kv, q[r], tables[trow], start, end, scale, softcap))
    out = np.empty(q.shape, np.float64)
    for r in range(len(q)):
        b = seq_of[r]
        parts[r].append(partial(kv, q[r], tables[b], int(shared.own_start[b]), pos_of[r] + 1, scale, softcap))
        lse = np.stack([p[1] for p in parts[r]])
        w = np.exp(lse - lse.max(0))
        out[r] = sum(wi[:, None] * p[0] for wi, p in zip(w, parts[r])) / w.sum(0)[:, None]
    return out


def build(ops, qlens, seed):
    """A pool after prefix-cache hits (a system prompt cut at block bounds, and a
    second-level conversation prefix), forks and appends; then each sequence
    gets its step's query tokens (``qlens``, cycled). Random K/V. Returns (pool,
    ids, query lengths)."""
    rng = np.random.default_rng(seed)
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=2048, block_size=BS, dtype="float32")
    pool = KVPool(spec)
    system = rng.integers(0, 50, 48).tolist()  # 6 blocks
    conv = system + rng.integers(50, 99, 24).tolist()  # 3 more
    ids = []
    for kind, n in ops:
        if kind in ("prompt", "conv"):
            base = system[: BS * (n % 7)] if kind == "prompt" else conv
            [a] = pool.allocate([base + rng.integers(100, 199, 1 + n).tolist()])
            pool.commit([a.seq_id])
            ids.append(a.seq_id)
        elif kind == "fork" and ids:
            ids += pool.fork([ids[n % len(ids)]], 1 + n % 3)[0]
        elif kind == "append" and ids:
            pool.append([ids[n % len(ids)]], 1 + n % 20)
    ql = np.array([qlens[i % len(qlens)] for i in range(len(ids))], np.int32)
    for i, n in zip(ids, ql.tolist()):
        pool.append([i], n)  # the step's query tokens
    kv = pool.backend.kv
    kv[...] = rng.standard_normal(kv.shape).astype(np.float32)
    return pool, ids, ql


OPS = st.lists(st.tuples(st.sampled_from(["prompt", "prompt", "conv", "fork", "append"]), st.integers(0, 40)),
               min_size=1, max_size=12)
QLENS = st.lists(st.integers(1, 40), min_size=1, max_size=6)


@settings(max_examples=50, deadline=None)
@given(OPS, QLENS, st.sampled_from([None, 2.5]), st.integers(0, 2**16))
def test_multi_token_cascade_equals_plain_causal_attention(ops, qlens, softcap, seed):
    pool, ids, ql = build(ops, qlens, seed)
    if not ids:
        return
    tables, lens = pool.tables(ids)
    shared = find_shared_prefixes(tables, lens, BS, query_lens=ql)
    first_q = lens.astype(np.int64) - ql
    if shared is None:
        firsts = [t[0] for t, f in zip(tables.tolist(), first_q.tolist()) if f // BS >= 1]
        assert len(set(firsts)) == len(firsts)  # no two hold the same first whole block
        return
    own_end = np.zeros(len(ids), np.int64)
    for row, start, end, moff, count, _level in shared.segments.tolist():
        members = shared.members[moff : moff + count]
        cols = slice(start // BS, end // BS)
        assert count >= 2 and row in members and (tables[members, cols] == tables[row, cols]).all()
        assert (first_q[members] >= end).all()  # every shared position precedes every member query
        assert (own_end[members] == start).all()
        own_end[members] = end
    assert np.array_equal(own_end, shared.own_start)
    rows = query_rows(shared, ql)
    q_start = np.cumsum(ql) - ql
    for (_, _, _, moff, count, _), (_, _, _, roff, rcount, _) in zip(shared.segments.tolist(),
                                                                       rows.segments.tolist()):
        want = [q_start[b] + j for b in shared.members[moff : moff + count].tolist() for j in range(ql[b])]
        assert rows.members[roff : roff + rcount].tolist() == want
    q = np.random.default_rng(seed).standard_normal((int(ql.sum()), 4, 16)).astype(np.float32)
    plain = paged_attention(pool.backend.kv, 0, q, tables, lens, ql, 0.25, softcap=softcap)
    got = cascade_attention(pool.backend.kv, q, tables, lens, ql, shared, 0.25, softcap)
    np.testing.assert_allclose(got, plain, rtol=1e-4, atol=1e-5)
    # the tile-read counts against the kernels' tiles counted one by one
    for qt in (4, 32, 128):
        plain_n = casc_n = 0
        for b, (n, m) in enumerate(zip(lens.tolist(), ql.tolist())):
            for j0 in range(0, m, qt):
                end = n - m + min(j0 + qt, m)
                plain_n += end
                casc_n += end - int(shared.own_start[b])
        for _, start, end, _, count, _ in rows.segments.tolist():
            casc_n += -(-count // qt) * (end - start)
        assert tile_positions(shared, lens, ql, qt) == (plain_n, casc_n)


def test_two_levels_with_chunked_prefill_and_a_decode_row():
    """A system prompt shared by all, a conversation shared by its forks; each
    sequence verifies a few draft tokens, one prefills a long chunk, one decodes.
    The block holding a sequence's first query is never shared."""
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=16, num_blocks=256, block_size=BS, dtype="float32")
    pool = KVPool(spec)
    system = list(range(100, 164))  # 8 blocks
    [first] = pool.allocate([system + [1, 2, 3]])
    pool.commit([first.seq_id])
    others = [a.seq_id for a in pool.allocate([system + [7] * (5 + i) for i in range(4)])]
    pool.append([others[0]], 20)  # 25 own tokens: 3 whole blocks of its own
    forks = pool.fork([others[0]], 2)[0]
    ids = [first.seq_id, *others, *forks]
    ql = np.array([4, 1, 30, 4, 4, 5, 3], np.int32)  # others[0]: 1 token; others[1]: a 30-token chunk
    for i, n in zip(ids, ql.tolist()):
        pool.append([i], n)
    tables, lens = pool.tables(ids)
    shared = find_shared_prefixes(tables, lens, BS, query_lens=ql)
    segs = shared.segments.tolist()
    assert [(s, e, c, lv) for _, s, e, _, c, lv in segs] == [(0, 64, 7, 0), (64, 88, 3, 1)]
    rows = query_rows(shared, ql)
    assert rows.segments[:, 4].tolist() == [int(ql.sum()), 1 + 5 + 3]
    # a fork whose queries start inside the conversation's third block (it verifies 13
    # tokens, from position 81): the conversation's segment ends with its second block
    fork_ql = np.array([4, 1, 30, 4, 4, 5 + 8, 3], np.int32)
    shared2 = find_shared_prefixes(tables, lens, BS, query_lens=fork_ql)
    assert shared2.segments[:, 1:3].tolist() == [[0, 64], [64, 80]]
    assert shared2.own_start.tolist() == [64, 80, 64, 64, 64, 80, 80]


def test_worth_it_counts_underfilled_tiles():
    """64 sequences x 8 query tokens on an 8k shared prefix (GQA 4: 32 tokens a
    tile) pay: the plain kernel's 64 tiles each read the prefix for 8 tokens;
    8 x 1,024 new tokens on a 4k prefix fill their tiles either way: nothing is
    spared, the plain kernel runs."""
    bs, per_position, partial = 16, 2 * 8 * 128 * 2, 32 * 129 * 4

    def step(nseq, prefix, own, qlen):
        shared_blocks = np.arange(1, prefix // bs + 1, dtype=np.int32)
        own_blocks = -(-(own + qlen) // bs)
        fresh = 1 + prefix // bs + np.arange(nseq * own_blocks, dtype=np.int32).reshape(nseq, own_blocks)
        tables = np.concatenate([np.tile(shared_blocks, (nseq, 1)), fresh], axis=1)
        lens = np.full(nseq, prefix + own + qlen, np.int32)
        ql = np.full(nseq, qlen, np.int32)
        return find_shared_prefixes(tables, lens, bs, query_lens=ql), lens, ql

    shared, lens, ql = step(64, 8192, 256, 8)
    plain, casc = tile_positions(shared, lens, ql, 32)
    assert plain == 64 * (8192 + 256 + 8) and casc == 16 * 8192 + 64 * (256 + 8)
    assert multi_token_worth_it(shared, lens, ql, 32, per_position, partial)
    shared, lens, ql = step(8, 4096, 0, 1024)
    plain, casc = tile_positions(shared, lens, ql, 32)
    assert plain == casc
    assert not multi_token_worth_it(shared, lens, ql, 32, per_position, partial, min_saved_bytes=0)
    # small steps spare too little to pay for the extra launches
    shared, lens, ql = step(4, 256, 16, 4)
    assert not multi_token_worth_it(shared, lens, ql, 32, per_position, partial)


def packed(shared, ql, per_tile, chunks, splits=1, bn=32):
    """`CascadeLaunch`'s tables for ``shared`` (its packing alone: no GPU); ``bn``: the
    kernel's K/V tile (32: cascade_prefix.cu; 64 / 128: cascade_prefix_sm90.cu)."""
    from kvpager.backends.cupy_cascade import CascadeLaunch

    launch = CascadeLaunch.__new__(CascadeLaunch)
    launch.per_tile, launch.chunks, launch.splits, launch.levels, launch.bn = per_tile, chunks, splits, 2, bn
    launch.cap_members = launch.cap_segs = launch.cap_tiles = 1 << 30
    rows = query_rows(shared, ql)
    return rows, launch._pack(rows)


@settings(max_examples=30, deadline=None)
@given(OPS, QLENS, st.sampled_from([4, 32, 128]), st.integers(1, 3), st.sampled_from([32, 64, 128]),
       st.integers(0, 2**16))
def test_packed_tiles_give_each_row_its_segments_once(ops, qlens, per_tile, chunks, bn, seed):
    """Walk the packed tables as `cascade_prefix.cu` does (tile -> segment chunk ->
    member rows j0 .. j0 + per_tile -> slot), then the own part into slot 0 and
    the merge: every row's slots are distinct, and the result is plain attention."""
    pool, ids, ql = build(ops, qlens, seed)
    tables, lens = pool.tables(ids) if ids else (None, None)
    shared = find_shared_prefixes(tables, lens, BS, query_lens=ql) if ids else None
    if shared is None:
        return
    rows, (segs, tiles) = packed(shared, ql, per_tile, chunks, bn=bn)
    kv = pool.backend.kv
    q = np.random.default_rng(seed).standard_normal((int(ql.sum()), 4, 16)).astype(np.float32)
    seq_of = np.repeat(np.arange(len(ids)), ql)
    pos_of = np.concatenate([np.arange(n - m, n) for n, m in zip(lens.tolist(), ql.tolist())])
    slots: list[dict] = [{} for _ in range(len(q))]
    for s, j0 in tiles.tolist():
        trow, a, b, moff, count, slot = segs[s].tolist()
        for r in rows.members[moff + j0 : moff + min(j0 + per_tile, count)].tolist():
            assert slot not in slots[r] and slot >= 1
            if b > a:  # (a chunk past a short segment's end is empty: it reads nothing)
                assert b <= lens[seq_of[r]] - ql[seq_of[r]]
                slots[r][slot] = partial(kv, q[r], tables[trow], a, b, 0.25, None)
    out = np.empty(q.shape, np.float64)
    for r in range(len(q)):
        b = seq_of[r]
        parts = [*slots[r].values(), partial(kv, q[r], tables[b], int(shared.own_start[b]), pos_of[r] + 1, 0.25,
                                             None)]
        lse = np.stack([p[1] for p in parts])
        w = np.exp(lse - lse.max(0))
        out[r] = sum(wi[:, None] * p[0] for wi, p in zip(w, parts)) / w.sum(0)[:, None]
    plain = paged_attention(kv, 0, q, tables, lens, ql, 0.25)
    np.testing.assert_allclose(out, plain, rtol=1e-4, atol=1e-5)


def test_the_plan_chooses_by_step_kind_and_pool():
    """`choose_cascade` / `cascade_applies` (the CuPy plan's choice, on its host
    fields alone): a multi-token step cascades where its tiles are underfilled,
    not where they are full unless forced; an FP8 decode step counts one byte a
    value; float32 pools and padded multi-token steps never cascade."""
    from types import SimpleNamespace

    from kvpager import KernelConfig
    from kvpager.backends.cupy_cascade import cascade_applies, choose_cascade

    def plan(nseq, prefix, own, qlen, kv_dtype=None, dtype="bfloat16"):
        spec = PoolSpec(num_layers=1, num_kv_heads=8, head_dim=128, num_blocks=4, block_size=16, dtype=dtype,
                        kv_dtype=kv_dtype)
        shared = np.arange(1, prefix // 16 + 1, dtype=np.int32)
        nown = -(-(own + qlen) // 16)
        fresh = 1 + prefix // 16 + np.arange(nseq * nown, dtype=np.int32).reshape(nseq, nown)
        return SimpleNamespace(spec=spec, config=KernelConfig(), decode=qlen == 1, rows=nseq, items=nseq * qlen,
                               tables=np.concatenate([np.tile(shared, (nseq, 1)), fresh], axis=1),
                               seq_lens=np.full(nseq, prefix + own + qlen, np.int32),
                               query_lens=np.full(nseq, qlen, np.int32))

    p = plan(64, 8192, 256, 8)
    assert cascade_applies(p, p.spec, 64) and choose_cascade(p, 32, False) is not None
    p = plan(8, 4096, 0, 1024)
    assert choose_cascade(p, 32, False) is None and choose_cascade(p, 32, True) is not None
    # decode: 64 x 2,048 shared positions spare 264 MB a layer at one byte a value; 32 sequences
    # 130 MB (below the 192 MiB threshold), the same 32 on a bfloat16 pool 260 MB
    assert choose_cascade(plan(64, 2048, 100, 1, "float8_e4m3"), 32, False) is not None
    assert choose_cascade(plan(32, 2048, 100, 1, "float8_e4m3"), 32, False) is None
    assert choose_cascade(plan(32, 2048, 100, 1), 32, False) is not None
    p = plan(4, 256, 0, 1, dtype="float32")
    assert not cascade_applies(p, p.spec, 4)
    p = plan(4, 256, 0, 8)
    assert not cascade_applies(p, p.spec, 3)  # padding rows
