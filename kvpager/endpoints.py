"""Daemon endpoints: the default ipc:// socket, its private directory, liveness probes.

The default endpoint is an ``ipc://`` socket in a directory only this user
can enter (mode 0700): anyone who can connect can free or read every
sequence, so the directory is the access control. TCP has no access control
and is used only when asked for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import socket
import stat
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from kvpager import env
from kvpager.errors import InvalidArgument

SOCKET_NAME = "kvpager.sock"


def ensure_runtime_dir(path: str | None = None) -> str:
    """Create the runtime directory (mode 0700) or check an existing one:
    it must be a real directory owned by this user with no group/other access."""
    path = path or env.runtime_dir()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"cannot create runtime directory {path}: {e} (set KVPAGER_RUNTIME_DIR)") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"runtime directory {path} is not a directory (a symlink?); refusing to use it")
    if st.st_uid != os.getuid():
        raise InvalidArgument(
            f"runtime directory {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
            "refusing to use it (set KVPAGER_RUNTIME_DIR)"
        )
    if st.st_mode & 0o077:
        raise InvalidArgument(
            f"runtime directory {path} has mode {stat.S_IMODE(st.st_mode):o}; it must be 700 so other "
            f"users cannot reach the daemon: chmod 700 {path}, or set KVPAGER_RUNTIME_DIR"
        )
    return path


def default_endpoint() -> str:
    """KVPAGER_ENDPOINT, else ``ipc://<runtime dir>/kvpager.sock``."""
    return env.endpoint() or f"ipc://{os.path.join(env.runtime_dir(), SOCKET_NAME)}"


def endpoint_or_default(endpoint: Any, bind: bool = False) -> str:
    """`check_endpoint` of ``endpoint``, `default_endpoint` where it is None (only
    None: an empty or falsy endpoint is refused, not taken for the default)."""
    return check_endpoint(default_endpoint() if endpoint is None else endpoint, bind=bind)


def other_process_endpoint(endpoint: Any, bind: bool = False) -> str:
    """`endpoint_or_default` for a command of the CLI, which runs in a process of
    its own: an ``inproc://`` endpoint, which only the process that binds it can
    reach, refused (a command waited out its timeout there; a daemon served no one)."""
    endpoint = endpoint_or_default(endpoint, bind=bind)
    if endpoint.startswith("inproc://"):
        raise InvalidArgument(f"endpoint {endpoint!r}: inproc:// reaches only a daemon in the same process, and "
                              "this command runs in a process of its own: give the daemon's ipc:// or tcp:// endpoint")
    return endpoint


def ipc_path(endpoint: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint, else None."""
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


def text(value: str, what: str) -> str:
    """``value`` if it is text UTF-8 can carry (a command line's undecodable bytes
    arrive as lone surrogates: ZeroMQ then failed with a traceback); else
    InvalidArgument naming ``what``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} {value!r} holds bytes that are not UTF-8") from None
    return value


def check_endpoint(endpoint: Any, bind: bool = False) -> str:
    """``endpoint`` if it is one kvpager uses: ``ipc://PATH``, ``tcp://HOST:PORT``
    (``*`` / port 0 only to bind) or ``inproc://NAME``; else InvalidArgument.
    To bind, a relative ipc:// path is made absolute (``ipc://kv.sock`` bound in
    the daemon's directory, and its "serving on" line named it so, where clients
    started elsewhere could not find it)."""
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise InvalidArgument(f"endpoint {endpoint!r} must look like ipc:///PATH or tcp://HOST:PORT")
    text(endpoint, "endpoint")
    scheme, rest = endpoint.split("://", 1)
    if scheme == "ipc" and rest and bind and not rest.startswith(("/", "@")):  # @: Linux's abstract names
        return "ipc://" + os.path.abspath(rest)
    if scheme in ("ipc", "inproc") and rest:
        return endpoint
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        ok_port = port.isdigit() and (0 if bind else 1) <= int(port) <= 65535
        if host and ok_port and (bind or host != "*") and _tcp_host(host):
            return endpoint
        raise InvalidArgument(f"endpoint {endpoint!r}: tcp endpoints are tcp://HOST:PORT (a host name, an IPv4 "
                              f"address or an IPv6 one in brackets) with a port in [{0 if bind else 1}, 65535]")
    raise InvalidArgument(f"endpoint {endpoint!r} must look like ipc:///PATH or tcp://HOST:PORT")


