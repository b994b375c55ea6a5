"""The daemon: one `KVPool` behind one ZeroMQ ROUTER socket and one event loop.

Every state change runs on the loop's thread, one request at a time, so the
allocator needs no locks. The server owns sessions (hello / heartbeat / bye)
and checks that a sequence belongs to the calling session before `KVPool`
sees the batch: a rejected batch changes nothing. A client's mistake is
answered with a typed error reply; it never ends the loop.

Observability, both off unless asked for: Prometheus metrics over HTTP
(``metrics_port``; `kvpager.metrics`) and vLLM-compatible KV events over
ZeroMQ PUB (``events``; `kvpager.events_pub`). With neither, a request costs
one ``is None`` test more; with them, a few list stores and a queue put.

In-process use (tests)::

    server = Server.create(spec, "ipc:///tmp/x/kv.sock")
    server.start()          # a background thread; returns once bound
    ...
    server.stop()
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from kvpager import env, protocol
from kvpager.endpoints import (
    check_endpoint,
    default_endpoint,
    ipc_path,
    is_local,
    is_socket,
    prepare_ipc_bind,
)
from kvpager.errors import (
    ERRORS_BY_CODE,
    InternalError,
    InvalidArgument,
    KVPagerError,
    LimitExceeded,
    Unauthorized,
)
from kvpager.events import EventSink
from kvpager.events_pub import EventPublisher, EventsConfig
from kvpager.limits import Limits
from kvpager.metrics import RequestMetrics, serve_metrics
from kvpager.pool import KVPool
from kvpager.protocol import (
    KEPT_REPLIES,
    OPS,
    RETRIED_OPS,
    ErrorInfo,
    decode_request,
    encode_reply,
)
from kvpager.render import human_bytes
from kvpager.server_ops import ServerOps, _ids
from kvpager.server_ranks import create_pool, rank_backends
from kvpager.sessions import Session, SessionTable
from kvpager.shm import PoolMemory
from kvpager.spec import PoolSpec

if TYPE_CHECKING:
    from kvpager.remote_tier import RemoteTier

log = logging.getLogger("kvpager.server")

_POLL_MS = 50  # how soon stop() and heartbeat expiry are noticed when idle
#: Ops that may launch work on a GPU pool (copy-on-write, swaps, remote write and
#: attend): their reply waits for it, so a block id handed out is never mid-copy
#: and a staging buffer is never read or rewritten while in use.
_DEVICE_OPS = frozenset({"append", "swap_out", "swap_in", "write", "attend"})


class Server(ServerOps):
    """A daemon serving ``pool`` at ``endpoint`` (default: the private ipc:// socket).

    ``memory`` is the shared memory the pool lives in (`PoolMemory`), which
    the hello reply hands to clients; a GPU pool (`CupyBackend`) is exported
    by CUDA IPC instead; otherwise clients use remote write/attend only.
    ``run()`` serves until ``stop()``; ``start()`` runs it in a thread."""

    def __init__(
        self,
        pool: KVPool,
        endpoint: str | None = None,
        *,
        memory: PoolMemory | None = None,
        rank_memory: list[PoolMemory] | None = None,
        heartbeat_timeout: float | None = None,
        max_message_bytes: int | None = None,
        epoch: str | None = None,
        owns_pool: bool = False,
        limits: Limits | None = None,
        token: str | None = None,
        control_token: str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        events: EventsConfig | None = None,
    ):
        self.pool = pool
        self.endpoint = check_endpoint(endpoint or default_endpoint(), bind=True)
        self.memory = memory
        #: a tensor-parallel CPU pool: each rank's shared memory (`kvpager.server_ranks`)
        self.rank_memory = rank_memory
        self.epoch = epoch or secrets.token_hex(8)
        ranks = rank_backends(pool)
        #: the pool's CUDA device index when it lives on a GPU (rank 0's), else None
        self.gpu: int | None = ranks[0].index if hasattr(ranks[0], "ipc_handle") else None
        self._exported: dict[int, Any] = {}  # CUDA IPC exports by rank, made at the first hello
        hb = env.heartbeat_timeout_s() if heartbeat_timeout is None else float(heartbeat_timeout)
        if not 0 < hb < float("inf"):
            raise InvalidArgument(f"heartbeat timeout must be a positive number of seconds, got {heartbeat_timeout!r}")
        self.limits = limits or Limits.from_env()
        #: hello must carry this secret when set (see "Trust" in docs/protocol.md)
        self.token = token or None
        #: hello with this secret opens a control session (quotas, kept pins; server_control.py)
        self.control_token = control_token or None
        self.sessions = SessionTable(hb, self.epoch, self.gpu, self.limits,
                                     [b.index for b in ranks] if self.gpu is not None and len(ranks) > 1 else None)
        self.max_message_bytes = max_message_bytes or env.max_message_bytes()
        self.owns_pool = owns_pool
        self.requests = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._handlers = {name: getattr(self, f"_op_{name}") for name in OPS}
        # When the loop last found nothing queued: every message sent before then
        # has been read, so a session silent since long before it is really gone.
        self._idle = time.monotonic()
        # Observability (see the module's docstring): what `bind` starts.
        self.metrics_port, self.metrics_host = metrics_port, metrics_host
        self.request_metrics = RequestMetrics() if metrics_port is not None else None
        self._snapshots: Any = None  # and the HTTP server: started by bind
        self._httpd: Any = None
        self.events = EventPublisher(events, pool.spec.block_size) if events is not None else None
        self._sink = EventSink() if events is not None else None
        self._op, self._result = "", "ok"  # the request being handled, for the metrics

    @classmethod
    def create(cls, spec: PoolSpec, endpoint: str | None = None, device: str = "cpu", *,
               max_pinned_blocks: int | None = None, remote: RemoteTier | None = None,
               devices: list[str] | str | None = None, **kwargs: Any) -> Server:
        """A server with its own pool; on the CPU the pool lives in shared memory
        that clients map. ``max_pinned_blocks``, ``remote``, ``devices`` (tensor-
        parallel ranks, one per device): as `KVPool`'s."""
        check_endpoint(endpoint or default_endpoint(), bind=True)  # before any memory is taken
        epoch = secrets.token_hex(8)
        pool, memory, rank_memory = create_pool(spec, device, devices, epoch,
                                                max_pinned_blocks=max_pinned_blocks, remote=remote)
        try:
            return cls(pool, endpoint, memory=memory, rank_memory=rank_memory, epoch=epoch, owns_pool=True,
                       **kwargs)
        except BaseException:
            for m in [memory, *(rank_memory or ())]:
                if m is not None:
                    m.close()
            pool.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def bind(self) -> str:
        """Open and bind the socket; returns the actual endpoint (tcp port ``*`` resolved).
        On failure everything is released (`close()`), shared memory included."""
        try:
            return self._bind()
        except BaseException:
            self.close()
            raise

    def _bind(self) -> str:
        if self.token is None and not is_local(self.endpoint):
            raise InvalidArgument(
                f"{self.endpoint} is reachable beyond this host: give the daemon a token "
                "(kvpager serve --token-file FILE, or KVPAGER_TOKEN) that clients send in hello")
        prepare_ipc_bind(self.endpoint)
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A blocking recv that gives up every _POLL_MS: one call per message
        # when busy, and a regular chance to expire sessions and see stop().
        sock.setsockopt(zmq.RCVTIMEO, _POLL_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + protocol.TRANSPORT_SLACK)
        try:
            sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            sock.close()
            self._ctx.term()
            self._ctx = None
            raise InvalidArgument(f"cannot bind {self.endpoint}: {e}") from None
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        path = ipc_path(self.endpoint)
        if path:
            os.chmod(path, 0o600)
        elif self.token is None and self.endpoint.startswith("tcp://"):
            log.warning("listening on %s without a token: every local user can use the pool "
                        "(--token-file / KVPAGER_TOKEN)", self.endpoint)
        self._start_observers()
        spec = self.pool.spec
        if self.pool.ranks > 1:
            per = self.pool.backend.rank_spec
            log.info("tensor-parallel: %d ranks on %s, %d kv heads and %s (%s per block) each",
                     self.pool.ranks, ", ".join(self.pool.backend.devices), per.num_kv_heads,
                     human_bytes(per.device_bytes), human_bytes(per.bytes_per_block))
        log.info(
            "serving on %s: device %s, %d blocks of %d tokens (%s), %d host blocks (%s); %d layers x %d kv "
            "heads x %d head dim, %s; epoch %s, heartbeat timeout %.1fs",
            self.endpoint, self.pool.device, spec.num_blocks, spec.block_size, human_bytes(spec.device_bytes),
            spec.num_host_blocks, human_bytes(spec.host_bytes), spec.num_layers, spec.num_kv_heads,
            spec.head_dim, spec.dtype + (f" stored as {spec.kv_dtype}" if spec.is_fp8 else ""), self.epoch,
            self.sessions.heartbeat_timeout,
        )
        return self.endpoint

    def _start_observers(self) -> None:
        if self.events is not None and self.endpoint in (self.events.endpoint, self.events.replay_endpoint):
            raise InvalidArgument(f"the KV events endpoints must differ from the daemon's {self.endpoint}")
        if self.request_metrics is not None:
            self._snapshots, self._httpd, self.metrics_port = serve_metrics(
                self.request_metrics, self.pool, lambda: len(self.sessions), self.metrics_host, self.metrics_port)
        if self.events is not None:
            self.pool.set_event_sink(self._sink)
            self.events.bind()

    def run(self) -> None:
        """Serve until `stop()`; then release everything (`close()`)."""
        try:
            if self._sock is None:
                self.bind()
            self._ready.set()
            self._loop()
        finally:
            self._ready.set()
            self.close()

    def start(self, timeout: float = 10.0) -> Server:
        """Run in a daemon thread; returns once the socket is bound."""
        self.bind()
        self._thread = threading.Thread(target=self.run, name="kvpager-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("server thread did not start")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end (safe from a signal handler or another thread)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        """End every session (freeing its sequences), close the socket, unlink
        the ipc socket and the shared memory."""
        for s in list(self.sessions.sessions.values()):
            self._end(s, "daemon shutting down")
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            self._ctx.term()
            path = ipc_path(self.endpoint)
            if path and is_socket(path):  # never anything else found there
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        for m in [self.memory, *(self.rank_memory or ())]:
            if m is not None:
                m.close()
        self.memory = self.rank_memory = None
        if self.owns_pool:
            self.pool.close()
            self.owns_pool = False
        if self.events is not None:
            self.pool.set_event_sink(None)
            self._flush_events()
            self.events.close()  # ends with AllBlocksCleared
            self.events = None
        log.info("stopped after %d requests", self.requests)

    # -- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        sock, stop, snapshots = self._sock, self._stop, self._snapshots
        next_expiry = time.monotonic() + self._expiry_interval()
        while not stop.is_set():
            try:
                frames = sock.recv_multipart()  # blocks for at most _POLL_MS (RCVTIMEO)
            except zmq.Again:
                self._idle = time.monotonic()  # the queue is empty: everything sent is read
            else:
                # [routing id, (empty delimiter from REQ), body]: answer on the same envelope.
                frames[-1] = self.handle(frames[-1])
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.ZMQError as e:  # peer gone or its queue full: its problem, not ours
                    log.debug("reply dropped: %s", e)
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._idle = time.monotonic()  # nothing else queued: read up to now
            now = time.monotonic()
            if snapshots is not None and snapshots.wanted and now >= snapshots.next_at:
                snapshots.serve(now)  # a scrape waits for the pool's figures
            if now >= next_expiry:
                next_expiry = now + self._expiry_interval()
                self.expire()
                if self.request_metrics is not None:
                    self.request_metrics.window(now)

    def expire(self) -> None:
        """End the sessions silent for longer than the heartbeat timeout, judged
        at the last moment the loop had read everything queued: after a slow
        request, the heartbeats that waited behind it count first."""
        t0 = time.perf_counter()
        ended = self.sessions.expired(self._idle)
        for s in ended:
            self._end(s, "missed heartbeats")
        if self.request_metrics is not None:
            self.request_metrics.session_expiries += len(ended)
            self.request_metrics.busy += time.perf_counter() - t0
        self._flush_events()

    def _expiry_interval(self) -> float:
        return min(1.0, self.sessions.heartbeat_timeout / 4)

    def handle(self, body: bytes) -> bytes:
        """One request in, one reply out (counted, timed and its KV events
        published when those are on). Never raises."""
        metrics = self.request_metrics
        if metrics is None:
            reply = self._handle(body)
        else:
            t0 = time.perf_counter()
            reply = self._handle(body)
            metrics.observe(self._op, self._result, time.perf_counter() - t0)
        if self._sink is not None and self._sink.items:
            self._flush_events()
        return reply

    def _flush_events(self) -> None:
        """Publish what the pool recorded as one batch."""
        if self._sink is not None and self._sink.items:
            self.events.publish(time.time(), self._sink.take())

    def _handle(self, body: bytes) -> bytes:
        self.requests += 1
        self._op, self._result = "", "ok"
        rid, op, session, digest = None, "?", None, None
        try:
            req = decode_request(body, self.max_message_bytes)
            rid, op = req.id, req.op
            self._op = op
            if OPS[op].session or (req.session is not None and op != "hello"):
                session = self.sessions.get(req.session)
                session.ops += 1
            elif self.token is not None and op != "hello":
                raise Unauthorized(f"{op}: this daemon has a token: open a session (hello with the token) first")
            if op in RETRIED_OPS:
                # A retry after a timeout (same id, same bytes) gets the first reply.
                digest = hashlib.blake2b(body, digest_size=16).digest()
                kept = session.replies.get(rid)
                if kept is not None and kept[0] == digest:
                    self._result = "replayed"
                    if kept[1] is None:  # ran, but its reply was over the session's limit to keep
                        raise LimitExceeded(
                            f"{op}: request {rid} ran, but its reply was too large to keep for a retry "
                            f"(over {self.limits.kept} bytes: KVPAGER_MAX_KEPT, kvpager serve --max-kept)",
                            "kept", self.limits.kept + 1, self.limits.kept)
                    return kept[1]
            reply = self._reply(rid, op, session, req.args)
        except Exception as e:
            return self._error_reply(rid, op, e)
        if digest is not None:
            self._keep(session, rid, digest, reply)
        return reply

    def _keep(self, session: Session, rid: int, digest: bytes, reply: bytes) -> None:
        """Keep ``reply`` for a retry of request ``rid``: the last KEPT_REPLIES of
        a session, within ``limits.kept`` bytes (one larger is remembered as run
        but not kept: its retry is told so, and nothing runs twice)."""
        replies, limit = session.replies, self.limits.kept
        old = replies.pop(rid, None)
        if old is not None and old[1] is not None:
            session.kept_bytes -= len(old[1])
        keep = reply if len(reply) <= limit else None
        replies[rid] = (digest, keep)
        session.kept_bytes += len(keep) if keep is not None else 0
        while len(replies) > KEPT_REPLIES or session.kept_bytes > limit:
            _, (_, dropped) = replies.popitem(last=False)
            session.kept_bytes -= len(dropped) if dropped is not None else 0

    def _reply(self, rid: int, op: str, session: Session | None, args: dict[str, Any]) -> bytes:
        try:
            self._bound(op, args)
            result = self._handlers[op](session, args)
            if self.gpu is not None and op in _DEVICE_OPS and self.pool.pending:
                self.pool.synchronize()
            return encode_reply(rid, result)
        except Exception as e:
            return self._error_reply(rid, op, e)

    def _error_reply(self, rid: int | None, op: str, e: Exception) -> bytes:
        if isinstance(e, KVPagerError):
            self._result = e.code if e.code in ERRORS_BY_CODE else "internal"
            return encode_reply(getattr(e, "request_id", rid), None, ErrorInfo.from_exception(e))
        if isinstance(e, (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError)):
            # KVPool validates its arguments; what slips through is still the
            # caller's malformed input, not a reason to die.
            self._result = "invalid_argument"
            msg = f"{op}: bad arguments: {type(e).__name__}: {e}"
            return encode_reply(rid, None, ErrorInfo("invalid_argument", msg))
        self._result = "internal"
        log.error("internal error in %s", op, exc_info=e)  # a bug: keep serving, say so loudly
        return encode_reply(rid, None, ErrorInfo.from_exception(InternalError(f"{op}: {e!r}")))

    def _bound(self, op: str, a: dict[str, Any]) -> None:
        """The per-request limits: ids and tokens in one request (len() only)."""
        lim = self.limits
        for name in ("seq_ids", "prompts", "lengths", "upto", "token_ids", "query_lens", "salt", "positions"):
            v = a.get(name)
            if isinstance(v, (list, np.ndarray)) and len(v) > lim.ids:
                lim.check("ids", len(v), f"{op}: {name}")
        tokens = 0
        for name in ("prompts", "token_ids"):
            v = a.get(name)
            if isinstance(v, list):
                tokens += sum(len(p) for p in v if isinstance(p, (list, np.ndarray)))
        n = a.get("num_tokens")
        if isinstance(n, int) and isinstance(a.get("seq_ids"), (list, np.ndarray)):
            tokens += n * len(a["seq_ids"])
        elif isinstance(n, int):
            tokens += n
        elif isinstance(n, list) and all(type(x) is int for x in n):
            tokens += sum(n)
        if tokens > lim.tokens:
            lim.check("tokens", tokens, f"{op}: token ids")

    # -- sessions ----------------------------------------------------------------------------
    def _owned(self, session: Session, value: Any) -> list[int]:
        """The ids, checked to exist and belong to ``session`` (all before any change)."""
        ids = _ids(value)
        self.pool.check_owner(ids, session.name)
        return ids

    def _end(self, session: Session, why: str) -> int:
        ids = self.pool.owned(session.name)
        if ids:
            self.pool.free(ids)
        pins = self.pool.release_pins(session.name)
        self.sessions.close(session)
        log.info("session %s (%s, pid %s) ended: %s; freed %d sequences, released %d pins",
                 session.name, session.client, session.pid, why, len(ids), pins)
        return len(ids)
