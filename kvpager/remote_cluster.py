"""A Redis Cluster store for the remote prefix tier (``redis+cluster://``;
see `kvpager.remote_store` for the interface and the URLs).

Lookups are redis-py cluster pipelines of ``GET`` (probes: of ``TYPE``;
writes: of ``SET NX``, then ``STRLEN`` and ``SET`` where a key held something
else, `put_checked`) (a cluster's ``MGET`` needs every key in one slot, and
blocks spread over all slots), copied into the caller's buffer by
`Store.get_into`'s default; redis-py follows the cluster's redirections and
slot-map changes.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.remote_store import (
    KEY_ABSENT,
    KEY_OTHER,
    KEY_STRING,
    Store,
    StoreError,
    _nodes,
    _options,
    _redis,
    put_checked,
    redact,
)


class RedisClusterStore(Store):
    """A Redis Cluster: keys spread over the masters by hash slot (no hash
    tags, so one salt's blocks spread too); a lookup is one pipeline, sent to
    every master that holds a slot of its keys before any reply is read. The
    cluster client is made on first use (it asks a node for the slot map)."""

    kind = "redis-cluster"

    def __init__(self, url: str, scheme: str, timeout: float, write_timeout: float):
        self._redis = _redis()
        self.url = redact(url)
        parts = urllib.parse.urlsplit(scheme + url[url.index("://") :].split(",", 1)[0])
        self._startup = _nodes(url.split("://", 1)[1].split("/", 1)[0], url)
        self._auth = dict(username=parts.username or None, password=parts.password,
                          ssl=scheme == "rediss")
        self._timeouts = (timeout, write_timeout)
        self._clients: list[Any] = [None, None]  # reader, writer
        self._errors = (self._redis.RedisError, self._redis.exceptions.RedisClusterException, OSError)

    def _client(self, which: int) -> Any:
        client = self._clients[which]
        if client is None:
            from redis.cluster import ClusterNode, RedisCluster

            nodes = [ClusterNode(h, p) for h, p in self._startup]
            options = _options(self._redis, self._timeouts[which])
            retry = options.pop("retry")
            client = RedisCluster(startup_nodes=nodes, retry=retry, require_full_coverage=False,
                                  **options, **self._auth)
            self._clients[which] = client
        return client

    def _call(self, which: int, fn: Any) -> Any:
        try:
            return fn(self._client(which))
        except self._errors as e:
            raise StoreError(f"{type(e).__name__}: {e}") from None

    def get_many(self, keys: Seq[str]) -> list[bytes | None]:
        def run(rc: Any) -> list[bytes | None]:
            pipe = rc.pipeline()
            for key in keys:
                pipe.get(key)
            return pipe.execute()

        return self._call(0, run)

    def exists_many(self, keys: Seq[str]) -> np.ndarray:
        def run(rc: Any) -> list[Any]:
            pipe = rc.pipeline()
            for key in keys:
                pipe.type(key)
            return pipe.execute()

        codes = {"none": KEY_ABSENT, "string": KEY_STRING}
        types = self._call(0, run) if len(keys) else []
        return np.fromiter((codes.get(t.decode() if isinstance(t, bytes) else t, KEY_OTHER) for t in types),
                           dtype=np.int8, count=len(types))

    def put_many(self, items: Seq[tuple[str, Any]], ttl: int) -> tuple[int, int]:
        return self._call(1, lambda rc: put_checked(rc.pipeline, items, ttl))

    def delete(self, keys: Seq[str]) -> None:
        self._call(1, lambda rc: rc.delete(*keys))

    def ping(self) -> None:
        self._call(0, lambda rc: rc.ping())

    def close(self) -> None:
        for client in self._clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._clients = [None, None]
