"""Windowed prefix hits: `allocate(..., window=w)` for a model whose every
layer attends within a sliding window of w positions. A prompt whose cached
prefix ends at a missing block (evicted: a windowed sequence releases its
leading blocks first, so they go first) still hits as far as the blocks its
first new token's window reads are cached, the entries before them left
released (the null block). Checked against a brute-force reading of the
rule over the cache's keys (recomputed from their definition), against
attention over a dense copy of the K/V, through a daemon, and with careless
windows; integrity after every op."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pool_helpers import BS, chain, make_pool, published, snapshot
from reference import attention

from kvpager import InvalidArgument, KVPool, OutOfBlocks, PoolSpec


def expected_hit(pool: KVPool, tokens: list[int], window: int | None, salt: bytes = b"") -> tuple[int, int]:
    """(cached tokens, leading entries released) the rule gives ``tokens`` now,
    by brute force: every hit point tried, furthest first."""
    cached = published(pool)
    usable = max(len(tokens) - 1, 0) // BS
    keys = chain(tokens, BS, salt)[:usable]
    present = [k in cached for k in keys]
    prefix = next((i for i, p in enumerate(present) if not p), usable)
    if window is None:
        return prefix * BS, 0
    reach = max(1, -(-(window - 1) // BS))  # (one block at least: a hit stands on a cached block)
    for h in range(usable, prefix - 1, -1):  # (the prefix itself last: its blocks before the reach unread too)
        if all(present[max(0, h - reach) : h]):
            return h * BS, max(0, h - reach)
    raise AssertionError("unreachable: the prefix's blocks are all cached")


def test_a_hit_past_evicted_leading_blocks_leaves_them_released():
    pool = make_pool(num_blocks=24, host=0, layers=1)
    tokens = list(range(100, 100 + 10 * BS))
    [a] = pool.allocate([tokens])
    pool.commit(a.seq_id)
    pool.release_before([a.seq_id], [6 * BS])  # blocks 0-5 given back first, as a windowed decode does
    pool.free([a.seq_id])
    [filler] = pool.allocate([list(range(5000, 5000 + 18 * BS))])  # evicts the oldest cached: the released
    pool.free([filler.seq_id])
    turn = tokens + [7, 8, 9]
    assert pool.cached_tokens([turn]) == [0]
    want, skipped = expected_hit(pool, turn, 2 * BS + 1)
    assert want > 0 and skipped > 0
    assert pool.cached_tokens([turn], window=2 * BS + 1) == [want]
    before = pool.stats()
    [b] = pool.allocate([turn], window=2 * BS + 1)
    assert b.num_cached_tokens == want and len(b.slots) == len(turn) - want
    assert b.block_table[:skipped] == (0,) * skipped and 0 not in b.block_table[skipped:]
    keys = chain(turn, BS)
    cache = published(pool)
    assert list(b.block_table[skipped : want // BS]) == [cache[k] for k in keys[skipped : want // BS]]
    after = pool.stats()
    assert after.prefix_hit_tokens - before.prefix_hit_tokens == want
    pool.check_integrity()
    # the sequence goes on as any released one: commit publishes its new blocks, fork shares its live ones
    pool.append([b.seq_id], 20, token_ids=[list(range(20))])
    pool.commit(b.seq_id)
    [[child]] = pool.fork([b.seq_id])
    assert pool.sequence(child).block_table[:skipped] == (0,) * skipped
    pool.check_integrity()
    pool.free([b.seq_id, child])
    pool.check_integrity()
    assert pool.stats().used_blocks == 0


def test_attention_over_a_windowed_hit_is_the_dense_sequences():
    """The K/V a windowed hit shares are the first sequence's, at their
    positions: attention with the window over the new sequence equals
    attention over a dense copy of the whole conversation."""
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=32, num_blocks=20, block_size=BS, dtype="float32")
    pool, rng, window = KVPool(spec), np.random.default_rng(5), 2 * BS - 3
    first = list(range(200, 200 + 9 * BS))
    dense_k = rng.standard_normal((len(first) + 5, 2, 32)).astype(np.float32)
    dense_v = rng.standard_normal(dense_k.shape).astype(np.float32)
    [a] = pool.allocate([first])
    pool.write(0, a.slots, dense_k[: len(first)], dense_v[: len(first)])
    pool.commit(a.seq_id)
    pool.release_before([a.seq_id], [5 * BS])
    pool.free([a.seq_id])
    [filler] = pool.allocate([list(range(9000, 9000 + 14 * BS))])
    pool.free([filler.seq_id])
    turn = first + [1, 2, 3, 4, 5]
    [b] = pool.allocate([turn], window=window)
    assert b.block_table[0] == 0 and b.num_cached_tokens >= 7 * BS
    c = b.num_cached_tokens
    pool.write(0, b.slots, dense_k[c:], dense_v[c:])
    q = rng.standard_normal((len(turn) - c, 4, 32)).astype(np.float32)
    out = pool.attend(0, [b.seq_id], q, query_lens=[len(q)], window=window)
    ref = attention(q, dense_k, dense_v, 32**-0.5, window=window)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(InvalidArgument):  # a wider window would read the released entries
        pool.attend(0, [b.seq_id], q, query_lens=[len(q)], window=window + 4 * BS)
    pool.free([b.seq_id])
    pool.check_integrity()


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "32", [32], 2**64])
def test_a_careless_window_is_refused_and_changes_nothing(bad):
    pool = make_pool()
    [a] = pool.allocate([list(range(3 * BS))])
    pool.commit(a.seq_id)
    before = snapshot(pool)
    with pytest.raises(InvalidArgument, match="window"):
        pool.allocate([list(range(3 * BS + 2))], window=bad)
    with pytest.raises(InvalidArgument, match="window"):
        pool.cached_tokens([list(range(3 * BS + 2))], window=bad)
    assert snapshot(pool) == before
    pool.check_integrity()


def test_without_a_gap_a_window_finds_the_same_hit_and_holds_the_blocks_it_reads():
    """A prefix cached from block 0 is the hit with or without a window (it is
    the furthest); with one, the sequence holds only the hit blocks the window
    reads, the entries before them released (they stay cached for others), and
    a window that reads the whole prefix changes nothing."""
    pool = make_pool()
    prompt = list(range(5 * BS + 3))
    [a] = pool.allocate([prompt])
    pool.commit(a.seq_id)
    [b] = pool.allocate([prompt], window=BS)
    [c] = pool.allocate([prompt])
    [d] = pool.allocate([prompt], window=5 * BS + 1)
    assert b.num_cached_tokens == c.num_cached_tokens == d.num_cached_tokens == 5 * BS
    assert b.block_table[:5] == (0, 0, 0, 0, a.block_table[4])
    assert c.block_table[:5] == d.block_table[:5] == a.block_table[:5]
    ref = pool.manager.pool.ref_cnt
    assert ref[list(a.block_table[:4])].tolist() == [3] * 4 and ref[a.block_table[4]] == 4
    pool.check_integrity()


OPS = st.lists(st.tuples(st.sampled_from(["alloc", "alloc", "commit", "release", "free", "fill"]),
                         st.integers(0, 10**6)), min_size=4, max_size=30)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, window=st.integers(1, 4 * BS))
def test_windowed_hits_follow_the_rule_under_random_ops(ops, window):
    """Random allocates (prompts drawn from a few conversations, so prefixes
    recur), commits, releases, frees and fillers that evict: each windowed
    allocate's hit and released entries are the brute-force rule's, batches
    of several prompts too, and the pool's integrity holds throughout."""
    pool = make_pool(num_blocks=40, host=0, layers=1)
    convs = [list(np.random.default_rng(c).integers(3, 50, 12 * BS)) for c in range(3)]
    live: list[int] = []
    for op, r in ops:
        rng = np.random.default_rng(r)
        if op == "alloc":
            n = 1 + int(rng.integers(0, 2))
            prompts = [convs[int(rng.integers(0, 3))][: int(rng.integers(1, 12 * BS))] for _ in range(n)]
            want = [expected_hit(pool, p, window) for p in prompts]  # (a batch's hits are all found first)
            probe = pool.cached_tokens(prompts, window=window)
            before = snapshot(pool)
            try:
                allocs = pool.allocate(prompts, window=window)
            except OutOfBlocks:
                assert snapshot(pool) == before
                continue
            assert [a.num_cached_tokens for a in allocs] == probe == [hit for hit, _ in want]
            for a, (_, skipped) in zip(allocs, want):
                assert a.block_table[:skipped] == (0,) * skipped and 0 not in a.block_table[skipped:]
            live += [a.seq_id for a in allocs]
        elif op == "commit" and live:
            pool.commit(live[int(rng.integers(0, len(live)))])
        elif op == "release" and live:
            s = live[int(rng.integers(0, len(live)))]
            pool.release_before([s], [int(rng.integers(0, pool.sequence(s).num_tokens + 1))])
        elif op == "free" and live:
            pool.free([live.pop(int(rng.integers(0, len(live))))])
        elif op == "fill":
            room = pool.stats().free_blocks + pool.stats().evictable_blocks
            if room:
                [f] = pool.allocate([list(range(10**5 + r, 10**5 + r + int(rng.integers(1, room + 1)) * BS - 1))])
                pool.free([f.seq_id])
        pool.check_integrity()
    pool.free(live)
    pool.check_integrity()
    assert pool.stats().used_blocks == 0


