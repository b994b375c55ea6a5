"""Lookups read straight into a staging buffer: pipelined ``GETRANGE`` replies
parsed by a minimal RESP reader on a redis-py connection's socket, several
connections at once (the probe's pipelined ``TYPE``, read the same way:
`kvpager.remote_key_types`).

redis-py's parser copies every value into a new ``bytes`` object (and
hiredis first into its own buffer); for 2 MiB values that copying, on the
thread that waits, costs more than the store's own work. Here each value's
bytes go from the socket into its row of the caller's buffer
(``recv_into``); only the short lines between values pass through a small
read-ahead buffer. Everything else (connecting, AUTH, TLS, SELECT, the
client name, timeouts) is redis-py's connection, taken from and returned to
its pool.

Each key is asked as ``GETRANGE key 0 W`` (W: a value's length), not ``GET``
or ``MGET``: at most W + 1 bytes of it come back, so a key holding a value of
hundreds of megabytes (another program, a hostile writer) costs a lookup W + 1
bytes, not the store building and sending the whole value (which held a
lookup past its timeout, every time, so the tier never restored again); a
reply announcing more than W + 1 bytes is malformed and fails the lookup at
once.

A lookup is split into chunks of about ``chunk_bytes`` (one pipeline each:
Redis builds a reply of 8 MiB far faster than one of 256 MiB, whose reply
buffers no longer fit in a cache) and ``connections`` threads fetch chunks
in turn, the caller's thread being one of them; socket reads and the
checksums of ``done`` release the GIL, so the checks of one chunk overlap the
transfer of the next. A lookup's replies must come within its own time
(`lookup_deadline`: the lookup timeout for each of a connection's round trips
and one more, at least a second, plus its bytes at `MIN_RATE`), not only
each read within the timeout: a reply of the right length sent a few bytes at
a time (a broken link, a hostile store) held the lookup, on the daemon's
loop, for as long as it kept coming. Any failure (timeout, the lookup's time
up, reset, closed connection, an error reply, a malformed reply) fails the
whole lookup: the connection it
happened on is dropped (never reused half-read), the other threads stop
after their current chunk, and the caller gets `FetchError` (`ReplyError`
for an error reply).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_AHEAD = 64 << 10  # the read-ahead buffer for reply lines
_LINE_READ = 256  # most bytes read ahead for a line: a value's bytes should go to their row
MAX_LINE = 4 << 10  # a longer line is not a reply to GETRANGE or TYPE
#: the slowest a lookup's replies may come, on top of the lookup timeout: a loaded
#: gigabit link reads faster; a store that sends slower fails the lookup
MIN_RATE = 64 << 20  # bytes a second


#: the least time a lookup is given, whatever its timeout: a loaded host (its threads, the
#: GIL) stretches a healthy lookup well past a 0.1 s timeout's round trips, and a second is
#: still well inside the heartbeats that keep the daemon's clients (5 s by default)
LOOKUP_FLOOR = 1.0


def lookup_deadline(timeout: float, nbytes: int, round_trips: int = 1) -> float:
    """When a lookup of about ``nbytes`` bytes in ``round_trips`` pipelines one after
    another must have its replies (monotonic time): the lookup timeout for each
    round trip and one more (at least `LOOKUP_FLOOR`), plus its bytes at `MIN_RATE`."""
    return time.monotonic() + max(LOOKUP_FLOOR, (round_trips + 1) * timeout) + nbytes / MIN_RATE


def recv_into(sock: Any, view: memoryview, n: int, deadline: float | None, per_read: float | None) -> int:
    """``sock.recv_into(view, n)``, waiting at most ``per_read`` (the socket's own
    timeout) and never past ``deadline``; FetchError once it has passed."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError(f"the store's replies came slower than {MIN_RATE >> 20} MiB/s: the lookup's "
                             "time is up")
        sock.settimeout(left if per_read is None else min(per_read, left))
    return sock.recv_into(view, n)


class FetchError(Exception):
    """A chunked lookup failed; the message says where and why."""


class ReplyError(FetchError):
    """The store answered an error (``reply``: its text, e.g. ``NOPERM ...``)."""

    def __init__(self, reply: str, what: str = ""):
        self.reply = reply
        super().__init__(f"the store answered {reply[:200]!r}{what}")


