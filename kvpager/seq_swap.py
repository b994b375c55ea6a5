"""Swap: the blocks only the swapped sequences hold go to host blocks and back.

A block moves when every reference to it is an entry of the sequences of the
call or of sequences swapped out before: a sequence's own blocks, and the
blocks a group (a parent and its forks: n > 1 sampling, beams) shares, which
move once, to one host block the group's entries share, with the group's last
resident holder (the entries of its holders swapped out before join their
rows' host entries). A block a resident sequence or a pin holds stays on the
device. A swapped-out entry of the block
table is the null block; the host pool remembers which table entries went to
which host blocks, and counts each host block's entries. Swapping in copies
each host block once per call (sequences swapped in together share it again)
and re-shares a block whose published copy is still cached on the device
instead of copying it back. A host block goes back once its last entry came
back or was freed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.block_pool import NULL_BLOCK
from kvpager.errors import IntegrityError, NotSwapped, OutOfBlocks
from kvpager.seq_prefix import report_stored

if TYPE_CHECKING:
    from kvpager.sequences import SequenceManager


class HostPool:
    """Host (swap) blocks: a free list, per swapped row the table entries
    (columns) it moved and the host block of each, and per host block the
    entries naming it (``refs``: more than one where a group moved a block it
    shared)."""

    def __init__(self, num_blocks: int, num_device_blocks: int):
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        # row -> (columns, host blocks), int32: 8 bytes an entry (a swapped group of many
        # forks holds an entry per fork and block, as its block tables do)
        self.held: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.refs = np.zeros(num_blocks, dtype=np.int32)
        # Per device block, the entries swapped-out rows kept of it on the device (it had other
        # holders then): a block whose references are all these and the call's moves.
        self.kept = np.zeros(num_device_blocks, dtype=np.int32)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, n: int) -> np.ndarray:
        ids = self.free[len(self.free) - n :][::-1]
        del self.free[len(self.free) - n :]
        return np.asarray(ids, dtype=np.int64)

    def drop(self, hosts: np.ndarray) -> None:
        """One entry of each of ``hosts`` (repeats: one each) is gone; a host block
        whose last entry went goes back to the free list (in the order given)."""
        if len(hosts):
            distinct, _, counts = first_order(hosts, self.num_blocks)
            self.drop_counted(distinct, counts)

    def drop_counted(self, distinct: np.ndarray, counts: np.ndarray) -> None:
        """`drop` of ``counts[i]`` entries of each of ``distinct``."""
        self.refs[distinct] -= counts.astype(np.int32)
        self.free.extend(distinct[self.refs[distinct] == 0].tolist())

    def keep(self, blocks: np.ndarray, sign: int) -> None:
        """Swapped-out rows' device entries of ``blocks`` (null ones skipped) counted
        in (``sign`` 1) or out (-1) of `kept`."""
        blocks = blocks[blocks != NULL_BLOCK]
        if len(blocks):
            np.add.at(self.kept, blocks, np.int32(sign))

    def release(self, rows: list[int], kept: np.ndarray) -> None:
        """Swapped rows freed: their entries' host blocks lose them, and ``kept``
        (their device entries) leave `kept`."""
        held = [self.held.pop(row)[1] for row in rows]
        self.drop(np.concatenate(held) if len(held) > 1 else held[0])
        self.keep(kept, -1)

    def check(self) -> None:
        held = [hosts for _, hosts in self.held.values()]
        counts = np.bincount(np.concatenate(held), minlength=self.num_blocks) if held else \
            np.zeros(self.num_blocks, np.int64)
        free = np.asarray(self.free, dtype=np.int64)
        free_count = np.bincount(free, minlength=self.num_blocks) if len(free) else np.zeros(self.num_blocks, np.int64)
        problems = []
        if len(counts) != self.num_blocks or len(free_count) != self.num_blocks:
            problems.append("a host block id out of range")
        else:
            if (free_count > 1).any():
                problems.append("the free list names a host block twice")
            if ((free_count > 0) & (counts > 0)).any():
                problems.append("a host block both free and held")
            if ((free_count == 0) & (counts == 0)).any():
                problems.append("a host block neither free nor held (leaked)")
            if not np.array_equal(counts, self.refs):
                problems.append("host block entry counts disagree with the swapped rows' entries")
        if any(len(np.unique(hosts)) != len(hosts) for hosts in held):
            problems.append("a swapped row names one host block twice")
        if problems:
            raise IntegrityError(
                f"host pool integrity violated (held={int((counts > 0).sum()) if held else 0}, "
                f"free={len(self.free)}, total={self.num_blocks}): " + "; ".join(problems)
            )


def first_order(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ``values`` (ids below ``size``) in order of first appearance,
    each value's index into them, and how often each appears: linear in
    ``values`` (scratch of ``size``, written only where ``values`` point), where
    a sort of a group's 16M entries took seconds."""
    n = len(values)
    first = np.empty(size, dtype=np.int64)
    first[values] = n
    at = np.arange(n)
    np.minimum.at(first, values, at)
    distinct = values[first[values] == at]
    first[distinct] = np.arange(len(distinct))  # (now: each distinct value's index)
    which = first[values]
    return distinct, which, np.bincount(which, minlength=len(distinct))


