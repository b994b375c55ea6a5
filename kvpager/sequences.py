"""Sequences: block tables, token counts, owners and commit state as arrays.

Each live sequence is a row of one `BlockTable`: its block ids, token count
and per-row columns (id, owner, committed tokens, published blocks, known
token ids, swapped). Batch ops look rows up once and work on whole arrays;
only the hashing path (allocate, commit, swap-in re-publish) reads a
sequence's `History` (token ids and block keys).

`SequenceManager` decides which blocks move; it never touches K/V bytes. Ops
that need bytes moved return the (source, destination) block pairs, and the
caller (`KVPool`) runs them on its backend before the freed blocks can be
handed out again; such an op sets `SequenceManager.copies_owed` once its
checks passed, before it changes anything, and the caller clears it once the
copies ran (an exception that leaves it set left tables pointing at blocks
whose K/V never came: `kvpager.pool._check_after`). Every op takes a batch,
validates all of it first and either applies all of it or raises and changes
nothing. Allocate and commit (the prefix-cache side) live in `seq_prefix`,
append in `seq_append`, swap in `seq_swap`, integrity and statistics in
`seq_check`, the owner index in `owners`, lookup and the checks of a batch in
`seq_lookup`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager import native, seq_append, seq_check, seq_one, seq_prefix, seq_release, seq_swap
from kvpager.block_pool import BlockPool
from kvpager.block_refs import MAX_REFS
from kvpager.block_table import BlockTable
from kvpager.errors import InvalidArgument
from kvpager.history import History, writable
from kvpager.owners import OwnerIndex
from kvpager.pins import PinTable
from kvpager.recent_batches import RecentBatches
from kvpager.seq_lookup import ANY_OWNER, COLUMNS, SequenceLookup
from kvpager.types import SequenceInfo
from kvpager.validate import is_int, shown, whole


def _consume(it: Iterator[Any]) -> None:
    """Run a ``map`` for its effect, in C."""
    deque(it, maxlen=0)


class SequenceManager(SequenceLookup):
    """Allocator state: block pool (with the prefix cache) + host blocks + sequences."""

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0,
                 max_pinned_blocks: int | None = None):
        if block_size < 1 or block_size & (block_size - 1):
            raise InvalidArgument(f"block_size must be a power of two, got {block_size}")
        self.block_size = block_size
        self.shift = block_size.bit_length() - 1  # pos >> shift == pos // block_size
        self.pool = BlockPool(num_blocks)
        self.host = seq_swap.HostPool(num_host_blocks, num_blocks)
        self.pins = PinTable(num_blocks, (num_blocks - 1) // 2 if max_pinned_blocks is None else max_pinned_blocks)
        self.table = BlockTable(columns=COLUMNS)
        self.rows: dict[int, int] = {}  # seq_id -> row, in id order (ids only grow)
        self.history: dict[int, History] = {}
        self.owners = OwnerIndex()
        self._ids = itertools.count(1)
        self.num_swapped = 0
        self.num_released = 0  # rows with released leading blocks
        #: What copies an op that returns block copies still owes (``"copy-on-write"``,
        #: ``"swap-out"``, ``"swap-in"``): set once its checks passed, before it changes
        #: anything; cleared by the caller (`KVPool`) once it ran them on its backend. Set
        #: while an exception leaves a call, the tables may point at blocks whose K/V never came.
        self.copies_owed: str | None = None
        # Recently checked batches: a decode loop sends the same ids step after step,
        # and while no sequence is freed (rows move only then) they need no new
        # lookup or checks. Every free forgets them.
        self.recent = RecentBatches()
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        #: Batches of one take `seq_one`'s scalar paths (False: the batch paths; tests compare both).
        self.scalar = True
        #: The compiled decode step (`kvpager.native`; None: NumPy's, its reference; tests compare both).
        self.native = native.DECODE
        #: The objects those paths use, never rebound (the arrays that grow are
        #: read through ``table``), so a call takes them in one step.
        self.one_refs = (self.rows, self.history, self.owners.by_code, self._ids, self.pool.ref_cnt, self.table,
                         self.table._free_rows)

    # -- lookup (the rest: `SequenceLookup`) -----------------------------------------
    def owned(self, owner: Any) -> list[int]:
        """Ids of ``owner``'s live sequences, in id order (InvalidArgument for an
        owner that cannot be one: unhashable)."""
        return self.owners.ids(owner)

    @property
    def num_sequences(self) -> int:
        return len(self.rows)

    def tokens_stored(self) -> int:
        """Real tokens in in-use blocks, a shared block counted once (see `seq_check`)."""
        return seq_check.tokens_stored(self)

    def ids(self) -> list[int]:
        """Every live sequence id, in id order."""
        return list(self.rows)

    def infos(self, seq_ids: list[int]) -> list[SequenceInfo]:
        """`SequenceInfo` of each id, its arrays read in one gather."""
        return seq_check.infos(self, seq_ids)

    def owner_of(self, row: int) -> Any:
        return self.owners.owner(self.table.owner.item(row))

    def new_ids(self, n: int) -> list[int]:
        """``n`` fresh sequence ids (increasing, never reused)."""
        return [next(self._ids)] if n == 1 else [next(self._ids) for _ in range(n)]

    # -- allocate ------------------------------------------------------------------
    def allocate(
        self,
        prompts: Seq[Seq[int] | np.ndarray],
        salts: Seq[str | bytes | None],
        owner: Any = None,
        share_in_batch: bool = False,
        window: int | None = None,
    ) -> tuple[list[int], np.ndarray, list[int], list[int], list[int]]:
        """New sequences holding ``prompts`` (see `seq_prefix.allocate`). Returns
        their ids, every block table back to back (int64), and per sequence its
        blocks, cached tokens and tokens."""
        if len(prompts) == 1 and self.scalar and window is None:
            return seq_one.allocate(self, prompts[0], salts[0], owner)
        return seq_prefix.allocate(self, prompts, salts, owner, share_in_batch, window)

    def window_matches(self, prompts: Seq[Seq[int] | np.ndarray], salts: Seq[str | bytes | None],
                       window: int) -> list[tuple[int, list[int]]]:
        """Per prompt, what `allocate` with ``window`` would find cached now past its
        prefix: (leading entries left released, the hit blocks after them); (0, its
        prefix hits) where the window finds nothing further (the allocate then
        takes only those its window reads: `seq_prefix._read_by_window`). Read-only."""
        return seq_prefix.window_matches(self, prompts, salts, window)

    def cached_tokens(self, prompts: Seq[Seq[int] | np.ndarray], salts: Seq[str | bytes | None],
                      window: int | None = None) -> list[int]:
        """How many tokens of each prompt `allocate` (with the same ``window``)
        would find cached now. Read-only: touches nothing, so the answer can
        change before an allocate."""
        return seq_prefix.cached_tokens(self, prompts, salts, window)

    # -- append / commit ------------------------------------------------------------
    def append(
        self, seq_ids: list[int] | np.ndarray, counts: int | Seq[int], token_ids: Seq[Seq[int] | None] | None,
        owner: Any = ANY_OWNER,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Extend each sequence by ``counts[i]`` token slots (one int: the same for
        all). Returns every new slot id (int64, sequence after sequence) and the
        (src, dst) block copies (int64 [k, 2]) to run before writing: a shared,
        partly filled last block is copied first (copy-on-write). ``owner``: the
        ids must be its (checked in the same lookup)."""
        return seq_append.append(self, seq_ids, counts, token_ids, owner)

    def record_tokens(self, seq_ids: list[int] | np.ndarray, token_ids: Seq[Seq[int]] | np.ndarray, owner: Any = ANY_OWNER) -> None:
        """The token ids of slots appended without them, continuing each
        sequence's known ids (`seq_append.record`)."""
        seq_append.record(self, seq_ids, token_ids, owner)

    def commit(self, seq_ids: list[int] | np.ndarray, upto: Seq[int | None],
               fresh: list[tuple[int, bytes, bytes]] | None = None, owner: Any = ANY_OWNER) -> list[int]:
        """Declare K/V written for tokens ``[0, upto)`` (default: all) and publish
        the full blocks whose token ids are known. Returns blocks published per
        sequence; ``fresh`` (if given) gets (block, root key, block key) of each
        block newly published. ``owner``: the ids must be its (checked in the
        same lookup)."""
        return seq_prefix.commit(self, seq_ids, upto, fresh, owner)

    # -- fork / free / truncate ------------------------------------------------------------
    def fork(self, seq_ids: list[int], n: int) -> list[list[int]]:
        """``n`` children of each sequence, sharing every block (ref counts +1 each);
        returns their ids."""
        n = fork_count(n, len(seq_ids))
        if len(seq_ids) == 1 and self.scalar:
            return seq_one.fork(self, seq_ids[0], n)
        rows = self.batch(seq_ids, "fork")
        bt = self.table
        kids = bt.copy_rows(np.repeat(rows, n) if n > 1 else rows)
        ids = self.new_ids(len(kids))
        bt.seq_id[kids] = ids
        self.pool.share(seq_release.live_blocks(self, bt.row_blocks(rows)), n, distinct=len(rows) == 1)
        if self.num_released:
            self.num_released += int(np.count_nonzero(bt.released[kids]))
        self.rows.update(zip(ids, kids.tolist()))
        history = self.history
        parents = seq_ids if n == 1 else [p for p in seq_ids for _ in range(n)]
        history.update(zip(ids, (history[p].share() for p in parents)))  # copy-on-write
        self.owners.add_codes(bt.owner[kids], ids)
        return [ids[k * n : (k + 1) * n] for k in range(len(seq_ids))]

    def free(self, seq_ids: list[int]) -> None:
        """Drop the sequences; their blocks lose one reference each (each table
        last entry first, so its tail is evicted first)."""
        if len(seq_ids) == 1 and self.scalar:
            return seq_one.free(self, seq_ids[0])
        rows = self.batch(seq_ids, None, name="free")
        self.recent.clear()  # rows are given back: no remembered batch holds any more
        bt = self.table
        swapped = rows[bt.swapped[rows] != 0] if self.num_swapped else rows[:0]
        holes = self.num_released or len(swapped)  # null entries among the rows' (released, swapped out)
        for part in bt.row_chunks(rows):  # (a run of rows at a time: many forks of a long sequence)
            blocks = bt.row_blocks(part, reverse=True)
            self.pool.free_blocks(blocks[blocks != 0] if holes else blocks, distinct=len(rows) == 1)
        if self.num_released:
            self.num_released -= int(np.count_nonzero(bt.released[rows]))
        if len(swapped):
            self.host.release(swapped.tolist(), bt.row_blocks(swapped))
            self.num_swapped -= len(swapped)
        self.owners.drop(bt.owner[rows], seq_ids)
        bt.release_rows(rows)
        if len(seq_ids) == 1:
            del self.rows[seq_ids[0]], self.history[seq_ids[0]]
        else:
            _consume(map(self.rows.pop, seq_ids))
            _consume(map(self.history.pop, seq_ids))

    def truncate(self, seq_ids: list[int], lengths: Seq[int]) -> None:
        """Shorten sequences to ``lengths`` tokens (speculative-decoding rollback)."""
        bs, bt, pool = self.block_size, self.table, self.pool
        rows = self.batch(seq_ids, "truncate")
        nt = bt.num_tokens[rows]
        floor = bt.released[rows] * bs + 1 if self.num_released else np.zeros(len(rows), np.int64)
        for s, n, limit, lo in zip(seq_ids, lengths, nt.tolist(), floor.tolist()):
            if not is_int(n) or not 0 <= n <= limit:
                raise InvalidArgument(f"truncate: length for sequence {s} must be in [0, {limit}], got {n!r}")
            if lo > 1 and n < lo:
                raise InvalidArgument(f"truncate: sequence {s} released its blocks before position {lo - 1}; "
                                      f"it can be cut back to {lo} tokens at least, not {n}")
        n = np.fromiter(map(int, lengths), np.int64, len(rows))
        keep = -(-n // bs)
        old = bt.num_blocks[rows].astype(np.int64)
        drop = old - keep
        dropped = np.zeros(0, dtype=np.int64)
        if drop.any():  # each sequence's dropped blocks, last first
            rep = np.repeat(rows, drop)
            cols = np.repeat(old - 1, drop) - (np.arange(len(rep)) - np.repeat(np.cumsum(drop) - drop, drop))
            dropped = bt.table[rep, cols].astype(np.int64)
            bt.table[rep, cols] = 0
            bt.num_blocks[rows] = keep
            pool.free_blocks(dropped)
        bt.num_tokens[rows] = n
        bt.last[rows] = np.where(keep > 0, bt.table[rows, np.maximum(keep - 1, 0)], 0)
        bt.committed[rows] = np.minimum(bt.committed[rows], n)
        bt.published[rows] = np.minimum(bt.published[rows], n // bs)
        cut = np.flatnonzero(bt.known[rows] > n)
        for k in cut.tolist():
            writable(self.history, seq_ids[k]).truncate(int(n[k]), bs)
        bt.known[rows[cut]] = n[cut]
        # A partly filled last block that stays published as a full block would
        # be rewritten by the next append: un-publish it if it is ours alone
        # once this sequence's blocks are dropped (sequences in batch order: a
        # later one's drops do not count yet; append un-publishes what is left).
        part = np.flatnonzero(n % bs != 0)
        if len(part):
            last = bt.last[rows[part]]
            maybe = (pool.ref_cnt[last] <= 1) & pool.holds_key(last)
            if np.count_nonzero(maybe):
                at = np.repeat(np.arange(len(rows)), drop)
                for k, b in zip(part[maybe].tolist(), last[maybe].tolist()):
                    if pool.ref_cnt[b] + np.count_nonzero(dropped[at > k] == b) == 1:
                        pool.unpublish(b)

    def release_before(self, seq_ids: list[int], positions: Seq[int], owner: Any = ANY_OWNER) -> list[int]:
        """Give back each sequence's whole blocks before ``positions[i]`` (never its
        last block), leaving null entries; returns blocks released per sequence
        (see `seq_release`). ``owner``: the ids must be its."""
        return seq_release.release_before(self, seq_ids, positions, owner)

    # -- swap ------------------------------------------------------------------------------
    def swap_out(self, seq_ids: list[int]) -> np.ndarray:
        """Move the blocks only these and swapped-out sequences hold to host
        blocks (a block they share, once); the rest stay. Returns the (device, host) block
        copies to run (int64 [k, 2])."""
        return seq_swap.swap_out(self, seq_ids)

    def swap_in(self, seq_ids: list[int]) -> np.ndarray:
        """Bring swapped sequences back; returns the (host, device) copies to run.
        A block whose published copy is still cached on the device is re-shared
        instead of copied."""
        return seq_swap.swap_in(self, seq_ids)

    # -- integrity ----------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise IntegrityError unless every block is exactly one of free /
        evictable / in use, each reference count equals the number of block-table
        entries pointing at it, the cache maps only to live blocks, host blocks
        are each free or held by the swapped entries their count says, and the owner index and
        row columns agree with the rows."""
        seq_check.check_integrity(self)


def fork_count(n: Any, parents: int) -> int:
    """Fork's ``n`` as an int, checked for ``parents`` sequences (the daemon checks it
    before the ids' owner, as `KVPool.fork` does before their lookup)."""
    if type(n) is not int:  # (a NumPy integer, a 0-d integer array or tensor: the int it holds)
        whole_n = whole(n)
        if whole_n is None:
            raise InvalidArgument(f"fork: n must be an integer >= 1, got {shown(n)}")
        n = whole_n
    if n < 1:
        raise InvalidArgument(f"fork: n must be an integer >= 1, got {n!r}")
    if max(n, n * parents) > MAX_REFS:
        raise InvalidArgument(f"fork: {n} children of {parents} sequence(s) would pass a block's "
                              f"reference count (int32, at most {MAX_REFS})")
    return n