def reply_error(line: bytes, what: str = "") -> ReplyError:
    """The `ReplyError` of an error line (``-...``)."""
    return ReplyError(line[1:].decode(errors="replace").rstrip("\r\n"), what)


class Reader:
    """A RESP2 reply reader over one socket: lines through a small read-ahead
    buffer, bulk payloads ``recv_into`` their destination; every read by
    ``deadline`` (`lookup_deadline`; None: each read within the socket's own
    timeout only). `restore` gives the socket its own timeout back."""

    def __init__(self, sock: Any, deadline: float | None = None):
        self.sock, self.deadline = sock, deadline
        self.per_read = sock.gettimeout() if deadline is not None else None
        self.buf = bytearray(_AHEAD)
        self.view = memoryview(self.buf)
        self.lo = self.hi = 0

    def _fill(self, most: int = _AHEAD) -> None:
        if self.lo == self.hi:
            self.lo = self.hi = 0
        elif self.hi == len(self.buf):
            n = self.hi - self.lo
            self.buf[:n] = self.buf[self.lo : self.hi]
            self.lo, self.hi = 0, n
        n = recv_into(self.sock, self.view[self.hi :], min(most, len(self.buf) - self.hi), self.deadline,
                      self.per_read)
        if not n:
            raise FetchError("the store closed the connection mid-reply")
        self.hi += n

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while True:
            end = self.buf.find(b"\r\n", self.lo, self.hi)
            if end >= 0:
                out = bytes(self.view[self.lo : end])
                self.lo = end + 2
                return out
            if self.hi - self.lo > MAX_LINE:
                raise FetchError("malformed reply: a line longer than 4 KiB")
            self._fill(_LINE_READ)

    def into(self, dest: memoryview) -> None:
        """Exactly ``len(dest)`` bytes into ``dest``."""
        have = min(self.hi - self.lo, len(dest))
        dest[:have] = self.view[self.lo : self.lo + have]
        self.lo += have
        got, want = have, len(dest)
        while got < want:
            n = recv_into(self.sock, dest[got:], 0, self.deadline, self.per_read)
            if not n:
                raise FetchError("the store closed the connection mid-reply")
            got += n

    def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes."""
        while n:
            if self.lo == self.hi:
                self._fill()
            take = min(n, self.hi - self.lo)
            self.lo += take
            n -= take

    def idle(self) -> bool:
        """True if nothing read ahead is left over (the reply was all of it)."""
        return self.lo == self.hi

    def restore(self) -> None:
        """The socket's own timeout back (before its connection is reused)."""
        if self.deadline is not None:
            self.sock.settimeout(self.per_read)


def _int(line: bytes, what: str) -> int:
    try:
        return int(line[1:])
    except ValueError:
        raise FetchError(f"malformed reply: {what} {line[:40]!r}") from None


def pack_ranges(keys: Seq[str], width: int) -> bytes:
    """``GETRANGE key 0 width`` for each of ``keys``, packed: at most ``width + 1``
    bytes of each value come back (``width`` of a value of that length)."""
    end = b"%d" % width
    tail = b"\r\n$1\r\n0\r\n$%d\r\n%s\r\n" % (len(end), end)
    return b"".join(b"*4\r\n$8\r\nGETRANGE\r\n$%d\r\n%s%s" % (len(k), k, tail) for k in (k.encode() for k in keys))


def read_range(reader: Reader, rows: memoryview, width: int, sizes: np.ndarray, i: int) -> None:
    """One reply to ``GETRANGE key 0 width``: a value of ``width`` bytes into row
    ``i`` of ``rows`` (flat, ``width`` bytes a row); ``sizes[i]``: its length
    (``width + 1``: longer), -1 where the key is absent or empty (``GETRANGE``
    answers an empty string for both) or holds another Redis type
    (``WRONGTYPE``: a miss, as ``MGET``'s nil made it). Another error reply is
    `ReplyError`; a value announced longer than ``width + 1`` is malformed."""
    head = reader.line()
    kind = head[:1]
    if kind == b"-":
        if head.startswith(b"-WRONGTYPE"):
            sizes[i] = -1
            return
        raise reply_error(head)
    if kind == b"_":  # RESP3 null
        sizes[i] = -1
        return
    if kind != b"$":
        raise FetchError(f"malformed reply: {head[:40]!r} for a value")
    n = _int(head, "bulk length")
    if n > width + 1:
        raise FetchError(f"malformed reply: {n} bytes to a GETRANGE of at most {width + 1}")
    sizes[i] = n if n > 0 else -1
    if n < 0:
        return
    if n == width:
        reader.into(rows[i * width : (i + 1) * width])
    else:
        reader.skip(n)
    if reader.line() != b"":
        raise FetchError("malformed reply: a value longer than its length")


