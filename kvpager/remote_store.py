"""Stores for the remote prefix tier: one small interface, Redis / Valkey
(standalone and Redis Cluster) behind it, chosen by URL.

A store only moves bytes under string keys; what the bytes are and whether
they may be restored is `kvpager.remote_format`'s business. Every failure
(refused connection, timeout, a cluster without a node for a slot, a
protocol error) is raised as `StoreError`; the tier counts it and treats
the call as a miss. Nothing here retries: the tier's circuit breaker
decides when to try again, so an outage never adds a timeout to every
allocate.

URLs (``--remote``) and their checks: `kvpager.remote_url`. `Store.verify`
checks, at start, that the store takes what the tier sends.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.remote_access import (
    CONNECT_ROUND_TRIPS,
    bound_connects,
    check_limits,
    config_value,
    connect_refusal,
    connection_options,
    judge,
    plain_redis,
    redis_module,
    tls_only,
    untrusted_certificate,
)
from kvpager.remote_errors import UNREADABLE_REPLY
from kvpager.remote_errors import StoreError as StoreError  # re-exported: the tier's errors
from kvpager.remote_errors import StoreMisconfigured as StoreMisconfigured
from kvpager.remote_errors import StoreRefused as StoreRefused
from kvpager.remote_errors import store_error as store_error
from kvpager.remote_key_types import KEY_ABSENT as KEY_ABSENT  # what exists_many says, re-exported
from kvpager.remote_key_types import KEY_OTHER as KEY_OTHER
from kvpager.remote_key_types import KEY_STRING as KEY_STRING
from kvpager.remote_key_types import KEY_WRONG_LENGTH as KEY_WRONG_LENGTH
from kvpager.remote_key_types import key_types
from kvpager.remote_resp import ChunkedFetch, FetchError, lookup_deadline
from kvpager.remote_url import CLUSTER, STANDALONE, check_url, hide, nodes, redact
from kvpager.remote_writes import put_checked

log = logging.getLogger("kvpager.remote")


CONNECTIONS = 2  # a lookup's connections (docs/remote.md: measured)
CHUNK_BYTES = 4 << 20  # about the bytes of one GETRANGE pipeline of a lookup (docs/remote.md: measured)
CHECK_KEY = "access-check"  # after the tier's key prefix: the key `Store.verify` asks about (no block's name)


class Store(ABC):
    """Bytes under string keys. Calls from the daemon's loop thread (lookups)
    and the tier's writer thread (writes, deletes) may overlap: an
    implementation keeps separate connections for the two."""

    #: "redis" or "redis-cluster"
    kind: str = ""
    #: the URL without its password, for logs and stats
    url: str = ""

    @abstractmethod
    def get_many(self, keys: Seq[str], limit: int | None = None) -> list[bytes | None]:
        """The values of ``keys`` (None where absent or of another Redis type) in
        one round trip (one per node of a cluster). With ``limit``, at most
        ``limit + 1`` bytes of each (``GETRANGE``: a longer value is cut there;
        an empty one is None). Loop thread; bounded by the lookup timeout."""

    def get_into(self, keys: Seq[str], out: np.ndarray, sizes: np.ndarray,
                 done: Callable[[int, int], None] | None = None) -> None:
        """The values of ``keys`` into the rows of ``out`` ([len(keys), width]
        uint8, C-contiguous), their lengths into ``sizes`` (int64, -1 where
        absent, empty or of another Redis type, ``width + 1`` where longer: at
        most that many bytes of a value are read; a row holds its value only
        where the length is ``width``). ``done(lo, hi)`` may run on another
        thread as soon as rows ``lo..hi`` are in (here: once, at the end). Loop
        thread; bounded by the lookup timeout. This default copies what
        `get_many` returns."""
        sizes[:] = -1
        width = out.shape[1]
        for i, value in enumerate(self.get_many(keys, width)):
            if value is not None:
                sizes[i] = len(value)
                if len(value) == width:
                    out[i] = np.frombuffer(value, dtype=np.uint8)
        if done is not None and len(keys):
            done(0, len(keys))

    @abstractmethod
    def exists_many(self, keys: Seq[str], width: int | None = None) -> np.ndarray:
        """What the store holds under each of ``keys`` (int8 per key):
        `KEY_ABSENT`, `KEY_STRING` (a string, of ``width`` bytes where
        ``width`` is given: the value is not read), `KEY_WRONG_LENGTH` (with
        ``width``: a string of another length, an empty one included, which no
        lookup restores) or `KEY_OTHER` (another Redis type: a hash, list,
        set, ..., which no lookup can restore, since ``GETRANGE`` answers
        ``WRONGTYPE`` for it). One pipelined round trip (one per node of a
        cluster) that reads no value: ``TYPE`` per key, which leaves the keys'
        LRU / LFU clocks as they were, and with ``width`` a ``STRLEN`` per key
        too, which moves the clock of a string. Loop thread (the writer's for
        the sentinels of `kvpager.remote_republish`); bounded by the lookup
        timeout."""

    @abstractmethod
    def put_many(self, items: Seq[tuple[str, Any]], ttl: int) -> tuple[int, int]:
        """Store each (key, bytes-like value), expiring after ``ttl`` seconds
        (0: never), in one pipelined batch, unless the key holds a string of
        the value's length already (the same block, maybe computed elsewhere:
        left as it is). A key that holds anything else (another Redis type, a
        string of another length) is written over: ``SET NX`` alone would leave
        it there for good. Returns (keys that were new, keys written over).
        Writer thread."""

    @abstractmethod
    def delete(self, keys: Seq[str]) -> None:
        """Remove ``keys`` (values that failed their checks). Writer thread."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreError unless the store answers now."""

    def verify(self, prefix: str, value_bytes: int | None = None) -> list[str]:
        """Check, at start, that the store answers and takes every command the
        tier sends, asking about the key ``prefix`` + `CHECK_KEY` (no block's):
        StoreError if it does not answer (a warning: the daemon serves without
        it until it does), `StoreMisconfigured` naming what is wrong if it
        answers but the tier could never work with it (``value_bytes``: a
        value's length, checked against the store's limit where it tells);
        returns warnings (a read-only replica, a full store: writes refused
        for now). This default only pings."""
        self.ping()
        return []

    def eviction_policy(self) -> str | None:
        """The store's ``maxmemory-policy``, None where it does not tell (`RemoteTier.check`)."""
        return None

    def owners(self, keys: Iterable[str]) -> list[tuple[str, str | None]] | None:
        """Each of ``keys`` with the name of the node that holds its slot now (None
        where not known), for a store that spreads keys over nodes that may lose
        theirs apart (a Redis Cluster's masters: `kvpager.remote_republish` watches
        each); None, ``keys`` left unread, for a store that holds every key in one
        place. Writer thread."""
        return None

    def close(self) -> None:
        """Drop the connections."""


