"""A decode step's commit publishes one block per sequence at once
(`seq_prefix._publish_one_each`): the pool it leaves (prefix-cache maps, the
tenants' counts, the events, what each commit returns, what later prompts find
cached) is the pool the block-by-block way leaves, for random batches with
salts, forks that generate alike (keys already cached) and prompts whose blocks
are cached before the commit."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpager import EventSink, KVPool, PoolSpec
from kvpager.events import to_dicts

BS = 8
SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=256, block_size=BS, dtype="float32")


def snapshot(pool: KVPool, sink: EventSink) -> tuple:
    cache, tenants = pool.manager.pool.cache, pool.manager.pool.tenants
    return (dict(cache.key_to_block), dict(cache.block_key), cache.cached.tolist(),
            tenants.usage.tolist(), tenants.of_block[cache.cached].tolist(), to_dicts(sink.take(), BS))


def run(plan: dict, batched: bool) -> tuple:
    pool = KVPool(SPEC)
    sink = EventSink()
    pool.set_event_sink(sink)
    if not batched:  # the block-by-block way
        pool.manager.pool.publish_new = lambda *a: False
    g = np.random.default_rng(plan["seed"])
    allocs = pool.allocate(plan["prompts"], plan["salts"])
    ids = [a.seq_id for a in allocs]
    pool.commit(ids)
    if plan["forks"]:  # children that generate the same tokens as their parent: keys already cached
        ids += [c for [c] in pool.fork(ids[: plan["forks"]], 1)]
    returned = []
    for _ in range(plan["steps"]):
        tokens = g.integers(0, plan["vocab"], len(ids)).tolist()
        if plan["forks"]:
            tokens[len(ids) - plan["forks"]:] = tokens[: plan["forks"]]
        pool.append(ids, 1, [[t] for t in tokens])
        returned.append(pool.commit(ids))
    pool.check_integrity()
    found = pool.cached_tokens([p + [0] * 12 for p in plan["prompts"]], plan["salts"][0])
    return (*snapshot(pool, sink), returned, found)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_one_block_each_equals_block_by_block(data):
    n = data.draw(st.integers(1, 6), label="sequences")
    lens = data.draw(st.lists(st.integers(1, 17), min_size=n, max_size=n), label="prompt lengths")
    vocab = data.draw(st.sampled_from([2, 1000]), label="vocab")  # 2: sequences that collide
    prompts = [data.draw(st.lists(st.integers(0, vocab - 1), min_size=k, max_size=k)) for k in lens]
    salts = data.draw(st.lists(st.sampled_from([None, "a", "b"]), min_size=n, max_size=n), label="salts")
    plan = dict(prompts=prompts, salts=salts, vocab=vocab, seed=data.draw(st.integers(0, 99)),
                forks=data.draw(st.integers(0, n), label="forks"), steps=data.draw(st.integers(1, 18)))
    assert run(plan, True) == run(plan, False)


def test_the_batched_way_runs_and_falls_back():
    """Both branches are taken: all new (batched), and a fork's identical block (fallback)."""
    calls = []
    pool = KVPool(SPEC)
    real = pool.manager.pool.publish_new
    pool.manager.pool.publish_new = lambda *a: calls.append(real(*a)) or calls[-1]
    [a, b] = pool.allocate([[1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 9, 10]], None)
    pool.commit([a.seq_id, b.seq_id])
    pool.append([a.seq_id, b.seq_id], 1, [[7], [8]])
    assert pool.commit([a.seq_id, b.seq_id]) == [1, 1] and calls == [True]
    [c] = pool.fork([a.seq_id], 1)[0]
    for t in (9, 10, 11, 12, 13, 14, 15, 16):
        pool.append([a.seq_id, c], 1, [[t], [t]])
    assert pool.commit([a.seq_id, c]) == [1, 0] and calls == [True, False]  # c's key is a's
    pool.check_integrity()