def read_ranges(reader: Reader, rows: memoryview, width: int, sizes: np.ndarray, lo: int, hi: int) -> None:
    """The replies to `pack_ranges` of keys ``lo..hi`` (see `read_range`)."""
    for i in range(lo, hi):
        read_range(reader, rows, width, sizes, i)


class ChunkedFetch:
    """Parallel chunked ``GETRANGE`` pipelines over connections handed out by
    ``acquire`` / ``release`` (see the module docstring). ``acquire() -> (conn,
    sock)``; ``release(conn, broken)``: ``broken`` connections must be dropped;
    ``send(conn, data)``: send packed commands on ``conn``."""

    def __init__(self, acquire: Callable[[], tuple[Any, Any]], release: Callable[[Any, bool], None],
                 send: Callable[[Any, bytes], None], connections: int, chunk_bytes: int, timeout: float):
        self.acquire, self.release, self.send = acquire, release, send
        self.connections, self.chunk_bytes, self.timeout = connections, chunk_bytes, timeout
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()  # two threads' first lookups make one pool (`_executor`)

    def run(self, keys: Seq[str], out: np.ndarray, sizes: np.ndarray,
            done: Callable[[int, int], None] | None = None) -> None:
        """Values of ``keys`` into the rows of ``out`` ([len(keys), width] uint8,
        C-contiguous), their lengths into ``sizes`` (-1: absent, empty or another
        Redis type; ``width + 1``: longer; a row is filled only where the length
        is ``width``). ``done(lo, hi)`` runs on the
        fetching thread as soon as rows ``lo..hi`` are in. FetchError if any
        chunk failed."""
        n, width = len(keys), out.shape[1]
        sizes[:] = -1
        if not n:
            return
        rows = memoryview(out).cast("B")
        per = max(1, round(self.chunk_bytes / width))
        chunks = -(-n // per)
        deadline = lookup_deadline(self.timeout, n * width, -(-chunks // min(self.connections, chunks)))
        starts = iter(range(0, n, per))
        lock = threading.Lock()
        failed: list[BaseException] = []

        def work() -> None:
            try:
                conn, sock = self.acquire()
            except Exception as e:
                failed.append(e)
                return
            broken = True
            try:
                reader = Reader(sock, deadline)
                while not failed:
                    with lock:
                        lo = next(starts, None)
                    if lo is None:
                        break
                    hi = min(lo + per, n)
                    self.send(conn, pack_ranges(keys[lo:hi], width))
                    read_ranges(reader, rows, width, sizes, lo, hi)
                    if not reader.idle():
                        raise FetchError("malformed reply: bytes after the GETRANGE replies")
                    if done is not None:
                        done(lo, hi)
                reader.restore()
                broken = False
            except Exception as e:
                failed.append(e)
            finally:
                self.release(conn, broken)

        helpers = min(self.connections, chunks) - 1
        futures = [self._executor().submit(work) for _ in range(helpers)]
        try:
            work()
        finally:  # no helper may still write into ``out`` once this returns
            for f in futures:
                f.result()
        if failed:
            e = failed[0]
            if isinstance(e, FetchError):
                raise e
            raise FetchError(f"{type(e).__name__}: {e}")

    def _executor(self) -> ThreadPoolExecutor:
        """The helpers' threads, made at the first lookup that needs them, under
        a lock: pools sharing a tier look up from threads of their own, and
        two first lookups at once each made a pool (one never shut down)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(self.connections - 1, 1),
                                                thread_name_prefix="kvpager-remote-fetch")
            return self._pool

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
