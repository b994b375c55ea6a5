"""Stores for the remote prefix tier: one small interface, Redis / Valkey
(standalone and Redis Cluster) behind it, chosen by URL.

A store only moves bytes under string keys; what the bytes are and whether
they may be restored is `kvpager.remote_format`'s business. Every failure
(refused connection, timeout, a cluster without a node for a slot, a
protocol error) is raised as `StoreError`; the tier counts it and treats
the call as a miss. Nothing here retries: the tier's circuit breaker
decides when to try again, so an outage never adds a timeout to every
allocate.

URLs (``--remote``):
- ``redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`` (port 6379 if none; an IPv6
  address in brackets), ``rediss://...`` (TLS),
  ``unix:///PATH.sock[?db=N]``; ``valkey://`` and ``valkeys://`` are the same;
- ``redis+cluster://HOST:PORT[,HOST:PORT...]`` (``rediss+cluster://``,
  ``valkey+cluster://``): a Redis Cluster, found from any of those nodes.
"""

from __future__ import annotations

import contextlib
import logging
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.remote_resp import KEY_ABSENT as KEY_ABSENT  # what exists_many says, re-exported
from kvpager.remote_resp import KEY_OTHER as KEY_OTHER
from kvpager.remote_resp import KEY_STRING as KEY_STRING
from kvpager.remote_resp import ChunkedFetch, FetchError, key_types

_STANDALONE = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss", "unix": "unix"}
_CLUSTER = {"redis+cluster": "redis", "rediss+cluster": "rediss", "valkey+cluster": "redis",
            "valkeys+cluster": "rediss"}

log = logging.getLogger("kvpager.remote")


CONNECTIONS = 2  # a lookup's connections (docs/remote.md: measured)
CHUNK_BYTES = 4 << 20  # about the bytes of one MGET of a lookup (docs/remote.md: measured)


class StoreError(Exception):
    """A store call failed (connection, timeout, cluster or protocol error)."""


class Store(ABC):
    """Bytes under string keys. Calls from the daemon's loop thread (lookups)
    and the tier's writer thread (writes, deletes) may overlap: an
    implementation keeps separate connections for the two."""

    #: "redis" or "redis-cluster"
    kind: str = ""
    #: the URL without its password, for logs and stats
    url: str = ""

    @abstractmethod
    def get_many(self, keys: Seq[str]) -> list[bytes | None]:
        """The values of ``keys`` (None where absent) in one round trip (one per
        node of a cluster). Loop thread; bounded by the lookup timeout."""

    def get_into(self, keys: Seq[str], out: np.ndarray, sizes: np.ndarray,
                 done: Callable[[int, int], None] | None = None) -> None:
        """The values of ``keys`` into the rows of ``out`` ([len(keys), width]
        uint8, C-contiguous), their lengths into ``sizes`` (int64, -1 where
        absent; a row holds its value only where the length is ``width``).
        ``done(lo, hi)`` may run on another thread as soon as rows ``lo..hi``
        are in (here: once, at the end). Loop thread; bounded by the lookup
        timeout. This default copies what `get_many` returns."""
        sizes[:] = -1
        width = out.shape[1]
        for i, value in enumerate(self.get_many(keys)):
            if value is not None:
                sizes[i] = len(value)
                if len(value) == width:
                    out[i] = np.frombuffer(value, dtype=np.uint8)
        if done is not None and len(keys):
            done(0, len(keys))

    @abstractmethod
    def exists_many(self, keys: Seq[str]) -> np.ndarray:
        """What the store holds under each of ``keys`` (int8 per key):
        `KEY_ABSENT`, `KEY_STRING` (a string of any length: the value is not
        read) or `KEY_OTHER` (another Redis type: a hash, list, set, ...,
        which no lookup can restore, since ``MGET`` / ``GET`` answer nil or an
        error for it). One pipelined round trip (one per node of a cluster)
        that reads no value and leaves the keys' LRU / LFU clocks as they were.
        Loop thread; bounded by the lookup timeout."""

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

    def close(self) -> None:
        """Drop the connections."""