def test_through_a_daemon_a_windowed_hit_is_the_embedded_pools_and_its_plans_follow():
    """The same ops through a daemon give the embedded pool's tables; the
    client's mirror knows the released entries (attention with a wider window
    refused there as embedded); a client of a daemon that does not announce
    windowed hits sends no window and gets prefix hits only."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=24, block_size=BS, dtype="float32")
    tokens = list(range(300, 300 + 10 * BS))
    turn = tokens + [4, 5, 6]
    answers = []
    with running_server(spec) as server, Client(server.endpoint) as c:
        for pool in (KVPool(spec), c):
            [a] = pool.allocate([tokens])
            pool.commit(a.seq_id)
            pool.release_before([a.seq_id], [6 * BS])
            pool.free([a.seq_id])
            [f] = pool.allocate([list(range(5000, 5000 + 18 * BS))])
            pool.free([f.seq_id])
            probe = pool.cached_tokens([turn], window=BS + 1)
            [b] = pool.allocate([turn], window=BS + 1)
            assert [b.num_cached_tokens] == probe
            q = np.ones((len(b.slots), 4, 16), np.float32)
            with pytest.raises(InvalidArgument):
                pool.attend(0, [b.seq_id], q, query_lens=[len(q)], window=3 * BS)
            answers.append((b.num_cached_tokens, pool.sequence(b.seq_id).block_table.count(0)))
            pool.free([b.seq_id])
            pool.check_integrity()
        assert answers[0] == answers[1] and answers[0][1] > 0
        c.windowed_hits = False  # as a daemon from before windowed hits answers hello
        assert c.cached_tokens([turn], window=BS + 1) == [0]
        [d] = c.allocate([turn], window=BS + 1)
        assert d.num_cached_tokens == 0
        c.free([d.seq_id])


def test_the_benchmarks_workload_computes_fewer_prompt_tokens_with_windowed_hits(capsys):
    """tools/bench_windowed_hits.py, small: the same conversations with and
    without the window; with it a later turn computes its new message alone,
    without it more (its first blocks evicted); the pool's integrity holds."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_windowed_hits.py"
    spec = importlib.util.spec_from_file_location("bench_windowed_hits", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--conversations", "6", "--turns", "3", "--system", "256", "--user", "32", "--answer", "64",
            "--window", "256", "--blocks", "150", "--json"]
    bench.main(args)
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["windowed"]["computed_per_turn"] == 32  # the new user message alone
    assert out["prefix_only"]["computed_per_turn"] > 32


