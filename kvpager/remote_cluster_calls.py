"""What each call of the Redis Cluster store (`kvpager.remote_cluster`) runs
on: `Side`, one cluster client with its threads and the nodes that failed,
and `Pipeline`, the pipeline `kvpager.remote_writes.put_checked` writes
through, sent as the store's per-master calls."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_THREADS = 64  # most masters one call talks to at once (past that, some wait for a thread)


class Side:
    """One RedisCluster client (the reader's or the writer's: calls of the loop
    thread and of the writer thread may overlap), its threads, and the nodes
    that failed since the slot map was last read."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.rc: Any = None
        self.pool: ThreadPoolExecutor | None = None
        self.stale = False  # a call failed: read the slot map before the next one
        self.failed: dict[str, None] = {}  # nodes that failed, in order

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
        if self.pool is None:
            self.pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="kvpager-cluster")
        futures = [self.pool.submit(guard, job) for job in jobs[1:]]
        try:
            first = guard(jobs[0])
        finally:  # no thread may still write into a caller's buffer once this returns
            rest = [f.result() for f in futures]
        return [first, *rest]

    def close(self) -> None:
        if self.rc is not None:
            with contextlib.suppress(Exception):
                self.rc.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.rc, self.pool, self.stale = None, None, False
        self.failed.clear()


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