def redact(url: str) -> str:
    """``url`` without a password (``redis://:***@host:6379``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _nodes(netloc: str, url: str) -> list[tuple[str, int]]:
    """HOST[:PORT][,HOST[:PORT]...] after any credentials, each checked (port
    6379 if none; an IPv6 address in brackets)."""
    hosts = netloc.rsplit("@", 1)[-1]
    out = []
    for item in hosts.split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if not sep or host.endswith("[") or (item.startswith("[") and not host.endswith("]")):
            host, port = item, "6379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"remote store URL {redact(url)!r}: {item!r} is not HOST:PORT")
        out.append((host, int(port)))
    return out


def open_store(url: str, timeout: float = 0.1, write_timeout: float = 2.0, *,
               connections: int = CONNECTIONS, chunk_bytes: int = CHUNK_BYTES) -> Store:
    """The store at ``url`` (see the module docstring). Nothing is contacted
    yet: an unreachable store is found by the first call (`Store.ping`).
    ``timeout``: seconds a lookup may wait for the store (connect and each
    read); ``write_timeout``: the same for the writer thread;
    ``connections``: connections (and threads) one lookup fetches over;
    ``chunk_bytes``: about how many bytes one ``MGET`` of a lookup asks for.
    InvalidArgument for a URL of no known form or a bad setting."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidArgument(f"remote store URL must look like redis://HOST:PORT, got {url!r}")
    for name, value in (("timeout", timeout), ("write_timeout", write_timeout)):
        if not isinstance(value, (int, float)) or not 0 < value < 3600:
            raise InvalidArgument(f"remote store {name} must be a positive number of seconds, got {value!r}")
    for name, value, top in (("connections", connections, 64), ("chunk_bytes", chunk_bytes, 1 << 30)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= top:
            raise InvalidArgument(f"remote store {name} must be an integer in [1, {top}], got {value!r}")
    scheme = url.split("://", 1)[0].lower()
    if scheme in _STANDALONE:
        return RedisStore(url, _STANDALONE[scheme], timeout, write_timeout, connections, chunk_bytes)
    if scheme in _CLUSTER:
        from kvpager.remote_cluster import RedisClusterStore

        return RedisClusterStore(url, _CLUSTER[scheme], timeout, write_timeout)
    known = ", ".join(f"{s}://" for s in [*_STANDALONE, *_CLUSTER])
    raise InvalidArgument(f"remote store URL {redact(url)!r}: unknown scheme {scheme!r} (known: {known})")


def put_checked(pipeline: Callable[[], Any], items: Seq[tuple[str, Any]], ttl: int) -> tuple[int, int]:
    """`Store.put_many` through redis-py pipelines made by ``pipeline()``:
    ``SET key value NX EX ttl`` for every item; where a key existed, its
    ``STRLEN`` (a ``WRONGTYPE`` error for another type); where that is not the
    value's length, ``SET key value EX ttl`` over it. One round trip when every
    key is new, at most three. Racing another writer of the same key is
    harmless: a key is only written over when it holds no value of this
    length, and both writers' values are valid for it."""
    ex = ttl or None
    pipe = pipeline()
    for key, value in items:
        pipe.set(key, value, nx=True, ex=ex)
    taken = [item for item, r in zip(items, pipe.execute()) if not r]
    if not taken:
        return len(items), 0
    pipe = pipeline()
    for key, _ in taken:
        pipe.strlen(key)
    over: list[tuple[str, Any, str]] = []  # (key, value, what it held)
    for (key, value), n in zip(taken, pipe.execute(raise_on_error=False)):
        if isinstance(n, Exception):
            if "WRONGTYPE" not in str(n):
                raise n  # NOPERM and the like: the call fails as any other would
            over.append((key, value, "another Redis type"))
        elif n != memoryview(value).nbytes:  # 0: an empty string, or gone since (counted the same)
            over.append((key, value, f"a string of {n} bytes"))
    if over:
        pipe = pipeline()
        for key, value, _ in over:
            pipe.set(key, value, ex=ex)
        pipe.execute()
        for key, _, what in over:
            log.warning("remote key %s held %s, no value of this pool: written over", key, what)
    return len(items) - len(taken), len(over)


def _redis() -> Any:
    try:
        import redis
    except ImportError as e:
        raise ImportError(f"the remote tier needs the redis client: pip install 'kvpager[remote]' ({e})") from None
    return redis


def _options(redis: Any, timeout: float) -> dict[str, Any]:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return dict(socket_timeout=timeout, socket_connect_timeout=timeout, socket_keepalive=True,
                retry=Retry(NoBackoff(), 0), health_check_interval=0, client_name="kvpager")


class RedisStore(Store):
    """A standalone Redis or Valkey server: lookups as chunked ``MGET``s over
    ``connections`` connections, read straight into the caller's buffer
    (`kvpager.remote_resp`); probes as pipelined ``TYPE`` on one of them;
    pipelined ``SET NX EX`` for writes (`put_checked`). The lookup
    connections and the writer's are separate pools."""

    kind = "redis"

    def __init__(self, url: str, scheme: str, timeout: float, write_timeout: float,
                 connections: int = CONNECTIONS, chunk_bytes: int = CHUNK_BYTES):
        redis = _redis()
        self.url = redact(url)
        real = scheme + url[url.index("://") :]
        if scheme != "unix":
            parts = urllib.parse.urlsplit(real)
            _nodes(parts.netloc, url)
        unix = {"socket_keepalive"} if scheme == "unix" else set()  # a Unix socket takes no keepalive

        def options(seconds: float) -> dict[str, Any]:
            return {k: v for k, v in _options(redis, seconds).items() if k not in unix}

        try:
            self._reader = redis.Redis.from_url(real, **options(timeout))
            self._writer = redis.Redis.from_url(real, **options(write_timeout))
        except (ValueError, TypeError) as e:
            raise InvalidArgument(f"remote store URL {self.url!r}: {e}") from None
        self._errors = (redis.RedisError, OSError)
        self._fetch = ChunkedFetch(self._acquire, self._release, self._send, connections, chunk_bytes)
        # Raw reads need the socket of a redis-py connection (a private attribute, there
        # from 5.3 on); a release without it gets redis-py's own MGET, copied (slower).
        pool = self._reader.connection_pool
        self.raw_reads = "_sock" in vars(pool.connection_class(**pool.connection_kwargs))
        if not self.raw_reads:
            log.warning("this redis-py (%s) keeps no socket where kvpager reads it: lookups go through "
                        "redis-py's MGET (slower restores)", getattr(redis, "__version__", "?"))

    def get_many(self, keys: Seq[str]) -> list[bytes | None]:
        try:
            return self._reader.mget(keys)
        except self._errors as e:
            raise StoreError(f"{type(e).__name__}: {e}") from None

    def get_into(self, keys: Seq[str], out: np.ndarray, sizes: np.ndarray,
                 done: Callable[[int, int], None] | None = None) -> None:
        if not self.raw_reads:
            return super().get_into(keys, out, sizes, done)
        try:
            self._fetch.run(keys, out, sizes, done)
        except FetchError as e:
            raise StoreError(str(e)) from None

    def exists_many(self, keys: Seq[str]) -> np.ndarray:
        if not len(keys):
            return np.zeros(0, dtype=np.int8)
        try:
            conn, sock = self._acquire()
        except self._errors as e:
            raise StoreError(f"{type(e).__name__}: {e}") from None
        broken = True
        try:
            out = key_types(sock, keys)
            broken = False
            return out
        except FetchError as e:
            raise StoreError(str(e)) from None
        except self._errors as e:
            raise StoreError(f"{type(e).__name__}: {e}") from None
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
    def _send(conn: Any, keys: Seq[str]) -> None:
        conn.send_packed_command(conn.pack_command("MGET", *keys), check_health=False)

    def put_many(self, items: Seq[tuple[str, Any]], ttl: int) -> tuple[int, int]:
        try:
            return put_checked(lambda: self._writer.pipeline(transaction=False), items, ttl)
        except self._errors as e:
            raise StoreError(f"{type(e).__name__}: {e}") from None

    def delete(self, keys: Seq[str]) -> None:
        try:
            self._writer.delete(*keys)
        except self._errors as e:
            raise StoreError(f"{type(e).__name__}: {e}") from None

    def ping(self) -> None:
        try:
            self._reader.ping()
        except self._errors as e:
            raise StoreError(f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        self._fetch.close()
        for client in (self._reader, self._writer):
            with contextlib.suppress(Exception):
                client.close()
