"""Append: extend sequences by token slots, with copy-on-write of a shared,
partly filled last block and un-publishing of a published last block that is
about to be rewritten. Of sharers that are all rows of one batch, the last
writes the block in place (`_in_place`): a batch needs exactly the blocks
its sequences appended one at a time would.

A decode step (one token for each sequence) is a few array operations over
the batch's rows: find the rows at a block boundary or whose last block is
shared, take that many blocks, write them into the rows, and read the slots
as ``table[rows, pos // bs] * bs + pos % bs``. Only appended token ids, when
given, are stored per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from itertools import compress
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.errors import InvalidArgument, OutOfBlocks
from kvpager.history import writable
from kvpager.prefix_cache import token_array
from kvpager.seq_lookup import LAST
from kvpager.validate import TOKEN_LIMIT, all_type, one_id_each, shown

if TYPE_CHECKING:
    from kvpager.sequences import SequenceManager

_NO_COPIES = np.zeros((0, 2), dtype=np.int64)


def _token_list(ids: object) -> list[int]:
    """Token ids of an append as a list of ints (validated: bools refused; one out
    of int64 range fails the append, not a later commit halfway through its batch)."""
    if (type(ids) is list and (len(ids) == 1 and type(ids[0]) is int or all_type(ids, int))
            and (not ids or min(ids) >= -TOKEN_LIMIT and max(ids) < TOKEN_LIMIT)):
        return ids
    return token_array(ids, "token_ids").tolist()


def _in_place(ref_cnt: np.ndarray, last: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """Rows (a mask) among ``shared`` (rows about to write into their shared,
    partly filled last block) that write it in place: of a block whose every
    reference is such a row of this batch (no other sequence, no pin), the last
    in batch order. Appended one at a time, the others copy it first and leave
    that row its only holder, so the batch needs no block more than that."""
    at = np.flatnonzero(shared)
    blocks = last[at][::-1]  # reversed: `unique`'s first index is a block's last row
    ids, first, counts = np.unique(blocks, return_index=True, return_counts=True)
    whole = counts == ref_cnt[ids]
    out = np.zeros(len(last), dtype=bool)
    out[at[len(at) - 1 - first[whole]]] = True
    return out


def _within(counts: np.ndarray) -> np.ndarray:
    """``0..counts[i]-1`` for each i, back to back."""
    total = int(counts.sum())
    return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


def append(
    m: SequenceManager, seq_ids: list[int] | np.ndarray, counts: int | Seq[int], token_ids: Seq[Seq[int] | None] | None,
    owner: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """`SequenceManager.append`: (slots int64, copies int64 [k, 2])."""
    rows = m.batch(seq_ids, "append", owner)
    if type(counts) is int and counts == 1:
        return _decode(m, seq_ids, rows, token_ids)
    if isinstance(counts, (int, np.integer)) and not isinstance(counts, bool):
        counts = [counts] * len(rows)
    elif len(counts) != len(rows):
        raise InvalidArgument(f"append: {len(counts)} counts for {len(rows)} sequences")
    packed = isinstance(token_ids, np.ndarray)  # rows of ids, checked by `validate.token_rows`
    ids_list: list[Any] = [None] * len(rows) if token_ids is None else token_ids.tolist() if packed \
        else list(token_ids)
    for k, (s, n, ids) in enumerate(zip(seq_ids, counts, ids_list)):
        if type(n) is not int and (not isinstance(n, (int, np.integer)) or isinstance(n, bool)) or n < 0:
            raise InvalidArgument(f"append: count for sequence {s} must be an integer >= 0, got {shown(n)}")
        if ids is not None:
            if not packed:
                ids_list[k] = ids = _token_list(ids)
            if len(ids) != n:
                raise InvalidArgument(f"append: sequence {s} got {len(ids)} token ids for {n} slots")
    if not len(rows):
        return np.zeros(0, np.int64), _NO_COPIES
    bs, bt, pool = m.block_size, m.table, m.pool
    try:
        n = np.fromiter(map(int, counts), np.int64, len(rows))
    except OverflowError:  # past int64: no pool holds that many tokens
        k = next(i for i, c in enumerate(counts) if int(c) >= 1 << 63)
        raise InvalidArgument(f"append: count for sequence {seq_ids[k]} is past any pool's size, got "
                              f"{shown(counts[k])}") from None
    nt = bt.num_tokens[rows]
    nb = bt.num_blocks[rows].astype(np.int64)
    last = bt.last[rows]  # the null block where a row is empty
    partial = (n > 0) & (nt % bs != 0)
    cow = partial & (pool.ref_cnt[last] > 1)
    copying = cow.any()
    if copying:  # the last of a block's sharers in this batch writes it in place
        cow &= ~_in_place(pool.ref_cnt, last, cow)
        copying = cow.any()
    grow = (nt + n + bs - 1) // bs - nb
    per = cow + grow
    need = int(per.sum())
    available = pool.get_num_free_blocks()
    if need > available:
        raise OutOfBlocks(need, available)
    if copying:  # (checked: from here until the caller ran the copies, tables point at blocks not yet written)
        m.copies_owed = "copy-on-write"

    # Blocks are taken row after row, a row's copy before its new blocks.
    new = pool.get_new_blocks(need) if need else np.zeros(0, np.int64)
    start = np.cumsum(per) - per
    copies = _NO_COPIES
    if copying:
        dst = new[start[cow]]
        bt.table[rows[cow], nb[cow] - 1] = dst
        copies = np.stack([last[cow], dst], axis=1)
    if need > len(copies):
        w = _within(grow)
        bt.reserve_width(int((nb + grow).max()))
        bt.table[np.repeat(rows, grow), np.repeat(nb, grow) + w] = new[np.repeat(start + cow, grow) + w]
        bt.num_blocks[rows] = nb + grow
    if need:
        changed = rows[per > 0]
        bt.last[changed] = bt.table[changed, bt.num_blocks[changed] - 1]
    _unpublish(m, last[partial & ~cow])
    pos = np.repeat(nt, n) + _within(n)
    slots = bt.table[np.repeat(rows, n), pos // bs].astype(np.int64) * bs + pos % bs
    if token_ids is not None:
        _record(m, seq_ids, rows, nt, ids_list, n)
    bt.num_tokens[rows] = nt + n
    # Sources are released only now: no block freed here is reused in this batch.
    if len(copies):
        pool.free_blocks(copies[:, 0])
    return slots, copies


def _decode(
    m: SequenceManager, seq_ids: list[int] | np.ndarray, rows: np.ndarray, token_ids: Seq[Seq[int] | None] | None
) -> tuple[np.ndarray, np.ndarray]:
    """`append` of one token to every sequence: a decode step. Each row needs
    at most one block: a new one at a block boundary, or a copy of a shared
    last block."""
    ids_list: list[Any] | None = None
    if isinstance(token_ids, np.ndarray):  # rows of ids, checked by `validate.token_rows`
        if token_ids.shape[1] != 1:
            raise InvalidArgument(f"append: sequence {seq_ids[0]} got {token_ids.shape[1]} token ids for 1 slot")
        ids_list = token_ids.tolist()
    elif token_ids is not None:
        ids_list = list(token_ids)
        # Each a list of one int, checked at C speed; anything else the slow way.
        if not (ids_list and one_id_each(ids_list)):
            for k, (s, ids) in enumerate(zip(seq_ids, ids_list)):
                if ids is not None:
                    ids_list[k] = ids = _token_list(ids)
                    if len(ids) != 1:
                        raise InvalidArgument(f"append: sequence {s} got {len(ids)} token ids for 1 slot")
    if len(rows) == 1:
        return _decode_one(m, int(seq_ids[0]), int(rows[0]), None if ids_list is None else ids_list[0])
    if not len(rows):
        return np.zeros(0, np.int64), _NO_COPIES
    if m.native is not None and rows.dtype == np.int64 and rows.flags.c_contiguous:
        done = _native_decode(m, seq_ids, rows, ids_list)
        if done is not None:
            return done
    bt, pool, shift = m.table, m.pool, m.shift
    nt = bt.num_tokens[rows]
    off = nt & (m.block_size - 1)
    last = bt.last[rows]  # the null block where a row is empty
    # A row needs a block at a block boundary, or a copy of its partly filled last block
    # when that is shared (copy-on-write), but for the last of its sharers in this batch.
    needs = off == 0
    shared = pool.ref_cnt[last] > 1
    if shared.any():  # (a row at a boundary after a shared full block needs a new block anyway)
        shared &= ~needs
        if shared.any():
            needs |= shared & ~_in_place(pool.ref_cnt, last, shared)
    k = np.count_nonzero(needs)
    copies = _NO_COPIES
    blocks = last
    if k:
        available = pool.get_num_free_blocks()
        if k > available:
            raise OutOfBlocks(int(k), available)
        cow = needs & (off != 0)
        c = cow[needs]
        copying = np.count_nonzero(c)
        if copying:  # (checked: from here until the caller ran the copies, tables point at blocks not yet written)
            m.copies_owed = "copy-on-write"
        new = pool.get_new_blocks(int(k), top_first=True)
        at, col = (rows, nt >> shift) if k == len(rows) else (rows[needs], nt[needs] >> shift)
        if int(col.max()) >= bt.width:
            bt.reserve_width(int(col.max()) + 1)
        bt.table[at, col] = new
        bt.num_blocks[at] = col + 1
        bt.last[at] = new
        blocks = last.copy()
        blocks[needs] = new
        if copying:
            copies = np.stack([last[cow], new[c]], axis=1)
    if len(pool.cache):  # (copies of cached blocks only where something is cached: `block_copies`)
        published = pool.holds_key(last)  # mostly none: one gather decides
        if published.any():
            _unpublish(m, last[published & ~needs])  # partly filled, not copied, published (a truncate)
    slots = (blocks << shift) | off
    if ids_list is not None:
        _record(m, seq_ids, rows, nt, ids_list, 1)
    bt.num_tokens[rows] = nt + 1
    # Sources are released only now: no block freed here is reused in this batch.
    if len(copies):
        pool.free_blocks(copies[:, 0])
    return slots, copies


def _native_decode(
    m: SequenceManager, seq_ids: list[int] | np.ndarray, rows: np.ndarray, ids_list: list[Any] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """`_decode` by the compiled step (`kvpager.native`): one call when no row
    needs a block, two around taking them when some do; None (nothing changed)
    where a row would write into a shared last block (which sharers copy is
    `_in_place`'s decision over the whole batch; once after a fork) or into a
    published one (un-published first): the NumPy path takes those steps."""
    bt, pool, native = m.table, m.pool, m.native
    slots = np.empty(len(rows), np.int64)
    nt = None if ids_list is None else np.empty(len(rows), np.int64)
    cached = pool.cache.cached if len(pool.cache) else None
    k, widest = native.scan(rows, bt.row_data, LAST, pool.ref_cnt, cached, m.shift, slots, nt)
    if k < 0:
        return None
    if k:
        available = pool.get_num_free_blocks()
        if k > available:
            raise OutOfBlocks(k, available)
        new = pool.get_new_blocks(k, top_first=True)
        if widest >= bt.width:
            bt.reserve_width(widest + 1)
        try:  # its checks fail only on state the scan did not see: nothing written, the blocks go back
            native.place(rows, bt.row_data, LAST, pool.ref_cnt, bt.table, m.shift, new, slots)
        except BaseException:
            pool.free_blocks(new[::-1], distinct=True)  # the free list as it was, its top last
            raise
    if ids_list is not None:
        _record(m, seq_ids, rows, nt, ids_list, 1)
    return slots, _NO_COPIES


def _decode_one(m: SequenceManager, seq_id: int, row: int, ids: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """`_decode` of one sequence, with scalar steps (a batch of one pays no array overhead)."""
    bt, pool = m.table, m.pool
    nt = int(bt.num_tokens[row])
    off = nt & (m.block_size - 1)
    col = nt >> m.shift
    copies = _NO_COPIES
    if off == 0:
        if not pool.get_num_free_blocks():
            raise OutOfBlocks(1, 0)
        b = int(pool.get_new_blocks(1)[0])
        if col >= bt.width:
            bt.reserve_width(col + 1)
        bt.table[row, col] = b
        bt.num_blocks[row] = col + 1
        bt.last[row] = b
    else:
        b = int(bt.table[row, col])
        if pool.ref_cnt[b] > 1:
            if not pool.get_num_free_blocks():
                raise OutOfBlocks(1, 0)
            m.copies_owed = "copy-on-write"  # (checked: until the caller ran the copy, see `append`)
            src, b = b, int(pool.get_new_blocks(1)[0])
            copies = np.array([[src, b]], dtype=np.int64)
            bt.table[row, col] = b
            bt.last[row] = b
        elif pool.holds_key(b):
            pool.unpublish(b)
    if ids is not None and bt.known[row] == nt:
        h = m.history[seq_id]
        if h.shared:  # `writable`, inline
            h = m.history[seq_id] = h.copy()
        h.tail += ids
        bt.known[row] = nt + 1
    bt.num_tokens[row] = nt + 1
    if len(copies):
        pool.free_blocks(copies[:, 0])
    return np.array([(b << m.shift) | off], dtype=np.int64), copies


def record(m: SequenceManager, seq_ids: list[int] | np.ndarray, token_ids: Seq[Seq[int]], owner: Any) -> None:
    """`SequenceManager.record_tokens`: the ids of slots appended without them.
    Each sequence's ids continue the ids it knows (a prefix of its tokens), at
    most up to its length; every check runs before anything changes."""
    rows = m.batch(seq_ids, "record_tokens", owner)
    if len(token_ids) != len(rows):
        raise InvalidArgument(f"record_tokens: {len(token_ids)} token-id lists for {len(rows)} sequences")
    bt = m.table
    known, nt = bt.known[rows], bt.num_tokens[rows]
    ids_list: list[Any]
    n: Any
    if isinstance(token_ids, np.ndarray):  # rows of ids, checked by `validate.token_rows`
        ids_list, n = token_ids.tolist(), token_ids.shape[1]
        over = np.flatnonzero(known + n > nt)
    elif (ids_list := list(token_ids)) and one_id_each(ids_list):
        n = 1  # one id each (a pipelined decode step), checked at C speed
        over = np.flatnonzero(known >= nt)
    else:
        ids_list = [_token_list(ids) for ids in ids_list]
        n = np.fromiter(map(len, ids_list), np.int64, len(ids_list))
        over = np.flatnonzero(known + n > nt)
    if len(over):
        k = int(over[0])
        raise InvalidArgument(
            f"record_tokens: sequence {seq_ids[k]} has {int(nt[k] - known[k])} slots without token ids, "
            f"got {len(ids_list[k])} ids")
    history = m.history
    for s, ids in zip(seq_ids.tolist() if isinstance(seq_ids, np.ndarray) else seq_ids, ids_list):
        if ids:
            h = history[s]
            if h.shared:  # `writable`, inline
                h = history[s] = h.copy()
            h.tail += ids
    bt.known[rows] = known + n


def _unpublish(m: SequenceManager, last: np.ndarray) -> None:
    """Last blocks about to be written in place: one still published (after a
    truncate) must not stay matchable while its K/V changes, nor one kept as a
    copy of a cached block's K/V (`kvpager.block_copies`) take its key later."""
    pool = m.pool
    if len(last) and len(pool.cache):
        for b in last[pool.holds_key(last)].tolist():
            pool.unpublish(b)


def _record(
    m: SequenceManager, seq_ids: list[int] | np.ndarray, rows: np.ndarray, nt: np.ndarray, ids_list: list[Any],
    n: int | np.ndarray,
) -> None:
    """Keep the given ids of rows whose ids so far are all known (then the
    known ids stay a prefix of the sequence's tokens)."""
    bt, history = m.table, m.history
    if isinstance(seq_ids, np.ndarray):  # packed ids: the history is keyed by ints
        seq_ids = seq_ids.tolist()
    ok = bt.known[rows] == nt
    if None in ids_list:
        ok &= np.fromiter((ids is not None for ids in ids_list), bool, len(ids_list))
    if ok.all():
        for s, ids in zip(seq_ids, ids_list):
            h = history[s]
            if h.shared:  # `writable`, inline
                h = history[s] = h.copy()
            h.tail += ids
        bt.known[rows] = nt + n
        return
    mask = ok.tolist()
    for s, ids in zip(compress(seq_ids, mask), compress(ids_list, mask)):
        writable(history, s).tail += ids
    bt.known[rows[ok]] = (nt + n)[ok]
