"""The daemon's socket and observers: `bind` opens the ROUTER socket (an ipc://
socket made private, a token required beyond loopback) and starts the metrics
server and the KV event publisher; `close` ends every session and releases all
of it, shared memory included."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket

import zmq

from kvpager import protocol
from kvpager.endpoints import (
    bind_lock,
    check_ipc_bind,
    endpoint_key,
    ensure_default_dir,
    ipc_path,
    is_local,
    open_socket,
    other_process_endpoint,
    prepare_ipc_bind,
    socket_file,
    unlink_socket_file,
)
from kvpager.errors import InvalidArgument
from kvpager.metrics import serve_metrics
from kvpager.render import human_bytes
from kvpager.server_ranks import close_release_count
from kvpager.server_watch import (
    ConnectionWatch,
    backlog,
    connection_cap,
    events_cap,
    held_files,
    open_files_limit,
    watched,
)

log = logging.getLogger("kvpager.server")

_POLL_MS = 50  # how soon stop() and heartbeat expiry are noticed when idle
#: Messages the ROUTER socket queues a connection, each way. A client has one call in flight on its
#: socket (its heartbeat has a socket of its own; a call that timed out is sent again on a new one),
#: so a few are plenty; ZeroMQ's default of 1,000 let one connection pin a thousand messages of up to
#: the message limit in the daemon's memory: a client that sent without waiting (100 requests of 9.6
#: MB: +953 MB), or one that stopped reading its replies (40 replies of 26 MB: +985 MB). Past it, a
#: connection's requests wait in its own sender and replies it does not read are dropped.
QUEUED_MESSAGES = 4
#: How often the daemon pings each connection at the transport level (ZMTP); a peer silent for three
#: pings is dropped. Its sessions are the heartbeats' business, not this.
PING_MS = 10_000


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit (at most 2**20):
    the daemon holds one a connection, and at a common soft limit of 1,024 a thousand
    idle connections locked every new client out. Returns (soft, hard) as they are now."""
    try:
        import resource
    except ImportError:  # (no such limit here)
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, want, e)
    return soft, hard


#: Open files a session holds in the daemon: its client's two connections (calls, heartbeats).
FILES_A_SESSION = 2


def check_open_files(soft: int) -> None:
    """InvalidArgument where the open files limit ``soft`` leaves no room for a
    client's connections beside the files this process holds now and a reserve:
    said by `kvpager serve` before it allocates the pool. The daemon fits its
    sessions to the limit once bound (`Binding._watch_connections`)."""
    if soft < 0:  # (no such limit here, or none at all)
        return
    cap = connection_cap(soft, held_files())
    if cap is not None and cap <= 4 * FILES_A_SESSION:
        raise InvalidArgument(
            f"the open files limit ({soft}) leaves no room for clients' connections beside the daemon's own "
            "files: raise it (ulimit -n; systemd LimitNOFILE=; docker run --ulimit nofile=N:N)")


def check_before_allocating(endpoint: str | None, token: str | None, metrics: tuple[str, int] | None = None) -> str:
    """The refusals of `Binding.bind` that need no socket, for `kvpager serve` to
    say before it allocates the pool: a malformed endpoint, TCP beyond loopback
    without a token, an ipc:// path that is no socket or where a daemon listens
    (`check_ipc_bind`) or where no socket can be made (`check_ipc_place`), a tcp
    port taken (`check_tcp_port`), the metrics server's port taken (``metrics``:
    its host and port, `check_port_free`). Once they came only after the pool was
    allocated (a GPU's memory, or /dev/shm, taken and given back for nothing).
    Returns the endpoint (``None``: the default)."""
    endpoint = other_process_endpoint(endpoint, bind=True)
    refuse_open_tcp(endpoint, token)
    check_ipc_bind(endpoint)  # (first: it makes the default endpoint's private folder)
    check_ipc_place(endpoint)
    check_tcp_port(endpoint)
    if metrics is not None:  # (its server bound after the pool is made: a taken port found there once)
        host, port = metrics
        check_port_free(host, port, f"the metrics server's {host}:{port}", "--metrics-port")
    return endpoint


def check_tcp_port(endpoint: str) -> None:
    """InvalidArgument if a tcp:// ``endpoint``'s port is taken: a listener there
    refuses a bind with SO_REUSEADDR (ZeroMQ binds with it), which a port some
    connection left in TIME_WAIT does not. Another daemon on the port was said only
    once the pool was allocated. A host that does not resolve here (an interface
    name) is left to the bind."""
    if not endpoint.startswith("tcp://"):
        return
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    check_port_free("" if host == "*" else host.strip("[]"), int(port), endpoint, "--endpoint")