def _tcp_host(host: str) -> bool:
    """Whether ``host`` can be a tcp endpoint's: an IPv6 address in brackets, or a
    name, an IPv4 address, an interface or ``*`` (no space, bracket, slash or colon
    in it). ``tcp://[zz]:1`` or ``tcp://a b:5`` ended in tracebacks (the URL parser's,
    ZeroMQ's); ``tcp://127.0.0.1:80:90`` passed (its host ``127.0.0.1:80``), a start
    then failed with "No such device" and a client called it no daemon."""
    if host.startswith("["):
        if not host.endswith("]"):
            return False
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return not any(c.isspace() or c in "[]/:" for c in host)


def open_socket(ctx: Any, kind: int, endpoint: str) -> Any:
    """A ZeroMQ socket of ``kind`` for ``endpoint``, with linger 0 and, for an
    IPv6 address (``tcp://[::1]:PORT``), IPv6 on: ZeroMQ sockets speak IPv4 only
    unless told, and such an endpoint failed with "No such device"."""
    import zmq

    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    return sock


def is_local(endpoint: str) -> bool:
    """Whether only this host can reach ``endpoint``: ipc://, inproc://, or TCP
    bound to a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    try:
        host = urlsplit(endpoint).hostname or ""
    except ValueError:  # (not an endpoint `check_endpoint` passes)
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface or host name


#: how `probe` begins its answer where a daemon listens but takes no new connections for now
AT_CAP = "the daemon there is at the most connections"


def at_cap(path: str) -> bool:
    """Whether a daemon listens at ``path + ".full"``: its socket file, renamed while
    its connections are at their cap (`kvpager.server_watch`). A file left there by
    one that died (killed while renamed) is no daemon."""
    full = path + ".full"
    if not is_socket(full):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(full)
        except (TimeoutError, BlockingIOError):
            return True  # (its queue of connections full: there)
        except OSError as e:
            return e.errno in (errno.EAGAIN, errno.EWOULDBLOCK)
    return True


def probe(endpoint: str, timeout: float = 1.0) -> str | None:
    """Why nothing listens at ``endpoint`` (a short reason), or None if something
    accepts connections there. Only ipc:// and tcp:// are probed."""
    path = ipc_path(endpoint)
    if path is not None:
        if not os.path.exists(path):
            if at_cap(path):
                return (f"{AT_CAP} its open files limit holds ({path}.full until some end): close clients' "
                        "unused sockets, or raise the daemon's limit")
            return f"no socket file {path}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(path)
            except (TimeoutError, BlockingIOError):
                # a listener whose queue of connections is full (a stopped daemon that
                # timed-out clients kept reconnecting to): there, not gone
                return None
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return None
                return f"{path}: {e.strerror or e}"
        return None
    if endpoint.startswith("tcp://"):
        try:
            parts = urlsplit(endpoint)
            host, port = parts.hostname, parts.port
        except ValueError:
            return f"bad tcp endpoint {endpoint}"
        if host is None or port is None:
            return f"bad tcp endpoint {endpoint}"
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:  # (a timeout too: a host that does not answer is said gone at once)
            return f"{host}:{port}: {e.strerror or e}"
    return None


def is_default_socket(path: str | None) -> bool:
    """Whether ``path`` is the default socket's (in the runtime directory, whatever
    endpoint named it), whose private directory a start makes."""
    return path == os.path.join(env.runtime_dir(), SOCKET_NAME)


def ensure_default_dir(path: str) -> None:
    """Where ``path`` is the default socket's, that private directory made or
    checked (`ensure_runtime_dir`)."""
    if is_default_socket(path):
        ensure_runtime_dir(os.path.dirname(path))


