"""A Redis Cluster store for the remote prefix tier (``redis+cluster://``;
see `kvpager.remote_store` for the interface and the URLs).

redis-py's cluster client (``RedisCluster``) keeps the slot map and one
``redis.Redis`` (with its connection pool) per node; the calls do not go
through its cluster pipelines. Those, after a failed node, send each of that
node's commands again on its own, each waiting a full timeout: a master that
hangs (SIGSTOP: its socket accepts, it never answers) held a lookup of 50 keys
for 1.4-2.2 s at a 0.1 s timeout, on the daemon's loop thread. Here a call
groups its keys by master (the cached slot map), and each master gets one
plain pipeline (no transaction) on a connection of its own pool, all masters
at once (a thread per master, the caller's among them), each bounded by the
socket timeout, nothing sent again after a failure: a call costs about one
timeout whatever the keys, and any failed master fails the whole call
(`StoreError`; the tier counts a miss and opens its breaker). Answering the
other masters' keys instead would give the tier a success (its breaker would
stay closed, so every lookup would wait for the hung master again) and save
little: blocks spread over all slots, so a prompt's run of restorable blocks
ends at its first block on the hung master.

- Lookups (`get_into`, `kvpager.remote_cluster_raw`): pipelined ``GETRANGE key 0 W``s
  (at most W + 1 bytes of a value, W a value's length: `kvpager.remote_resp.read_range`) read
  straight into the caller's rows, as the standalone store reads them, each
  row reported to ``done`` as it arrives; a multi-key command needs all its
  keys in one slot, and blocks spread over all slots. A master's keys go as
  pipelines of about ``chunk_bytes`` of values each, one after another on its
  connection (a reply of all of them at once is built whole in the node's
  output buffers: one of 256 MiB read at half the speed of 4-16 MiB ones). A
  key of another Redis type (``WRONGTYPE``) is a miss.
- Probes (`kvpager.remote_cluster_raw`): ``TYPE`` per key, each master's status lines read raw
  as a lookup's replies are, all by the probe's deadline (through redis-py's pipeline each read
  was bounded by the timeout alone: replies that came a byte at a time held a probe, on the loop,
  for seconds).
- Writes: ``SET NX`` then ``STRLEN``, ``TYPE`` and ``SET`` where a key held
  something else (`put_checked`); deletes: ``DEL`` per key; `ping`: every master. Through the
  node's redis-py pipeline.
- Redirections: a key answered ``ASK`` (its slot migrating) is asked again of
  the node named, after ``ASKING``; ``MOVED`` (the slot has moved: a stale
  map) first refreshes the slot map, then the key is asked of the node named.
  One round of that per call: a key redirected again fails the call.
- After a failed call the next one refreshes the slot map first (a master
  that failed over is found), asking the nodes that failed last.
- Every node's connect (socket, TLS, AUTH, CLIENT SETNAME), those the slot
  map is read from included, is bounded as a whole, as a standalone store's
  (`kvpager.remote_cluster_calls.cluster_client`): a node that answered a
  byte at a time held the call that connected to it for ever.
- Pools sharing a tier may call from threads of their own: a `Side` (the
  lookups' or the writer's client, threads and slot map) is made once and its
  slot map read by one thread at a time (`kvpager.remote_cluster_calls`).
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.remote_access import (
    NEEDS_CLUSTER,
    check_limits,
    config_value,
    connect_refusal,
    diagnose_cluster,
    judge,
    redis_module,
    untrusted_certificate,
)
from kvpager.remote_cluster_calls import Pipeline, Side, cluster_client
from kvpager.remote_cluster_raw import RawReads
from kvpager.remote_errors import (
    UNREADABLE_REPLY,
    StoreError,
    StoreMisconfigured,
    StoreRefused,
    store_error,
)
from kvpager.remote_resp import FetchError
from kvpager.remote_store import (
    CHECK_KEY,
    CHUNK_BYTES,
    KEY_ABSENT,
    KEY_OTHER,
    KEY_STRING,
    KEY_WRONG_LENGTH,
    Store,
    _ranges,
)
from kvpager.remote_url import nodes, redact
from kvpager.remote_writes import put_checked

#: a node's part of a call: [(index of the key in the call, send ASKING first)]
Plan = list[tuple[int, bool]]
#: a node's work: (its redis.Redis, its plan) -> the keys it redirected, [(index, AskError / MovedError)]
Job = Callable[[Any, Plan], list[tuple[int, Any]]]


class RedisClusterStore(RawReads, Store):
    """A Redis Cluster: keys spread over the masters by hash slot (no hash
    tags, so one salt's blocks spread too); a call asks every master that
    holds a slot of its keys at once (see the module docstring). The cluster
    client is made on first use (it asks a node for the slot map). Lookups and
    probes read their replies raw where redis-py's connections have a socket
    (`RawReads`, `kvpager.remote_cluster_raw`)."""

    kind = "redis-cluster"

    def __init__(self, url: str, scheme: str, timeout: float, write_timeout: float,
                 chunk_bytes: int = CHUNK_BYTES):
        self._redis = redis_module()
        self._chunk_bytes = chunk_bytes
        self.url = redact(url)
        self._scheme, self._timeout = scheme, timeout
        parts = urllib.parse.urlsplit(scheme + url[url.index("://") :].split(",", 1)[0])
        self._startup = nodes(urllib.parse.urlsplit(url).netloc, url)
        self._auth = dict(username=parts.username or None, password=parts.password,
                          ssl=scheme == "rediss")
        self._sides = (Side(timeout), Side(write_timeout))  # reader, writer
        exc = self._redis.exceptions
        self._errors = (self._redis.RedisError, exc.RedisClusterException, OSError, FetchError, *UNREADABLE_REPLY)
        self._ask, self._moved = exc.AskError, exc.MovedError
        # Raw reads need the socket of a redis-py connection (a private attribute, there
        # from 5.3 on); without it a lookup copies what redis-py's GET returns (slower).
        self.raw_reads = "_sock" in vars(self._redis.connection.Connection())

    # -- the cluster client and its slot map ------------------------------------------------
    def _client(self, side: Side) -> Any:
        return side.client(lambda: cluster_client(self._startup, self._auth, side.timeout))

    def _call(self, which: int, fn: Callable[[Side, Any], Any]) -> Any:
        side = self._sides[which]
        try:
            return fn(side, self._client(side))
        except (StoreError, *self._errors) as e:
            error = store_error(e)
            if not isinstance(error, StoreRefused):  # a refused call says nothing of the slot map
                side.failure()
            raise error from None

    def _spread(self, side: Side, rc: Any, keys: Seq[str], job: Job) -> None:
        """Run ``job`` on every master that holds a slot of ``keys`` at once, then
        once more for the keys redirected (``ASK``, ``MOVED``) on the nodes named."""
        plans: dict[str, tuple[Any, Plan]] = {}
        maps = side.maps
        for i, key in enumerate(keys):
            node = rc.get_node_from_key(key)
            plans.setdefault(node.name, (node, []))[1].append((i, False))
        redirected = self._fan(side, rc, plans, job)
        if not redirected:
            return
        if any(isinstance(e, self._moved) for _, e in redirected):
            side.refresh(maps)
        plans = {}
        for i, e in redirected:
            node = rc.get_node(host=e.host, port=e.port)
            if node is None:
                raise StoreError(f"key {keys[i]!r} redirected to {e.host}:{e.port}, not a node of the cluster")
            plans.setdefault(node.name, (node, []))[1].append((i, not isinstance(e, self._moved)))
        again = self._fan(side, rc, plans, job)
        if again:
            i, e = again[0]
            raise StoreError(f"key {keys[i]!r} redirected twice (its slot moves): {e}")

    def _fan(self, side: Side, rc: Any, plans: dict[str, tuple[Any, Plan]], job: Job) -> list[tuple[int, Any]]:
        items = list(plans.values())
        results = side.run([lambda node=node, plan=plan: job(rc.get_redis_connection(node), plan)
                            for node, plan in items])
        failed = [(node, r) for (node, _), r in zip(items, results) if isinstance(r, Exception)]
        if failed:
            errors = [store_error(e) for _, e in failed]
            if down := [node.name for (node, _), error in zip(failed, errors) if not isinstance(error, StoreRefused)]:
                side.failure(down)
            # refused only if every failed master refused (a master that did not answer is an outage)
            refused = all(isinstance(error, StoreRefused) for error in errors)
            node, error = failed[0][0], errors[0]
            raise (StoreRefused if refused else StoreError)(f"{node.name}: {error}")
        return [x for r in results for x in r]

    def _commands(self, side: Side, rc: Any, calls: Seq[tuple[str, tuple, dict]]) -> list[Any]:
        """The results of redis-py commands ``(method, args, kwargs)`` whose first
        argument is their key, one node pipeline per master (error replies in
        place, as ``execute(raise_on_error=False)`` gives them)."""
        out: list[Any] = [None] * len(calls)

        def job(client: Any, plan: Plan) -> list[tuple[int, Any]]:
            pipe = client.pipeline(transaction=False)
            for i, ask in plan:
                if ask:
                    pipe.execute_command("ASKING")
                name, args, kwargs = calls[i]
                getattr(pipe, name)(*args, **kwargs)
            replies = iter(pipe.execute(raise_on_error=False))
            redirected = []
            for i, ask in plan:
                if ask and isinstance(asking := next(replies), Exception):
                    raise asking
                reply = next(replies)
                if isinstance(reply, self._ask):  # MovedError is an AskError
                    redirected.append((i, reply))
                else:
                    out[i] = reply
            return redirected

        self._spread(side, rc, [args[0] for _, args, _ in calls], job)
        return out

    # -- the Store interface ---------------------------------------------------------------
    def get_many(self, keys: Seq[str], limit: int | None = None) -> list[bytes | None]:
        def run(side: Side, rc: Any) -> list[bytes | None]:
            if limit is not None:
                return _ranges(self._commands(side, rc, [("getrange", (k, 0, limit), {}) for k in keys]))
            values = self._commands(side, rc, [("get", (k,), {}) for k in keys])
            for i, v in enumerate(values):
                if isinstance(v, Exception):
                    if "WRONGTYPE" not in str(v):
                        raise v
                    values[i] = None  # another Redis type: a miss, as MGET makes it
            return values

        return self._call(0, run) if len(keys) else []

    def exists_many(self, keys: Seq[str], width: int | None = None) -> np.ndarray:
        if not len(keys):
            return np.zeros(0, dtype=np.int8)
        if self.raw_reads:
            return self._types(keys, width)
        calls = [("type", (k,), {}) for k in keys]
        if width is not None:
            calls += [("strlen", (k,), {}) for k in keys]

        def run(side: Side, rc: Any) -> list[Any]:
            replies = self._commands(side, rc, calls)
            for r in replies:
                if isinstance(r, Exception) and "WRONGTYPE" not in str(r):  # NOPERM and the like: the call fails
                    raise r
            return replies

        codes = {"none": KEY_ABSENT, "string": KEY_STRING}
        replies = self._call(0, run)
        out = np.fromiter((codes.get(t.decode() if isinstance(t, bytes) else t, KEY_OTHER)
                           for t in replies[: len(keys)]), dtype=np.int8, count=len(keys))
        if width is not None:  # a string counts only where STRLEN said a value's length
            out[(out == KEY_STRING) & np.array([n != width for n in replies[len(keys) :]])] = KEY_WRONG_LENGTH
        return out

    def put_many(self, items: Seq[tuple[str, Any]], ttl: int) -> tuple[int, int]:
        def run(side: Side, rc: Any) -> tuple[int, int]:
            return put_checked(lambda: Pipeline(self, side, rc), items, ttl)

        return self._call(1, run) if len(items) else (0, 0)

    def delete(self, keys: Seq[str]) -> None:
        def run(side: Side, rc: Any) -> None:
            for r in self._commands(side, rc, [("delete", (k,), {}) for k in keys]):
                if isinstance(r, Exception):
                    raise r

        if len(keys):
            self._call(1, run)

    def ping(self) -> None:
        def job(client: Any, plan: Plan) -> list[tuple[int, Any]]:
            client.ping()
            return []

        def run(side: Side, rc: Any) -> None:
            self._fan(side, rc, {node.name: (node, []) for node in rc.get_primaries()}, job)

        self._call(0, run)

    def verify(self, prefix: str, value_bytes: int | None = None) -> list[str]:
        redis = self._redis
        side = self._sides[0]
        try:
            rc = self._client(side)
        except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as e:
            raise StoreMisconfigured(f"remote store {self.url}: {connect_refusal(e, NEEDS_CLUSTER)}") from None
        except self._errors as e:
            side.failure()
            if (why := untrusted_certificate(e)) is not None:
                raise StoreMisconfigured(f"remote store {self.url}: {why}") from None
            diagnose_cluster(self.url, self._scheme, self._startup, self._timeout, self._auth)
            raise store_error(e) from None
        key = prefix + CHECK_KEY
        # what the tier sends, about a key no block has (SET XX of an absent key stores nothing),
        # on its master; ASKING then PING on every master
        names = ["GETRANGE", "TYPE", "STRLEN", "SET", "DEL"]
        calls = [("getrange", (key, 0, 0), {}), ("type", (key,), {}), ("strlen", (key,), {}),
                 ("set", (key, b""), {"xx": True}), ("delete", (key,), {})]
        masters: list[list[Any]] = []  # each master's replies (appended by its thread)

        def job(client: Any, plan: Plan) -> list[tuple[int, Any]]:
            pipe = client.pipeline(transaction=False)
            pipe.execute_command("ASKING")
            pipe.execute_command("PING")
            masters.append(pipe.execute(raise_on_error=False))
            return []

        def run(side: Side, rc: Any) -> list[Any]:
            replies = self._commands(side, rc, calls)
            self._fan(side, rc, {node.name: (node, []) for node in rc.get_primaries()}, job)
            return replies

        replies = self._call(0, run)
        for asking_ping in masters:
            names += ["ASKING", "PING"]
            replies += asking_ping
        warnings = judge(self.url, names, replies, NEEDS_CLUSTER)
        if value_bytes is not None:
            check_limits(self.url, rc.get_redis_connection(rc.get_node_from_key(key)), value_bytes, self._chunk_bytes)
        return warnings

    def owners(self, keys: Iterable[str]) -> list[tuple[str, str | None]]:
        # by the writer's slot map (read again after a failed call or a MOVED): no node is asked
        rc = self._sides[1].rc
        out: list[tuple[str, str | None]] = []
        for key in keys:
            try:
                owner = rc.get_node_from_key(key).name if rc is not None else None
            except self._errors:  # (a slot no master holds now)
                owner = None
            out.append((key, owner))
        return out

    def eviction_policy(self) -> str | None:  # a master's (made by `verify`): the others' should be the same
        rc = self._sides[0].rc
        return rc and config_value(rc.get_redis_connection(rc.get_primaries()[0]), "maxmemory-policy")

    def close(self) -> None:
        for side in self._sides:
            side.close()
