"""Stateful property test of the allocator: random op sequences over a small pool.

The model keeps, per sequence, its token ids. Every token's K is written as a
deterministic function of the token ids up to and including it (as a real
model's K/V is), so any prefix hit, copy-on-write, swap or truncation that
hands a sequence the wrong bytes shows up when K is read back through the
block table. Pins and tenants' quotas run among the other ops: pinned
prefixes must stay cached with their bytes, and an eviction may take from
tenants at or under their quota only once every tenant over its quota has
nothing evictable left. `check_integrity()` runs after every step."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvpager import InvalidArgument, KVPool, OutOfBlocks, PoolSpec
from kvpager.errors import LimitExceeded, NotPinned

BS = 8
HEAD_DIM = 8
# Prompts start with one of two "system prompts" (cut to 0-3 blocks and a bit) so
# prefix hits are common; the rest is random.
SYSTEM = ([1, 2, 0, 1, 1, 2, 0, 0] * 4, [2] * 4 * BS)
tokens_st = st.builds(
    lambda sys_i, cut, rest: SYSTEM[sys_i][:cut] + rest,
    st.integers(0, 1), st.integers(0, 4 * BS), st.lists(st.integers(0, 2), max_size=2 * BS),
)


def k_value(prefix: tuple[int, ...]) -> np.ndarray:
    """The K row of the last token of ``prefix`` (depends on the whole prefix)."""
    d = hashlib.blake2b(repr(prefix).encode(), digest_size=HEAD_DIM).digest()
    return np.frombuffer(d, dtype=np.uint8).astype(np.float32)


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = KVPool(PoolSpec(1, 1, HEAD_DIM, num_blocks=25, block_size=BS,
                                    dtype="float32", num_host_blocks=10), max_pinned_blocks=8)
        self.tokens: dict[int, list[int]] = {}
        self.swapped: set[int] = set()
        self.floor: dict[int, int] = {}  # first position still held, after a release
        self.prompts: list[tuple[tuple[int, ...], str | None]] = []  # (tokens, salt) allocated
        self.pinned: dict[tuple[tuple[int, ...], str | None], int] = {}  # (pinned prefix, salt) -> count

    # -- helpers -----------------------------------------------------------------
    def _write(self, seq_id: int, start: int, slots: np.ndarray) -> None:
        toks = self.tokens[seq_id]
        k = np.zeros((len(slots), 1, HEAD_DIM), np.float32)
        for i, p in enumerate(range(start, start + len(slots))):
            k[i, 0] = k_value(tuple(toks[: p + 1]))
        self.pool.write(0, slots, k, -k)

    def _resident(self) -> list[int]:
        return [s for s in self.tokens if s not in self.swapped]

    # -- rules -------------------------------------------------------------------
    @rule(prompts=st.lists(tokens_st, min_size=1, max_size=3), salt=st.sampled_from([None, "x"]),
          share=st.booleans())
    def allocate(self, prompts, salt, share):
        if salt == "x":  # salted sequences get a token offset so the model stays per-salt
            prompts = [[t + 10 for t in p] for p in prompts]
        before = self._tenants()
        try:
            # Shared-in-batch blocks are filled by an earlier prompt of the batch:
            # the writes below go in prompt order, as a batched prefill's would.
            allocs = self.pool.allocate(prompts, salt=salt, share_in_batch=share)
        except OutOfBlocks:
            return
        self._check_eviction_order(before, self._tenants())
        self.prompts += [(tuple(p), salt) for p in prompts]
        for p, a in zip(prompts, allocs):
            assert a.num_cached_tokens % BS == 0 and a.num_cached_tokens < max(len(p), 1)
            assert len(a.slots) == len(p) - a.num_cached_tokens
            if a.num_cached_tokens:
                event("prefix hit")
            self.tokens[a.seq_id] = list(p)
            self._write(a.seq_id, a.num_cached_tokens, a.slots)

    @precondition(lambda self: self._resident())
    @rule(data=st.data(), n=st.integers(0, 2 * BS))
    def append(self, data, n):
        seqs = data.draw(st.lists(st.sampled_from(self._resident()), min_size=1, max_size=3, unique=True))
        new = [data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)) for _ in seqs]
        before = [len(self.tokens[s]) for s in seqs]
        tables = [self.pool.sequence(s).block_table for s in seqs]
        try:
            slots = self.pool.append(seqs, n, token_ids=new)
        except OutOfBlocks:
            return
        if any(self.pool.sequence(s).block_table[: len(b)] != b for s, b in zip(seqs, tables)):
            event("copy-on-write")
        for s, t, start, sl in zip(seqs, new, before, slots):
            self.tokens[s] += t
            self._write(s, start, sl)

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def commit(self, data):
        s = data.draw(st.sampled_from(self._resident()))
        upto = data.draw(st.integers(0, len(self.tokens[s])))
        self.pool.commit(s, upto)

    @precondition(lambda self: self._resident())
    @rule(data=st.data(), n=st.integers(1, 3))
    def fork(self, data, n):
        s = data.draw(st.sampled_from(self._resident()))
        [kids] = self.pool.fork(s, n)
        for c in kids:
            self.tokens[c] = list(self.tokens[s])
            if s in self.floor:
                self.floor[c] = self.floor[s]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seqs = data.draw(st.lists(st.sampled_from(list(self.tokens)), min_size=1, max_size=3, unique=True))
        self.pool.free(seqs)
        for s in seqs:
            del self.tokens[s]
            self.swapped.discard(s)
            self.floor.pop(s, None)

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def truncate(self, data):
        s = data.draw(st.sampled_from(self._resident()))
        n = data.draw(st.integers(0, len(self.tokens[s])))
        if s in self.floor and n <= self.floor[s]:  # into the released blocks: refused, nothing changes
            with pytest.raises(InvalidArgument, match="released"):
                self.pool.truncate(s, n)
            event("truncate into released blocks")
            return
        self.pool.truncate(s, n)
        del self.tokens[s][n:]

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def release(self, data):
        s = data.draw(st.sampled_from(self._resident()))
        p = data.draw(st.integers(0, len(self.tokens[s])))
        before = self.pool.stats().used_blocks
        [n] = self.pool.release_before(s, p)
        # whole blocks before p, never the last block, never what was released already
        want = max(0, min(p // BS, -(-len(self.tokens[s]) // BS) - 1) - self.floor.get(s, 0) // BS)
        assert n == want
        assert self.pool.stats().used_blocks <= before
        if n:
            event("release")
            self.floor[s] = self.floor.get(s, 0) + n * BS

    @precondition(lambda self: self._resident())
    @rule(data=st.data())
    def swap_out(self, data):
        seqs = data.draw(st.lists(st.sampled_from(self._resident()), min_size=1, max_size=3, unique=True))
        try:
            self.pool.swap_out(seqs)
        except OutOfBlocks:
            event("swap out: host full")
            return
        self.swapped.update(seqs)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.swapped)), min_size=1, max_size=3, unique=True))
        try:
            self.pool.swap_in(seqs)
        except OutOfBlocks:
            event("swap in: device full")
            return
        event("swap in")
        self.swapped.difference_update(seqs)

    @precondition(lambda self: self.prompts)
    @rule(data=st.data(), cut=st.integers(0, 5 * BS))
    def pin(self, data, cut):
        toks, salt = data.draw(st.sampled_from(self.prompts))
        toks = toks[:cut]
        before = self.pool.stats()
        try:
            [n] = self.pool.pin([list(toks)], salt=salt)
        except LimitExceeded:
            assert self.pool.stats() == before
            event("pin: over the cap")
            return
        assert n % BS == 0 and n <= len(toks)
        # What is pinned is what a prompt one token longer finds cached (allocate keeps one back).
        assert n == self.pool.cached_tokens([list(toks) + [0]], salt)[0]
        if n:
            event("pin")
            key = (toks[:n], salt)
            self.pinned[key] = self.pinned.get(key, 0) + 1

    @precondition(lambda self: self.pinned)
    @rule(data=st.data())
    def unpin(self, data):
        toks, salt = data.draw(st.sampled_from(sorted(self.pinned, key=repr)))
        assert self.pool.unpin([list(toks)], salt) == [len(toks)]
        self.pinned[(toks, salt)] -= 1
        if not self.pinned[(toks, salt)]:
            del self.pinned[(toks, salt)]

    @rule(toks=tokens_st, salt=st.sampled_from([None, "x"]))
    def unpin_what_is_not_pinned(self, toks, salt):
        if any(toks[: len(p)] == list(p) and s == salt for p, s in self.pinned):
            return
        before = self.pool.stats()
        try:
            self.pool.unpin([toks], salt)
            raise AssertionError("unpin of an unpinned prefix succeeded")
        except NotPinned:
            pass
        assert self.pool.stats() == before

    @rule(salt=st.sampled_from([None, "x"]), blocks=st.one_of(st.none(), st.integers(0, 6)))
    def set_quota(self, salt, blocks):
        self.pool.set_quota(salt, blocks)

    @rule(extra=st.integers(1, 4))
    def memory_pressure(self, extra):
        """Take every free block and ``extra`` evictable ones (one-block prompts no
        other prompt matches), then give them back: an eviction of ``extra`` blocks."""
        st_ = self.pool.stats()
        extra = min(extra, st_.evictable_blocks)
        if not extra:
            return
        event("memory pressure")
        before = self._tenants()
        allocs = self.pool.allocate([[99] * BS] * (st_.free_blocks + extra))
        self._check_eviction_order(before, self._tenants())
        self.pool.free([a.seq_id for a in allocs])

    # -- helpers for quotas ----------------------------------------------------------
    def _tenants(self) -> dict:
        return {t.salt: t for t in self.pool.stats().tenants}

    @staticmethod
    def _check_eviction_order(before: dict, after: dict) -> None:
        """Blocks evicted beyond what tenants over their quota had in excess only
        if, after, every tenant with a quota is at or under it or has nothing
        evictable left (new blocks are not published yet: cached counts fall only
        by eviction)."""
        evicted = {s: t.cached_blocks - (after[s].cached_blocks if s in after else 0) for s, t in before.items()}
        excess = sum(min(evicted[s], max(t.cached_blocks - t.quota, 0))
                     for s, t in before.items() if t.quota is not None)
        if sum(evicted.values()) > excess:
            for t in after.values():
                assert t.quota is None or t.cached_blocks <= t.quota or t.evictable_blocks == 0, (before, after)
        if excess:
            event("eviction from a tenant over its quota")

    # -- invariants --------------------------------------------------------------
    @invariant()
    def integrity(self):
        self.pool.check_integrity()

    @invariant()
    def lengths_and_contents(self):
        k_all, v_all = self.pool.kv(0)
        infos = {i.seq_id: i for i in self.pool.sequences()}
        assert set(infos) == set(self.tokens)
        for s, toks in self.tokens.items():
            info = infos[s]
            assert info.num_tokens == len(toks)
            assert info.swapped == (s in self.swapped)
            if info.swapped:
                continue
            for p in range(self.floor.get(s, 0), len(toks)):
                b, o = info.block_table[p // BS], p % BS
                want = k_value(tuple(toks[: p + 1]))
                np.testing.assert_array_equal(k_all[b, 0, o], want, err_msg=f"seq {s} pos {p}")
                np.testing.assert_array_equal(v_all[b, 0, o], -want)

    @invariant()
    def pins_hold_their_prefixes(self):
        pins = self.pool.pins()
        assert sorted(repr((p.salt, p.num_tokens, p.count)) for p in pins) == sorted(
            repr((s, len(t), c)) for (t, s), c in self.pinned.items())
        k_all, _ = self.pool.kv(0)
        for toks, salt in self.pinned:
            assert self.pool.cached_tokens([list(toks) + [0]], salt)[0] >= len(toks)
        for p in pins:  # the bytes of a pinned block are its prefix's, as written
            k = k_all[list(p.block_table), 0].reshape(-1, HEAD_DIM)
            assert any(s == p.salt and len(t) == p.num_tokens
                       and all(np.array_equal(k[i], k_value(t[: i + 1])) for i in range(len(t)))
                       for t, s in self.pinned)

    @invariant()
    def accounting(self):
        st_ = self.pool.stats()
        assert st_.free_blocks + st_.evictable_blocks + st_.used_blocks == st_.total_blocks
        assert st_.num_sequences == len(self.tokens)
        assert st_.swapped_sequences == len(self.swapped)
        assert st_.tokens_stored <= st_.token_slots_allocated
        assert st_.pinned_blocks == len({b for p in self.pool.pins() for b in p.block_table}) <= 8
        tenants = st_.tenants
        assert sum(t.cached_blocks for t in tenants) == st_.cached_blocks
        assert sum(t.evictable_blocks for t in tenants) == st_.evictable_blocks
        assert sum(t.pinned_blocks for t in tenants) == st_.pinned_blocks


AllocatorMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestAllocator = AllocatorMachine.TestCase