def check_ipc_bind(endpoint: str) -> str | None:
    """The refusals of `prepare_ipc_bind`, removing nothing: InvalidArgument if a
    daemon already listens at an ipc:// ``endpoint``, or if its path is anything but
    a socket (or the default runtime directory is not private); returns the
    path of a stale socket file to remove (None: none)."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    ensure_default_dir(path)
    if at_cap(path):  # (a daemon there whose file is out of clients' way for now)
        raise InvalidArgument(f"another daemon already listens at {endpoint}, at the most connections its open "
                              f"files limit holds (its socket file is {path}.full until some end)")
    if not os.path.lexists(path):
        return None
    if not is_socket(path):
        raise InvalidArgument(f"{path} exists and is not a socket; refusing to remove it: "
                              "choose another --endpoint")
    if probe(endpoint) is None:
        raise InvalidArgument(f"another daemon already listens at {endpoint}")
    return path


def prepare_ipc_bind(endpoint: str) -> None:
    """Before binding an ipc:// endpoint: refuse if a daemon already listens
    there, or if the path is anything but a socket; remove a stale socket file
    left by one that died."""
    path = check_ipc_bind(endpoint)
    if path is not None:
        try:
            os.unlink(path)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise InvalidArgument(f"cannot remove stale socket {path}: {e}") from None
    full = ipc_path(endpoint)
    if full is not None and is_socket(full := full + ".full"):  # (a dead daemon's, renamed at its cap)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(full)


#: How long a daemon waits for another one's bind on the same ipc:// path (`bind_lock`).
BIND_WAIT = 5.0


@contextlib.contextmanager
def bind_lock(endpoint: str, wait: float = BIND_WAIT) -> Iterator[None]:
    """Held around an ipc:// endpoint's check and bind (`prepare_ipc_bind`, then the
    bind): an exclusive ``flock`` on ``<path>.lock`` beside the socket, removed at the
    end. ZeroMQ's bind removes whatever socket file is at its path, so two daemons
    started together both passed the check (no socket yet) and both bound: the first
    served on with its file gone, where no client could reach it. Under the lock the
    second's check finds the first's socket and is refused. Nothing for tcp:// or a
    Linux abstract name (the kernel refuses a second bind of those). InvalidArgument
    if another process holds the lock past ``wait`` seconds, or it cannot be made."""
    path = ipc_path(endpoint)
    if path is None or path.startswith("@"):
        yield
        return
    name = path + ".lock"
    deadline = time.monotonic() + wait
    while True:
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise InvalidArgument(f"cannot bind {endpoint}: cannot make its lock file {name}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                raise InvalidArgument(f"cannot bind {endpoint}: another process has been binding it for {wait:g} s "
                                      f"(it holds {name})") from None
            time.sleep(0.01)
            continue
        if _same_file(fd, name):
            break
        os.close(fd)  # (its holder removed it as this one opened it: lock the file at the path now)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)  # (while held: a waiter that opened it finds it gone and opens anew)
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    """Whether the open file ``fd`` is still the file at ``path``."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def socket_file(path: str | None) -> tuple[int, int] | None:
    """The (device, inode) of the socket file at ``path`` (None: no path, or no
    socket there): what a daemon that bound it keeps, to remove only its own file
    at the end (`unlink_socket_file`)."""
    if path is None:
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None


def unlink_socket_file(path: str | None, bound: tuple[int, int] | None) -> None:
    """Remove the socket file at ``path`` if it is still the one this process bound
    (``bound``: `socket_file` just after the bind). Another daemon may have bound the
    path since (this one's file removed by an operator or a /tmp cleaner, or a new
    daemon that started while this one was closing): removing that daemon's file
    left it running where no client could reach it."""
    if path is not None and bound is not None and socket_file(path) == bound:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def is_socket(path: str) -> bool:
    """Whether ``path`` itself (not a symlink's target) is a socket file: the
    only thing the daemon ever unlinks at an ipc:// endpoint."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def endpoint_key(endpoint: str) -> str:
    """``endpoint`` as the place it binds: an ipc:// path made absolute and normal
    (``ipc:///run/kv//a.sock`` is ``ipc:///run/kv/a.sock``), for telling two
    endpoints of one daemon apart (the same socket given twice waited 5 s, then
    blamed another process)."""
    if endpoint.startswith("ipc://"):
        return "ipc://" + os.path.normpath(os.path.abspath(endpoint[len("ipc://"):]))
    return endpoint
