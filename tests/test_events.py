"""KV events of an embedded pool: what enters and leaves the prefix cache,
checked against keys recomputed from their definition, and the wire format
decoded as a router written for vLLM decodes it."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from vllm_events import (
    DECODERS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    LegacyBlockStored,
    hashes,
)

from kvpager import EventSink, InvalidArgument, KVPool, PoolSpec
from kvpager.events import batch_value, parse_batch, to_dicts

BS = 16
SPEC = PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=12, block_size=BS, dtype="float32",
                num_host_blocks=8)


def pool_with_sink() -> tuple[KVPool, EventSink]:
    pool = KVPool(SPEC)
    sink = EventSink()
    pool.set_event_sink(sink)
    return pool, sink


def events(sink: EventSink) -> list[dict]:
    return to_dicts(sink.take(), BS)


def test_commit_reports_the_published_blocks_with_their_tokens():
    pool, sink = pool_with_sink()
    prompt = list(range(100, 150))  # 3 full blocks and 2 tokens
    [a] = pool.allocate([prompt], salt="m")
    assert events(sink) == []  # allocated, not yet written: nothing is matchable
    pool.commit(a.seq_id, 40)  # K/V written for 2 full blocks and a half
    [e] = events(sink)
    want = hashes(prompt, BS, b"m")
    assert e == {"type": "BlockStored", "block_hashes": want[:2], "parent_block_hash": None,
                 "token_ids": prompt[:32], "block_size": BS, "lora_id": None, "medium": "GPU", "lora_name": None}
    pool.commit(a.seq_id)  # the third block now; the 2-token tail stays unpublished
    [e] = events(sink)
    assert e["block_hashes"] == want[2:3] and e["parent_block_hash"] == want[1]
    assert e["token_ids"] == prompt[32:48]
    pool.commit(a.seq_id)
    assert events(sink) == []  # nothing new


@pytest.mark.parametrize("view", [False, True], ids=["array", "a view of one"])
def test_a_prompt_buffer_reused_after_allocate_changes_no_key_and_no_event(view):
    """A caller that reuses its int64 prompt buffer (as a tokenizer's output is reused)
    after `allocate`: before, the pool kept the buffer itself, so the commit published
    the blocks under keys of the buffer's new ids (while they hold the old ids' K/V),
    and a stored event reported the new ids."""
    pool, sink = pool_with_sink()
    prompt = list(range(100, 100 + 2 * BS + 3))
    buf = np.array([0, *prompt], dtype=np.int64)[1:] if view else np.array(prompt, dtype=np.int64)
    [a] = pool.allocate([buf], salt="m")
    buf[:] = 7  # reused before the commit
    pool.commit(a.seq_id)
    buf[:] = 9  # and after it, before the events are read
    [e] = events(sink)
    assert e["block_hashes"] == hashes(prompt, BS, b"m")[:2] and e["token_ids"] == prompt[: 2 * BS]
    assert pool.cached_tokens([prompt], salt="m") == [2 * BS]
    pool.check_integrity()


def test_decoded_tokens_extend_a_committed_chain():
    pool, sink = pool_with_sink()
    [a] = pool.allocate([list(range(20))])
    for t in range(20, 32):
        pool.append(a.seq_id, 1, token_ids=[[t]])
    pool.commit(a.seq_id)
    [e] = events(sink)
    assert e["block_hashes"] == hashes(list(range(32)), BS) and e["token_ids"] == list(range(32))


def test_a_key_already_cached_is_not_stored_again():
    pool, sink = pool_with_sink()
    prompt = list(range(33))
    a, b = pool.allocate([prompt, prompt])  # both miss: two copies of the same blocks
    pool.commit(a.seq_id)
    pool.commit(b.seq_id)  # the same keys: the cache keeps a's blocks, b's are not published
    [e] = events(sink)
    assert e["block_hashes"] == hashes(prompt, BS)
    pool.free([a.seq_id, b.seq_id])
    assert events(sink) == []  # freed blocks stay matchable: no key left the cache
    [c] = pool.allocate([prompt])
    assert c.num_cached_tokens == 32 and events(sink) == []  # a hit changes nothing either


def test_an_evicted_block_whose_key_passes_to_a_copy_reports_nothing():
    """Two sequences that computed the same blocks: one's are published, the other's
    are copies. Evicting the published ones hands their keys to the copies, so no
    key leaves the cache; an empty BlockRemoved (no hashes) went out before, a
    sequence number and a replay slot spent on nothing, and a consumer that wants
    at least one hash refused it."""
    pool, sink = pool_with_sink()
    prompt = list(range(100, 100 + 3 * BS))
    a, b = pool.allocate([prompt, prompt])
    pool.commit([a.seq_id, b.seq_id])
    [e] = events(sink)
    assert e["type"] == "BlockStored" and e["block_hashes"] == hashes(prompt, BS)
    pool.free(a.seq_id)  # a's 3 blocks evictable, 5 free of 11
    [big] = pool.allocate([list(range(1000, 1000 + 8 * BS))])  # 8 blocks: a's 3 evicted, their keys to b's
    assert events(sink) == []
    assert pool.stats().cached_blocks == 3
    pool.free(big.seq_id)
    [c] = pool.allocate([prompt + [1]])
    assert c.num_cached_tokens == 3 * BS and c.block_table[:3] == b.block_table[:3]


def test_eviction_reports_each_key_leaving_the_cache_tail_first():
    pool, sink = pool_with_sink()
    prompt = list(range(64))  # 4 full blocks
    [a] = pool.allocate([prompt + [0]])
    pool.commit(a.seq_id)
    events(sink)
    pool.free(a.seq_id)  # 4 cached blocks evictable, the 5th free; 11 usable in all
    want = hashes(prompt, BS)
    pool.allocate([list(range(1000, 1000 + 8 * BS))])  # 8 blocks: 7 free, so 1 eviction
    [e] = events(sink)
    assert e == {"type": "BlockRemoved", "block_hashes": want[3:], "medium": "GPU"}  # the tail goes first
    pool.allocate([list(range(2000, 2000 + 2 * BS))])  # 2 more evictions, merged into one event
    [e] = events(sink)
    assert e["block_hashes"] == [want[2], want[1]]
    assert pool.counters().evicted_blocks == 3


def test_a_truncated_block_rewritten_leaves_the_cache():
    pool, sink = pool_with_sink()
    prompt = list(range(40))
    [a] = pool.allocate([prompt])
    pool.commit(a.seq_id)
    want = hashes(prompt, BS)
    events(sink)
    pool.truncate(a.seq_id, 24)  # block 1 becomes the partly filled last block, ours alone
    [e] = events(sink)
    assert e["type"] == "BlockRemoved" and e["block_hashes"] == [want[1]]


def test_swap_in_republishes_blocks_evicted_meanwhile():
    pool, sink = pool_with_sink()
    prompt = list(range(48))
    [a] = pool.allocate([prompt + [7]])
    pool.commit(a.seq_id)
    events(sink)
    pool.swap_out(a.seq_id)  # its cached blocks stay matchable on the device
    assert events(sink) == []
    pool.allocate([list(range(500, 500 + 11 * BS))])  # every device block: the cached ones evicted
    want = hashes(prompt, BS)
    [e] = events(sink)
    assert e["type"] == "BlockRemoved" and sorted(e["block_hashes"]) == sorted(want)
    pool.free(pool.owned(None)[1:])
    pool.swap_in(a.seq_id)  # copied back from host memory and published again
    [e] = events(sink)
    assert e["type"] == "BlockStored" and e["block_hashes"] == want and e["token_ids"] == prompt
    pool.check_integrity()


def test_without_a_sink_nothing_is_recorded():
    pool, sink = pool_with_sink()
    pool.set_event_sink(None)
    [a] = pool.allocate([list(range(40))])
    pool.commit(a.seq_id)
    assert sink.take() == []
    with pytest.raises(InvalidArgument, match="EventSink"):
        pool.set_event_sink([])


@pytest.mark.parametrize("fmt", ["map", "array"])
def test_wire_format_decodes_as_vllm(fmt):
    pool, sink = pool_with_sink()
    prompt = list(range(37))
    [a] = pool.allocate([prompt])
    pool.commit(a.seq_id)
    pool.truncate(a.seq_id, 20)
    sink.cleared()
    payload = msgpack.packb(batch_value(12.5, to_dicts(sink.take(), BS), fmt))
    batch = DECODERS[fmt].decode(payload)
    assert batch.ts == 12.5 and batch.data_parallel_rank is None
    stored, removed, cleared = batch.events
    want = hashes(prompt, BS)
    if fmt == "map":
        assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
        assert isinstance(cleared, AllBlocksCleared) and stored.lora_name is None
    else:
        assert isinstance(stored, LegacyBlockStored)
        assert msgpack.unpackb(payload)[1][0][0] == "BlockStored"  # a positional array led by its tag
    assert stored.block_hashes == want and stored.parent_block_hash is None
    assert stored.token_ids == prompt[:32] and stored.block_size == BS and stored.medium == "GPU"
    assert removed.block_hashes == [want[1]] and removed.medium == "GPU"
    # kvpager's own reader (`kvpager events`) takes both forms alike
    ts, parsed = parse_batch(msgpack.unpackb(payload))
    assert ts == 12.5 and [e["type"] for e in parsed] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert parsed[0]["block_hashes"] == want and parsed[1]["medium"] == "GPU"


@pytest.mark.parametrize("bad", [None, [], [1.0], ["x", []], [1.0, [3]], [1.0, [{"no": "type"}]], [True, []]])
def test_parse_batch_refuses_what_is_not_a_batch(bad):
    with pytest.raises(ValueError):
        parse_batch(bad)


def test_hashes_are_the_keys_low_64_bits():
    pool, sink = pool_with_sink()
    [a] = pool.allocate([list(range(16))], salt=b"s")
    [b] = pool.allocate([list(range(16))], salt=b"t")
    pool.commit([a.seq_id, b.seq_id])
    first, second = events(sink)
    assert first["block_hashes"] == hashes(list(range(16)), BS, b"s")
    assert second["block_hashes"] == hashes(list(range(16)), BS, b"t")  # salts give other keys
    assert first["block_hashes"] != second["block_hashes"]
    assert all(0 <= h < 2**64 for h in first["block_hashes"] + second["block_hashes"])
    assert np.asarray(first["token_ids"]).dtype.kind == "i"
