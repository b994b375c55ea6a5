"""kvpager's allocator against an independent model of vLLM's v1 block pool
(`LRUReference`): one free queue in eviction order (blocks without a hash at
its front, cached ones appended as their last reference goes, a request's
blocks last to first), evicted from the front; only full blocks hashed,
chained from the parent's hash and a salt; prefix hits capped so the last
token is computed; evictable cached blocks counted as free, usage =
1 - free / total. Both are driven with the same requests and compared on hit
tokens, refusals, blocks used / free / evictable, usage, the hit counters and
the cached prefixes that survive eviction.

Where vLLM caches a second block under a key already cached (a prompt ending
on a block boundary recomputes its last block), kvpager keeps one block per
key (`PrefixCache.publish`); the reference's ``one_block_per_key`` mode keeps
it on the copy in use, if any, else on the newest copy, and passes it to a
copy in use when its block is evicted, and to a copy whose last reference
goes while its block is idle (`kvpager.block_copies`): the key lives as long
as in vLLM, in one block. That is what kvpager must match exactly."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from kvpager import KVPool, PoolSpec
from kvpager.errors import OutOfBlocks

BS = 16


class LRUReference:
    """vLLM v1's block pool and cache manager for full attention, in plain Python."""

    def __init__(self, num_blocks: int, one_block_per_key: bool = False):
        self.num_blocks = num_blocks
        self.one_block_per_key = one_block_per_key
        self.queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))  # block 0: null
        self.ref = [0] * num_blocks
        self.hash: list[object] = [None] * num_blocks
        self.cache: dict[object, list[int]] = {}  # hash -> blocks, first inserted answers
        self.reqs: dict[int, dict] = {}
        self.queries = self.hits = 0
        self.copies: dict[object, list[int]] = {}  # one block a key: copies in use of a cached block, by key

    def hashes(self, tokens: list[int], salt: str | None, n: int) -> list[object]:
        out, parent = [], None
        for i in range(n):
            parent = hash((parent, tuple(tokens[i * BS : (i + 1) * BS]), salt if i == 0 else None))
            out.append(parent)
        return out

    def match(self, tokens: list[int], salt: str | None) -> list[int]:
        hits = []
        for h in self.hashes(tokens, salt, max(len(tokens) - 1, 0) // BS):
            if h not in self.cache:
                break
            hits.append(self.cache[h][0])
        return hits

    def num_free(self) -> int:
        return len(self.queue)

    def num_evictable(self) -> int:
        return sum(1 for b in self.queue if self.hash[b] is not None)

    def usage(self) -> float:
        return 1.0 - self.num_free() / (self.num_blocks - 1)

    def _take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            b, _ = self.queue.popitem(last=False)
            if self.hash[b] is not None:  # evicted
                h = self.hash[b]
                self._unhash(b)
                if self.copies.get(h):  # (one block a key) its first copy in use takes the key
                    self._rehash(self.copies[h].pop(0), h)
            self.ref[b] = 1
            out.append(b)
        return out

    def _unhash(self, b: int) -> None:
        copies = self.cache[self.hash[b]]
        copies.remove(b)
        if not copies:
            del self.cache[self.hash[b]]
        self.hash[b] = None

    def _rehash(self, b: int, h: object) -> None:
        if not self.copies.get(h):
            self.copies.pop(h, None)
        self.hash[b] = h
        self.cache.setdefault(h, []).append(b)

    def _cache_full_blocks(self, r: dict) -> None:
        full = len(r["tokens"]) // BS
        hs = self.hashes(r["tokens"], r["salt"], full)
        for i in range(r["ncached"], full):
            b, h = r["blocks"][i], hs[i]
            if self.hash[b] is not None:
                continue
            if self.one_block_per_key and h in self.cache:
                if any(self.ref[c] for c in self.cache[h]):
                    self.copies.setdefault(h, []).append(b)  # the block in use keeps the key; this one a copy
                    continue
                for c in list(self.cache[h]):  # idle copies give it up: free, at the front
                    self._unhash(c)
                    self.queue.move_to_end(c, last=False)
            self.hash[b] = h
            self.cache.setdefault(h, []).append(b)
        r["ncached"] = max(r["ncached"], full)

    def window_match(self, tokens: list[int], salt: str | None, window: int) -> list[int]:
        """vLLM's sliding-window manager (`find_longest_cache_hit`): walking down
        from the last usable block, the first run of cdiv(window - 1, BS) cached
        blocks ends the hit; the entries before the run are null blocks (0);
        with no such run, the cached blocks from block 0 on."""
        contiguous = -(-(window - 1) // BS)
        hs = self.hashes(tokens, salt, max(len(tokens) - 1, 0) // BS)
        computed = [0] * len(hs)
        run = 0
        for i in range(len(hs) - 1, -1, -1):
            if hs[i] not in self.cache:
                run = 0
                continue
            computed[i] = self.cache[hs[i]][0]
            run += 1
            if run >= contiguous:
                return computed[: i + run]
        return computed[:run]

    def allocate(self, rid: int, tokens: list[int], salt: str | None, window: int | None = None) -> int | None:
        """Hit tokens, or None where the pool cannot hold the request. ``window``:
        a sliding-window model's request (`window_match`)."""
        hits = self.match(tokens, salt) if window is None else self.window_match(tokens, salt, window)
        held = [b for b in hits if b]
        n = -(-len(tokens) // BS)
        if n - len(hits) + sum(self.ref[b] == 0 for b in held) > self.num_free():
            return None
        self.queries += len(tokens)
        self.hits += len(hits) * BS
        for b in held:
            if self.ref[b] == 0:
                del self.queue[b]
            self.ref[b] += 1
        r = self.reqs[rid] = {"tokens": list(tokens), "salt": salt, "ncached": len(hits),
                              "blocks": hits + self._take(n - len(hits))}
        self._cache_full_blocks(r)
        return len(hits) * BS

    def append(self, rid: int, tokens: list[int]) -> bool:
        r = self.reqs[rid]
        need = -(-(len(r["tokens"]) + len(tokens)) // BS) - len(r["blocks"])
        if need > self.num_free():
            return False
        r["blocks"] += self._take(need)
        r["tokens"] += tokens
        self._cache_full_blocks(r)
        return True

    def free(self, rid: int) -> None:
        blocks = [b for b in self.reqs.pop(rid)["blocks"][::-1] if b]  # the tail evicted first; no null block
        for b in blocks:
            self.ref[b] -= 1
        idle = [b for b in blocks if self.ref[b] == 0]
        for b in idle:  # (one block a key) a copy going idle takes its key from an idle block, which goes free
            h = next((h for h, bs in self.copies.items() if b in bs), None)
            if h is None:
                continue
            self.copies[h].remove(b)
            holder = self.cache[h][0]
            if self.ref[holder] == 0:
                self._unhash(holder)
                self.queue.move_to_end(holder, last=False)
                self._rehash(b, h)
            elif not self.copies[h]:
                del self.copies[h]
        for b in reversed([b for b in idle if self.hash[b] is None]):
            self.queue[b] = None
            self.queue.move_to_end(b, last=False)
        for b in idle:
            if self.hash[b] is not None:
                self.queue[b] = None

    def cached_tokens(self, tokens: list[int], salt: str | None) -> int:
        return len(self.match(tokens, salt)) * BS


def make_pool(num_blocks: int) -> KVPool:
    return KVPool(PoolSpec(num_layers=1, num_kv_heads=1, head_dim=8, num_blocks=num_blocks, dtype="float32"))


def allocate_both(pool: KVPool, ref: LRUReference, rid: int, tokens: list[int], salt: str | None = None,
                  window: int | None = None):
    """The request on both sides (kvpager's committed at once: vLLM caches full
    blocks when it allocates them); the kvpager sequence id (None if refused)
    and both hit counts."""
    want = ref.allocate(rid, tokens, salt, window)
    try:
        [a] = pool.allocate([tokens], salt=salt, window=window)
    except OutOfBlocks:
        return None, want, None
    pool.commit([a.seq_id])
    return a.seq_id, want, a.num_cached_tokens


def assert_same_state(pool: KVPool, ref: LRUReference, prompts: list[tuple[list[int], str | None]]) -> None:
    st, bp = pool.stats(), pool.manager.pool
    assert bp.get_num_free_blocks() == ref.num_free()
    assert st.used_blocks == ref.num_blocks - 1 - ref.num_free()
    assert st.evictable_blocks == ref.num_evictable()
    assert bp.get_usage() == pytest.approx(ref.usage())
    assert (st.prefix_query_tokens, st.prefix_hit_tokens) == (ref.queries, ref.hits)
    for tokens, salt in prompts:
        assert pool.cached_tokens([tokens], salt) == [ref.cached_tokens(tokens, salt)], (len(tokens), salt)
    pool.check_integrity()


def test_a_recomputed_last_block_keeps_its_prefix_as_long_as_in_vllm():
    """A prompt ending on a block boundary, sent again: the cap on hits makes it
    compute its last block again, and vLLM caches that copy too, which outlives
    the idle first copy. kvpager kept the key on the idle copy, at its older
    place in the LRU: blocks freed in between were evicted after it, and the
    prompt's last block was lost where vLLM still hits it."""
    pool, ref = make_pool(6), LRUReference(6)  # 5 usable blocks
    prompt = list(range(2 * BS))
    a, *hits = allocate_both(pool, ref, 0, prompt)
    ref.free(0), pool.free([a])
    x, *hits = allocate_both(pool, ref, 1, list(range(500, 500 + BS + 1)))  # cached in between
    ref.free(1), pool.free([x])
    b, *hits = allocate_both(pool, ref, 2, prompt)
    assert hits == [BS, BS]  # its last block computed again
    ref.free(2), pool.free([b])
    c, *hits = allocate_both(pool, ref, 3, list(range(1000, 1000 + 3 * BS)))  # pressure: evicts
    assert c is not None and hits == [0, 0]
    longer = prompt + [7]
    assert ref.cached_tokens(longer, None) == 2 * BS
    assert pool.cached_tokens([longer]) == [ref.cached_tokens(longer, None)]


def run_trace(seed: int, steps: int) -> None:
    """Random requests (shared prefixes of several lengths, partial last blocks,
    repeats, salts), appends and frees (one or several at once, any order) on a
    pool small enough to evict: every answer and count as the reference's."""
    rng = random.Random(seed)
    nb = rng.randint(8, 40)
    pool, ref = make_pool(nb), LRUReference(nb, one_block_per_key=True)
    prefixes = [[rng.randrange(1000) for _ in range(rng.choice([0, 5, 16, 20, 32, 40, 64]))] for _ in range(4)]
    live: dict[int, int] = {}
    seen: list[tuple[list[int], str | None]] = []
    for rid in range(steps):
        op = rng.random()
        if op < 0.4 or not live:
            if seen and rng.random() < 0.25:
                tokens, salt = rng.choice(seen)
            else:
                tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.choice([1, 3, 15, 16, 17]))]
                salt = rng.choice([None, None, "a", "b"])
            seen.append((tokens, salt))
            seq, want, got = allocate_both(pool, ref, rid, list(tokens), salt)
            assert got == want, f"step {rid}: allocate of {len(tokens)} tokens"
            if seq is not None:
                live[rid] = seq
        elif op < 0.7:
            r = rng.choice(list(live))
            toks = [rng.randrange(1000) for _ in range(rng.choice([1, 1, 5, 16, 20]))]
            want = ref.append(r, toks)
            try:
                pool.append([live[r]], len(toks), [toks])
                pool.commit([live[r]])
                got = True
            except OutOfBlocks:
                got = False
            assert got == want, f"step {rid}: append of {len(toks)} tokens"
        else:
            free_some(rng, pool, ref, live, [1, 2, 3])
        assert_same_state(pool, ref, seen[-12:])


def free_some(rng: random.Random, pool: KVPool, ref: LRUReference, live: dict[int, int], counts: list[int]) -> None:
    """Free a few live requests (as many as one of ``counts``) on both sides, in one call each."""
    gone = rng.sample(list(live), min(len(live), rng.choice(counts)))
    for r in gone:
        ref.free(r)
    pool.free([live.pop(r) for r in gone])


@pytest.mark.parametrize("seed", range(6))
def test_random_traces_match_the_lru_reference(seed):
    run_trace(seed, 120)


def test_forked_samples_decode_together_where_vllm_holds_them():
    """Two samples of one prompt: vLLM runs them as two requests (the second
    hits the full blocks, its partly filled block its own); kvpager forks (one
    block fewer). At the pool size where vLLM holds both, a decode step of the
    pair needs no block there; kvpager's copies the shared, partly filled
    block once, for the first sample, and the second, its last holder, writes
    it in place (it asked for two blocks, one more than it has, before)."""
    prompt = list(range(2 * BS + 5))
    ref = LRUReference(5)  # 4 usable blocks: 3 for the prompt, 1 for the second sample's own last block
    assert ref.allocate(0, prompt, None) == 0 and ref.allocate(1, prompt, None) == 2 * BS
    assert ref.append(0, [1]) and ref.append(1, [2])
    pool = make_pool(5)
    [a] = pool.allocate([prompt])
    pool.commit([a.seq_id])
    [[child]] = pool.fork([a.seq_id])
    pool.append([a.seq_id, child], 1, [[1], [2]])
    assert pool.stats().used_blocks == ref.num_blocks - 1 - ref.num_free()


def test_a_windowed_prompt_holds_only_the_blocks_its_window_reads_as_vllm():
    """A sliding-window model's prompt over an 8-block cached prefix (evictable)
    in a pool of 10 usable blocks: vLLM's sliding-window manager takes the one
    block a 16-token window reads before the first new token, null entries for
    the rest, and fits; kvpager held all 8 hit blocks and refused ("needed 6,
    available 2"). The 7 unread blocks stay evictable, some evicted for the
    new blocks as in vLLM."""
    pool, ref = make_pool(11), LRUReference(11, one_block_per_key=True)
    prefix = list(range(8 * BS))
    a, *hits = allocate_both(pool, ref, 0, prefix + [1])
    ref.free(0), pool.free([a])
    prompt = prefix + list(range(5000, 5081))
    b, want, got = allocate_both(pool, ref, 1, prompt, window=16)
    assert b is not None and got == want == 8 * BS
    table = pool.sequence(b).block_table
    assert table[:7] == (0,) * 7 and table[7] == ref.reqs[1]["blocks"][7] and 0 not in table[8:]
    assert_same_state(pool, ref, [(prefix + [1], None), (prompt, None)])
    ref.free(1), pool.free([b])
    assert_same_state(pool, ref, [(prefix + [1], None), (prompt, None)])


def run_window_trace(seed: int, steps: int) -> None:
    """Random requests, windowed (several windows) or not, over shared prefixes
    in a pool small enough to evict, and frees: every hit, refusal and count
    as vLLM's (its sliding-window manager for the windowed ones)."""
    rng = random.Random(seed)
    nb = rng.randint(10, 40)
    pool, ref = make_pool(nb), LRUReference(nb, one_block_per_key=True)
    convs = [[rng.randrange(1000) for _ in range(10 * BS)] for _ in range(3)]
    live: dict[int, int] = {}
    seen: list[tuple[list[int], str | None]] = []
    for rid in range(steps):
        if rng.random() < 0.6 or not live:
            tokens = rng.choice(convs)[: rng.randint(1, 10 * BS)] + [rng.randrange(1000)] * rng.choice([0, 1, 17])
            salt = rng.choice([None, None, "a"])
            window = rng.choice([None, 1, 16, 17, 33, 100])
            seen.append((tokens, salt))
            seq, want, got = allocate_both(pool, ref, rid, tokens, salt, window)
            assert got == want, f"step {rid}: allocate of {len(tokens)} tokens, window {window}"
            if seq is not None:
                live[rid] = seq
        else:
            free_some(rng, pool, ref, live, [1, 2])
        assert_same_state(pool, ref, seen[-8:])


@pytest.mark.parametrize("seed", range(6))
def test_random_windowed_traces_match_vllms_sliding_window_manager(seed):
    run_window_trace(seed, 100)
