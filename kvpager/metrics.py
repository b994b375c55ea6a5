"""Prometheus metrics of the daemon, served over HTTP by `prometheus_client`
from a thread of their own (names modelled on vLLM's, prefixed ``kvpager_``;
each listed with its meaning in docs/protocol.md, "Metrics").

The loop thread is the only one that touches the pool. So:
- per-request counts and latencies are plain ints and floats in lists that
  the loop adds to (`RequestMetrics.observe`: a few list stores per request)
  and a scrape copies (a list copy is atomic under the GIL);
- the pool's gauges and counters are read on the loop: a scrape asks for a
  `Snapshot` (`Snapshots.request`) and the loop takes one between two
  requests (or within ~50 ms when idle); a loop stuck in a long request
  leaves the scrape the previous snapshot after ``wait`` seconds, and
  ``kvpager_pool_snapshot_age_seconds`` says how old it is.

The families themselves, and the names a filtered scrape (``?name[]=``)
finds them by, are `kvpager.metrics_collector`'s.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvpager.errors import ERRORS_BY_CODE, InvalidArgument
from kvpager.protocol import OPS
from kvpager.types import PoolCounters, PoolStats, RemoteStats

log = logging.getLogger("kvpager.server")

#: Upper bounds (seconds) of the request latency buckets: a decode step takes
#: tens of microseconds, a large allocate milliseconds.
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
           2.5)
#: The ``op`` label of a request too broken to name a known op.
INVALID_OP = "invalid"
#: ``result`` label values: ok, a retry answered with the kept reply, or an error code.
RESULTS = ("ok", "replayed", *ERRORS_BY_CODE)


class RequestMetrics:
    """Per-op request counts by result, latency histograms and loop busy time;
    written by the loop thread only."""

    def __init__(self) -> None:
        self.ops = (*OPS, INVALID_OP)
        self._op_index = {op: i for i, op in enumerate(self.ops)}
        self._result_index = {r: i for i, r in enumerate(RESULTS)}
        self._internal = self._result_index["internal"]  # an unknown code is a bug
        self.counts = [[0] * len(RESULTS) for _ in self.ops]  # [op][result]
        self.buckets = [[0] * (len(BUCKETS) + 1) for _ in self.ops]  # [op][bucket], not cumulative
        self.sums = [0.0] * len(self.ops)
        self.busy = 0.0  # seconds handling requests and expiring sessions
        self.session_expiries = 0
        self.busy_ratio = 0.0  # of the last window (`window`)
        self._window = (time.monotonic(), 0.0)

    def observe(self, op: str, result: str, seconds: float) -> None:
        """One request: its op, result (``ok``, ``replayed`` or an error code) and time."""
        i = self._op_index.get(op, -1)  # -1: INVALID_OP, the last
        self.counts[i][self._result_index.get(result, self._internal)] += 1
        self.buckets[i][bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sums[i] += seconds
        self.busy += seconds

    def window(self, now: float) -> None:
        """Close the current busy-ratio window (the loop calls this about once a second)."""
        start, busy = self._window
        if now > start:
            self.busy_ratio = min(1.0, (self.busy - busy) / (now - start))
        self._window = (now, self.busy)


@dataclass(frozen=True)
class Snapshot:
    """The pool as the loop saw it at ``taken`` (time.monotonic())."""

    stats: PoolStats
    counters: PoolCounters
    sessions: int
    taken: float
    remote: RemoteStats | None = None  # the remote prefix tier's counters, where there is one


class Snapshots:
    """Hands a scrape (any thread) a snapshot the loop thread takes: at most
    one per ``MIN_INTERVAL`` seconds, so scrapes in a tight loop cannot take
    the loop's time (a snapshot reads every block's reference count)."""

    MIN_INTERVAL = 0.1

    def __init__(self, take: Callable[[], Snapshot]):
        self._take = take
        self._cond = threading.Condition()
        self.wanted = False  # read by the loop on every turn: a plain attribute
        self.next_at = 0.0  # time.monotonic() before which the loop takes none
        self.latest: Snapshot | None = None
        self.taken = 0  # snapshots taken, ever

    def request(self, wait: float) -> Snapshot | None:
        """A snapshot taken after this call, or after ``wait`` seconds the last
        one (None if none yet)."""
        with self._cond:
            taken = self.taken
            self.wanted = True
            self._cond.wait_for(lambda: self.taken != taken, wait)
            return self.latest

    def serve(self, now: float) -> None:
        """Take one (the loop thread, when ``wanted`` and ``now >= next_at``)."""
        snap = self._take()
        with self._cond:
            self.latest = snap
            self.taken += 1
            self.wanted = False
            self.next_at = now + self.MIN_INTERVAL
            self._cond.notify_all()


def serve_metrics(requests: RequestMetrics, pool: Any, sessions: Callable[[], int], host: str,
          port: int) -> tuple[Snapshots, Any, int]:
    """Serve the metrics of a daemon's ``pool`` (a `KVPool`; its figures read on
    the loop's thread through the returned `Snapshots`) and ``requests`` at
    http://HOST:PORT/metrics from a thread. Returns the snapshots, the HTTP
    server (``shutdown()``, ``server_close()``) and the bound port."""
    from kvpager import __version__
    from kvpager.metrics_collector import Collector

    def take() -> Snapshot:
        remote = pool.remote.stats() if pool.remote is not None else None
        return Snapshot(pool.stats(), pool.counters(), sessions(), time.monotonic(), remote)

    snapshots = Snapshots(take)
    devices = getattr(pool.backend, "devices", None) or [pool.device]
    info = {"version": __version__, "device": ",".join(map(str, devices)), "block_size": str(pool.spec.block_size)}
    httpd, port = serve_http(Collector(requests, snapshots, info), host, port)
    log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)
    return snapshots, httpd, port


#: Scrape connections served at once; one more is closed unanswered, so
#: clients that connect and stall hold no more threads and descriptors.
HTTP_CONNECTIONS = 16
#: Seconds a scrape connection may wait for the client's next bytes (or for
#: it to take the answer's) before it is closed.
HTTP_TIMEOUT = 5.0
#: Seconds a scrape connection may stay open in all: one that trickles a byte
#: within each `HTTP_TIMEOUT` is closed at this age, so stalled clients cannot
#: keep the `HTTP_CONNECTIONS` slots from scrapes for ever.
HTTP_DEADLINE = 15.0


def serve_http(collector: Any, host: str, port: int) -> tuple[Any, int]:
    """Serve ``collector`` (a `kvpager.metrics_collector.Collector`) at
    http://HOST:PORT/metrics from a thread, ``?name[]=`` filters taking family
    and sample names; returns the server (``shutdown()`` / ``server_close()``)
    and the bound port. At most `HTTP_CONNECTIONS` connections at once, each
    closed after `HTTP_TIMEOUT` seconds without progress or `HTTP_DEADLINE`
    seconds in all."""
    from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app

    from kvpager.metrics_collector import by_family, family_samples

    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidArgument(f"metrics port must be an integer in [0, 65535], got {port!r}")
    # auto_describe: a ProcessCollector has no describe(); its collect() (a read of /proc) names it
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    process = ProcessCollector(registry=registry)  # process_cpu_seconds_total, resident memory, open fds
    app = by_family(make_wsgi_app(registry), family_samples([*collector.describe(), *process.collect()]))
    try:
        httpd = _http_server(host, port, app)
    except (OSError, UnicodeError, ValueError) as e:  # (a host name with an empty label: the idna codec's)
        raise InvalidArgument(f"cannot serve metrics on {host}:{port}: {getattr(e, 'strerror', None) or e} "
                              "(choose another --metrics-port / KVPAGER_METRICS_PORT, or --metrics-host)") from None
    threading.Thread(target=httpd.serve_forever, name="kvpager-metrics", daemon=True).start()
    return httpd, httpd.server_address[1]


def _http_server(host: str, port: int, app: Any) -> Any:
    """prometheus_client's WSGI app behind a thread-per-connection server with
    a cap on connections, a timeout on each read and write, and a deadline on
    each connection (its own server has none of them)."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Handler(WSGIRequestHandler):
        timeout = HTTP_TIMEOUT  # per read and write of the connection's socket

        def log_message(self, format: str, *args: Any) -> None:
            pass

    deadline = HTTP_DEADLINE

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        slots = threading.BoundedSemaphore(HTTP_CONNECTIONS)
        deadlines: dict[Any, float] = {}  # connection -> when it is cut (one class per server)
        deadlines_lock = threading.Lock()

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)  # all slots taken: closed at once, unanswered
                return
            with self.deadlines_lock:
                self.deadlines[request] = time.monotonic() + deadline
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._closed(request)
                raise

        def service_actions(self) -> None:
            """Cut connections past their deadline (serve_forever calls this
            between polls, every half second): their reads and writes fail at
            once, and their threads end."""
            now = time.monotonic()
            with self.deadlines_lock:
                late = [r for r, at in self.deadlines.items() if at <= now]
            for request in late:
                with contextlib.suppress(OSError):  # (closed meanwhile)
                    request.shutdown(socket.SHUT_RDWR)

        def _closed(self, request: Any) -> None:
            with self.deadlines_lock:
                self.deadlines.pop(request, None)
            self.slots.release()

        def handle_error(self, request: Any, client_address: Any) -> None:
            log.debug("metrics: a connection from %s failed", client_address, exc_info=True)  # a timeout, a reset

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._closed(request)

    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    Server.address_family = family
    return make_server(sockaddr[0], port, app, Server, handler_class=Handler)
