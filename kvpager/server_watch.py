"""The daemon's connections kept within its open files: `ConnectionWatch` counts
the ROUTER socket's connections from ZeroMQ's monitor events, on a thread of its
own; near the open files limit it takes an ipc:// endpoint's socket file out of
clients' way until some connections end, and it shuts down any connection
accepted past its cap.

Every connection holds one of the daemon's file descriptors, connections that
never say hello included, and ZeroMQ (4.3) aborts the whole process when its
ipc:// listener's ``accept`` finds none left (an assertion, not an error):
every session went with it. Sessions were capped to fit the open files limit,
connections were not: 250 idle connections of a
client that leaked its sockets, or of a hostile one, ended a daemon whose limit
was 200 (on tcp:// ZeroMQ copes, and the other files the daemon opens, shared
memory for a session or the remote store's connections, failed instead).

A ROUTER socket has no call to stop accepting for a while: unbinding its
endpoint drops every connection accepted through it. So at the cap the socket
file is renamed beside itself (``PATH.full``): the listening socket and its
connections go on, a new client's connect finds no file (its ZeroMQ tries again
every 100 ms) and takes no descriptor of the daemon's; the file is named back
once connections fall below the cap. Connections accepted past the cap before
the rename (a burst, the listen queue's) are shut down by their descriptor,
which ZeroMQ's monitor event names, after checking that it is still a socket of
this endpoint (no other file of the daemon's that took the number since);
shutting them down alone made the clients' retries a storm of accepts, one of
which found no file left. Where there is no file to rename (tcp://, a Linux
abstract name) connections past the cap are shut down as they come. The cap
leaves room for every session the limits allow (fitted to it at bind), two
connections each, and a reserve for a burst."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from typing import Any

import zmq

log = logging.getLogger("kvpager.server")

#: Files kept free above the connections' cap: a fixed few and a share of the limit, for what
#: sessions open besides their connections (shared memory, the remote store's sockets, scrapes,
#: event subscribers) and for connections accepted past the cap before the watch's thread sees them
#: (the listen queue's, a burst's).
RESERVE_FILES = 32
RESERVE_SHARE = 16


def backlog(soft: int) -> int:
    """The listen queue of the daemon's sockets under the open files limit ``soft``:
    connections the kernel holds for a listener, which it may accept after the socket
    file was renamed (so counted in the reserve). ZeroMQ's default of 100 where the
    limit affords it (a sixty-fourth of it), at least 16: past it clients connecting
    at the same instant (many ranks starting together) try again 100 ms later."""
    return 100 if soft < 0 else min(100, max(16, soft // 64))

#: How often the watch's thread looks at its stop flag while no event comes.
_WAIT_MS = 20
_EVENT = struct.Struct("=HI")  # a monitor event's first frame: the event, its value (the descriptor)


def connection_cap(soft: int, held: int) -> int | None:
    """The most connections a daemon holding ``held`` files keeps under the open
    files limit ``soft`` (None: no limit here), a reserve above them for bursts."""
    if soft < 0:
        return None
    return max(soft - held - RESERVE_FILES - soft // RESERVE_SHARE - backlog(soft), 4)


def events_cap(cap: int) -> int:
    """The connections each of the KV events publisher's sockets keeps, out of a
    daemon's ``cap``: subscribers are a few processes, and one that leaks its
    sockets must not take the files the daemon's clients need."""
    return max(4, min(256, cap // 16))


def open_files_limit() -> int:
    """This process's soft limit of open files now (-1: none, or no such limit)."""
    try:
        import resource
    except ImportError:
        return -1
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else soft


def held_files() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16  # (no /proc: about what a daemon holds before clients come)


class ConnectionWatch:
    """Counts the connections of ``sock`` bound at ``endpoint``; at ``cap`` renames
    ``path`` (its socket file; None: none to rename) out of clients' way and shuts
    down each connection accepted past it, and names the file back once they are a
    few under it. Made and closed by the thread that owns ``sock`` (the monitor is
    set up on it); counts on a daemon thread of its own, which touches ``sock``
    only to turn the monitor off once `close` is called (the owner done with it).
    ``lock`` is held while the file is renamed either way (the loop's
    `Binding.keep_socket_file` takes it too, and leaves a hidden file alone)."""

    def __init__(self, sock: zmq.Socket, endpoint: str, cap: int, path: str | None, lock: threading.Lock):
        self.cap = cap
        self.open = 0  # connections accepted and not yet ended (written by the watch's thread only)
        self.shed = 0  # connections shut down past the cap, in all
        self.hidden = False  # the socket file renamed (to ``path + ".full"``)
        self.lock = lock
        self._path = path
        self._sock = sock
        self._local = _local_address(endpoint)
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._stop = threading.Event()
        self._full = False  # at the cap since the last warning
        self._thread = threading.Thread(target=self._run, name="kvpager-connections", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop counting; a renamed socket file named back (for the daemon's close to
        remove). Called once the socket's own thread is done with it: the watch's
        thread drains the events queued and turns the monitor off itself (ZeroMQ's
        I/O thread waits on a full monitor queue holding the monitor's lock, and
        turning it off from here, the GIL held, while the watch's thread needed the
        GIL to drain that queue, would have hung the daemon's stop)."""
        self._stop.set()
        self._thread.join(2 * _WAIT_MS / 1000 + 2)
        if self._thread.is_alive():  # (stuck: the monitor left on; the socket's close ends it)
            log.warning("the connections' watch did not stop; closing without it")
        self._monitor.close(0)
        self._show()

    def _run(self) -> None:
        monitor, stop = self._monitor, self._stop
        while True:
            try:
                if monitor.poll(_WAIT_MS):
                    while True:  # (every event there: one wake-up a burst)
                        self._event(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                pass
            except zmq.ZMQError:  # (closed under it: the daemon ends)
                return
            except Exception:  # (a bug here must not stop the count: ZeroMQ's I/O thread waits on its queue)
                log.exception("the connections' watch: an event could not be counted")
            if stop.is_set():
                break
        with contextlib.suppress(Exception):  # (every event drained: the I/O thread is not waiting on a full queue)
            while True:
                self._event(monitor.recv_multipart(zmq.NOBLOCK))
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()

    def _event(self, frames: list[bytes]) -> None:
        try:
            event, fd = _EVENT.unpack_from(frames[0])
        except (struct.error, IndexError):
            return
        if event == zmq.EVENT_ACCEPTED:
            self.open += 1
            if self.open >= self.cap:
                self._at_cap()
                if self.open > self.cap and self._shut(fd):
                    self.shed += 1
        elif event == zmq.EVENT_DISCONNECTED:
            self.open = max(self.open - 1, 0)
            if self._full and self.open <= self.cap - max(self.cap // 16, 2):
                self._full = False
                self._show()
                log.info("connections under the cap again (%d of %d): new clients reach the daemon "
                         "(%d shut down past the cap in all)", self.open, self.cap, self.shed)

    def _at_cap(self) -> None:
        if self._full:
            return
        self._full = True
        self._hide()
        log.warning(
            "%d connections, the most this daemon's open files limit holds beside its own files: new clients "
            "cannot connect until some end%s (a client that opens sockets and never closes them? raise the "
            "limit: ulimit -n, systemd LimitNOFILE=)", self.open,
            f" (the socket file is {self._path}.full meanwhile)" if self.hidden else "")

    def _hide(self) -> None:
        if self._path is None:
            return
        with self.lock:
            try:
                os.rename(self._path, self._path + ".full")
                self.hidden = True
            except OSError as e:  # (removed meanwhile: `keep_socket_file` makes it again)
                log.debug("could not rename %s: %s", self._path, e)

    def _show(self) -> None:
        if not self.hidden:
            return
        with self.lock:
            self.hidden = False
            try:
                if os.path.lexists(self._path):  # (something else there now: ours removed)
                    os.unlink(self._path + ".full")
                    log.error("something was bound at %s while this daemon's connections were at their cap "
                              "(another daemon?): new clients reach it, not this daemon, which keeps only the "
                              "connections it has; stop one of them, or give each its own --endpoint", self._path)
                else:
                    os.rename(self._path + ".full", self._path)
            except OSError as e:
                log.debug("could not name %s back: %s", self._path, e)

    def _shut(self, fd: int) -> bool:
        """Shut down the accepted socket ``fd`` (ZeroMQ then ends its connection and
        closes it) if it is still one of this endpoint's."""
        try:
            s = socket.socket(fileno=fd)
        except OSError:  # (closed since, or no socket now)
            return False
        try:
            if not _same_endpoint(s, self._local):
                return False
            s.shutdown(socket.SHUT_RDWR)
            return True
        except OSError:
            return False
        finally:
            s.detach()  # (ZeroMQ's descriptor: never closed here)


def watched(endpoint: str) -> bool:
    """Whether connections to ``endpoint`` take file descriptors (ipc://, tcp://;
    not inproc://)."""
    return endpoint.startswith(("ipc://", "tcp://"))


def _local_address(endpoint: str) -> tuple[str, Any]:
    """What an accepted socket of ``endpoint`` reports as its own address:
    ("unix", the path as the kernel gives it) or ("tcp", (host or None for any
    address, port))."""
    transport, _, rest = endpoint.partition("://")
    if transport == "ipc":
        return "unix", "\0" + rest[1:] if rest.startswith("@") else rest
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    return "tcp", (None if host in ("", "*", "0.0.0.0", "::") else host, int(port))


def _same_endpoint(s: socket.socket, local: tuple[str, Any]) -> bool:
    kind, address = local
    name = s.getsockname()
    if kind == "unix":
        if s.family != socket.AF_UNIX:
            return False
        if isinstance(name, bytes):  # (an abstract name)
            name = name.decode("utf-8", "surrogateescape")
        return name == address
    host, port = address
    if s.family not in (socket.AF_INET, socket.AF_INET6) or name[1] != port:
        return False
    # (another listener on the same port at another address, the metrics server's say: not ours)
    return host is None or name[0] == host or name[0] == "::ffff:" + host
