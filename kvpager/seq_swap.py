"""Swap: a sequence's exclusively owned blocks to host blocks and back.

Shared blocks stay on the device. A swapped-out entry of the block table is
the null block; the host pool remembers which table entries went to which
host blocks. Swapping in re-shares a block whose published copy is still
cached on the device instead of copying it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvpager.errors import IntegrityError, NotSwapped, OutOfBlocks
from kvpager.seq_prefix import report_stored

if TYPE_CHECKING:
    from kvpager.sequences import SequenceManager


class HostPool:
    """Host (swap) blocks: a free list, and per swapped row the table entries
    (columns) it moved and the host block of each."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.held: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> (columns, host blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def take(self, n: int) -> np.ndarray:
        ids = self.free[len(self.free) - n :][::-1]
        del self.free[len(self.free) - n :]
        return np.asarray(ids, dtype=np.int64)

    def release(self, rows: list[int]) -> None:
        """Swapped rows freed: their host blocks go back."""
        for row in rows:
            self.free.extend(self.held.pop(row)[1].tolist())

    def check(self) -> None:
        held = [h for _, hosts in self.held.values() for h in hosts.tolist()]
        every, free = set(held), set(self.free)
        if (len(every) != len(held) or every & free or len(every) + len(free) != self.num_blocks
                or len(free) != len(self.free)):
            raise IntegrityError(
                f"host pool integrity violated (held={len(held)}, free={len(self.free)}, "
                f"total={self.num_blocks})"
            )


def swap_out(m: SequenceManager, seq_ids: list[int]) -> np.ndarray:
    """`SequenceManager.swap_out`: the (device, host) copies, int64 [k, 2]."""
    rows = m.batch(seq_ids, "swap_out")
    bt, pool, host = m.table, m.pool, m.host
    blocks, rep, cols = bt.entries(rows)
    move = pool.ref_cnt[blocks] == 1
    need = int(np.count_nonzero(move))
    if need > len(host.free):
        raise OutOfBlocks(need, len(host.free), "host")
    if need:  # (checked: from here until the caller ran the copies, host entries name blocks not yet written)
        m.copies_owed = "swap-out"
    hosts = host.take(need)
    per_row = np.bincount(np.repeat(np.arange(len(rows)), bt.num_blocks[rows])[move], minlength=len(rows))
    ends = np.cumsum(per_row).tolist()
    moved_cols = cols[move]
    start = 0
    for row, end in zip(rows.tolist(), ends):
        host.held[row] = (moved_cols[start:end], hosts[start:end])
        start = end
    # Released last to first per sequence, as a free would; nothing can reuse
    # them before the caller has copied them (the same call).
    released = bt.row_blocks(rows, reverse=True)
    released = released[pool.ref_cnt[released] == 1]
    copies = np.stack([blocks[move], hosts], axis=1)
    bt.table[rep[move], moved_cols] = 0
    bt.last[rows] = bt.table[rows, np.maximum(bt.num_blocks[rows].astype(np.int64) - 1, 0)]
    bt.swapped[rows] = 1
    m.num_swapped += len(rows)
    pool.free_blocks(released, distinct=True)  # ref 1: one entry each
    return copies


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
    reused = reuse[reuse >= 0]
    need = len(reuse) - len(reused)
    idle = len(np.unique(reused[pool.ref_cnt[reused] == 0]))
    available = pool.get_num_free_blocks() - idle
    if need > available:
        raise OutOfBlocks(need, available)
    if need:  # (checked: from here until the caller ran the copies, tables point at blocks not yet written)
        m.copies_owed = "swap-in"
    pool.touch(reused)  # before any eviction, as in allocate
    new = pool.get_new_blocks(need) if need else np.zeros(0, np.int64)
    taken = 0
    copies = []
    for row, cols, hosts, published, history, found in plans:
        fresh = found < 0
        k = int(np.count_nonzero(fresh))
        blocks = found.copy()
        blocks[fresh] = new[taken : taken + k]
        taken += k
        copies.append(np.stack([hosts[fresh], blocks[fresh]], axis=1))
        again = [(i, b) for i, b in zip(cols[fresh].tolist(), blocks[fresh].tolist()) if i < published]
        # (a tenant entry only where a block goes back into the cache: released blocks are not moved)
        tenant = pool.tenants.code(history.root, history.salt) if again else 0
        done = [pool.publish(b, history.keys[i], tenant) for i, b in again]
        if again and not any(done):
            pool.tenants.release_idle([tenant])
        if pool.events is not None and any(done):
            report_stored(m, history, [i for i, _ in again], done)
        bt.table[row, cols] = blocks
        host.free.extend(hosts.tolist())
        del host.held[row]
    bt.last[rows] = bt.table[rows, np.maximum(bt.num_blocks[rows].astype(np.int64) - 1, 0)]
    bt.swapped[rows] = 0
    m.num_swapped -= len(rows)
    return np.concatenate(copies) if copies else np.zeros((0, 2), np.int64)
