"""Sequences: block tables, token counts, fork, copy-on-write and swap state.

`SequenceManager` decides which blocks move; it never touches K/V bytes. Ops
that need bytes moved return the (source, destination) block pairs, and the
caller (`KVPool`) runs them on its backend before the freed blocks can be
handed out again. Every op takes a batch, validates all of it first and
either applies all of it or raises and changes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from kvpager.block_pool import NULL_BLOCK, BlockPool
from kvpager.errors import (
    IntegrityError,
    InvalidArgument,
    NotSwapped,
    OutOfBlocks,
    SequenceSwapped,
    UnknownSequence,
)
from kvpager.prefix_cache import PrefixCache, chain_keys, root_key, token_array


@dataclass(eq=False)
class Sequence:
    """One sequence's state. ``block_table[i]`` holds tokens ``i*bs .. (i+1)*bs-1``."""

    seq_id: int
    block_table: list[int]
    num_tokens: int
    prompt: np.ndarray  # token ids given at allocate (int64; shared by forks, never mutated)
    root: bytes  # parent key of block 0 (from the salt)
    block_keys: list[bytes] = field(default_factory=list)  # keys of blocks 0..k-1
    num_committed: int = 0  # K/V written for tokens [0, num_committed)
    num_published: int = 0  # blocks [0, num_published) were offered to the cache
    host_blocks: dict[int, int] | None = None  # when swapped: table index -> host block
    owner: object = None  # the daemon's session id; None when embedded
    # Ids of tokens appended after the prompt, while every one was given: the
    # known ids are prompt + tail, a prefix of the sequence's tokens.
    tail: list[int] = field(default_factory=list)

    @property
    def num_known(self) -> int:
        return len(self.prompt) + len(self.tail)

    def known(self, start: int, stop: int) -> np.ndarray:
        """Known token ids ``[start, stop)`` as int64."""
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        head = self.prompt[start:p] if start < p else self.prompt[:0]
        return np.concatenate([head, np.array(self.tail[max(start - p, 0) : stop - p], dtype=np.int64)])

    @property
    def swapped(self) -> bool:
        return self.host_blocks is not None


def _token_list(ids: object) -> list[int]:
    """Token ids of an append as a list of ints (validated)."""
    if type(ids) is list and (len(ids) == 1 and type(ids[0]) is int or all(type(t) is int for t in ids)):
        return ids
    return token_array(ids, "token_ids").tolist()


