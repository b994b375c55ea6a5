"""What each call of the Redis Cluster store (`kvpager.remote_cluster`) runs
on: `Side`, one cluster client (made by `cluster_client`) with its threads
and the nodes that failed, and `Pipeline`, the pipeline
`kvpager.remote_writes.put_checked` writes through, sent as the store's
per-master calls."""

from __future__ import annotations

import contextlib
import inspect
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvpager.remote_access import (
    CONNECT_ROUND_TRIPS,
    bounded_pool,
    connection_options,
    redis_module,
)

_THREADS = 64  # most masters one call talks to at once (past that, some wait for a thread)


def cluster_client(startup: Sequence[tuple[str, int]], auth: dict[str, Any], timeout: float) -> Any:
    """A redis-py cluster client of the nodes ``startup`` (``auth``: username,
    password, ssl), no retries, ``timeout`` for each connect and read. Every
    node's connect is bounded as a whole, as a standalone store's: the client
    is given a URL (the first node's), and then every redis-py release makes
    each node's pool, those it reads the slot map from included, of
    ``connection_pool_class`` (`kvpager.remote_access.bounded_pool`; given
    nodes alone, 5.x made them of its own class). A node that accepted and
    answered its handshake a byte at a time held the call for ever."""
    from redis.cluster import ClusterNode, RedisCluster

    (host, port), *rest = startup
    named = urllib.parse.quote(host, safe=":")  # (redis-py unquotes it: an IPv6 zone's % stays)
    first = f"{'rediss' if auth['ssl'] else 'redis'}://{f'[{named}]' if ':' in host else named}:{port}"
    options = connection_options(redis_module(), timeout)
    retry = options.pop("retry")
    return RedisCluster(url=first, startup_nodes=[ClusterNode(h, p) for h, p in rest], retry=retry,
                        require_full_coverage=False, connection_pool_class=bounded_pool(CONNECT_ROUND_TRIPS * timeout),
                        username=auth["username"], password=auth["password"], **options)


class Side:
    """One RedisCluster client (the reader's or the writer's: calls of the loop
    thread and of the writer thread may overlap), its threads, and the nodes
    that failed since the slot map was last read.

    The reader's side is shared by every thread that looks up: pools sharing a
    tier may each be driven by a thread of its own. ``lock`` makes the client
    and the thread pool once (made unguarded, three threads' first lookups made
    three of each: the side kept one, the others stayed connected to every
    master after `close`) and guards ``failed``, ``stale`` and reading the slot
    map again (one thread at a time: it iterates and clears ``failed``, which
    other threads' failed calls add to, and reorders redis-py's startup nodes).
    A call that finds both made and the map fresh takes no lock."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.rc: Any = None
        self.pool: ThreadPoolExecutor | None = None
        self.stale = False  # a call failed: read the slot map before the next one
        self.failed: dict[str, None] = {}  # nodes that failed, in order
        self.maps = 0  # slot maps read: a call answered MOVED reads it again unless another did since
        self.lock = threading.Lock()

    # -- the cluster client and its slot map ------------------------------------------------
    def client(self, make: Callable[[], Any]) -> Any:
        """The cluster client (``make()`` on first use), its slot map read again
        first where a call failed since."""
        rc = self.rc
        if rc is not None and not self.stale:
            return rc
        with self.lock:
            if self.rc is None:
                self.rc = make()
                self.maps += 1
                self.stale = False
                self.failed.clear()
            elif self.stale:
                self._refresh()
            return self.rc

    def refresh(self, seen: int) -> None:
        """Read the slot map again (a key was answered ``MOVED``), unless another
        thread did since this one's call began (``seen``: `maps` then)."""
        with self.lock:
            if self.maps == seen:
                self._refresh()

    def _refresh(self) -> None:
        """Read the slot map again, asking the nodes that failed last (``lock`` held).
        The nodes asked get clients of their own, used once: redis-py 5
        disconnects every connection of each node it asks, those in use too, and
        (with dynamic startup nodes, its default) the nodes it asks are the nodes
        the calls use: another thread's lookup failed mid-reply ("Bad file
        descriptor") on a master that answered."""
        from redis.cluster import ClusterNode

        manager = self.rc.nodes_manager
        known = dict(manager.startup_nodes)
        order = [n for name, n in known.items() if name not in self.failed]
        order += [known[name] for name in self.failed if name in known]
        manager.startup_nodes = {n.name: ClusterNode(n.host, n.port, n.server_type) for n in order}
        defer = {}
        if self.failed and "last_failed_node_name" in inspect.signature(manager.initialize).parameters:
            defer = {"last_failed_node_name": next(iter(self.failed))}  # redis-py >= 7: shuffles the rest
        manager.initialize(**defer)
        self.maps += 1
        self.stale = False
        self.failed.clear()

    def failure(self, nodes: list[str] | None = None) -> None:
        """A call failed (on ``nodes``, where known): read the slot map before the next one."""
        with self.lock:
            self.stale = True
            for name in nodes or ():
                self.failed[name] = None

    # -- the threads -----------------------------------------------------------------------
    def run(self, jobs: list[Callable[[], Any]]) -> list[Any]:
        """Run ``jobs`` at once (the caller's thread takes the first) and wait for
        all of them: each one's result or the exception it raised."""
        def guard(job: Callable[[], Any]) -> Any:
            try:
                return job()
            except Exception as e:
                return e

        if len(jobs) == 1:
            return [guard(jobs[0])]
        pool = self.pool or self._pool()
        futures = [pool.submit(guard, job) for job in jobs[1:]]
        try:
            first = guard(jobs[0])
        finally:  # no thread may still write into a caller's buffer once this returns
            rest = [f.result() for f in futures]
        return [first, *rest]

    def _pool(self) -> ThreadPoolExecutor:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="kvpager-cluster")
            return self.pool

    def close(self) -> None:
        with self.lock:
            rc, pool = self.rc, self.pool
            self.rc, self.pool, self.stale = None, None, False
            self.failed.clear()
        if rc is not None:
            # each node's pool disconnected too: redis-py 5.x closes only the pools its node
            # clients made themselves, and with a URL (`cluster_client`) it makes them apart
            pools = [n.redis_connection.connection_pool for n in rc.get_nodes() if n.redis_connection is not None]
            with contextlib.suppress(Exception):
                rc.close()
            for node_pool in pools:
                with contextlib.suppress(Exception):
                    node_pool.disconnect()
        if pool is not None:
            pool.shutdown(wait=True)


class Pipeline:
    """What `put_checked` needs of a pipeline (``set``, ``strlen``, ``type``, ``execute``),
    sent as `kvpager.remote_cluster.RedisClusterStore._commands`: a node pipeline per master, at once."""

    def __init__(self, store: Any, side: Side, rc: Any):
        self.store, self.side, self.rc = store, side, rc
        self.calls: list[tuple[str, tuple, dict]] = []

    def set(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("set", args, kwargs))

    def strlen(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("strlen", args, kwargs))

    def type(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("type", args, kwargs))

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        out = self.store._commands(self.side, self.rc, self.calls)
        if raise_on_error:
            for r in out:
                if isinstance(r, Exception):
                    raise r
        return out
