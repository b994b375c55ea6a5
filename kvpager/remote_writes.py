"""`RemoteTier`'s writes: committed blocks' bytes copied into a bounded queue
on the caller's thread (a block that does not fit, or comes while the store
is unavailable, is dropped and counted), and the writer thread that seals
them (header, checksum) and sends them, pipelined ``SET NX`` with an expiry
(written over a key that holds anything but a string of a value's length:
`put_checked`, through which both stores' `Store.put_many` write), with the deletes of values found corrupt or of another
Redis type. The writer never touches pool state. A store that refuses
writes (full under ``noeviction``, a read-only replica, an ACL without
``SET``) pauses the writes only (``refusals["writes"]``): lookups and
deletes go on, blocks offered meanwhile are dropped before they are copied
(counted), and the refusal is logged once, not once a batch; one that
refuses ``DEL`` pauses the deletes only (``refusals["deletes"]``). A write
that fails otherwise (a timeout, a reset) pauses the writes and deletes
(``breakers["writes"]``), not the lookups. Blocks the store lost come back
through `RemoteWrites.requeue` (`kvpager.remote_republish`), whose check the
writer runs before a batch or when an allocate asks. What the writer sent,
wrote or dropped is counted with the queue it took it from, in one step."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.remote_errors import StoreError, store_error
from kvpager.remote_format import HEADER_BYTES, block_key
from kvpager.remote_republish import check_losses

log = logging.getLogger("kvpager.remote")

_BATCH_BYTES = 64 << 20  # most bytes the writer sends in one pipeline


class RemoteWrites:
    """Mixed into `RemoteTier`, which supplies ``store``, ``codec``, ``breakers``,
    ``refusals``, ``_allow``, ``_failed``, ``_answered``, ``ttl``,
    ``queue_bytes``, ``_prefix``, the queue (``_queue``, ``_deletes``,
    ``_queued_bytes``, ``_queued_blocks``, ``_busy``, ``_cond``, ``_closed``,
    ``_thread``), ``losses`` and the counters (``_n``, ``_count``)."""

    def offer(self, backend: Any, fresh: Seq[tuple[int, bytes, bytes]]) -> None:
        """Queue newly published blocks for writing: ``fresh`` = [(device block,
        root key, block key)]. Their bytes are copied now (``backend.read_blocks``),
        so the blocks may change once this returns; what does not fit in the
        queue, or comes while the store is unavailable, is dropped (counted)."""
        if fresh:
            self._enqueue(backend, fresh, True)

    def requeue(self, backend: Any, blocks: Seq[tuple[int, bytes, bytes]]) -> int:
        """Queue blocks published here before the store lost them, as `offer`
        does (`kvpager.remote_republish`): how many of the first were taken;
        the rest (no room, the writes paused) are not counted as dropped (they
        are offered again at a later use)."""
        taken = self._enqueue(backend, blocks, False)
        self._count(republished=taken)
        return taken

    def _enqueue(self, backend: Any, fresh: Seq[tuple[int, bytes, bytes]], count: bool) -> int:
        """Copy the first of ``fresh`` that fit into the queue; ``count``: the rest
        are dropped (counted). Returns how many were queued. An empty queue takes
        one block whatever ``queue_bytes`` (``--remote-queue``), as the restore
        cap restores one at least: a queue smaller than a value (``--remote-queue
        0``, or 4M for 5 MiB blocks) dropped every block, the tier silently writing
        nothing."""
        size = self.codec.value_bytes
        if self._closed or self.breakers["writes"].is_open() or self.refusals["writes"].is_open():
            if count:
                self._count(dropped_full=len(fresh))  # (closed: no writer would send them)
            return 0
        with self._cond:
            room = max((self.queue_bytes - self._queued_bytes) // size, 0 if self._queued_blocks else 1)
        take = fresh[: max(room, 0)]
        if count and len(take) < len(fresh):
            self._count(dropped_full=len(fresh) - len(take))
        if not take:
            return 0
        rows = np.empty((len(take), size), dtype=np.uint8)
        backend.read_blocks(np.fromiter((b for b, _, _ in take), np.int64, len(take)), rows[:, HEADER_BYTES:])
        names = [block_key(self._prefix, root, key) for _, root, key in take]
        with self._cond:
            self._queue.append((rows, names, [key for _, _, key in take]))
            self._queued_bytes += rows.nbytes
            self._queued_blocks += len(take)
            self._start()
            self._cond.notify()
        return len(take)

    def ask_check(self) -> None:
        """Have the writer check, now, that the store still holds what it wrote
        (`kvpager.remote_republish.check_losses`), off the caller's thread."""
        with self._cond:
            if not self._closed and not self.losses.asked:
                self.losses.asked = True
                self._start()
                self._cond.notify()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued write and delete has been sent (or dropped);
        False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._deletes or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._write_loop, name="kvpager-remote-writer", daemon=True)
            self._thread.start()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not (self._queue or self._deletes or self._closed or self.losses.asked):
                    self._cond.wait()
                if self._closed:  # close() gave flush its time: what is left is dropped
                    self._n["dropped_failed"] += self._queued_blocks
                    self._queue.clear()
                    self._deletes = []
                    self._queued_bytes = self._queued_blocks = 0
                    self._cond.notify_all()
                    return
                batch, nbytes = [], 0
                while self._queue and (not batch or nbytes + self._queue[0][0].nbytes <= _BATCH_BYTES):
                    item = self._queue.popleft()
                    batch.append(item)
                    nbytes += item[0].nbytes
                deletes, self._deletes = self._deletes, []
                blocks = sum(len(names) for _, names, _ in batch)
                due = self.losses.asked or time.monotonic() >= self.losses.due
                self.losses.asked = False
                self._busy = True
            sent = {"dropped_failed": blocks}  # (what an unexpected error leaves)
            try:
                if due:  # (before the batch: a loss it finds gets this batch's first block as its sentinel)
                    check_losses(self)
                sent = self._send(batch, deletes, blocks)
            except Exception as e:  # never let the writer die
                log.error("remote writer: unexpected error", exc_info=e)
            finally:  # counted with the queue they leave: `stats` never sees a block in both
                with self._cond:
                    for name, k in sent.items():
                        self._n[name] += k
                    self._queued_bytes -= nbytes
                    self._queued_blocks -= blocks
                    self._busy = False
                    self._cond.notify_all()

    def _send(self, batch: list[tuple[np.ndarray, list[str], list[bytes]]], deletes: list[str],
              count: int) -> dict[str, int]:
        """Send ``deletes`` and the ``count`` blocks of ``batch``; returns the
        counters to add (the caller adds them as it takes the batch off the queue)."""
        if deletes:
            self._delete(deletes)
        if not count:
            return {}
        if not self._allow("writes"):
            return {"dropped_failed": count}
        try:
            items = []
            for rows, names, keys in batch:
                for row, name, key in zip(rows, names, keys):
                    view = memoryview(row)
                    self.codec.seal(view, key)
                    items.append((name, view))
            new, replaced = self.store.put_many(items, self.ttl)
        except StoreError as e:
            self._failed("writes", "write", e)
            return {"write_errors": 1, "written": e.written, "dropped_failed": count - e.written}
        self._answered("writes")
        self.losses.wrote(self.store, (name for name, _ in items))
        return {"written": new + replaced, "replaced": replaced}

    def _delete(self, names: list[str]) -> None:
        """Delete values found refused, a kind of call of its own
        (``refusals["deletes"]``): a store full under ``noeviction`` refuses
        ``SET`` but takes ``DEL`` (which frees memory), so a refused value no
        longer waits for the writes to be taken again (it stayed there, refused
        and logged at every lookup, while the store was full), and a ``DEL``
        refused (an ACL without it, a replica) pauses the deletes, not the
        writes. Deletes skipped meanwhile are dropped: a lookup that meets the
        value again queues it again."""
        if not self._allow("deletes"):
            return
        try:
            self.store.delete(names)
        except StoreError as e:
            self._count(write_errors=1)
            self._failed("deletes", "delete", e)
            return
        self._answered("deletes")