def swap_out(m: SequenceManager, seq_ids: list[int]) -> np.ndarray:
    """`SequenceManager.swap_out`: the (device, host) copies, int64 [k, 2]."""
    rows = m.batch(seq_ids, "swap_out")
    bt, pool, host = m.table, m.pool, m.host
    blocks, rep, cols = bt.entries(rows)
    ref = pool.ref_cnt[blocks] if len(rows) == 1 else None
    late = None  # device entries of sequences swapped out before, of blocks that move now
    if ref is not None and not (m.num_swapped and np.count_nonzero((ref > 1) & (host.kept[blocks] == ref - 1))):
        # one sequence: its own blocks are those of one reference
        move = ref == 1
        distinct, hosts_of, counts = blocks[move], None, None
        moving = None
    else:  # blocks whose every reference is an entry of these rows or of swapped-out rows
        size = pool.num_blocks
        ids, at, within = first_order(blocks, size)
        refs = pool.ref_cnt[ids]
        outside = refs - within  # references of each other than these rows' entries
        late_at = None
        if m.num_swapped and np.count_nonzero(outside):
            # (other holders all swapped out: a scan of the swapped rows finds their entries)
            joins = (outside > 0) & (host.kept[ids] == outside)
            moving = ((outside == 0) | joins) & (ids != NULL_BLOCK)
            if np.count_nonzero(joins):
                late, late_at = _kept_entries(bt, host, ids, joins & moving)
        else:
            moving = (outside == 0) & (ids != NULL_BLOCK)
        move = moving[at]
        # The blocks that move, in order of first appearance, and each moved entry's one.
        pick = np.flatnonzero(moving)
        distinct, counts = ids[pick], refs[pick]
        place = np.cumsum(moving) - 1
        hosts_of = place[at[move]] if late_at is None else np.concatenate([place[at[move]], place[late_at]])
    need = len(distinct)
    if need > len(host.free):
        raise OutOfBlocks(need, len(host.free), "host")
    if need:  # (checked: from here until the caller ran the copies, host entries name blocks not yet written)
        m.copies_owed = "swap-out"
    hosts = host.take(need)
    host.refs[hosts] = 1 if counts is None else counts
    entry_hosts = (hosts if hosts_of is None else hosts[hosts_of]).astype(np.int32)
    per_row = np.bincount(np.repeat(np.arange(len(rows)), bt.num_blocks[rows])[move], minlength=len(rows))
    ends = np.cumsum(per_row).tolist()
    moved_cols = cols[move].astype(np.int32)
    start = 0
    for row, end in zip(rows.tolist(), ends):
        host.held[row] = (moved_cols[start:end], entry_hosts[start:end])
        start = end
    # Released last to first per sequence, as a free would; nothing can reuse
    # them before the caller has copied them (the same call).
    if moving is None:
        released = bt.row_blocks(rows, reverse=True)
        released = released[pool.ref_cnt[released] == 1]
    bt.table[rep[move], moved_cols] = 0
    host.keep(blocks[~move], 1)  # what these rows keep on the device
    if late is not None and len(late_at):
        _move_late(bt, host, late, entry_hosts[start:])
        host.keep(ids[late_at], -1)
    _last_again(bt, rows)
    bt.swapped[rows] = 1
    m.num_swapped += len(rows)
    if moving is None:
        pool.free_blocks(released, distinct=True)
    else:  # every reference of each goes; last appearing first (a sequence's tail, then its prefix)
        pool.release_all(distinct[::-1].copy())
    return np.stack([distinct, hosts], axis=1)


def _last_again(bt: Any, rows: np.ndarray) -> None:
    """The rows' last-block column read again from their tables (a moved entry is null)."""
    bt.last[rows] = bt.table[rows, np.maximum(bt.num_blocks[rows].astype(np.int64) - 1, 0)]


