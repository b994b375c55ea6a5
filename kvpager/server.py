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

`Server` is one class made of mixins by responsibility: the socket and
observers, opened and closed (`kvpager.server_bind`), request dispatch and
replies kept for retries (`kvpager.server_dispatch`), session expiry and
ends (`kvpager.server_sessions`), the op handlers (`kvpager.server_ops`,
`kvpager.server_staging`, `kvpager.server_control`). This module builds the
server and runs its loop.

In-process use (tests)::

    server = Server.create(spec, "ipc:///tmp/x/kv.sock")
    server.start()          # a background thread; returns once bound
    ...
    server.stop()
"""

from __future__ import annotations

import logging
import numbers
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

import zmq

from kvpager import env
from kvpager.endpoints import endpoint_or_default
from kvpager.errors import InvalidArgument
from kvpager.events import EventSink
from kvpager.events_pub import EventPublisher, EventsConfig
from kvpager.limits import Limits
from kvpager.metrics import RequestMetrics
from kvpager.pool import KVPool
from kvpager.protocol import OPS, ErrorInfo, encode_reply
from kvpager.reply_budget import LARGE as LARGE_REPLY
from kvpager.reply_budget import UnreadReplies
from kvpager.request_memo import RequestMemo
from kvpager.server_bind import Binding
from kvpager.server_dispatch import Dispatch
from kvpager.server_ops import ServerOps
from kvpager.server_ranks import create_pool, rank_backends, release_count
from kvpager.server_refusals import RefusedHellos
from kvpager.server_sessions import SessionEnds
from kvpager.server_staging import StagingOps
from kvpager.sessions import SessionTable
from kvpager.shm import PoolMemory
from kvpager.spec import PoolSpec

if TYPE_CHECKING:
    from kvpager.remote_tier import RemoteTier

log = logging.getLogger("kvpager.server")
#: Bytes of large replies the daemon holds for clients that have not read them, all
#: connections together (at least 8 messages of the limit; `kvpager.reply_budget`).
UNREAD_REPLY_BYTES = 256 << 20
#: The heartbeat timeouts a daemon takes, in seconds
MIN_HEARTBEAT_TIMEOUT, MAX_HEARTBEAT_TIMEOUT = 0.1, 1e9


def heartbeat_timeout_s(value: float | None) -> float:
    """The heartbeat timeout ``value`` in seconds (None: KVPAGER_HEARTBEAT_TIMEOUT),
    checked (`kvpager serve --dry-run` refuses what a start refuses)."""
    hb = env.heartbeat_timeout_s() if value is None else float(value)
    if not MIN_HEARTBEAT_TIMEOUT <= hb <= MAX_HEARTBEAT_TIMEOUT:
        raise InvalidArgument(
            f"heartbeat timeout must be {MIN_HEARTBEAT_TIMEOUT} to {MAX_HEARTBEAT_TIMEOUT:g} seconds, got {hb!r} "
            "(clients beat at most every 0.05 s, so a shorter one ended healthy sessions; a longer one "
            "overflowed their heartbeat threads' waits)")
    return hb


#: How stale the loop's "everything queued was read" mark may get under steady load.
_IDLE_EVERY_S = 0.01
#: A wait for a request this much past the socket's timeout (50 ms) means the process was stopped:
#: for as long again, an empty queue is not taken to mean everything sent was read.
_STOPPED_S = 0.5


def _recv(sock: zmq.Socket) -> list[bytes]:
    """One message's frames: [routing id, (a REQ socket's empty delimiter), body]
    when well formed. Of a message of more frames, frames past the third are read
    without a copy and dropped (one stays, uncopied, to say there were more): what
    a client sends past a request's frames is neither kept nor sent back."""
    frames = [sock.recv()]
    while sock.getsockopt(zmq.RCVMORE):
        part = sock.recv(copy=len(frames) < 3)
        if len(frames) < 4:
            frames.append(part)
    return frames