def put_checked(pipeline: Callable[[], Any], items: Seq[tuple[str, Any]], ttl: int) -> tuple[int, int]:
    """`Store.put_many` through redis-py pipelines made by ``pipeline()``:
    ``SET key value NX EX ttl`` for every item; where a key existed, its
    ``STRLEN`` (a ``WRONGTYPE`` error for another type) and ``TYPE``; where
    that is not the value's length, ``SET key value EX ttl`` over it, unless
    the key is gone since (``TYPE`` none: evicted or expired after the
    ``SET NX``; it was counted corrupt and logged as "a string of 0 bytes"):
    ``SET NX`` again, a new key. One round trip when every key is new, at
    most three. Racing another writer of the same key is harmless: a key is
    only written over when it holds no value of this length, and both
    writers' values are valid for it. An error reply (``OOM``, ``READONLY``,
    ``NOPERM``, ...) is raised as `store_error` makes it, its ``written`` the
    keys stored before it (a full store takes some)."""
    ex = ttl or None
    pipe = pipeline()
    for key, value in items:
        pipe.set(key, value, nx=True, ex=ex)
    results = pipe.execute(raise_on_error=False)
    _raise_first(results, sum(r is True for r in results))
    taken = [item for item, r in zip(items, results) if not r]
    if not taken:
        return len(items), 0
    new = len(items) - len(taken)
    pipe = pipeline()
    for key, _ in taken:
        pipe.strlen(key)
        pipe.type(key)
    replies = pipe.execute(raise_on_error=False)
    _raise_first([r for r in replies if not (isinstance(r, Exception) and "WRONGTYPE" in str(r))], new)
    over: list[tuple[str, Any, str | None]] = []  # (key, value, what it held; None: nothing now)
    for (key, value), n, kind in zip(taken, replies[0::2], replies[1::2]):
        if isinstance(n, Exception):
            over.append((key, value, "another Redis type"))
        elif n == 0 and kind in ("none", b"none"):
            over.append((key, value, None))
        elif n != memoryview(value).nbytes:  # (0: an empty string)
            over.append((key, value, f"a string of {n} bytes"))
    if over:
        pipe = pipeline()
        for key, value, what in over:
            pipe.set(key, value, nx=what is None, ex=ex)
        results = pipe.execute(raise_on_error=False)
        _raise_first(results, new + sum(r is True for r in results))
        new += sum(r is True for (_, _, what), r in zip(over, results) if what is None)  # (else: written since)
        for key, _, what in over:
            if what is not None:
                log.warning("remote key %s held %s, no value of this pool: written over", key, what)
    return new, sum(what is not None for _, _, what in over)


def _raise_first(replies: Seq[Any], written: int) -> None:
    """Raise the first error reply of ``replies`` as `store_error` makes it, with
    ``written`` (keys stored meanwhile)."""
    for r in replies:
        if isinstance(r, Exception):
            e = store_error(r)
            e.written = written
            raise e
