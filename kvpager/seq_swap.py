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

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> (columns, host blocks)
        self.refs = np.zeros(num_blocks, dtype=np.int32)

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
        if not len(hosts):
            return
        np.subtract.at(self.refs, hosts, 1)
        gone = hosts[self.refs[hosts] == 0]
        if len(gone) > 1:  # a repeat reaches 0 at each of its listings: keep the first
            _, first = np.unique(gone, return_index=True)
            gone = gone[np.sort(first)]
        self.free.extend(gone.tolist())

    def release(self, rows: list[int]) -> None:
        """Swapped rows freed: their entries' host blocks lose them."""
        held = [self.held.pop(row)[1] for row in rows]
        self.drop(np.concatenate(held) if len(held) > 1 else held[0])

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


def _first_order(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct ``values`` in order of first appearance, each value's index
    into them, and how often each appears."""
    uniq, first, inverse, counts = np.unique(values, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[inverse.reshape(-1)], counts[order]


def swap_out(m: SequenceManager, seq_ids: list[int]) -> np.ndarray:
    """`SequenceManager.swap_out`: the (device, host) copies, int64 [k, 2]."""
    rows = m.batch(seq_ids, "swap_out")
    bt, pool, host = m.table, m.pool, m.host
    blocks, rep, cols = bt.entries(rows)
    ref = pool.ref_cnt[blocks]
    late = None  # device entries of sequences swapped out before, of blocks that move now
    if len(rows) == 1 and not (m.num_swapped and np.count_nonzero(ref > 1)):
        # one sequence: its own blocks are those of one reference
        move = ref == 1
        distinct, hosts_of, counts = blocks[move], None, None
        moving = None
    else:  # blocks whose every reference is an entry of these rows or of swapped-out rows
        ids, at, within = np.unique(blocks, return_inverse=True, return_counts=True)
        at = at.reshape(-1)
        if m.num_swapped and (pool.ref_cnt[ids] > within).any():
            srows = np.fromiter(host.held, np.int64, len(host.held))
            sblocks, srep, scols = bt.entries(srows)
            k = np.minimum(np.searchsorted(ids, sblocks), len(ids) - 1)
            hit = ids[k] == sblocks
            within = within + np.bincount(k[hit], minlength=len(ids))
            moving = (pool.ref_cnt[ids] == within) & (ids != NULL_BLOCK)
            hit[hit] = moving[k[hit]]
            late = (sblocks[hit], srep[hit], scols[hit])
        else:
            moving = (pool.ref_cnt[ids] == within) & (ids != NULL_BLOCK)
        move = moving[at]
        moved = blocks[move] if late is None else np.concatenate([blocks[move], late[0]])
        distinct, hosts_of, counts = _first_order(moved)
    need = len(distinct)
    if need > len(host.free):
        raise OutOfBlocks(need, len(host.free), "host")
    if need:  # (checked: from here until the caller ran the copies, host entries name blocks not yet written)
        m.copies_owed = "swap-out"
    hosts = host.take(need)
    host.refs[hosts] = 1 if counts is None else counts
    entry_hosts = hosts if hosts_of is None else hosts[hosts_of]
    per_row = np.bincount(np.repeat(np.arange(len(rows)), bt.num_blocks[rows])[move], minlength=len(rows))
    ends = np.cumsum(per_row).tolist()
    moved_cols = cols[move]
    start = 0
    for row, end in zip(rows.tolist(), ends):
        host.held[row] = (moved_cols[start:end], entry_hosts[start:end])
        start = end
    # Released last to first per sequence, as a free would; nothing can reuse
    # them before the caller has copied them (the same call).
    released = bt.row_blocks(rows, reverse=True)
    released = released[pool.ref_cnt[released] == 1 if moving is None else moving[np.searchsorted(ids, released)]]
    bt.table[rep[move], moved_cols] = 0
    if late is not None and len(late[0]):
        released = np.concatenate([released, _move_late(bt, host, late, entry_hosts[start:])])
    bt.last[rows] = bt.table[rows, np.maximum(bt.num_blocks[rows].astype(np.int64) - 1, 0)]
    bt.swapped[rows] = 1
    m.num_swapped += len(rows)
    pool.free_blocks(released, distinct=counts is None)  # (a group's shared block: once per entry)
    return np.stack([distinct, hosts], axis=1)


def _move_late(bt: Any, host: HostPool, late: tuple[np.ndarray, np.ndarray, np.ndarray],
               late_hosts: np.ndarray) -> np.ndarray:
    """Sequences swapped out before kept device entries of blocks that move now
    (their other holders were resident then): those entries join their rows'
    host entries. Returns the blocks, an entry each, to release."""
    blocks, rep, cols = late
    bt.table[rep, cols] = NULL_BLOCK
    first = np.flatnonzero(np.r_[True, rep[1:] != rep[:-1]])  # (entries come a row at a time)
    rows = rep[first]
    for row, a, b in zip(rows.tolist(), first.tolist(), [*first[1:].tolist(), len(rep)]):
        old_cols, old_hosts = host.held[row]
        host.held[row] = (np.concatenate([old_cols, cols[a:b]]), np.concatenate([old_hosts, late_hosts[a:b]]))
    bt.last[rows] = bt.table[rows, np.maximum(bt.num_blocks[rows].astype(np.int64) - 1, 0)]
    return blocks


def swap_in(m: SequenceManager, seq_ids: list[int]) -> np.ndarray:
    """`SequenceManager.swap_in`: the (host, device) copies, int64 [k, 2]."""
    rows = m.batch(seq_ids, None, name="swap_in")
    bt, pool, host = m.table, m.pool, m.host
    swapped = bt.swapped[rows] != 0
    if not swapped.all():
        raise NotSwapped(seq_ids[int(np.argmin(swapped))])
    # Per moved entry: the device block still cached under its key, or -1.
    plans = []
    for s, row in zip(seq_ids, rows.tolist()):
        cols, hosts = host.held[row]
        published = int(bt.published[row])
        history = m.history[s]
        keys = history.keys
        found = [pool.lookup(keys[i]) if i < published else None for i in cols.tolist()]
        plans.append((row, cols, hosts, published, history,
                      np.array([-1 if b is None else b for b in found], dtype=np.int64)))
    reuse = np.concatenate([p[5] for p in plans]) if plans else np.zeros(0, np.int64)
    every_host = np.concatenate([p[2] for p in plans]) if plans else np.zeros(0, np.int64)
    reused = reuse[reuse >= 0]
    # Each host block not re-shared is copied once, to one device block its
    # entries of this call share (sequences swapped in together share it again).
    copied, copy_of, counts = _first_order(every_host[reuse < 0])
    need = len(copied)
    idle = len(np.unique(reused[pool.ref_cnt[reused] == 0]))
    available = pool.get_num_free_blocks() - idle
    if need > available:
        raise OutOfBlocks(need, available)
    if need:  # (checked: from here until the caller ran the copies, tables point at blocks not yet written)
        m.copies_owed = "swap-in"
    pool.touch(reused)  # before any eviction, as in allocate
    new = pool.get_new_blocks(need) if need else np.zeros(0, np.int64)
    if need and (counts > 1).any():
        pool.touch(np.repeat(new, counts - 1))  # a group's block: a reference per entry
    entry_new = new[copy_of]
    taken = 0
    for row, cols, _hosts, published, history, found in plans:
        fresh = found < 0
        k = int(np.count_nonzero(fresh))
        blocks = found.copy()
        blocks[fresh] = entry_new[taken : taken + k]
        taken += k
        again = [(i, b) for i, b in zip(cols[fresh].tolist(), blocks[fresh].tolist()) if i < published]
        # (a tenant entry only where a block goes back into the cache: released blocks are not moved)
        tenant = pool.tenants.code(history.root, history.salt) if again else 0
        done = [pool.publish(b, history.keys[i], tenant) for i, b in again]
        if again and not any(done):
            pool.tenants.release_idle([tenant])
        if pool.events is not None and any(done):
            report_stored(m, history, [i for i, _ in again], done)
        bt.table[row, cols] = blocks
        del host.held[row]
    host.drop(every_host)
    bt.last[rows] = bt.table[rows, np.maximum(bt.num_blocks[rows].astype(np.int64) - 1, 0)]
    bt.swapped[rows] = 0
    m.num_swapped -= len(rows)
    return np.stack([copied, new], axis=1) if need else np.zeros((0, 2), np.int64)
