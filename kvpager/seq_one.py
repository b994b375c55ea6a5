"""One-sequence paths of allocate, fork and free, with scalar steps.

A batch of one pays NumPy's per-call overhead on every array operation of
the batch paths (about a microsecond each on a small machine): these do the
same work for one sequence with Python ints, row indices and one array op
per step where an array is needed (the block ids). Each must leave exactly
the state its batch path leaves for a batch of one (tables, columns,
reference counts, the free list and its order, the LRU, the cache, owners,
histories): `SequenceManager.scalar` switches them off, and
tests/test_allocator_paths.py runs random ops both ways and compares.
Validation is the batch paths': the same checks, in the same order, raising
the same typed errors before anything changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.block_table import SHRINK_FROM
from kvpager.errors import OutOfBlocks, SequenceSwapped, UnknownSequence
from kvpager.history import History
from kvpager.prefix_cache import root_key, token_array
from kvpager.seq_lookup import OWNER, RELEASED, SWAPPED

if TYPE_CHECKING:
    from kvpager.sequences import SequenceManager

_I64 = np.int64
_NONE = np.zeros(0, dtype=np.int64)
_NONE.flags.writeable = False
#: Reference counts 0..256 as read-only 0-d int32 arrays: storing one into
#: ``ref_cnt[ids]`` is a plain copy, where a Python int is converted first
#: (about as long again as the store itself).
_COUNTS = tuple(np.full((), k, dtype=np.int32) for k in range(257))
for _c in _COUNTS:
    _c.flags.writeable = False
_ZERO = _COUNTS[0]
_PLUS_ONE = _COUNTS[1:]  # count k + 1 at index k
_ONE = np.int32(1)
#: Up to this many new blocks after prefix hits, an allocate of one prompt
#: builds its table as a list (one conversion); more, as arrays (a list of
#: many ids converts slower than a concatenation).
_LIST_NEW = 32
#: Up to this many prefix hits, their reference counts are read as a list (a
#: short prefix's); more, in NumPy (a list of a long prompt's 62,500 costs ms).
_LIST_HITS = 256


def row_of(m: SequenceManager, seq_id: int) -> int:
    """The row of a live sequence; UnknownSequence otherwise."""
    try:
        row = m.rows.get(seq_id)
    except TypeError:  # unhashable
        row = None
    if row is None:
        raise UnknownSequence(seq_id)
    return row


def allocate(m: SequenceManager, prompt: Any, salt: str | bytes | None, owner: Any
             ) -> tuple[list[int], np.ndarray, list[int], list[int], list[int]]:
    """`seq_prefix.allocate` of one prompt (``share_in_batch`` has no earlier
    prompt to share with), in its return form."""
    seq_id, flat, _, nh, ntok = allocate_one(m, prompt, salt, owner)
    return [seq_id], flat, [len(flat)], [nh * m.block_size], [ntok]


def allocate_one(m: SequenceManager, prompt: Any, salt: str | bytes | None, owner: Any
                 ) -> tuple[int, np.ndarray, tuple[int, ...], int, int]:
    """One prompt's sequence: its cached prefix, then fresh blocks. Returns its
    id, block table (int64 and as a tuple), blocks taken from the cache and
    tokens.

    The hits are distinct blocks: the cache maps keys to blocks one to one,
    and the keys of one chain differ unless BLAKE2b-128 collides (which the
    cache's answers already rule out). So a hit's count goes up by a store
    when they all have one count (a prefix held by live sequences), and only
    a prefix with evictable blocks takes `BlockPool.touch` (the LRU)."""
    bs, pool = m.block_size, m.pool
    tokens = token_array(prompt, "prompts[0]")
    root = root_key(salt)
    ntok = len(tokens)
    # blocks we may take from the cache: the last token is always computed
    keys, hits = pool.cache.match_tokens(root, tokens, bs, (ntok - 1) // bs if ntok else 0)
    n = -(-ntok // bs)
    nh = len(hits)
    need = n - nh
    ref = pool.ref_cnt
    top = pool._num_free
    if nh:
        # Few new blocks, taken from the free list's top (no eviction, so
        # enough of them): the table built as a list, one conversion.
        short = need <= top and need <= _LIST_NEW
        if short:
            new = pool._free[top - need : top]
            blocks = hits + new[::-1].tolist()
            flat = np.array(blocks, dtype=_I64)
            hit_ids = flat[:nh]
        else:
            hit_ids = np.array(hits, dtype=_I64)
        if nh <= _LIST_HITS:
            before = ref[hit_ids].tolist()
            v = before[0]
            same = v and before.count(v) == nh  # all in use, one count
            idle = 0 if same else before.count(0)  # evictable hits
        else:  # a long prefix's counts, read without a list of them
            counts = ref[hit_ids]
            v = int(counts[0])
            same = v and not np.count_nonzero(counts != v)
            idle = 0 if same else nh - int(np.count_nonzero(counts))
        if not short:
            # An evictable hit is taken before any new block: it must not be
            # evicted to make room for this very allocation.
            available = top + len(pool.evictable) - idle
            if need > available:
                raise OutOfBlocks(need, available)
        if same:  # `BlockPool.touch` with nothing in the LRU: a store
            try:
                ref[hit_ids] = _PLUS_ONE[v]
            except IndexError:  # a count past the table's
                ref[hit_ids] = v + 1
        elif idle:
            pool.touch(hit_ids, True)
        else:
            ref[hit_ids] += _ONE
        if short:  # `BlockPool.get_new_blocks`, inline
            pool._num_free = top - need
            ref[new] = _COUNTS[1]
        else:
            flat = np.concatenate((hit_ids, pool.get_new_blocks(need)))
            blocks = flat.tolist()
    else:
        if need <= top:  # `BlockPool.get_new_blocks` from the free list's top, inline
            new = pool._free[top - need : top]
            pool._num_free = top - need
            ref[new] = _COUNTS[1]
            flat = new[::-1].copy()
        else:
            available = top + len(pool.evictable)
            if need > available:
                raise OutOfBlocks(need, available)
            flat = pool.get_new_blocks(need)
        blocks = flat.tolist()
    rows, history, _, ids, _, bt, free_rows = m.one_refs
    seq_id = next(ids)
    code = m.owners.add(owner, (seq_id,))
    try:  # `BlockTable.add_row`, inline
        row = free_rows.pop()
    except IndexError:  # no free row
        row = bt._take_rows(1)[0]
    table = bt.table
    if n > table.shape[1]:
        bt.reserve_width(n)
        table = bt.table
    table[row, :n] = flat
    bt.row_data[row] = (n, ntok, seq_id, code, nh * bs, nh, ntok, 0, flat.item(-1) if n else 0, 0)
    rows[seq_id] = row
    history[seq_id] = History(tokens, root, keys, [], salt)
    m.prefix_query_tokens += ntok
    m.prefix_hit_tokens += nh * bs
    return seq_id, flat, tuple(blocks), nh, ntok


def fork(m: SequenceManager, seq_id: int, n: int) -> list[list[int]]:
    """`SequenceManager.fork` of one sequence (``n`` checked by the caller)."""
    if n == 1:
        return fork_one(m, seq_id)
    return _fork_many(m, seq_id, row_of(m, seq_id), n)


def fork_one(m: SequenceManager, seq_id: int) -> list[list[int]]:
    """One child of one sequence."""
    rows, history, by_code, ids, ref, bt, free_rows = m.one_refs
    try:
        row = rows[seq_id]
    except (KeyError, TypeError):  # unknown or unhashable
        row = row_of(m, seq_id)
    data = bt.row_data
    d = data[row]  # its counts and columns (a view: still the same values if the arrays grow below)
    if m.num_swapped and d.item(SWAPPED):
        raise SequenceSwapped(seq_id, "fork")
    nb = d.item(0)
    try:  # a row as `BlockTable.copy_row` copies one, inline
        kid = free_rows.pop()
    except IndexError:  # no free row
        kid = bt._take_rows(1)[0]
        data = bt.row_data  # grown: new arrays
    table = bt.table
    src = table[row]
    if nb >= bt.whole_from:  # the whole row (null past the end in both) in one copy
        table[kid] = src
    else:
        table[kid, :nb] = src[:nb]
    data[kid] = d  # block and token counts and every column in one copy
    i = next(ids)
    bt.seq_id[kid] = i
    if nb:  # `BlockPool.share`, inline
        blocks = src[:nb].astype(_I64)
        if m.num_released and d.item(RELEASED):  # released entries are the null block: not shared
            blocks = blocks[blocks != 0]  # (never the last one: some stay)
            m.num_released += 1
            nb = len(blocks)  # from here: the number of blocks shared
        before = ref[blocks].tolist()
        k = before[0]
        if before.count(k) == nb:  # one count for all: a store
            try:
                ref[blocks] = _PLUS_ONE[k]
            except IndexError:  # a count past the table's
                ref[blocks] = k + 1
        else:
            ref[blocks] += np.int32(1)  # distinct blocks: a plain indexed update
    rows[i] = kid
    history[i] = h = history[seq_id]  # copy-on-write: the child holds the parent's (`History.share`, inline)
    h.shared = True
    by_code[d.item(OWNER)][i] = None  # `OwnerIndex.add_one`, inline
    return [[i]]


def _fork_many(m: SequenceManager, seq_id: int, row: int, n: int) -> list[list[int]]:
    """``n`` > 1 children of one sequence."""
    bt = m.table
    if m.num_swapped and bt.swapped.item(row):
        raise SequenceSwapped(seq_id, "fork")
    kids = bt.copy_row(row, n)
    ids = m.new_ids(n)
    seq_col = bt.seq_id
    for kid, i in zip(kids, ids):
        seq_col[kid] = i
    blocks = bt.table[row, : bt.num_blocks.item(row)].astype(np.int64)
    if m.num_released and bt.released.item(row):
        blocks = blocks[blocks != 0]
        m.num_released += n
    m.pool.share(blocks, n, distinct=True)
    parent, code = m.history[seq_id].share(), bt.owner.item(row)
    for kid, i in zip(kids, ids):
        m.rows[i] = kid
        m.history[i] = parent
        m.owners.add_one(code, i)
    return [ids]


def free(m: SequenceManager, seq_id: int) -> None:
    """`SequenceManager.free` of one sequence: its blocks last to first."""
    rows, history, by_code, _, ref, bt, free_rows = m.one_refs
    row = rows.get(seq_id) if type(seq_id) is int else None
    if row is None:
        row = row_of(m, seq_id)
    m.recent.clear()  # rows are given back: no remembered batch holds any more
    d = bt.row_data[row]  # [num_blocks, num_tokens, columns...]
    nb = d.item(0)
    src = bt.table[row]
    pool = m.pool
    top = pool._num_free
    # The block ids, last to first, go where a free pushes them: the free
    # list's room above its top (room for every block in use), read back from
    # there as int64; pushing them is then moving the top. Released and
    # swapped-out entries (null) are taken out first instead.
    staged = pool._free[top : top + nb] if not (m.num_released or m.num_swapped) else _NONE
    if len(staged) == nb and nb:
        staged[::-1] = src[:nb]
        before = ref[staged].tolist()
        if before.count(1) == nb and not pool.cache.key_to_block:
            ref[staged] = _ZERO  # all its own, nothing cached: every block to the free list
            pool._num_free = top + nb
        else:
            pool.free_table(staged, before)
    else:
        blocks = src[nb - 1 :: -1].astype(_I64) if nb else _NONE
        if m.num_released or m.num_swapped:
            released, swapped = d.item(RELEASED), d.item(SWAPPED)
            if released or swapped:
                blocks = blocks[blocks != 0]  # released entries; swapped-out ones
                if released:
                    m.num_released -= 1
                if swapped:
                    m.host.release([row], blocks)
                    m.num_swapped -= 1
        if len(blocks):
            pool.free_table(blocks)
    code = d.item(OWNER)
    mine = by_code[code]  # `OwnerIndex.drop_one`, inline
    del mine[seq_id]
    if not mine and code:  # an owner left with none is forgotten (None: never)
        m.owners.forget(code)
    if nb >= bt.whole_from:  # `BlockTable.release_row`, inline
        src.fill(0)
    else:
        src[:nb].fill(0)
    d.fill(0)
    free_rows.append(row)
    del rows[seq_id], history[seq_id]
    if bt.table.nbytes >= SHRINK_FROM:  # (a large table gives memory back as its rows go)
        bt._released(1)