class SequenceManager:
    """Allocator state: block pool + prefix cache + host blocks + sequences."""

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.cache = PrefixCache(self.pool)
        self.num_host_blocks = num_host_blocks
        self.host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))
        self.seqs: dict[int, Sequence] = {}
        self.swapped_ids: set[int] = set()
        self._ids = itertools.count(1)
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # -- lookup ------------------------------------------------------------------
    def get(self, seq_id: int, op: str | None = None) -> Sequence:
        """The sequence, or UnknownSequence; SequenceSwapped if ``op`` needs it resident."""
        try:
            seq = self.seqs[seq_id]
        except (KeyError, TypeError):
            raise UnknownSequence(seq_id) from None
        if op is not None and seq.host_blocks is not None:
            raise SequenceSwapped(seq_id, op)
        return seq

    def _batch(self, seq_ids: Seq[int], op: str | None) -> list[Sequence]:
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidArgument(f"{op or 'operation'}: duplicate sequence ids in one batch")
        seqs = list(map(self.seqs.get, seq_ids))
        if None in seqs or (op is not None and self.swapped_ids and not self.swapped_ids.isdisjoint(seq_ids)):
            return [self.get(s, op) for s in seq_ids]  # raises the right error
        return seqs

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocate ------------------------------------------------------------------
    def allocate(
        self,
        prompts: Seq[Seq[int] | np.ndarray],
        salts: Seq[str | bytes | None],
        owner: object = None,
        share_in_batch: bool = False,
    ) -> list[tuple[Sequence, int]]:
        """New sequences holding ``prompts``; returns (sequence, cached tokens) each.

        The longest committed prefix of full blocks found in the cache is
        shared. At least one token is always left to compute, so a worker
        gets logits for the last prompt token: a fully cached prompt gives
        back its last block.

        With ``share_in_batch``, a prompt also shares the full blocks that an
        earlier prompt of the same batch gets fresh (same salt, same tokens):
        they count as cached for it, but their K/V is written by that earlier
        prompt's prefill, so the caller must write the whole batch's K/V (layer
        by layer, as a batched forward pass does) before attending over it."""
        bs = self.block_size
        pool = self.pool
        plans = []
        touched_evictable: set[int] = set()
        # key -> (prompt index, table index) of a fresh full block earlier in this batch
        fresh: dict[bytes, tuple[int, int]] = {}
        need = 0
        for i, prompt in enumerate(prompts):
            tokens = token_array(prompt, f"prompts[{i}]")
            root = root_key(salts[i])
            usable = max(len(tokens) - 1, 0) // bs  # blocks we may take from the cache
            keys, hits = self.cache.match_tokens(root, tokens, bs, usable)
            for b in hits:
                if pool.ref_cnt[b] == 0:
                    touched_evictable.add(b)
            shared: list[tuple[int, int]] = []
            if share_in_batch:
                start = len(hits)
                rest = chain_keys(keys[-1] if keys else root, tokens[start * bs :], bs)
                for key in rest[: usable - start]:
                    where = fresh.get(key)
                    if where is None:
                        break
                    shared.append(where)
                    keys.append(key)
                for t in range(start + len(shared), start + len(rest)):
                    fresh.setdefault(rest[t - start], (i, t))
            need += self._blocks_for(len(tokens)) - len(hits) - len(shared)
            plans.append((tokens, root, keys, hits, shared))
        available = pool.get_num_free_blocks() - len(touched_evictable)
        if need > available:
            raise OutOfBlocks(need, available)

        # Take the hits before any new block: an evictable hit must not be
        # evicted to make room for this very batch.
        for plan in plans:
            pool.touch(plan[3])
        new_ids = pool.get_new_blocks(need) if need else []
        taken = 0
        out: list[tuple[Sequence, int]] = []
        for tokens, root, keys, hits, shared in plans:
            from_batch = [out[pi][0].block_table[t] for pi, t in shared]
            pool.touch(from_batch)
            k = self._blocks_for(len(tokens)) - len(hits) - len(shared)
            table = hits + from_batch + new_ids[taken : taken + k]
            taken += k
            cached = (len(hits) + len(shared)) * bs
            seq = Sequence(
                next(self._ids), table, len(tokens), tokens, root, keys,
                num_committed=len(hits) * bs, num_published=len(hits), owner=owner,
            )
            self.seqs[seq.seq_id] = seq
            self.prefix_query_tokens += len(tokens)
            self.prefix_hit_tokens += cached
            out.append((seq, cached))
        return out

    def cached_tokens(self, prompts: Seq[Seq[int] | np.ndarray], salts: Seq[str | bytes | None]) -> list[int]:
        """How many tokens of each prompt `allocate` would find cached now.
        Read-only: touches nothing, so the answer can change before an allocate."""
        bs = self.block_size
        out = []
        for i, prompt in enumerate(prompts):
            tokens = token_array(prompt, f"prompts[{i}]")
            usable = max(len(tokens) - 1, 0) // bs
            _, hits = self.cache.match_tokens(root_key(salts[i]), tokens, bs, usable)
            out.append(len(hits) * bs)
        return out

    # -- append (copy-on-write) ----------------------------------------------------------
    def append(
        self, seq_ids: Seq[int], counts: int | Seq[int], token_ids: Seq[Seq[int] | None] | None
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Extend each sequence by ``counts[i]`` token slots (``counts``: one int for all).

        Returns every new slot id (block * block_size + offset) in one flat
        int64 array, sequence after sequence, and the (src, dst) block copies
        to run before writing: a shared, partly filled last block is copied
        first (copy-on-write). This is the decode hot path: plain Python per
        sequence, one NumPy array per batch."""
        bs = self.block_size
        pool, ref = self.pool, self.pool.ref_cnt
        seqs = self._batch(seq_ids, "append")
        if type(counts) is int and counts == 1:
            return self._append_one(seqs, token_ids)
        if isinstance(counts, (int, np.integer)) and not isinstance(counts, bool):
            counts = [counts] * len(seqs)
        elif len(counts) != len(seqs):
            raise InvalidArgument(f"append: {len(counts)} counts for {len(seqs)} sequences")
        need = 0
        plans = []
        for i, (seq, n) in enumerate(zip(seqs, counts)):
            if type(n) is not int and (not isinstance(n, (int, np.integer)) or isinstance(n, bool)) or n < 0:
                raise InvalidArgument(f"append: count for sequence {seq.seq_id} must be an integer >= 0, got {n!r}")
            ids = None if token_ids is None else token_ids[i]
            if ids is not None:
                ids = _token_list(ids)
                if len(ids) != n:
                    raise InvalidArgument(f"append: sequence {seq.seq_id} got {len(ids)} token ids for {n} slots")
            nt, table = seq.num_tokens, seq.block_table
            cow = n > 0 and nt % bs != 0 and ref[table[-1]] > 1
            grow = (nt + n + bs - 1) // bs - len(table)
            need += grow + cow
            plans.append((seq, int(n), ids, cow, grow))
        available = len(pool.free_ids) + len(pool.evictable)
        if need > available:
            raise OutOfBlocks(need, available)

        new_ids = pool.get_new_blocks(need) if need else []
        taken = 0
        copies: list[tuple[int, int]] = []
        released: list[int] = []
        flat: list[int] = []
        published = self.cache.block_key
        for seq, n, ids, cow, grow in plans:
            table, nt = seq.block_table, seq.num_tokens
            if n and nt % bs:
                last = table[-1]
                if cow:
                    dst = new_ids[taken]
                    taken += 1
                    copies.append((last, dst))
                    released.append(last)
                    table[-1] = dst
                elif last in published:
                    # Exclusively ours but still matchable as a full block (after
                    # a truncate): un-publish before its K/V changes.
                    self.cache.unpublish(last)
            if grow:
                table += new_ids[taken : taken + grow]
                taken += grow
            if n == 1:
                flat.append(table[nt // bs] * bs + nt % bs)
            else:
                flat += [table[p // bs] * bs + p % bs for p in range(nt, nt + n)]
            if ids is not None and len(seq.prompt) + len(seq.tail) == nt:
                seq.tail += ids
            seq.num_tokens = nt + n
        # Sources are released only now: no block freed here is reused in this batch.
        if released:
            pool.free_blocks(released)
        return np.array(flat, dtype=np.int64), copies

    def _append_one(
        self, seqs: list[Sequence], token_ids: Seq[Seq[int] | None] | None
    ) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """`append` of one token to every sequence: a decode step. The same
        rules as the general path in fewer operations per sequence: each
        sequence needs at most one block (a new one at a block boundary, or a
        copy of a shared last block), so when the pool has one per sequence
        the exact count is skipped and blocks are taken as they are needed."""
        bs = self.block_size
        pool, ref = self.pool, self.pool.ref_cnt
        if token_ids is None:
            ids_list: list[Any] = [None] * len(seqs)
        else:
            ids_list = list(token_ids)
            # Each a list of one int, checked at C speed; anything else the slow way.
            if not (set(map(type, ids_list)) <= {list} and set(map(len, ids_list)) == {1}
                    and set(map(type, map(itemgetter(0), ids_list))) <= {int}):
                for k, (seq, ids) in enumerate(zip(seqs, ids_list)):
                    if ids is not None:
                        ids_list[k] = ids = _token_list(ids)
                        if len(ids) != 1:
                            raise InvalidArgument(
                                f"append: sequence {seq.seq_id} got {len(ids)} token ids for 1 slot")
        free = pool.free_ids
        available = len(free) + len(pool.evictable)
        if available < len(seqs):
            need = sum(1 for seq in seqs if seq.num_tokens % bs == 0 or ref[seq.block_table[-1]] > 1)
            if need > available:
                raise OutOfBlocks(need, available)
        copies: list[tuple[int, int]] = []
        flat: list[int] = []
        published = self.cache.block_key
        for seq, ids in zip(seqs, ids_list):
            nt, table = seq.num_tokens, seq.block_table
            off = nt % bs
            if off == 0:
                if free:
                    b = free.pop()
                    ref[b] = 1
                else:
                    b = pool.get_new_blocks(1)[0]
                table.append(b)
            else:
                b = table[-1]
                if ref[b] > 1:
                    if free:
                        dst = free.pop()
                        ref[dst] = 1
                    else:
                        dst = pool.get_new_blocks(1)[0]
                    copies.append((b, dst))
                    table[-1] = b = dst
                elif b in published:
                    self.cache.unpublish(b)  # see `append`
            flat.append(b * bs + off)
            if ids is not None and len(seq.prompt) + len(seq.tail) == nt:
                seq.tail += ids
            seq.num_tokens = nt + 1
        # Sources are released only now: no block freed here is reused in this batch.
        if copies:
            pool.free_blocks([src for src, _ in copies])
        return np.array(flat, dtype=np.int64), copies

    # -- commit ---------------------------------------------------------------------
    def commit(self, seq_ids: Seq[int], upto: Seq[int | None]) -> list[int]:
        """Declare K/V written for tokens ``[0, upto)`` (default: all) and publish
        the full blocks whose token ids are known. Returns blocks published per sequence."""
        bs = self.block_size
        seqs = self._batch(seq_ids, "commit")
        ups = []
        for seq, u in zip(seqs, upto):
            u = seq.num_tokens if u is None else u
            if not isinstance(u, (int, np.integer)) or isinstance(u, bool) or not 0 <= u <= seq.num_tokens:
                raise InvalidArgument(
                    f"commit: upto for sequence {seq.seq_id} must be in [0, {seq.num_tokens}], got {u!r}"
                )
            ups.append(int(u))
        published = []
        for seq, u in zip(seqs, ups):
            seq.num_committed = max(seq.num_committed, u)
            full = min(seq.num_committed, seq.num_known) // bs
            start = len(seq.block_keys)
            if full > start:
                parent = seq.block_keys[-1] if start else seq.root
                seq.block_keys += chain_keys(parent, seq.known(start * bs, full * bs), bs)
            count = 0
            for i in range(seq.num_published, full):
                count += self.cache.publish(seq.block_table[i], seq.block_keys[i])
            seq.num_published = max(seq.num_published, full)
            published.append(count)
        return published

    # -- fork / free / truncate ------------------------------------------------------------
    def fork(self, seq_ids: Seq[int], n: int) -> list[list[Sequence]]:
        """``n`` children of each sequence, sharing every block (ref counts +1)."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise InvalidArgument(f"fork: n must be an integer >= 1, got {n!r}")
        parents = self._batch(seq_ids, "fork")
        out = []
        for p in parents:
            children = []
            for _ in range(n):
                self.pool.touch(p.block_table)
                child = Sequence(
                    next(self._ids), list(p.block_table), p.num_tokens, p.prompt, p.root,
                    list(p.block_keys), p.num_committed, p.num_published, owner=p.owner, tail=list(p.tail),
                )
                self.seqs[child.seq_id] = child
                children.append(child)
            out.append(children)
        return out

    def free(self, seq_ids: Seq[int]) -> None:
        """Drop the sequences; their blocks lose one reference each."""
        seqs = self._batch(seq_ids, None)
        for seq in seqs:
            del self.seqs[seq.seq_id]
            self.swapped_ids.discard(seq.seq_id)
            table = seq.block_table[::-1]
            if seq.host_blocks:
                table = [b for b in table if b != NULL_BLOCK]
            self.pool.free_blocks(table)
            if seq.host_blocks:
                self.host_free.extend(seq.host_blocks.values())

    def truncate(self, seq_ids: Seq[int], lengths: Seq[int]) -> None:
        """Shorten sequences to ``lengths`` tokens (speculative-decoding rollback)."""
        bs = self.block_size
        seqs = self._batch(seq_ids, "truncate")
        for seq, n in zip(seqs, lengths):
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= seq.num_tokens:
                raise InvalidArgument(
                    f"truncate: length for sequence {seq.seq_id} must be in [0, {seq.num_tokens}], got {n!r}"
                )
        for seq, n in zip(seqs, lengths):
            keep = self._blocks_for(n)
            dropped = seq.block_table[keep:]
            del seq.block_table[keep:]
            self.pool.free_blocks(reversed(dropped))
            seq.num_tokens = int(n)
            if n <= len(seq.prompt):
                seq.prompt, seq.tail = seq.prompt[:n], []
            else:
                del seq.tail[n - len(seq.prompt) :]
            seq.num_committed = min(seq.num_committed, n)
            del seq.block_keys[n // bs :]
            seq.num_published = min(seq.num_published, n // bs)
            if n % bs and self.pool.ref_cnt[seq.block_table[-1]] == 1:
                self.cache.unpublish(seq.block_table[-1])

    # -- swap -------------------------------------------------------------------------
    def swap_out(self, seq_ids: Seq[int]) -> list[tuple[int, int]]:
        """Move exclusively owned blocks to host blocks; shared blocks stay.
        Returns the (device, host) block copies to run."""
        seqs = self._batch(seq_ids, "swap_out")
        ref = self.pool.ref_cnt
        moving = [[i for i, b in enumerate(s.block_table) if ref[b] == 1] for s in seqs]
        need = sum(map(len, moving))
        if need > len(self.host_free):
            raise OutOfBlocks(need, len(self.host_free), "host")
        copies = []
        for seq, idx in zip(seqs, moving):
            seq.host_blocks = {}
            self.swapped_ids.add(seq.seq_id)
            for i in idx:
                h = self.host_free.pop()
                copies.append((seq.block_table[i], h))
                seq.host_blocks[i] = h
        # The device blocks are released after the caller has copied them (the
        # same call): nothing can reuse them before then.
        for seq, idx in zip(seqs, moving):
            released = [seq.block_table[i] for i in idx]
            for i in idx:
                seq.block_table[i] = NULL_BLOCK
            self.pool.free_blocks(reversed(released))
        return copies

    def swap_in(self, seq_ids: Seq[int]) -> list[tuple[int, int]]:
        """Bring swapped sequences back; returns the (host, device) copies to run.
        A block whose published copy is still cached on the device is re-shared
        instead of copied."""
        seqs = self._batch(seq_ids, None)
        for seq in seqs:
            if seq.host_blocks is None:
                raise NotSwapped(seq.seq_id)
        pool = self.pool
        reuse: dict[tuple[int, int], int] = {}
        touched_evictable = set()
        need = 0
        for k, seq in enumerate(seqs):
            for i in seq.host_blocks:
                b = self.cache.key_to_block.get(seq.block_keys[i]) if i < seq.num_published else None
                if b is not None:
                    reuse[(k, i)] = b
                    if pool.ref_cnt[b] == 0:
                        touched_evictable.add(b)
                else:
                    need += 1
        available = pool.get_num_free_blocks() - len(touched_evictable)
        if need > available:
            raise OutOfBlocks(need, available)
        pool.touch(reuse.values())  # before any eviction, as in allocate
        new_ids = iter(pool.get_new_blocks(need) if need else ())
        copies = []
        for k, seq in enumerate(seqs):
            for i, h in seq.host_blocks.items():
                b = reuse.get((k, i))
                if b is None:
                    b = next(new_ids)
                    copies.append((h, b))
                    if i < seq.num_published:
                        self.cache.publish(b, seq.block_keys[i])
                seq.block_table[i] = b
                self.host_free.append(h)
            seq.host_blocks = None
            self.swapped_ids.discard(seq.seq_id)
        return copies

    # -- integrity ------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise IntegrityError unless every block is exactly one of free /
        evictable / in use, each reference count equals the number of block-table
        entries pointing at it, the cache maps only to live blocks, and host
        blocks are each either free or held by one swapped sequence."""
        bs = self.block_size
        expected = [0] * self.pool.num_blocks
        host_held = []
        for seq in self.seqs.values():
            if len(seq.block_table) != self._blocks_for(seq.num_tokens):
                raise IntegrityError(
                    f"sequence {seq.seq_id}: {len(seq.block_table)} blocks for {seq.num_tokens} tokens (block size {bs})"
                )
            for i, b in enumerate(seq.block_table):
                if b == NULL_BLOCK and not (seq.host_blocks and i in seq.host_blocks):
                    raise IntegrityError(f"sequence {seq.seq_id}: block-table entry {i} is the null block")
                expected[b] += 1
            if seq.host_blocks:
                host_held.extend(seq.host_blocks.values())
        expected[NULL_BLOCK] = 0
        swapped = {s.seq_id for s in self.seqs.values() if s.swapped}
        if swapped != self.swapped_ids:
            raise IntegrityError(f"swapped sequences {sorted(swapped)} but tracked {sorted(self.swapped_ids)}")
        self.pool.check(expected)
        self.cache.check()
        held, free = set(host_held), set(self.host_free)
        if len(held) != len(host_held) or held & free or len(held) + len(free) != self.num_host_blocks or len(free) != len(self.host_free):
            raise IntegrityError(
                f"host pool integrity violated (held={len(host_held)}, free={len(self.host_free)}, "
                f"total={self.num_host_blocks})"
            )