def _kept_entries(bt: Any, host: HostPool, ids: np.ndarray, joins: np.ndarray
                  ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """The swapped-out rows' device entries of ``ids[joins]``: (rows, columns),
    and each one's index into ``ids``; a run of rows at a time."""
    index = np.full(len(host.kept), -1, dtype=np.int64)
    index[ids[joins]] = np.flatnonzero(joins)
    reps, cols, at = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    srows = np.fromiter(host.held, np.int64, len(host.held))
    for part in bt.row_chunks(srows):
        blocks, rep, col = bt.entries(part)
        k = index[blocks]
        hit = k >= 0
        reps.append(rep[hit])
        cols.append(col[hit])
        at.append(k[hit])
    return (np.concatenate(reps), np.concatenate(cols)), np.concatenate(at)


def _move_late(bt: Any, host: HostPool, late: tuple[np.ndarray, np.ndarray],
               late_hosts: np.ndarray) -> None:
    """Sequences swapped out before kept device entries of blocks that move now
    (their other holders were resident then): those entries join their rows'
    host entries."""
    rep, cols = late
    bt.table[rep, cols] = NULL_BLOCK
    first = np.flatnonzero(np.r_[True, rep[1:] != rep[:-1]])  # (entries come a row at a time)
    rows = rep[first]
    for row, a, b in zip(rows.tolist(), first.tolist(), [*first[1:].tolist(), len(rep)]):
        old_cols, old_hosts = host.held[row]
        host.held[row] = (np.concatenate([old_cols, cols[a:b].astype(np.int32)]),
                          np.concatenate([old_hosts, late_hosts[a:b]]))
    _last_again(bt, rows)


def swap_in(m: SequenceManager, seq_ids: list[int]) -> np.ndarray:
    """`SequenceManager.swap_in`: the (host, device) copies, int64 [k, 2].

    Work per host block, not per entry: the entries of one host block (a
    group's shared block) hold one block's K/V under one key, so one lookup
    says whether it is still cached on the device, and one copy brings it
    back otherwise."""
    rows = m.batch(seq_ids, None, name="swap_in")
    bt, pool, host = m.table, m.pool, m.host
    swapped = bt.swapped[rows] != 0
    if not swapped.all():
        raise NotSwapped(seq_ids[int(np.argmin(swapped))])
    if not len(rows):
        return np.zeros((0, 2), np.int64)
    held = [host.held[row] for row in rows.tolist()]
    cols = np.concatenate([c for c, _ in held]).astype(np.int64)
    hosts = np.concatenate([h for _, h in held])
    row_of = np.repeat(np.arange(len(rows)), [len(c) for c, _ in held])
    distinct, which, counts = first_order(hosts, host.num_blocks)
    # Per host block, an entry whose row published its column (its key known), if any.
    known = cols < bt.published[rows][row_of]
    none = len(cols)
    named = np.full(len(distinct), none, np.int64)
    np.minimum.at(named, which[known], np.flatnonzero(known))  # (the first such entry)
    named[named == none] = -1
    found = np.full(len(distinct), -1, np.int64)
    for d, e in zip(np.flatnonzero(named >= 0).tolist(), named[named >= 0].tolist()):
        b = pool.lookup(m.history[seq_ids[row_of[e]]].keys[cols[e]])
        if b is not None:
            found[d] = b
    cached = np.flatnonzero(found >= 0)
    reused = found[cached]  # (two host blocks of one key may find one block)
    fresh = np.flatnonzero(found < 0)
    need = len(fresh)
    idle = len(np.unique(reused[pool.ref_cnt[reused] == 0]))
    available = pool.get_num_free_blocks() - idle
    if need > available:
        raise OutOfBlocks(need, available)
    if need:  # (checked: from here until the caller ran the copies, tables point at blocks not yet written)
        m.copies_owed = "swap-in"
    pool.touch(reused)  # before any eviction, as in allocate
    pool.share(reused, counts[cached] - 1)  # a reference per entry
    new = pool.get_new_blocks(need) if need else np.zeros(0, np.int64)
    pool.share(new, counts[fresh] - 1, distinct=True)
    device = found.copy()
    device[fresh] = new
    # Copies whose key is known go back into the cache, under their first namer's key.
    again = fresh[named[fresh] >= 0]
    _republish(m, seq_ids, row_of, cols, device[again], named[again])
    # What they kept on the device leaves `kept` (moved entries are null until the next line).
    keeping = bt.num_blocks[rows] - np.array([len(c) for c, _ in held]) - bt.released[rows]
    if np.count_nonzero(keeping):
        host.keep(bt.row_blocks(rows[keeping > 0]), -1)
    bt.table[rows[row_of], cols] = device[which]
    for row in rows.tolist():
        del host.held[row]
    host.drop_counted(distinct, counts)
    _last_again(bt, rows)
    bt.swapped[rows] = 0
    m.num_swapped -= len(rows)
    return np.stack([distinct[fresh], new], axis=1) if need else np.zeros((0, 2), np.int64)


def _republish(m: SequenceManager, seq_ids: list[int], row_of: np.ndarray, cols: np.ndarray,
               blocks: np.ndarray, entries: np.ndarray) -> None:
    """Publish swapped-in copies of blocks that were published: ``blocks[k]``
    under the key of entry ``entries[k]`` (its sequence's history), a
    sequence at a time in column order (events report runs of columns)."""
    pool = m.pool
    order = np.lexsort((cols[entries], row_of[entries]))
    blocks, entries = blocks[order], entries[order]
    seqs = row_of[entries]
    for a, b in zip(*_runs(seqs)):
        history = m.history[seq_ids[seqs[a]]]
        index = cols[entries[a:b]].tolist()
        # (a tenant entry only where a block goes back into the cache: released blocks are not moved)
        tenant = pool.tenants.code(history.root, history.salt)
        done = [pool.publish(blk, history.keys[i], tenant) for i, blk in zip(index, blocks[a:b].tolist())]
        if not any(done):
            pool.tenants.release_idle([tenant])
        elif pool.events is not None:
            report_stored(m, history, index, done)


def _runs(values: np.ndarray) -> tuple[list[int], list[int]]:
    """The starts and ends of the runs of equal ``values``."""
    if not len(values):
        return [], []
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return starts.tolist(), [*starts[1:].tolist(), len(values)]