def test_a_window_of_one_token_hits_only_on_cached_blocks_and_the_mirror_follows():
    """A window of 1 needs no earlier block: every usable block counted as a hit
    on an empty pool (hit statistics included), and a client's mirror counted
    no released entries where all were (its tables then out of step with the
    daemon's, a later write accepted into another sequence's block)."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=24, block_size=BS, dtype="float32")
    prompt = list(range(4 * BS + 3))
    with running_server(spec) as server, Client(server.endpoint) as c:
        for pool in (KVPool(spec), c):
            assert pool.cached_tokens([prompt], window=1) == [0]
            [a] = pool.allocate([prompt], window=1)
            assert a.num_cached_tokens == 0 and 0 not in a.block_table
            pool.commit(a.seq_id)
        c.release_before([a.seq_id], [3 * BS])  # its first three blocks go first
        c.free([a.seq_id])
        [f] = c.allocate([list(range(900, 900 + 22 * BS - 1))])  # evicts those three
        c.free([f.seq_id])
        [b] = c.allocate([prompt], window=1)  # the last usable block cached: the hit stands on it
        assert b.num_cached_tokens == 4 * BS and b.block_table[:3] == (0, 0, 0)
        assert c._mirror.floors([b.seq_id]).tolist() == [3 * BS]
        tables, _ = c.tables([b.seq_id])
        assert tables[0].tolist() == list(c._call("tables", {"seq_ids": [b.seq_id]})[0][0])
        c.check_integrity()


def test_a_long_cached_prefix_takes_only_the_blocks_the_window_reads_and_every_op_follows():
    """A prompt over a cached prefix (no gap) with a window of under two blocks:
    the sequence holds the two hit blocks the window reads, the four before
    them stay cached and evictable (the entries released). Attention with the
    window equals attention over the dense K/V before and after commit (which
    publishes its new blocks under the chained keys of its tokens), fork,
    truncate (not into the released entries), swap out and in."""
    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=32, num_blocks=24, block_size=BS, dtype="float32",
                    num_host_blocks=8)
    pool, rng, window = KVPool(spec), np.random.default_rng(9), 2 * BS - 3
    first = list(range(400, 400 + 6 * BS))
    turn = first + list(range(21))
    dense_k = rng.standard_normal((len(turn) + 40, 2, 32)).astype(np.float32)
    dense_v = rng.standard_normal(dense_k.shape).astype(np.float32)
    [a] = pool.allocate([first + [1]])
    pool.write(0, a.slots, dense_k[: len(first) + 1], dense_v[: len(first) + 1])  # (its last token's unused)
    pool.commit(a.seq_id, [len(first)])
    pool.free([a.seq_id])
    assert pool.stats().evictable_blocks == 6
    [b] = pool.allocate([turn], window=window)
    assert b.num_cached_tokens == 6 * BS
    assert b.block_table[:4] == (0,) * 4 and b.block_table[4:6] == a.block_table[4:6]
    st = pool.stats()
    assert (st.used_blocks, st.evictable_blocks) == (2 + 2, 4)  # two hits and two new blocks; four idle
    assert pool.cached_tokens([first + [1]]) == [6 * BS]  # the unread prefix blocks still matchable
    pool.check_integrity()
    pool.write(0, b.slots, dense_k[6 * BS : len(turn)], dense_v[6 * BS : len(turn)])
    n = len(turn)

    def attends_as_dense(seq: int, length: int) -> None:
        q = rng.standard_normal((5, 4, 32)).astype(np.float32)
        out = pool.attend(0, [seq], q, query_lens=[5], window=window)
        ref = attention(q, dense_k[:length], dense_v[:length], 32**-0.5, window=window)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)

    attends_as_dense(b.seq_id, n)
    # commit: its new full block published under its tokens' chained key
    pool.append([b.seq_id], 12, [list(range(21, 33))])
    pool.write(0, np.arange(n, n + 12) % BS + np.asarray(pool.sequence(b.seq_id).block_table)[
        np.arange(n, n + 12) // BS] * BS, dense_k[n : n + 12], dense_v[n : n + 12])
    n += 12
    assert pool.commit(b.seq_id) == [2]  # its blocks 6 and 7, by their keys
    table = pool.sequence(b.seq_id).block_table
    keys = chain(turn + list(range(21, 33)), BS)
    assert [published(pool)[k] for k in keys[6:8]] == list(table[6:8])
    attends_as_dense(b.seq_id, n)
    # fork: the child shares the live blocks, its leading entries released too
    [[child]] = pool.fork([b.seq_id])
    assert pool.sequence(child).block_table[:4] == (0,) * 4
    attends_as_dense(child, n)
    pool.free([child])
    # truncate: not into the released entries
    with pytest.raises(InvalidArgument, match="released"):
        pool.truncate([b.seq_id], [3 * BS])
    pool.truncate([b.seq_id], [n - 2])
    n -= 2
    attends_as_dense(b.seq_id, n)
    # swap out and in: the live blocks move, the released entries stay null
    pool.swap_out([b.seq_id])
    [f] = pool.allocate([list(range(9000, 9000 + 12 * BS))])  # takes the blocks it gave back
    pool.free([f.seq_id])
    pool.swap_in([b.seq_id])
    assert pool.sequence(b.seq_id).block_table[:4] == (0,) * 4 and 0 not in pool.sequence(b.seq_id).block_table[4:]
    attends_as_dense(b.seq_id, n)
    pool.check_integrity()
    pool.free([b.seq_id])
    pool.check_integrity()
    assert pool.stats().used_blocks == 0


def test_through_a_daemon_a_prefix_hit_under_a_window_is_the_embedded_pools_and_the_mirror_follows():
    """A windowed allocate over a cached prefix (no gap) through a daemon: the
    embedded pool's tables; the worker's mirror counts the released entries
    (its floor, its tables the daemon's) through fork, swap out and in."""
    pytest.importorskip("zmq")
    from daemon_helpers import running_server

    from kvpager.client import Client

    spec = PoolSpec(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=24, block_size=BS, dtype="float32",
                    num_host_blocks=8)
    prefix = list(range(300, 300 + 7 * BS))
    turn = prefix + [4, 5, 6]
    answers = []
    with running_server(spec) as server, Client(server.endpoint) as c:
        for pool in (KVPool(spec), c):
            [a] = pool.allocate([prefix + [1]])
            pool.commit(a.seq_id)
            pool.free([a.seq_id])
            [b] = pool.allocate([turn], window=2 * BS)
            assert b.num_cached_tokens == 7 * BS and b.block_table[:6] == (0,) * 5 + (a.block_table[5],)
            q = np.ones((len(b.slots), 4, 16), np.float32)
            with pytest.raises(InvalidArgument):
                pool.attend(0, [b.seq_id], q, query_lens=[len(q)], window=3 * BS)
            pool.swap_out([b.seq_id])
            pool.swap_in([b.seq_id])
            [[kid]] = pool.fork([b.seq_id])
            answers.append([pool.sequence(s).block_table for s in (b.seq_id, kid)] + [pool.stats().used_blocks])
            pool.check_integrity()
        assert answers[0] == answers[1]
        assert c._mirror.floors([b.seq_id, kid]).tolist() == [5 * BS, 5 * BS]
        tables, _ = c.tables([b.seq_id, kid])
        assert [t.tolist() for t in tables] == [list(t) for t in c._call("tables", {"seq_ids": [b.seq_id, kid]})[0]]
        c.free([b.seq_id, kid])
        c.check_integrity()
