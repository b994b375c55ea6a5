"""A full block computed again while its key is cached on another block (a
block-aligned prompt sent whole: its last token, and so its last block, is
computed again) is a copy of that block's K/V. vLLM caches both copies, so the
key lives until the last goes; kvpager keeps one block a key, and its key lived
only as long as the first block: vLLM's own allocator hit where kvpager missed
(`tools/peers_vllm.py`, 60 of 1,000 requests of its block-boundary trace).
Now a copy in use takes the key when the key's block is evicted or written
again, and a copy whose last reference goes while the key's block is idle
takes it from that block (`kvpager.block_copies`): each scenario against
`LRUReference` in vLLM's mode (what vLLM's own allocator does, checked by
the tool) and in kvpager's, with no event of the key's removal while a copy
holds it, and no key passed to a copy written again."""

from __future__ import annotations

import numpy as np
import pytest
from daemon_helpers import running_server
from test_allocator_vs_lru import BS, LRUReference, allocate_both, make_pool

from kvpager.client import Client
from kvpager.errors import NotOwner
from kvpager.events import EventSink, to_dicts
from kvpager.spec import PoolSpec

P = list(range(2 * BS))  # a block-aligned prompt: sent again, its last block is computed again
Q = list(range(1000, 1000 + BS + 1))


def sides(num_blocks: int):
    return make_pool(num_blocks), LRUReference(num_blocks), LRUReference(num_blocks, one_block_per_key=True)


def run(steps, pool, *refs):
    """``steps``: ("alloc", rid, tokens) / ("free", rid) on the pool and every model."""
    seqs = {}
    for op, rid, *tokens in steps:
        if op == "alloc":
            seq, want, got = allocate_both(pool, refs[0], rid, tokens[0])
            for ref in refs[1:]:
                assert ref.allocate(rid, tokens[0], None) == want
            assert got == want
            seqs[rid] = seq
        else:
            pool.free([seqs.pop(rid)])
            for ref in refs:
                ref.free(rid)
    return seqs


def assert_cached_as_vllm(pool, vllm, model, prompts):
    for tokens in prompts:
        want = vllm.cached_tokens(tokens, None)
        assert model.cached_tokens(tokens, None) == want
        assert pool.cached_tokens([tokens]) == [want], len(tokens)
    pool.check_integrity()


def test_a_copy_freed_after_the_keys_idle_block_keeps_the_key_as_vllm():
    """Two runs of one block-aligned prompt at once, the one holding the key
    ending first: vLLM still hit the whole prompt after a miss evicted the
    older block, kvpager only its first block."""
    pool, vllm, model = sides(7)  # 6 usable blocks
    run([("alloc", 0, P), ("alloc", 1, P), ("free", 0), ("alloc", 2, Q), ("free", 2), ("free", 1),
         ("alloc", 3, list(range(5000, 5000 + 4 * BS)))], pool, vllm, model)
    assert_cached_as_vllm(pool, vllm, model, [P + [7], Q + [7]])
    assert pool.cached_tokens([P + [7]]) == [2 * BS]


def test_a_copy_in_use_takes_the_key_when_its_block_is_evicted():
    """The run holding the key ends and its block is evicted while the other
    run, holding a copy, goes on: vLLM hits the copy, kvpager hit nothing."""
    pool, vllm, model = sides(6)  # 5 usable blocks
    sink = EventSink()
    pool.set_event_sink(sink)
    run([("alloc", 0, P), ("alloc", 1, P), ("free", 0), ("alloc", 2, list(range(5000, 5000 + 3 * BS)))],
        pool, vllm, model)
    assert_cached_as_vllm(pool, vllm, model, [P + [7]])
    assert pool.cached_tokens([P + [7]]) == [2 * BS]
    removed = [e for e in to_dicts(sink.take(), BS) if e["type"] == "BlockRemoved"]
    stored = pool.manager.pool.cache.key_to_block
    assert not any(h in stored for e in removed for h in e["block_hashes"])  # no key still cached reported gone


def test_a_copy_written_again_is_no_copy():
    """A copy whose sequence is cut back into it and goes on with other tokens
    holds other K/V: it never takes the key."""
    pool = make_pool(8)
    [a] = pool.allocate([P])
    pool.commit([a.seq_id])
    [b] = pool.allocate([P])
    pool.commit([b.seq_id])
    bp = pool.manager.pool
    copy = int(pool.tables([b.seq_id])[0][0, 1])
    assert bp.is_copy[copy] and b.num_cached_tokens == BS
    pool.truncate([b.seq_id], [BS + 3])
    pool.append([b.seq_id], 5, [[9000 + i for i in range(5)]])  # into the copy's block
    assert int(pool.tables([b.seq_id])[0][0, 1]) == copy and not bp.is_copy[copy]
    pool.free([a.seq_id])
    pool.allocate([list(range(5000, 5000 + 5 * BS))])  # evicts a's last block: its key leaves the cache
    assert pool.cached_tokens([P + [7]]) == [BS]  # the first block (b holds it), not the second's key
    pool.check_integrity()


def test_a_daemon_refuses_a_staged_write_into_a_copy():
    """A copy's K/V is its key's: a client's staged write into it (its own block,
    at committed positions) would reach every sequence that hits the key once
    the copy takes it. Refused as a write into a published block is."""
    spec = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=8, block_size=BS, dtype="float32")
    with running_server(spec, heartbeat_timeout=30) as srv, Client(srv.endpoint, timeout=10, map_pool=False) as c:
        [a] = c.allocate([P])
        c.commit([a.seq_id])
        [b] = c.allocate([P])
        c.commit([b.seq_id])
        copy = int(c.tables([b.seq_id])[0][0, 1])
        assert srv.pool.manager.pool.is_copy[copy]
        k = np.ones((1, 1, 8), np.float32)
        with pytest.raises(NotOwner, match="published"):
            c.write(0, [copy * BS + 2], k, k)
        c.check_integrity()