def message_limit(max_message_bytes: int | None) -> int:
    """The daemon's message limit: ``max_message_bytes``, or KVPAGER_MAX_MESSAGE
    (`env.max_message_bytes`) when None. InvalidArgument for a size under
    `env.MIN_MESSAGE`, as for the variable: 0 once meant the default without a
    word, and a small size started a daemon that refused every request."""
    if max_message_bytes is None:
        return env.max_message_bytes()
    if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, numbers.Integral):
        raise InvalidArgument(f"max_message_bytes must be a whole number of bytes (at least {env.MIN_MESSAGE}), "
                              f"got {type(max_message_bytes).__name__}")
    if max_message_bytes < env.MIN_MESSAGE:
        raise InvalidArgument(f"max_message_bytes={max_message_bytes!r} is under {env.MIN_MESSAGE} bytes (64K): "
                              "no request but the smallest would fit; give None (KVPAGER_MAX_MESSAGE, "
                              "default 16 MiB) or a size such as 16 << 20")
    if max_message_bytes > env.MAX_MESSAGE:
        raise InvalidArgument(f"max_message_bytes={max_message_bytes!r} is over {env.MAX_MESSAGE} bytes (2G)")
    return int(max_message_bytes)


class Server(Dispatch, SessionEnds, Binding, ServerOps, StagingOps):
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
        self.max_message_bytes = message_limit(max_message_bytes)  # before anything else is made
        if events is not None and pool.stats().cached_blocks:
            # (the stream's batch 0 says AllBlocksCleared: a consumer replaying it would not know the
            # blocks cached before, and would then see them removed without ever being stored)
            raise InvalidArgument(f"KV events need a pool whose prefix cache is empty when the daemon starts "
                                  f"({pool.stats().cached_blocks} blocks cached): serve a fresh pool, or one "
                                  "without events")
        self.pool = pool
        self.endpoint = endpoint_or_default(endpoint, bind=True)
        self.memory = memory
        #: a tensor-parallel CPU pool: each rank's shared memory (`kvpager.server_ranks`)
        self.rank_memory = rank_memory
        self.epoch = epoch or secrets.token_hex(8)
        ranks = rank_backends(pool)
        #: the pool's CUDA device index when it lives on a GPU (rank 0's), else None
        self.gpu: int | None = ranks[0].index if hasattr(ranks[0], "ipc_handle") else None
        self._exported: dict[int, Any] = {}  # CUDA IPC exports by rank, made at the first hello
        hb = heartbeat_timeout_s(heartbeat_timeout)
        self.limits = limits or Limits.from_env()
        #: hello must carry this secret when set (see "Trust" in docs/protocol.md)
        self.token = token or None
        #: hello with this secret opens a control session (quotas, kept pins; server_control.py)
        self.control_token = control_token or None
        self.sessions = SessionTable(hb, self.epoch, self.gpu, self.limits,
                                     [b.index for b in ranks] if self.gpu is not None and len(ranks) > 1 else None)
        self.owns_pool = owns_pool
        self.requests = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._socket_file: tuple[int, int] | None = None  # the ipc socket file bound (`Binding.close`)
        self._socket_lost = False  # it was removed and could not be made again (`Binding.keep_socket_file`)
        self._watch: Any = None  # the connections kept within the open files (`kvpager.server_watch`)
        self._file_lock = threading.Lock()  # the ipc socket file renamed by the watch or made again by the loop
        self._events_cap: int | None = None  # connections each KV events socket keeps (`kvpager.server_watch`)
        self._served = False  # bound and serving: said at the end (a failed bind says only why)
        self._check_after = self._check_took = 0.0  # `check`'s share of the loop (`ServerOps._op_check`)
        self._handlers = {name: getattr(self, f"_op_{name}") for name in OPS}
        self._refused = RefusedHellos()  # refused hellos, logged (`kvpager.server_refusals`)
        self._memo = RequestMemo()  # decode steps' requests, decoded and checked once
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
        self._rid: int | None = None  # its id, for a reply refused past the unread replies' budget
        #: large replies clients have not read yet, all connections together (`kvpager.reply_budget`)
        self._unread = UnreadReplies(max(UNREAD_REPLY_BYTES, 8 * self.max_message_bytes))
        #: the count of releases mapped workers follow (`kvpager.server_ranks.release_count`)
        self.releases = release_count(self)

    @classmethod
    def create(cls, spec: PoolSpec, endpoint: str | None = None, device: str = "cpu", *,
               max_pinned_blocks: int | None = None, remote: RemoteTier | None = None,
               devices: list[str] | str | None = None, **kwargs: Any) -> Server:
        """A server with its own pool; on the CPU the pool lives in shared memory
        that clients map. ``max_pinned_blocks``, ``remote``, ``devices`` (tensor-
        parallel ranks, one per device): as `KVPool`'s."""
        endpoint_or_default(endpoint, bind=True)  # before any memory is taken
        kwargs["max_message_bytes"] = message_limit(kwargs.get("max_message_bytes"))  # likewise
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

    # -- the loop ---------------------------------------------------------------------------
    def _send(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        """Send a reply; a large one tracked and counted against the bytes of replies
        clients have not read (`kvpager.reply_budget`), or refused past them."""
        large = len(frames[-1]) >= LARGE_REPLY
        if large:
            frames[-1] = self._unread.admit(self._op, self._rid, frames[-1])
            large = len(frames[-1]) >= LARGE_REPLY
        for attempt in (0, 1):
            try:
                if large:
                    self._unread.sent(sock.send_multipart(frames, zmq.NOBLOCK, copy=False, track=True),
                                      len(frames[-1]))
                else:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                return
            except zmq.Again as e:
                if attempt:  # its queue full indeed: it reads none of its replies
                    log.debug("reply dropped: %s", e)
                    return
                # Its queue looks full (`QUEUED_MESSAGES`); the socket may not have heard yet that the
                # peer read it (ZeroMQ takes such notices in at most once a millisecond while messages
                # keep coming, and a client's quick round trips outran that): take them in, try again.
                sock.getsockopt(zmq.EVENTS)
            except zmq.ZMQError as e:  # peer gone: its problem, not ours
                log.debug("reply dropped: %s", e)
                return

    def _loop(self) -> None:
        sock, stop, snapshots = self._sock, self._stop, self._snapshots
        next_expiry = time.monotonic() + self._expiry_interval()
        last = held = time.monotonic()
        while not stop.is_set():
            try:
                frames = _recv(sock)  # blocks for at most _POLL_MS (RCVTIMEO)
            except zmq.Again:
                now = time.monotonic()
                # The queue is empty: everything sent is read. Not for a while after a wait far
                # past RCVTIMEO: this process was stopped (SIGSTOP, a paused VM), and what came
                # meanwhile is not all in the socket yet (a healthy session whose beat waited in
                # the kernel's buffers was expired).
                if now - last >= _STOPPED_S:
                    held = now + _STOPPED_S
                elif now >= held:
                    self._idle = now
            else:
                # [routing id, (empty delimiter from REQ), body]: answer on the same envelope.
                before = time.monotonic()
                try:
                    if len(frames) == 2 or len(frames) == 3 and frames[1] == b"":
                        frames[-1] = self.handle(frames[-1])
                    else:  # nothing runs, and only the routing id goes back with the error
                        frames = [frames[0], self.refuse_frames(len(frames) - 1)]
                except Exception as e:  # handle never raises: a bug in it must not end the daemon
                    log.error("a request's handling raised; answered as an internal error", exc_info=e)
                    frames[-1] = encode_reply(None, None, ErrorInfo("internal", f"internal error: {type(e).__name__}"))
                self._send(sock, frames)
                now = time.monotonic()
                # Nothing else queued: everything sent is read up to now. Asked at most every
                # _IDLE_EVERY_S (a socket query costs a decode step 1-3 us): a mark that old
                # only judges silence more leniently, never a healthy client as gone.
                if before - last >= _STOPPED_S:  # (stopped while it waited for this request)
                    held = now + _STOPPED_S
                elif now - self._idle >= _IDLE_EVERY_S and now >= held \
                        and not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._idle = now
            if snapshots is not None and snapshots.wanted and now >= snapshots.next_at:
                snapshots.serve(now)  # a scrape waits for the pool's figures
            if now >= next_expiry:
                next_expiry = now + self._expiry_interval()
                self.expire()
                self.keep_socket_file()
                if self.request_metrics is not None:
                    self.request_metrics.window(now)
                now = time.monotonic()  # (the next wait counts from here)
            last = now