def open_store(url: str, timeout: float = 0.1, write_timeout: float = 2.0, *,
               connections: int = CONNECTIONS, chunk_bytes: int = CHUNK_BYTES) -> Store:
    """The store at ``url`` (see the module docstring). Nothing is contacted
    yet: an unreachable store is found by the first call (`Store.ping`,
    `Store.verify`). ``timeout``: seconds a lookup may wait for the store
    (connect and each read); ``write_timeout``: the same for the writer
    thread; ``connections``: connections (and threads) one lookup fetches
    over; ``chunk_bytes``: about how many bytes one pipeline of a lookup asks
    for. InvalidArgument for a URL of no known form or a bad setting."""
    if not isinstance(url, str) or "://" not in url:
        shown = hide(url) if isinstance(url, str) else url
        raise InvalidArgument(f"remote store URL must look like redis://HOST:PORT, got {shown!r}")
    for name, value in (("timeout", timeout), ("write_timeout", write_timeout)):
        if not isinstance(value, (int, float)) or not 0 < value < 3600:
            raise InvalidArgument(f"remote store {name} must be a positive number of seconds, got {value!r}")
    for name, value, top in (("connections", connections, 64), ("chunk_bytes", chunk_bytes, 1 << 30)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise InvalidArgument(f"remote store {name} must be an integer in [1, {top}], got {value!r}")
    scheme = url.split("://", 1)[0].lower()
    if scheme in STANDALONE:
        check_url(url, STANDALONE[scheme], False)
        return RedisStore(url, STANDALONE[scheme], timeout, write_timeout, connections, chunk_bytes)
    if scheme in CLUSTER:
        from kvpager.remote_cluster import RedisClusterStore

        check_url(url, CLUSTER[scheme], True)
        return RedisClusterStore(url, CLUSTER[scheme], timeout, write_timeout, chunk_bytes)
    known = ", ".join(f"{s}://" for s in [*STANDALONE, *CLUSTER])
    raise InvalidArgument(f"remote store URL {redact(url)!r}: unknown scheme {scheme!r} (known: {known})")


def _ranges(replies: Seq[Any]) -> list[bytes | None]:
    """Pipelined ``GETRANGE`` replies as `Store.get_many` answers: an empty string
    (an absent key, or an empty value) or another Redis type (``WRONGTYPE``)
    is None; another error reply is raised."""
    out: list[bytes | None] = []
    for r in replies:
        if isinstance(r, Exception):
            if "WRONGTYPE" not in str(r):
                raise r
            r = None
        out.append(r or None)
    return out


def cluster_reply(r: Any) -> bool:
    """Is ``r`` an error reply only a Redis Cluster node gives (``CROSSSLOT``,
    ``ASK``, ``MOVED``)? redis-py 6 and later parse them on a plain connection
    as cluster errors, 5.x as plain ``ResponseError``s named by their first
    word: `RedisStore.verify` named a cluster node given as ``redis://`` under
    the first only, and under 5.x let the tier run with every call failing."""
    exc = redis_module().exceptions
    if isinstance(r, (exc.ClusterCrossSlotError, exc.AskError)):  # (MovedError is an AskError)
        return True
    return isinstance(r, exc.ResponseError) and str(r).startswith(("CROSSSLOT ", "ASK ", "MOVED "))


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return key_slot(key.encode())


class RedisStore(Store):
    """A standalone Redis or Valkey server: lookups as chunked ``GETRANGE``
    pipelines over ``connections`` connections, read straight into the
    caller's buffer (`kvpager.remote_resp`); probes as pipelined ``TYPE`` on one
    of them; pipelined ``SET NX EX`` for writes (`put_checked`). The lookup
    connections and the writer's are separate pools."""

    kind = "redis"

    def __init__(self, url: str, scheme: str, timeout: float, write_timeout: float,
                 connections: int = CONNECTIONS, chunk_bytes: int = CHUNK_BYTES):
        redis = redis_module()
        self.url = redact(url)
        self._scheme, self._timeout = scheme, timeout
        real = scheme + url[url.index("://") :]
        self._node = None if scheme == "unix" else nodes(urllib.parse.urlsplit(real).netloc, url)[0]
        unix = {"socket_keepalive"} if scheme == "unix" else set()  # a Unix socket takes no keepalive

        def options(seconds: float) -> dict[str, Any]:
            return {k: v for k, v in connection_options(redis, seconds).items() if k not in unix}

        try:
            self._reader = redis.Redis.from_url(real, **options(timeout))
            self._writer = redis.Redis.from_url(real, **options(write_timeout))
            # Raw reads need the socket of a redis-py connection (a private attribute, there
            # from 5.3 on); a release without it gets redis-py's own replies, copied (slower).
            pool = self._reader.connection_pool
            self.raw_reads = "_sock" in vars(pool.connection_class(**pool.connection_kwargs))
            for client, seconds in ((self._reader, timeout), (self._writer, write_timeout)):
                bound_connects(client.connection_pool, CONNECT_ROUND_TRIPS * seconds)
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"remote store URL {self.url!r}: {e}") from None
        self._errors = (redis.RedisError, OSError, *UNREADABLE_REPLY)
        self._fetch = ChunkedFetch(self._acquire, self._release, self._send, connections, chunk_bytes, timeout)
        if not self.raw_reads:
            log.warning("this redis-py (%s) keeps no socket where kvpager reads it: lookups go through "
                        "redis-py's replies (slower restores)", getattr(redis, "__version__", "?"))

    def get_many(self, keys: Seq[str], limit: int | None = None) -> list[bytes | None]:
        if not len(keys):
            return []
        try:
            if limit is None:
                return self._reader.mget(keys)
            pipe = self._reader.pipeline(transaction=False)
            for k in keys:
                pipe.getrange(k, 0, limit)
            return _ranges(pipe.execute(raise_on_error=False))
        except self._errors as e:
            raise store_error(e) from None

    def get_into(self, keys: Seq[str], out: np.ndarray, sizes: np.ndarray,
                 done: Callable[[int, int], None] | None = None) -> None:
        if not self.raw_reads:
            return super().get_into(keys, out, sizes, done)
        try:
            self._fetch.run(keys, out, sizes, done)
        except FetchError as e:
            raise store_error(e) from None

    def exists_many(self, keys: Seq[str], width: int | None = None) -> np.ndarray:
        if not len(keys):
            return np.zeros(0, dtype=np.int8)
        try:
            conn, sock = self._acquire()
        except self._errors as e:
            raise store_error(e) from None
        broken = True
        try:
            out = key_types(sock, keys, lookup_deadline(self._timeout, 16 * len(keys)), width)
            broken = False
            return out
        except (FetchError, *self._errors) as e:
            raise store_error(e) from None
        finally:
            self._release(conn, broken)

    # a lookup connection: redis-py's (connected, authenticated), read raw; its
    # parser has nothing buffered, as every reply on it was read whole
    # (a connection left with part of one is dropped). redis >= 5.3.
    def _acquire(self) -> tuple[Any, Any]:
        pool = self._reader.connection_pool
        conn = pool.get_connection()
        try:
            if conn._sock is None:
                conn.connect()
        except BaseException:
            self._release(conn, True)
            raise
        return conn, conn._sock

    def _release(self, conn: Any, broken: bool) -> None:
        if broken:
            with contextlib.suppress(Exception):
                conn.disconnect()
        self._reader.connection_pool.release(conn)

    @staticmethod
    def _send(conn: Any, data: bytes) -> None:
        conn.send_packed_command([data], check_health=False)

    def put_many(self, items: Seq[tuple[str, Any]], ttl: int) -> tuple[int, int]:
        try:
            return put_checked(lambda: self._writer.pipeline(transaction=False), items, ttl)
        except self._errors as e:
            raise store_error(e) from None

    def delete(self, keys: Seq[str]) -> None:
        try:
            self._writer.delete(*keys)
        except self._errors as e:
            raise store_error(e) from None

    def ping(self) -> None:
        try:
            self._reader.ping()
        except self._errors as e:
            raise store_error(e) from None

    def verify(self, prefix: str, value_bytes: int | None = None) -> list[str]:
        redis = redis_module()
        key = prefix + CHECK_KEY
        other = next(f"{key}:{i}" for i in range(64) if _slot(f"{key}:{i}") != _slot(key))
        # what the tier sends, about a key no block has (SET XX of an absent key stores
        # nothing); DEL of two keys in two slots: a node of a cluster answers CROSSSLOT
        asked = [("GETRANGE", key, 0, 0), ("TYPE", key), ("STRLEN", key), ("SET", key, b"", "XX"),
                 ("DEL", key, other)]
        pipe = self._reader.pipeline(transaction=False)
        for command in asked:
            pipe.execute_command(*command)
        try:
            replies = pipe.execute(raise_on_error=False)
        except self._errors as e:  # connecting (AUTH, CLIENT SETNAME, SELECT) or sending
            refused = isinstance(e, redis.AuthenticationError) or isinstance(store_error(e), StoreRefused)
            if refused:
                raise StoreMisconfigured(f"remote store {self.url}: {connect_refusal(e)}") from None
            if (why := untrusted_certificate(e)) is not None:
                raise StoreMisconfigured(f"remote store {self.url}: {why}") from None
            if self._scheme == "rediss" and self._node is not None and plain_redis(*self._node, self._timeout):
                raise StoreMisconfigured(f"remote store {self.url}: {self._node[0]}:{self._node[1]} answers "
                                         "without TLS; use redis:// (or enable TLS on the server)") from None
            if self._scheme == "redis" and self._node is not None and tls_only(*self._node, self._timeout):
                raise StoreMisconfigured(f"remote store {self.url}: {self._node[0]}:{self._node[1]} answers only "
                                         "TLS; use rediss:// (with ssl_ca_certs=PATH for a private CA)") from None
            raise store_error(e) from None
        for command, r in zip(asked, replies):
            if cluster_reply(r):
                raise StoreMisconfigured(f"remote store {self.url} is a node of a Redis Cluster ({command[0]} "
                                         f"answered {type(r).__name__}: {r}); use redis+cluster://")
        warnings = judge(self.url, [command[0] for command in asked], replies)
        if value_bytes is not None:
            check_limits(self.url, self._reader, value_bytes, self._fetch.chunk_bytes)
        return warnings

    def eviction_policy(self) -> str | None:
        return config_value(self._reader, "maxmemory-policy")

    def close(self) -> None:
        self._fetch.close()
        for client in (self._reader, self._writer):
            with contextlib.suppress(Exception):
                client.close()