def check_port_free(host: str, port: int, what: str, option: str) -> None:
    """InvalidArgument if TCP ``port`` of ``host`` ("": every address) is taken (as
    `check_tcp_port`; ``what`` and ``option`` name it: the endpoint's, the metrics
    server's). Port 0 (any free one) and a host that does not resolve here pass."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return
    for family, kind, proto, _, address in addresses:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # (a family this host does not have: IPv6 turned off)
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise InvalidArgument(f"cannot bind {what}: the port is taken (another daemon, or another "
                                          f"program, listens there): choose another {option}") from None


def check_ipc_place(endpoint: str, option: str = "--endpoint") -> None:
    """InvalidArgument if an ipc:// ``endpoint``'s socket cannot be made where it
    names: a path longer than a unix socket's address holds, or a folder that is
    missing, is no folder or is not this user's to write in. ZeroMQ's refusal said
    so only once the pool was allocated (a GPU's memory, or /dev/shm, taken and
    given back), in words about its own constants."""
    path = ipc_path(endpoint)
    if path is None or path.startswith("@"):  # (Linux's abstract names live in no folder)
        return
    longest = getattr(zmq, "IPC_PATH_MAX_LEN", 107)
    size = len(os.fsencode(path))
    if size > longest:
        fix = ("a shorter --endpoint (KVPAGER_ENDPOINT), e.g. ipc:///tmp/kvpager/kv.sock, or set "
               "KVPAGER_RUNTIME_DIR to a shorter folder") if option == "--endpoint" else f"a shorter {option}"
        raise InvalidArgument(f"{endpoint}: the socket's path is {size} bytes, and a unix socket's path holds at "
                              f"most {longest}: choose {fix}")
    folder = os.path.dirname(path) or "/"
    if not os.path.isdir(folder):
        why = "does not exist" if not os.path.lexists(folder) else "is not a folder"
        raise InvalidArgument(f"{endpoint}: the socket's folder {folder} {why}: create it (mkdir -p {folder}, "
                              f"mode 700) or choose another {option}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgument(f"{endpoint}: this user (uid {os.getuid()}) cannot create a socket in {folder}: "
                              f"choose a folder of yours (another {option}), or run as its owner")


def refuse_open_tcp(endpoint: str, token: str | None) -> None:
    """InvalidArgument if ``endpoint`` is reachable beyond this host and there is no token."""
    if token is None and not is_local(endpoint):
        raise InvalidArgument(
            f"{endpoint} is reachable beyond this host: give the daemon a token "
            "(kvpager serve --token-file FILE, or KVPAGER_TOKEN) that clients send in hello")


class Binding:
    """Mixed into `Server`, which supplies ``pool``, ``endpoint``, ``token``,
    ``max_message_bytes``, ``sessions``, ``memory``, ``rank_memory``, ``owns_pool``, ``_watch``,
    ``events``, ``request_metrics`` and the metrics' settings, ``requests``,
    ``_ctx``, ``_sock``, ``_sink``, ``_snapshots``, ``_httpd``, ``_end`` and
    ``_flush_events``."""

    def bind(self) -> str:
        """Open and bind the socket; returns the actual endpoint (tcp port ``*`` resolved).
        On failure everything is released (`close()`), shared memory included."""
        try:
            return self._bind()
        except BaseException:
            self.close()
            raise

    def _bind(self) -> str:
        refuse_open_tcp(self.endpoint, self.token)
        with bind_lock(self.endpoint):
            return self._bind_socket()

    def _bind_socket(self) -> str:
        prepare_ipc_bind(self.endpoint)
        self._ctx = zmq.Context()
        sock = open_socket(self._ctx, zmq.ROUTER, self.endpoint)
        # A blocking recv that gives up every _POLL_MS: one call per message
        # when busy, and a regular chance to expire sessions and see stop().
        sock.setsockopt(zmq.RCVTIMEO, _POLL_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes + protocol.TRANSPORT_SLACK)
        sock.setsockopt(zmq.SNDHWM, QUEUED_MESSAGES)
        sock.setsockopt(zmq.RCVHWM, QUEUED_MESSAGES)
        # a reply that finds its queue full raises (the loop takes in the socket's notices and tries
        # once more) instead of going nowhere in silence: see `Server._loop`
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # ZMTP pings on every connection: one whose peer stopped answering (a host gone, a
        # half-open TCP connection) is dropped, and its file descriptor with it
        sock.setsockopt(zmq.HEARTBEAT_IVL, PING_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * PING_MS)
        sock.setsockopt(zmq.BACKLOG, backlog(open_files_limit()))  # (accepted past the watch's cap: `server_watch`)
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
        self._socket_file = socket_file(path)  # what close may remove: this daemon's file alone
        if path:
            os.chmod(path, 0o600)
        elif self.token is None and self.endpoint.startswith("tcp://"):
            log.warning("listening on %s without a token: every local user can use the pool "
                        "(--token-file / KVPAGER_TOKEN)", self.endpoint)
        self._watch_connections()  # (after the file is taken: the watch may rename it at once)
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
        self._served = True
        return self.endpoint

    def _watch_connections(self) -> None:
        """Close connections past what the open files limit holds as they come
        (`kvpager.server_watch`), and open no more sessions than fit under that cap
        with room for hellos being refused and the control token's sessions: counted
        here, with the files this daemon holds once bound (`kvpager serve` counted
        them before the pool and the socket were made, and a session past them was
        shut out unanswered instead of refused at hello)."""
        if not watched(self.endpoint):
            return
        soft = open_files_limit()
        cap = connection_cap(soft, held_files())
        if cap is None:
            return
        if self.events is not None:  # (its publisher's two sockets: subscribers' connections, a share each)
            self._events_cap = events_cap(cap)
            cap -= 2 * self._events_cap
        from kvpager.server_ops import CONTROL_SESSIONS

        slack = max(4, cap // 8)  # (connections not in a session yet: hellos, refused ones too)
        fit = max((cap - slack) // FILES_A_SESSION - (CONTROL_SESSIONS if self.control_token else 0), 1)
        if fit < self.limits.sessions:
            log.warning("the open files limit (%d) holds about %d sessions (%d connections each) beside the "
                        "daemon's own files: sessions past %d are refused, not the %d of --max-sessions (past the "
                        "files, ZeroMQ ends the daemon); raise the limit (ulimit -n; systemd LimitNOFILE=; docker "
                        "run --ulimit nofile=N:N) for more", soft, fit, FILES_A_SESSION, fit, self.limits.sessions)
            self.limits = self.sessions.limits = dataclasses.replace(self.limits, sessions=fit)
        path = ipc_path(self.endpoint)
        self._watch = ConnectionWatch(self._sock, self.endpoint, cap,
                                      None if path is None or path.startswith("@") else path, self._file_lock)

    def keep_socket_file(self) -> None:
        """Make the ipc:// socket file again where it was removed while the daemon
        serves (a /tmp cleaner, logind removing the runtime folder of a login session
        that ended, an operator's ``rm``): the daemon served on where no new client
        could reach it, without a word, and a second daemon started on the path beside
        it (two pools, the first one's memory held for nothing). Called by the loop
        about once a second; one ``lstat`` while the file is there. A file another
        daemon bound since is left alone (said once); a file that cannot be made
        again is said once and tried again each call."""
        path = ipc_path(self.endpoint)
        if path is None or path.startswith("@") or self._sock is None:
            return
        if self._socket_file is not None and socket_file(path) == self._socket_file:
            return
        with self._file_lock:  # (the watch renames it while connections are at their cap: not removed)
            if self._watch is None or not self._watch.hidden:
                self._make_socket_file(path)

    def _make_socket_file(self, path: str) -> None:
        if os.path.lexists(path):  # another daemon's (or anything else) since: never removed
            if self._socket_file is not None:
                log.error("the socket file %s was removed and something else is there now (another daemon?): "
                          "new clients no longer reach this daemon, only the connections it has; stop one of "
                          "them, or give each its own --endpoint", path)
                self._socket_file = None
            return
        try:
            ensure_default_dir(path)  # (the default socket's private folder, made again where it is gone)
            with bind_lock(self.endpoint, wait=0.0):
                if os.path.lexists(path):  # (bound by another daemon as this one took the lock)
                    return
                self._sock.bind(self.endpoint)
                os.chmod(path, 0o600)
                self._socket_file = socket_file(path)
        except (InvalidArgument, OSError, zmq.ZMQError) as e:
            self._socket_file = None
            if not self._socket_lost:
                self._socket_lost = True
                log.error("the socket file %s was removed, and cannot be made again (%s): new clients cannot "
                          "reach this daemon (the ones connected keep their connections); restart it on an "
                          "--endpoint in a folder that lasts (KVPAGER_RUNTIME_DIR for the default one)", path, e)
            return
        log.warning("the socket file %s was removed while serving (a /tmp cleaner? the runtime folder of a login "
                    "session that ended?): made it again", path)
        self._socket_lost = False

    def _start_observers(self) -> None:
        if self.events is not None and endpoint_key(self.endpoint) in (
                endpoint_key(self.events.endpoint), endpoint_key(self.events.replay_endpoint)):
            raise InvalidArgument(f"the KV events endpoints must differ from the daemon's {self.endpoint}")
        if self.request_metrics is not None:
            self._snapshots, self._httpd, self.metrics_port = serve_metrics(
                self.request_metrics, self.pool, lambda: len(self.sessions), self.metrics_host, self.metrics_port)
        if self.events is not None:
            self.pool.set_event_sink(self._sink)
            self.events.bind(self._events_cap)

    def close(self) -> None:
        """End every session (freeing its sequences), close the socket, unlink
        the ipc socket and the shared memory."""
        for s in list(self.sessions.sessions.values()):
            self._end(s, "daemon shutting down")
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            self._ctx.term()
            # never anything else found there, nor another daemon's socket bound there since
            unlink_socket_file(ipc_path(self.endpoint), self._socket_file)
            self._socket_file = None
        close_release_count(self)
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
        if self._served:  # (a bind that failed: its error says why, nothing was served)
            self._served = False
            log.info("stopped after %d requests", self.requests)
