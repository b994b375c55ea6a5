"""Blocks the store lost, written again.

A block goes to the store once, when its commit first publishes it here
(`RemoteTier.offer`). A store that then loses it (a Redis restart without
persistence, ``FLUSHALL`` / ``FLUSHDB``, eviction under ``maxmemory``, its TTL
run out) held it for nobody from then on: the host that computed it kept
hitting it locally, never wrote it again, and every other host recomputed it.

- **Noticing a loss.** The writer keeps the name of one block it wrote (the
  first of a batch the store took: the *sentinel*; on a Redis Cluster one per
  master, the first block written to its slots, `Store.owners`) and, at most
  every ``check_every`` seconds (`CHECK_EVERY`), asks the store whether it
  still holds a string there (``TYPE``: no value read, its LRU / LFU clock
  left alone, so the sentinel ages as the blocks written with it; on a
  cluster every sentinel in one call, each master asked for its own). The
  check runs on the writer's thread, before a batch it sends or when an
  allocate that uses blocks cached here asks for it (`republish`): the loop
  never waits for it.
  No string there: the store lost what the tier wrote (up to then), the
  tier's ``epoch`` moves on (logged once at WARNING, counted), and the next
  batch written gives a new sentinel (on a cluster: to the masters whose
  sentinel was lost). With one sentinel for a whole cluster, a master not
  holding it that restarted empty was never noticed. The masters may change
  (a failover, a resharding): after each check the sentinels kept are
  grouped by the master that holds each now (one each), and a master that
  has none (new, or whose slots came from others) gets one from the next
  batch written to its slots. No key of its own: nothing in the store but
  blocks.
- **Writing again, as blocks are used.** At a pool's first allocate after a
  loss, the blocks it has cached then are marked pending (a copy of its
  prefix cache's mask: one byte a block). An allocate's local prefix hits
  that are pending are offered to the writer again, their bytes copied as a
  commit's are (`RemoteTier.requeue`), at most `REPUBLISH_BYTES` (and the
  restore cap) of them an allocate: the work follows the use, a prompt's
  first blocks first, and the loop never copies the whole pool at once. What
  does not fit in the write queue, or comes while the writes are paused,
  stays pending for a later use. Blocks restored from the store since are
  not pending; a block not used again is not written again; one written
  twice costs a ``SET NX`` that leaves the store's value as it is.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from kvpager.remote_errors import StoreError
from kvpager.remote_key_types import KEY_STRING

if TYPE_CHECKING:
    from kvpager.block_pool import BlockPool
    from kvpager.pool import KVPool
    from kvpager.remote_store import Store
    from kvpager.remote_tier import RemoteTier

log = logging.getLogger("kvpager.remote")

CHECK_EVERY = 10.0  # most seconds between two checks of the sentinel (`RemoteTier(check_every=)`)
REPUBLISH_BYTES = 64 << 20  # most bytes of blocks one allocate offers again (and at most the restore cap)


class Losses:
    """What the tier knows of the store losing its blocks: the sentinels (the
    writer's), when they are next checked, the losses seen (``epoch``), and each
    pool's blocks pending since the last (by its block pool, weakly)."""

    def __init__(self, every: float):
        self.every = every
        self.epoch = 0  # losses seen
        #: a block the store took per master that holds it ("" for a standalone store), checked
        #: for (writer thread)
        self.sentinels: dict[str, str] = {}
        self.due = 0.0  # monotonic time of the next check
        self.asked = False  # an allocate asked the writer for a check (under the tier's queue lock)
        self._pending: weakref.WeakKeyDictionary[BlockPool, tuple[int, np.ndarray]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def pending(self, bp: BlockPool) -> np.ndarray:
        """``bp``'s blocks cached when the last loss was seen and not offered again
        since (a bool per block, updated in place); made at its first use after
        each loss, from the blocks it has cached then."""
        with self._lock:
            entry = self._pending.get(bp)
            if entry is None or entry[0] != self.epoch:
                entry = self._pending[bp] = (self.epoch, bp.cache.cached.copy())
        return entry[1]

    def wrote(self, store: Store, names: Iterable[str]) -> None:
        """``store`` took a batch of blocks ``names`` (writer thread): the first
        becomes the sentinel where there is none; on a cluster, the first on
        each master that has none."""
        owners = store.owners(names)
        if owners is None:  # (a standalone store: one sentinel, the batch's first block)
            if not self.sentinels:
                self.sentinels[""] = next(iter(names))
            return
        for name, owner in owners:
            if owner is not None and owner not in self.sentinels:
                self.sentinels[owner] = name

    def regroup(self, store: Store) -> None:
        """Key the sentinels by the master that holds each now, one a master
        (writer thread): after a failover or a resharding a sentinel is on
        another master, two may share one, and a node may be gone. One whose
        master is not known now (its slot uncovered) stays as it was."""
        owners = store.owners(list(self.sentinels.values()))
        if owners is not None:
            regrouped: dict[str, str] = {}
            for old, (name, owner) in zip(list(self.sentinels), owners):
                regrouped.setdefault(old if owner is None else owner, name)
            self.sentinels = regrouped


def check_losses(tier: RemoteTier) -> None:
    """Writer thread: are the sentinels still in the store? One gone, or of
    another Redis type: a loss (see the module docstring). Not while the writes
    are paused (nothing would be written again); a check that fails is counted
    (``errors``) and tried again when next due, the breakers left to the
    writes' own calls (a check that took the writes' one retry would leave the
    batch after it dropped)."""
    w = tier.losses
    w.due = time.monotonic() + w.every
    if not w.sentinels or tier.breakers["writes"].is_open() or tier.refusals["writes"].is_open():
        return
    try:
        held = tier.store.exists_many(list(w.sentinels.values())).tolist()
    except StoreError as e:
        tier._count(write_errors=1)
        log.debug("remote store %s: the check for lost blocks failed: %s", tier.store.url, e)
        return
    gone = [owner for owner, h in zip(list(w.sentinels), held) if h != KEY_STRING]
    lost = [w.sentinels.pop(owner) for owner in gone]
    w.regroup(tier.store)
    if not lost:
        return
    w.epoch += 1
    tier._count(losses=1)
    log.warning("remote store %s lost blocks this tier wrote (%s gone: a restart without persistence, "
                "FLUSHALL, eviction or expiry); blocks cached here are written again as they are used",
                tier.store.url, ", ".join(lost))


def republish(kv: KVPool, used: Seq[tuple[bytes, Seq[bytes], Seq[int]]]) -> None:
    """Loop thread, as an allocate looks its prompts up: asks the writer for a
    check when one is due, and after a loss offers the blocks of ``used`` =
    [(root key, block keys, blocks)] (each prompt's local prefix hits) that
    are pending again, at most `REPUBLISH_BYTES` of them."""
    tier = kv.remote
    w = tier.losses
    if w.sentinels and not w.asked and time.monotonic() >= w.due:
        tier.ask_check()
    if not w.epoch or tier.codec is None:
        return
    pending = w.pending(kv.manager.pool)
    most = max(1, min(tier.max_restore_bytes, REPUBLISH_BYTES) // tier.codec.value_bytes)
    todo: list[tuple[int, bytes, bytes]] = []
    for root, keys, blocks in used:
        if len(todo) == most:
            break
        for j in np.flatnonzero(pending[blocks]).tolist() if blocks else ():  # (in chain order)
            if pending[blocks[j]] and len(todo) < most:  # (once, where prompts share it)
                pending[blocks[j]] = False
                todo.append((blocks[j], root, keys[j]))
    if todo:
        taken = tier.requeue(kv.backend, todo)
        pending[[b for b, _, _ in todo[taken:]]] = True  # (no room, or the writes paused: a later use)


def restored(kv: KVPool, blocks: Seq[int]) -> None:
    """``blocks`` were restored from the store: not pending (they are there)."""
    w = kv.remote.losses
    if w.epoch and len(blocks):
        w.pending(kv.manager.pool)[np.asarray(blocks, dtype=np.int64)] = False
