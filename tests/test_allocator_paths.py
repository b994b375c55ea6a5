"""The one-sequence paths (`kvpager.seq_one`) leave exactly the state the batch
paths leave: the same random ops run on two pools, one with the scalar paths
switched off (`SequenceManager.scalar = False`, so a batch of one goes
through the array code), and after every op the whole allocator state of the
two is compared: block-table rows and columns, reference counts, the free
list in order, the LRU, the prefix cache, owners, histories, host blocks,
counters; every result, and every error (type and message), must agree too.
Ops of one sequence dominate (the paths under test), mixed with batches,
appends, commits, truncation, releases, swaps, evictions and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from kvpager import KVPool, PoolSpec
from kvpager.errors import KVPagerError

BS = 8
SYSTEM = [[7, 1, 2, 3] * 4, [5] * 20]


def make_pool(scalar: bool) -> KVPool:
    pool = KVPool(PoolSpec(1, 1, 8, num_blocks=40, block_size=BS, dtype="float32", num_host_blocks=8))
    pool.manager.scalar = scalar
    return pool


def state(pool: KVPool) -> dict:
    """Everything the allocator keeps, as plain values."""
    m = pool.manager
    bt, bp = m.table, m.pool
    return dict(
        table=bt.table.tolist(), num_blocks=bt.num_blocks.tolist(), num_tokens=bt.num_tokens.tolist(),
        cols=bt.cols.tolist(), free_rows=list(bt._free_rows), rows=dict(m.rows),
        ref=bp.ref_cnt.tolist(), free=bp.free_ids, evictable=list(bp.evictable),
        cache=dict(bp.cache.key_to_block), cached=np.flatnonzero(bp.cache.cached).tolist(),
        owned={repr(o): list(ids) for o, ids in m.owners.owned.items()},
        codes={repr(o): c for o, c in m.owners._codes.items()},
        history={s: (h.prompt.tolist(), h.root, list(h.keys), list(h.tail), h.salt) for s, h in m.history.items()},
        host=(list(m.host.free), {r: (c.tolist(), h.tolist()) for r, (c, h) in m.host.held.items()}),
        counters=(m.num_swapped, m.num_released, m.prefix_query_tokens, m.prefix_hit_tokens, bp.num_evicted),
        tenants=pool.stats().tenants,
    )


def outcome(fn, pool: KVPool) -> object:
    """What an op returned, or the error it raised (type and message)."""
    try:
        out = fn(pool)
    except KVPagerError as e:
        return (type(e).__name__, str(e))
    if isinstance(out, list) and out and hasattr(out[0], "slots"):  # allocations
        return [(a.seq_id, a.block_table, a.num_cached_tokens, a.slots.tolist()) for a in out]
    if isinstance(out, list) and out and isinstance(out[0], np.ndarray):  # append's slots
        return [s.tolist() for s in out]
    return out


def random_op(rng: np.random.Generator, live: list[int], swapped: set[int]):
    """One op (a function of a pool) and a description of it."""
    def pick(k: int = 1) -> list[int]:
        return [int(s) for s in rng.choice(live, size=min(k, len(live)), replace=False)]

    def prompt() -> list[int]:
        head = SYSTEM[rng.integers(2)][: int(rng.integers(0, 21))]
        return head + rng.integers(0, 3, size=int(rng.integers(0, 13))).tolist()

    kind = rng.choice(["allocate", "allocate", "fork", "fork", "free", "free", "append", "commit", "truncate",
                       "release", "swap_out", "swap_in", "batch", "pressure", "bad"]) if live else "allocate"
    one_resident = [s for s in live if s not in swapped]
    if kind == "allocate":
        p, salt = prompt(), [None, "a", b"b"][rng.integers(3)]
        owner, share = [None, "s1", "s2"][rng.integers(3)], bool(rng.integers(2))
        tokens = np.array(p, dtype=np.int64) if rng.integers(2) else p
        return (lambda pool: pool.allocate([tokens], salt, owner=owner, share_in_batch=share)), kind
    if kind == "fork":
        [s], n = pick(), int(rng.integers(1, 4))
        return (lambda pool: pool.fork([s] if rng.integers(2) else s, n)), kind
    if kind == "free":
        ids = pick()
        if rng.integers(6) == 0:
            ids = [10_000]  # unknown: UnknownSequence, nothing changes
        return (lambda pool: pool.free(ids)), kind
    if kind == "batch":  # batch paths on both pools, for the state they leave
        prompts, ids = [prompt() for _ in range(int(rng.integers(2, 4)))], pick(2)
        op = rng.choice(["allocate", "fork", "free"])
        if op == "allocate":
            return (lambda pool: pool.allocate(prompts, share_in_batch=True)), "batch allocate"
        return (lambda pool: getattr(pool, op)(ids)), f"batch {op}"
    if kind == "pressure":  # every free block and some evictable ones, then back: evictions
        def pressure(pool: KVPool) -> None:
            st = pool.stats()
            allocs = pool.allocate([[99] * BS] * (st.free_blocks + min(2, st.evictable_blocks)))
            pool.free([a.seq_id for a in allocs])
        return pressure, kind
    if kind == "bad":
        bad = [lambda pool: pool.allocate([[1, 2]], salt=5), lambda pool: pool.allocate([[1] * 500]),
               lambda pool: pool.fork(pick(), 0), lambda pool: pool.fork(pick(), True),
               lambda pool: pool.free([pick()[0]] * 2), lambda pool: pool.allocate([[1, -1.5]])]
        return bad[rng.integers(len(bad))], kind
    if not one_resident:
        return (lambda pool: None), "nothing"
    s = int(rng.choice(one_resident))
    if kind == "append":
        n = int(rng.integers(1, 6))
        ids = rng.integers(0, 3, size=n).tolist()
        return (lambda pool: pool.append([s], n, token_ids=[ids])), kind
    if kind == "commit":
        return (lambda pool: pool.commit(s)), kind
    if kind == "truncate":
        return (lambda pool: pool.truncate(s, pool.sequence(s).num_tokens // 2)), kind
    if kind == "release":
        return (lambda pool: pool.release_before(s, pool.sequence(s).num_tokens)), kind
    if kind == "swap_out":
        return (lambda pool: pool.swap_out(s)), kind
    return (lambda pool: pool.swap_in(sorted(swapped)[:1])), kind


@pytest.mark.parametrize("seed", range(12))
def test_scalar_paths_leave_the_batch_paths_state(seed):
    rng = np.random.default_rng(seed)
    fast, slow = make_pool(True), make_pool(False)
    kinds = set()
    for step in range(250):
        live = fast.manager.ids()
        swapped = {i.seq_id for i in fast.sequences() if i.swapped}
        fn, kind = random_op(rng, live, swapped)
        draws = rng.bit_generator.state  # an op may draw again when run: the same draws for both
        a = outcome(fn, fast)
        rng.bit_generator.state = draws
        b = outcome(fn, slow)
        assert a == b, f"step {step} ({kind}): results differ"
        sa, sb = state(fast), state(slow)
        for key in sa:
            assert sa[key] == sb[key], f"step {step} ({kind}): {key} differs"
        fast.check_integrity()
        slow.check_integrity()
        kinds.add(kind if not isinstance(a, tuple) else f"{kind} error")
    # the paths under test ran, and so did the errors
    assert {"allocate", "fork", "free", "free error"} <= kinds, kinds


def test_scalar_switch_changes_the_path():
    """The switch really selects the path: with it off, no `seq_one` function runs."""
    import kvpager.seq_one as seq_one

    calls = []
    saved = {name: getattr(seq_one, name) for name in ("allocate", "allocate_one", "fork_one", "free")}
    try:
        for name, fn in saved.items():
            setattr(seq_one, name, lambda *a, _fn=fn, _name=name: calls.append(_name) or _fn(*a))
        for scalar in (True, False):
            pool = make_pool(scalar)
            [a] = pool.allocate([[1, 2, 3, 4, 5]])
            [[kid]] = pool.fork(a.seq_id)
            [[kid2]] = pool.fork([a.seq_id], 1)  # the pool's own short cut to it
            pool.free(kid)
            [b] = pool.allocate([[1, 2, 3, 4, 5]], ["a"])  # a list of salts: through the manager
            assert calls == (["allocate_one", "fork_one", "fork_one", "free", "allocate", "allocate_one"]
                             if scalar else []), scalar
            calls.clear()
    finally:
        for name, fn in saved.items():
            setattr(seq_one, name, fn)


def test_fork_and_free_across_row_growth():
    """A one-child fork that finds no free row grows the block table (its
    arrays are replaced mid-fork), and rows far narrower than the table take
    the sliced copy and clear: the scalar paths still leave the batch paths'
    state, and the manager's tuple of stable objects still names the live
    ones."""
    pools = []
    for scalar in (True, False):
        pool = KVPool(PoolSpec(1, 1, 8, num_blocks=400, block_size=BS, dtype="float32"))
        pool.manager.scalar = scalar
        rows = len(pool.manager.table.num_blocks)
        ids = [a.seq_id for a in pool.allocate([[i] * 3 for i in range(rows - 1)])]
        [wide] = pool.allocate([list(range(40 * BS))])  # the table 40+ wide: a 1-block row is far narrower
        assert not pool.manager.table._free_rows
        out = [pool.fork([ids[0]]), pool.fork([wide.seq_id])]  # the first grows the rows, sliced copy
        assert len(pool.manager.table.num_blocks) > rows
        pool.free([ids[1]])  # a 1-block row: sliced clear
        pool.free([out[1][0][0]])  # a full-width one, shared with its parent
        pool.free([wide.seq_id])  # then the parent: its blocks go
        pool.commit(out[0][0][0])
        out.append(pool.fork([out[0][0][0]], 3))
        m = pool.manager
        assert all(x is y for x, y in zip(m.one_refs, (m.rows, m.history, m.owners.by_code, m._ids,
                                                         m.pool.ref_cnt, m.table, m.table._free_rows), strict=True))
        pool.check_integrity()
        pools.append((out, state(pool)))
    (out_a, state_a), (out_b, state_b) = pools
    assert out_a == out_b
    for key in state_a:
        assert state_a[key] == state_b[key], key


def test_fork_of_blocks_held_many_times():
    """Counts past the one-child fork's table of stored counts (256) take the
    plain store: the same state as the batch path, counts equal to the
    references in the tables."""
    states = []
    for scalar in (True, False):
        pool = KVPool(PoolSpec(1, 1, 8, num_blocks=64, block_size=BS, dtype="float32"))
        pool.manager.scalar = scalar
        [a] = pool.allocate([list(range(3 * BS))])
        pool.fork([a.seq_id], 255)  # 256 holders
        for _ in range(3):  # 256 -> 257 -> 258 -> 259 holders, one child at a time
            pool.fork([a.seq_id])
        ref = pool.manager.pool.ref_cnt
        assert ref[list(a.block_table)].tolist() == [259] * 3
        pool.check_integrity()  # every count equal to the table references
        states.append(state(pool))
    for key in states[0]:
        assert states[0][key] == states[1][key], key


def test_allocate_of_one_prompt_by_its_hits():
    """An allocate of one prompt whose prefix is cached, in each case of its
    hits and new blocks: hits all held once or twice, with different counts,
    some or all evictable, more than 256 holders; few new blocks (a list) and
    many (arrays); new blocks by eviction; too few blocks. The scalar path
    leaves the batch path's state and answers (or error) after each step."""
    prefix = list(range(3 * BS))  # three full blocks to share
    long_tail = list(range(1000, 1000 + 34 * BS))  # 34 more blocks: past the list's limit
    other_tail = list(range(5000, 5000 + 40 * BS))  # more than are evictable

    def steps():
        yield "commit", lambda pool: pool.commit(pool.allocate([prefix + [1]])[0].seq_id)
        yield "held once", lambda pool: pool.allocate([prefix + [2]])
        yield "many new blocks", lambda pool: pool.allocate([prefix + long_tail])
        yield "commit it", lambda pool: pool.commit(pool.manager.ids()[-1])
        yield "free it", lambda pool: pool.free(pool.manager.ids()[-1])  # its own blocks evictable
        yield "fork", lambda pool: pool.fork(pool.manager.ids()[0])
        yield "cut the fork", lambda pool: pool.truncate(pool.manager.ids()[-1], BS)  # counts 3, 2, 2
        yield "different counts", lambda pool: pool.allocate([prefix + [3]])
        yield "free all", lambda pool: pool.free(pool.manager.ids())  # the prefix evictable
        yield "one block held", lambda pool: pool.allocate([prefix[: BS + 1]])  # block 0 in use again
        yield "some evictable", lambda pool: pool.allocate([prefix + [4]])
        yield "free all again", lambda pool: pool.free(pool.manager.ids())
        yield "all evictable", lambda pool: pool.allocate([prefix + [5]])
        yield "fill the free list", lambda pool: pool.allocate([[7] * (pool.stats().free_blocks * BS)])
        yield "too few", lambda pool: pool.allocate([prefix + other_tail])
        yield "evictions", lambda pool: pool.allocate([prefix + [6] * 30])
        yield "many holders", lambda pool: pool.fork(pool.manager.ids()[0], 300)
        yield "past the stored counts", lambda pool: pool.allocate([np.array(prefix + [8], dtype=np.int64)])

    runs = []
    for scalar in (True, False):
        pool = KVPool(PoolSpec(1, 1, 8, num_blocks=64, block_size=BS, dtype="float32"))
        pool.manager.scalar = scalar
        run = []
        for name, fn in steps():
            run.append((name, outcome(fn, pool), state(pool)))
            pool.check_integrity()
        runs.append(run)
    for (name, out_a, state_a), (_, out_b, state_b) in zip(*runs, strict=True):
        assert out_a == out_b, name
        for key in state_a:
            assert state_a[key] == state_b[key], f"{name}: {key} differs"
    outcomes = {name: out for name, out, _ in runs[0]}
    states = {name: st for name, _, st in runs[0]}
    assert outcomes["too few"][0] == "OutOfBlocks"
    assert outcomes["many new blocks"][0][2] == 3 * BS and len(outcomes["many new blocks"][0][1]) == 37
    assert outcomes["evictions"][0][2] == 3 * BS
    assert states["fill the free list"]["free"] == [] and len(states["fill the free list"]["evictable"]) == 34
    assert len(states["evictions"]["evictable"]) == 34 - 4  # its 4 new blocks evicted
    assert max(states["past the stored counts"]["ref"]) > 257
