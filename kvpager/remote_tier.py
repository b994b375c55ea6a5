"""`RemoteTier`: committed prefix blocks in a shared store (Redis / Valkey),
so a daemon on another host restores them instead of its worker recomputing.

- Lookups run on the caller's thread (the daemon's loop), one pipelined
  batch per allocate, bounded by a short timeout. Any failure is a miss:
  it is counted, logged once per outage, and opens a circuit breaker so the
  next lookups skip the store (no timeout added to every allocate) until a
  retry after a growing pause (``retry_after`` doubling up to 30 s) succeeds.
  Reads (lookups, probes) and writes (writes, deletes: the writer's thread,
  its own connections and timeout) have a breaker each (``breakers``): a
  store too slow to take writes still serves the restores it answers (one
  writer timeout skipped every lookup for the pause). A call the store
  answers but refuses (`StoreRefused`: ``NOPERM``, ``OOM``, ``READONLY``,
  ...) pauses only its kind (lookups, probes, writes or the deletes of
  refused values: a breaker each), so a full store or a replica still
  serves lookups, and a full store still deletes.
- `check` (at start): the store answers and takes every command the tier
  sends, or `StoreMisconfigured` says what is wrong.
- Writes never block the caller: committed blocks' bytes are copied into a
  bounded queue (``queue_bytes``; a block that does not fit is dropped and
  counted) and a writer thread seals (header, checksum) and sends them,
  pipelined ``SET NX`` with an expiry, written over a key that holds
  anything but a string of a value's length. The writer never touches pool
  state.
- Probes (`exists`, for `KVPool.cached_tokens`) ask which keys hold a string
  of a value's length, one pipelined ``TYPE`` and ``STRLEN`` batch behind the
  same breaker and timeout, reading no value (none while the lookups are
  refused: no allocate would restore them); a key of another Redis type or a
  string of another length (an empty one: a lookup misses it, never refusing
  it) is counted and deleted.
- Values are checked before they are restored (`kvpager.remote_format`); a
  bad one is counted, deleted from the store and treated as a miss.
- A store that lost what the tier wrote (a restart without persistence,
  ``FLUSHALL``, eviction, expiry) is noticed and the blocks cached here are
  written again as allocates use them (`kvpager.remote_republish`).
- The counters are updated and read under the queue's lock: pools sharing
  the tier may each be driven by a thread of its own, and the writer counts
  what it sent with the queue it took it from, so `stats` is one moment.

A tier serves one pool geometry: `KVPool` attaches it (`attach`). The write
side (queue and writer thread) is `kvpager.remote_writes`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.remote_access import ttl_warning
from kvpager.remote_breaker import MAX_PAUSE, Breakers
from kvpager.remote_format import (
    FORMAT_VERSION,
    HEADER_BYTES,
    BadValue,
    Codec,
    block_key,
    check_namespace,
    key_prefix,
)
from kvpager.remote_republish import CHECK_EVERY, Losses
from kvpager.remote_store import (
    CHUNK_BYTES,
    CONNECTIONS,
    KEY_OTHER,
    KEY_STRING,
    KEY_WRONG_LENGTH,
    Store,
    StoreError,
    open_store,
)
from kvpager.remote_writes import RemoteWrites
from kvpager.spec import PoolSpec
from kvpager.types import RemoteStats

log = logging.getLogger("kvpager.remote")

#: the tier's counters (`RemoteTier.stats`), all under the queue's lock (`RemoteTier._count`)
COUNTERS = ("lookups", "lookup_blocks", "hits", "skipped", "restored", "lookup_errors", "corrupt", "dropped_full",
            "probes", "probe_blocks", "probe_hits", "skipped_probes", "written", "write_errors", "dropped_failed",
            "replaced", "losses", "republished")

#: the longest block TTL (about 68 years): Redis refuses a SET whose expiry in milliseconds
#: past its clock overflows, so a larger one (10**16, "forever") stored nothing, every write refused
MAX_TTL = (1 << 31) - 1


class RemoteTier(RemoteWrites, Breakers):
    """The remote prefix tier over ``store`` (a `Store` or a URL for `open_store`).

    ``timeout``: seconds a lookup may wait for the store; ``ttl``: seconds a
    block lives in the store (0: until the store evicts it);
    ``queue_bytes``: bytes of blocks waiting to be written, past which new
    ones are dropped (an empty queue takes one block, whatever its size); ``retry_after``: the first pause after a failure;
    ``max_restore_bytes``: most bytes one allocate may restore (the lookup and
    the restore run on the caller's thread: the daemon's loop waits for them);
    ``connections`` and ``chunk_bytes``: how a URL's store splits a lookup
    (`open_store`); ``namespace``: the model the blocks belong to, in every key
    (`kvpager.remote_format`): daemons of two models of one geometry (a model
    and its fine-tune) that share a store find each other's blocks only under
    one namespace (or salt), and would restore each other's K/V without;
    ``check_every``: most seconds between two checks that the store still
    holds what the tier wrote (`kvpager.remote_republish`)."""

    def __init__(self, store: Store | str, *, timeout: float = 0.1, ttl: int = 86400,
                 queue_bytes: int = 256 << 20, retry_after: float = 1.0,
                 max_restore_bytes: int = 256 << 20, connections: int = CONNECTIONS,
                 chunk_bytes: int = CHUNK_BYTES, namespace: str | None = None,
                 check_every: float = CHECK_EVERY):
        for name, value in (("ttl", ttl), ("queue_bytes", queue_bytes), ("max_restore_bytes", max_restore_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"remote {name} must be a non-negative integer, got {value!r}")
        if ttl > MAX_TTL:  # (Redis refuses every SET with an expiry past its clock's range: nothing stored)
            raise InvalidArgument(f"remote ttl must be at most {MAX_TTL} seconds (0: no expiry), got {ttl}")
        if not isinstance(retry_after, (int, float)) or not 0 < retry_after <= MAX_PAUSE:
            raise InvalidArgument(f"remote retry_after must be in (0, {MAX_PAUSE}] seconds, got {retry_after!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, (int, float)) or not 0 < check_every <= 3600:
            raise InvalidArgument(f"remote check_every must be in (0, 3600] seconds, got {check_every!r}")
        #: the model these blocks belong to (`kvpager.remote_format.check_namespace`), in every key
        self.namespace = check_namespace(namespace)
        self.store = open_store(store, timeout, connections=connections, chunk_bytes=chunk_bytes) \
            if isinstance(store, str) else store
        self.ttl, self.queue_bytes, self.max_restore_bytes = ttl, queue_bytes, max_restore_bytes
        self._guard(float(retry_after))  # the breakers (`Breakers`)
        self.codec: Codec | None = None
        self._prefix = ""
        self._ranks = 1
        # fetched values, kept for the next lookup: a buffer per calling thread (`_rows`)
        self._local = threading.local()
        self._n = dict.fromkeys(COUNTERS, 0)  # the counters (`_count`)
        self.losses = Losses(float(check_every))  # the store losing what was written (`remote_republish`)
        # the queue: (rows [n, value_bytes] uint8, names, block keys); deletes: names
        self._queue: collections.deque[tuple[np.ndarray, list[str], list[bytes]]] = collections.deque()
        self._deletes: list[str] = []
        self._queued_bytes = self._queued_blocks = 0
        self._busy = False
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._users = 0  # pools attached and not closed: the last one's close closes the tier

    # -- wiring -----------------------------------------------------------------------
    def attach(self, spec: PoolSpec, ranks: int = 1) -> None:
        """Serve pools of ``spec``'s geometry split over ``ranks`` tensor-parallel
        ranks (a tier serves one geometry)."""
        old = self.codec.spec if self.codec is not None else spec
        if key_prefix(old) != key_prefix(spec) or (self.codec is not None and self._ranks != ranks):
            raise InvalidArgument("this RemoteTier already serves a pool of another geometry")
        if self._closed:
            raise InvalidArgument("this RemoteTier is closed (its writer stopped, its connections dropped); "
                                  "make a new one")
        self._prefix = key_prefix(spec, ranks, self.namespace)
        self.codec = Codec(spec, self._prefix)
        self._ranks = ranks
        self._users += 1

    def detach(self) -> None:
        """A pool that `attach`-ed is closing: the tier closes with the last of them
        (before, the first pool's close closed it under the others, whose commits then
        queued writes no writer would send)."""
        self._users = max(self._users - 1, 0)
        if not self._users:
            self.close()

    def describe(self) -> dict[str, Any]:
        """What hello tells clients: the store's kind and URL (no password);
        ``probe``: ``cached_tokens`` counts the tier and takes ``remote`` and
        ``remote_tokens``."""
        return {"kind": self.store.kind, "url": self.store.url, "ttl": self.ttl, "probe": True,
                "namespace": self.namespace}

    def check(self, spec: PoolSpec | None = None) -> str | None:
        """At start: None if the store answers now and takes every command the
        tier sends (`Store.verify`, about a key no block has), else why it does
        not answer (for a warning: the daemon serves without it until it
        does). `kvpager.remote_store.StoreMisconfigured` (an InvalidArgument)
        where it answers but the tier could never work with it: credentials
        refused, a DB past the server's, commands an ACL user may not run, a
        cluster node given as a standalone store or the other way, TLS asked
        of a server without it, a value longer than the store takes
        (``spec``: the pool's, where the tier is not attached yet). A store
        that takes no writes for now (a read-only replica, full) is logged, and
        so is a ``volatile-*`` eviction policy with ttl 0 (`ttl_warning`)."""
        spec = self.codec.spec if self.codec is not None else spec
        prefix = self._prefix or (key_prefix(spec, 1, self.namespace) if spec is not None
                                  else f"kvpager:v{FORMAT_VERSION}:")
        try:
            warnings = self.store.verify(prefix, Codec(spec).value_bytes if spec is not None else None)
        except StoreError as e:
            self._count(lookup_errors=1)
            self.breakers["reads"].failure("ping", e)  # (the writer finds out by itself, off the loop)
            return str(e)
        if (why := ttl_warning(self.store.eviction_policy(), self.ttl)) is not None:
            warnings.append(why)
        for warning in warnings:
            log.warning("remote store %s: %s", self.store.url, warning)
        return None

    def _count(self, **counts: int) -> None:
        """Add ``counts`` to the counters, under the queue's lock: pools sharing
        the tier may each be driven by a thread of its own (an unguarded ``+=``
        may lose an update), and `stats` reads them all at one moment."""
        with self._cond:
            n = self._n
            for name, k in counts.items():
                n[name] += k

    def key(self, root: bytes, key: bytes) -> str:
        """The store key of block ``key`` under the salt whose root key is ``root``."""
        return block_key(self._prefix, root, key)

    # -- lookups (the caller's thread) ----------------------------------------------------
    def fetch(self, wants: Seq[tuple[bytes, bytes]]) -> dict[bytes, memoryview]:
        """Payloads of the blocks ``wants`` = [(root key, block key)] found in the
        store and valid, by block key: views of the calling thread's staging
        buffer, valid until its next fetch. Never raises: a failure is an empty
        answer."""
        if not wants:
            return {}
        if self._closed or not self._allow("lookups"):
            self._count(skipped=1)
            return {}
        codec = self.codec
        width = codec.value_bytes
        wants = wants[: self.most_blocks()]
        names = [block_key(self._prefix, root, key) for root, key in wants]
        self._count(lookups=1, lookup_blocks=len(names))
        rows = self._rows(len(names), width)
        flat = memoryview(rows).cast("B")
        payloads: list[memoryview | None] = [None] * len(names)
        refused: list[str | None] = [None] * len(names)

        def check(lo: int, hi: int) -> None:  # on a fetching thread, as each chunk arrives
            for i in range(lo, hi):
                if sizes[i] == width:
                    try:
                        payloads[i] = codec.open(flat[i * width : (i + 1) * width], wants[i][1])
                    except BadValue as e:
                        refused[i] = str(e)
                elif sizes[i] > width:
                    refused[i] = f"longer than {width} bytes"
                elif sizes[i] >= 0:
                    refused[i] = f"{sizes[i]} bytes, expected {width}"

        sizes = np.full(len(names), -1, dtype=np.int64)
        try:
            self.store.get_into(names, rows, sizes, check)
        except StoreError as e:
            self._count(lookup_errors=1)
            self._failed("lookups", "lookup", e)
            return {}
        except Exception as e:  # a client bug must not fail the allocate either
            self._count(lookup_errors=1)
            self.breakers["reads"].failure("lookup", e)
            log.error("unexpected error from the remote store", exc_info=e)
            return {}
        self._answered("lookups")
        found = {key: p for (_, key), p in zip(wants, payloads) if p is not None}
        self._condemn([(name, why) for name, why in zip(names, refused) if why is not None])
        self._count(hits=len(found))
        return found

    def _condemn(self, bad: list[tuple[str, str]]) -> None:
        """Keys found holding no value this pool could restore, (name, why):
        counted (``corrupt_blocks``), logged, and queued for the writer to
        delete, so the next commit of that block stores it (the namespace is
        kvpager's). Loop thread."""
        if not bad or self._closed:
            return
        for name, why in bad:
            log.warning("remote block %s refused: %s; deleting it", name, why)
        with self._cond:
            self._n["corrupt"] += len(bad)
            self._deletes += [name for name, _ in bad]
            self._start()
            self._cond.notify()

    def most_blocks(self) -> int:
        """Most blocks one allocate may restore: ``max_restore_bytes`` of values
        (at least one); a lookup asks for the first this many it misses."""
        return max(1, self.max_restore_bytes // self.codec.value_bytes)

    def exists(self, wants: Seq[tuple[bytes, bytes]]) -> set[bytes]:
        """The block keys of ``wants`` = [(root key, block key)] under which the
        store holds a string of a value's length, among the first `most_blocks`
        (as `fetch` would ask for them): one pipelined round trip of ``TYPE``
        and ``STRLEN``, no value read, nothing changed here but the probe
        counters, except that a key of another Redis type (which ``GETRANGE``
        answers ``WRONGTYPE`` for) or a string of another length does not
        count and is counted and deleted as `fetch` deletes a refused value.
        Before, any string counted: an empty one, which `fetch` misses as an
        absent key (``GETRANGE`` answers both with an empty string), neither
        refusing nor deleting it, counted at every probe while no allocate
        restored it, until that block was committed again. A value refused by
        `fetch` (its checksum, header) counts here: the probe reads no value.
        Never raises: a failure (counted, as
        in `fetch`, and opening the breaker) or an open breaker is an empty
        answer, and so is a pause of the lookups (``refusals["lookups"]``
        open: the store refused ``GETRANGE``): the allocate's `fetch` would
        skip the store, so no key it holds would be restored (the probe
        counted them while an ACL user lacked ``GETRANGE``)."""
        if not wants:
            return set()
        if self._closed or self.refusals["lookups"].is_open() or not self._allow("probes"):
            self._count(skipped_probes=1)
            return set()
        wants = wants[: self.most_blocks()]
        self._count(probes=1, probe_blocks=len(wants))
        names = [block_key(self._prefix, root, key) for root, key in wants]
        try:
            held = self.store.exists_many(names, self.codec.value_bytes)
        except StoreError as e:
            self._count(lookup_errors=1)
            self._failed("probes", "probe", e)
            return set()
        except Exception as e:  # a client bug must not fail the probe either
            self._count(lookup_errors=1)
            self.breakers["reads"].failure("probe", e)
            log.error("unexpected error from the remote store", exc_info=e)
            return set()
        self._answered("probes")
        codes = held.tolist()
        found = {key for (_, key), c in zip(wants, codes) if c == KEY_STRING}
        self._condemn([(name, "another Redis type" if c == KEY_OTHER else "a string of another length")
                       for name, c in zip(names, codes) if c in (KEY_OTHER, KEY_WRONG_LENGTH)])
        self._count(probe_hits=len(found))
        return found

    def _rows(self, n: int, width: int) -> np.ndarray:
        """``n`` staging rows of ``width`` bytes, the calling thread's. The
        buffer is kept (at most ``max_restore_bytes`` and a value): faulting in
        fresh pages for every lookup would cost a tenth of a restore. One per
        thread: pools that share the tier may each be driven by a thread of its
        own, and with one buffer a thread's lookup overwrote the values another
        thread was checking (a good value refused and deleted) or restoring
        (another block's K/V restored)."""
        staging = getattr(self._local, "staging", None)
        if staging is None or staging.shape[1] != width or len(staging) < n:
            staging = self._local.staging = np.empty((n, width), dtype=np.uint8)
        return staging[:n]

    def restored(self, n: int) -> None:
        """``n`` blocks were restored from the last fetch (for the counters)."""
        self._count(restored=n)

    # -- inspection and shutdown -------------------------------------------------------------
    def stats(self) -> RemoteStats:
        """The counters at one moment (read under the lock they are updated under);
        ``available``: the lookups are not skipped (neither the reads' breaker nor
        the lookups' refusal is open)."""
        size = self.codec.value_bytes if self.codec is not None else 0
        with self._cond:
            n = dict(self._n)
            queued_blocks, queued_bytes = self._queued_blocks, self._queued_bytes
        available = not (self.breakers["reads"].is_open() or self.refusals["lookups"].is_open())
        return RemoteStats(
            store=self.store.url, available=available, lookups=n["lookups"],
            lookup_blocks=n["lookup_blocks"], hit_blocks=n["hits"], restored_blocks=n["restored"],
            restored_bytes=n["restored"] * (size - HEADER_BYTES), skipped_lookups=n["skipped"],
            errors=n["lookup_errors"] + n["write_errors"], corrupt_blocks=n["corrupt"] + n["replaced"],
            queued_blocks=queued_blocks, queued_bytes=queued_bytes, written_blocks=n["written"],
            written_bytes=n["written"] * size, dropped_blocks=n["dropped_full"] + n["dropped_failed"],
            probes=n["probes"], probe_blocks=n["probe_blocks"], probe_hit_blocks=n["probe_hits"],
            skipped_probes=n["skipped_probes"], store_losses=n["losses"], republished_blocks=n["republished"],
        )

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), stop the writer,
        drop the connections."""
        if self._closed:
            return
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(Exception):
            self.store.close()
