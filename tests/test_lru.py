"""The pool's LRU as arrays with lazy deletion (`kvpager.lru`) against an
``OrderedDict`` doing the same operations (stale entries skipped, queues
compacted and grown); eviction with tenants' quotas against the greedy
choice over per-tenant ``OrderedDict`` LRUs that it replaced; and the prefix
cache's bulk paths (`PrefixCache.remove_many` rebuilding its map,
`publish_new` refusing) against one key at a time."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpager.block_pool import BlockPool
from kvpager.lru import Lru, TickQueue
from kvpager.prefix_cache import PrefixCache, root_key

N = 24  # blocks of the LRU tests: small, so runs of blocks come and go many times over

ops_st = st.lists(st.tuples(st.sampled_from(["add", "remove", "pop"]), st.integers(0, 2**32 - 1)), max_size=150)


def _same(lru: Lru, model: OrderedDict) -> None:
    assert list(lru) == list(model) and lru.ids().tolist() == list(model) and len(lru) == len(model)
    assert [b for b in range(-2, N + 2) if b in lru] == sorted(model)
    assert not lru.problems()


@settings(max_examples=300, deadline=None)
@given(ops_st)
def test_lru_does_what_an_ordered_dict_does(ops):
    """Runs of blocks added at the end, taken out anywhere, popped from the
    front: the same order, length and membership as an OrderedDict."""
    lru, model = Lru(N), OrderedDict()
    for op, seed in ops:
        rng = np.random.default_rng(seed)
        if op == "add":
            out = np.array([b for b in range(1, N) if b not in model], dtype=np.int64)
            run = rng.permutation(out)[: int(rng.integers(0, len(out) + 1))]
            ticks = lru.add(run)
            assert (np.diff(ticks) == 1).all() and (lru.tick[run] == ticks).all()
            model.update(dict.fromkeys(run.tolist()))
        elif op == "remove":
            held = np.array(list(model), dtype=np.int64)
            gone = rng.permutation(held)[: int(rng.integers(0, len(held) + 1))]
            lru.remove(gone)
            for b in gone.tolist():
                del model[b]
        else:
            n = int(rng.integers(0, len(model) + 1))
            assert lru.pop(n).tolist() == [model.popitem(last=False)[0] for _ in range(n)]
        _same(lru, model)


def test_a_long_run_compacts_and_keeps_the_arrays_bounded(monkeypatch):
    """Tens of thousands of blocks through an LRU of 24, mostly taken out from
    the middle (stale entries pile up between live ones): the order stays an
    OrderedDict's, and compaction keeps the queue's arrays within a few times
    the blocks ever evictable at once."""
    rng = np.random.default_rng(7)
    lru, model = Lru(N), OrderedDict()
    sizes = set()
    compactions = []
    compact = TickQueue._compact
    monkeypatch.setattr(TickQueue, "_compact", lambda q, room: compactions.append(room) or compact(q, room))
    for _ in range(4000):
        out = np.array([b for b in range(1, N) if b not in model], dtype=np.int64)
        run = rng.permutation(out)[: int(rng.integers(0, 6))]
        lru.add(run)
        model.update(dict.fromkeys(run.tolist()))
        if len(model) > 12:
            held = np.array(list(model), dtype=np.int64)
            gone = held[rng.random(len(held)) < 0.3]
            gone = gone[1:] if len(gone) > 1 else gone  # (mostly not the oldest: stale entries behind a live one)
            lru.remove(gone)
            for b in gone.tolist():
                del model[b]
        if rng.random() < 0.2:
            n = int(rng.integers(0, 3))
            assert lru.pop(n).tolist() == [model.popitem(last=False)[0] for _ in range(n)]
        sizes.add(len(lru._queue._block))
        assert list(lru) == list(model)
    assert lru.clock > 100 * N and len(compactions) > 100 and max(sizes) <= 4 * N + 64, sizes
    assert not lru.problems()


def test_problems_tell_a_broken_lru():
    lru = Lru(8)
    lru.add(np.array([3, 1, 5], dtype=np.int64))
    assert not lru.problems()
    lru.tick[6] = 1  # a tick without a live entry
    assert any("carry an LRU tick" in p for p in lru.problems())
    lru.tick[6] = -1
    lru._queue.count += 1
    assert any("counts 4 live entries but holds 3" in p for p in lru.problems())


def test_a_tenant_queue_is_an_ordered_dict_of_its_own_blocks():
    """A `TickQueue` over the pool LRU's ticks: a block leaving the pool's LRU
    leaves it too (its count kept by the caller); its own `pop` / `move_to_end`
    (OrderedDict's names, for one block) leave the pool's LRU as it is."""
    lru = Lru(16)
    q = TickQueue(lru.tick)
    mine = np.array([2, 4, 6, 8, 10], dtype=np.int64)
    ticks = lru.add(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], dtype=np.int64))
    q.push(mine, ticks[mine - 1])
    assert list(q) == [2, 4, 6, 8, 10] and len(q) == 5
    lru.remove(np.array([4], dtype=np.int64))
    q.count -= 1
    assert list(q) == [2, 6, 8, 10] and q.first(2).tolist() != [] and q.blocks_at(q.first(2)).tolist() == [2, 6]
    q.move_to_end(2)
    assert list(q) == [6, 8, 10, 2] and len(q) == 4 and list(lru) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    q.pop(8)
    assert list(q) == [6, 10, 2] and len(q) == 3 and 8 in lru
    with pytest.raises(KeyError):
        q.pop(8)
    assert any("out of tick order" in p for p in q.problems())  # (2 moved behind later ticks)


class GreedyModel:
    """The eviction order before the arrays: one OrderedDict of evictable blocks,
    one per quota'd tenant, and victims taken one at a time from the tenant over
    its quota whose oldest block is oldest, each until it is back at its quota.
    Tenants by index (a code may be released and given to another salt)."""

    def __init__(self):
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.mine: dict[int, OrderedDict[int, None]] = {}
        self.quotas: dict[int, int] = {}
        self.usage: dict[int, int] = {}
        self.of: dict[int, int] = {}
        self.stamp: dict[int, int] = {}
        self.clock = 0

    def published(self, b: int, c: int) -> None:
        self.of[b] = c
        self.usage[c] = self.usage.get(c, 0) + 1

    def evictable(self, blocks: list[int]) -> None:
        for b in blocks:
            self.lru[b] = None
            self.stamp[b] = self.clock
            self.clock += 1
            if self.of[b] in self.mine:
                self.mine[self.of[b]][b] = None

    def left(self, blocks: list[int]) -> None:
        for b in blocks:
            del self.lru[b]
            self.mine.get(self.of[b], {}).pop(b, None)

    def set_quota(self, c: int, q: int) -> None:
        if c not in self.mine:
            self.mine[c] = OrderedDict.fromkeys(b for b in self.lru if self.of[b] == c)
        self.quotas[c] = q

    def evict(self, n: int) -> list[int]:
        excess = {c: self.usage.get(c, 0) - q for c, q in self.quotas.items()}
        over = [c for c, e in excess.items() if e > 0 and self.mine[c]]
        out = []
        while len(out) < n and over:
            c = min(over, key=lambda c: self.stamp[next(iter(self.mine[c]))])
            b = self.mine[c].popitem(last=False)[0]
            del self.lru[b]
            out.append(b)
            excess[c] -= 1
            if not excess[c] or not self.mine[c]:
                over.remove(c)
        while len(out) < n:
            b = self.lru.popitem(last=False)[0]
            self.mine.get(self.of[b], {}).pop(b, None)
            out.append(b)
        for b in out:
            self.usage[self.of.pop(b)] -= 1
        return out


@pytest.mark.parametrize("seed", range(12))
def test_eviction_with_quotas_takes_what_the_greedy_choice_took(seed):
    """Blocks of four tenants published, made evictable in runs, taken back by
    prefix hits and evicted, with quotas set among them: the blocks evicted,
    in order, and every LRU (the pool's and each quota'd tenant's) are the
    model's after every step."""
    rng = np.random.default_rng(seed)
    pool, model = BlockPool(48), GreedyModel()
    salts = [None, "a", "b", "c"]
    held: list[int] = []  # blocks with one reference
    n_key = 0
    for _ in range(300):
        op = int(rng.integers(6))
        if op <= 1:  # take blocks (evicting), publish some under a tenant
            n = int(rng.integers(1, 9))
            if n > pool.get_num_free_blocks():
                continue
            top = pool.num_free
            got = pool.get_new_blocks(n).tolist()
            assert got[top:] == model.evict(max(0, n - top))
            held += got
            for b in got:
                if rng.random() < 0.7:
                    k = int(rng.integers(4))
                    n_key += 1
                    assert pool.publish(b, n_key.to_bytes(16, "little"), pool.tenants.code(root_key(salts[k]), salts[k]))
                    model.published(b, k)
        elif op == 2 and held:  # free a run: published blocks go to the LRU in this order
            run = [held.pop(int(rng.integers(len(held)))) for _ in range(min(len(held), int(rng.integers(1, 7))))]
            pool.free_blocks(np.array(run, dtype=np.int64), distinct=True)
            model.evictable([b for b in run if b in model.of])
        elif op == 3 and model.lru:  # prefix hits on evictable blocks
            hits = rng.permutation(list(model.lru))[: int(rng.integers(1, 4))].tolist()
            pool.touch(np.array(hits + hits[:1], dtype=np.int64))  # (a repeat: two references to one)
            pool.free_blocks(np.array(hits[:1], dtype=np.int64))
            model.left(hits)
            held += hits
        elif op == 4:
            k = int(rng.integers(4))
            q = int(rng.integers(0, 8))
            pool.set_quota(salts[k], q)
            model.set_quota(k, q)
        elif op == 5 and model.lru and rng.random() < 0.3:  # an evictable block rewritten: un-published
            b = int(rng.choice(list(model.lru)))
            pool.unpublish(b)
            model.left([b])
            model.usage[model.of.pop(b)] -= 1
        assert list(pool.evictable) == list(model.lru)
        for k, mine in model.mine.items():
            theirs = pool.tenants.lru[pool.tenants.find(salts[k])]
            assert list(theirs) == list(mine) and len(theirs) == len(mine)
        assert not pool.evictable.problems() and not pool.cache.problems()
        assert not pool.tenants.problems(pool.cache.cached, pool.evictable)
    assert pool.num_evicted > 20


def _cache(n: int, keyed: range) -> PrefixCache:
    cache = PrefixCache(n)
    for b in keyed:
        assert cache.publish(b, bytes([b]) * 16)
    return cache


def _state(cache: PrefixCache) -> tuple:
    return dict(cache.key_to_block), dict(cache.block_key), cache.cached.tolist(), cache.key_of.tolist()


@pytest.mark.parametrize("as_array", [False, True])
@pytest.mark.parametrize("num_blocks", [64, 4096])  # (the blocks left found by the mask, or from the dict)
def test_remove_many_of_most_of_the_cache_is_remove_of_each(as_array, num_blocks):
    """Most of the cache evicted at once (its key map built again from the
    entries left): the same keys back and the same maps as removing each."""
    one, many = _cache(num_blocks, range(1, 60)), _cache(num_blocks, range(1, 60))
    victims = [b for b in range(63, 0, -1) if b % 7]  # (blocks 60-62 have no key)
    assert len(victims) > len(many) / 2
    got = many.remove_many(np.array(victims, dtype=np.int64) if as_array else victims)
    assert got == [one.remove(b) for b in victims] and got[0] is None and got[-1] == bytes([1]) * 16
    assert _state(many) == _state(one) and not many.problems() and len(many) == 8
    assert many.get(bytes([7]) * 16) == 7 and many.get(bytes([8]) * 16) is None


@pytest.mark.parametrize("n", [5, 200])  # (distinct blocks checked as a set, then sorted)
def test_publish_new_refuses_and_changes_nothing(n):
    """A key cached already, a key twice, a block twice, a block with a key:
    False and the maps as they were; else what publishing each would leave."""
    base = range(1000, 1010)
    blocks = list(range(1, n + 1))
    keys = [b.to_bytes(16, "little") for b in blocks]
    for bad_blocks, bad_keys in ((blocks, keys[:-1] + [(1000).to_bytes(16, "little")]),  # cached already
                                 (blocks, keys[:-1] + keys[:1]),  # a key twice
                                 (blocks[:-1] + blocks[:1], keys),  # a block twice
                                 (blocks[:-1] + [1005], keys)):  # a block with a key
        cache = PrefixCache(1100)
        for b in base:
            cache.publish(b, b.to_bytes(16, "little"))
        before = _state(cache)
        assert not cache.publish_new(bad_blocks, bad_keys)
        assert _state(cache) == before and not cache.problems()
    one, many = PrefixCache(1100), PrefixCache(1100)
    assert many.publish_new(blocks, keys, np.array(blocks, dtype=np.int64))
    assert all(map(one.publish, blocks, keys)) and _state(many) == _state(one) and not many.problems()


def test_block_keys_read_as_a_dict():
    cache = _cache(16, range(3, 12, 2))
    view = cache.block_key
    want = {b: bytes([b]) * 16 for b in range(3, 12, 2)}
    assert dict(view) == want and list(view) == sorted(want) and len(view) == 5 and view == want
    assert view[np.int64(5)] == want[5] and view.get(4) is None and 4 not in view and 5 in view
    for missing in (0, 4, 16, -1, "x", 2.0):
        with pytest.raises(KeyError):
            view[missing]
    cache.remove(5)
    assert 5 not in view and len(view) == 4 and cache.key_of[5] is None
