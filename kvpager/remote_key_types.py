"""The probe's question to the store, read as a lookup's replies are
(`kvpager.remote_resp`): what each key holds, by pipelined ``TYPE`` (and
``STRLEN`` where a value's length is given), every reply one line, classified
with NumPy (`key_types`)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.remote_resp import MAX_LINE, FetchError, recv_into, reply_error

#: what `key_types` says a key holds
KEY_ABSENT, KEY_STRING, KEY_OTHER, KEY_WRONG_LENGTH = 0, 1, 2, 3
_STRING = np.frombuffer(b"+string\r\n", dtype=np.uint8)
_NONE = np.frombuffer(b"+none\r\n", dtype=np.uint8)


def key_types(sock: Any, keys: Seq[str], deadline: float | None = None, width: int | None = None) -> np.ndarray:
    """What the store holds under each of ``keys`` (int8 per key):
    `KEY_ABSENT`, `KEY_STRING` (a string: of ``width`` bytes where ``width``
    is given, a value a lookup may restore once its checksum passes),
    `KEY_WRONG_LENGTH` (with ``width``: a string of another length, an empty
    one included, which no lookup restores: ``GETRANGE`` answers an empty
    string as for an absent key) or `KEY_OTHER` (a hash, list, set, sorted
    set, stream or a module's type: a lookup's ``GETRANGE`` answers
    ``WRONGTYPE`` for it, a miss, so no lookup would ever restore it). One
    ``TYPE`` per key (and with ``width`` a ``STRLEN`` after each), all sent
    before any reply is read (one round trip). ``TYPE``, like ``EXISTS``, reads
    no value and does not touch a key's LRU / LFU clock; ``STRLEN`` reads no
    value but moves the clock of a string it finds (the sentinel check of
    `kvpager.remote_republish` asks no ``width``: its key must age as the
    blocks written with it do).

    Each reply is one line (``+string``, ``+none``, ``+hash``, ...; ``:N`` or
    ``-WRONGTYPE ...`` to ``STRLEN``), so the replies are read until as many
    line ends as commands have come, then split and classified with NumPy. An
    error reply to ``TYPE`` (an ACL's ``NOPERM``), one to ``STRLEN`` but
    ``WRONGTYPE``, a reply of another form, or bytes past the last reply fail
    the call (`FetchError`; `ReplyError` for an error reply) and the connection
    must be dropped. The replies must have come by ``deadline``
    (`lookup_deadline`); the socket's own timeout is given back after."""
    n = len(keys)
    if not n:
        return np.zeros(0, dtype=np.int8)
    step = 1 if width is None else 2  # replies a key
    encoded = [k.encode() for k in keys]
    ask = b"*2\r\n$4\r\nTYPE\r\n$%d\r\n%s\r\n" if width is None else \
        b"*2\r\n$4\r\nTYPE\r\n$%d\r\n%s\r\n*2\r\n$6\r\nSTRLEN\r\n$%d\r\n%s\r\n"
    sock.sendall(b"".join(ask % ((len(k), k) * step) for k in encoded))
    lines_due = n * step
    buf = bytearray(9 * lines_due)  # room for replies of "+string\r\n", the longest of Redis's own types
    got = lines = 0
    per_read = sock.gettimeout() if deadline is not None else None
    while lines < lines_due:
        if got == len(buf):
            if got >= MAX_LINE * lines_due:
                raise FetchError(f"malformed reply: {got} bytes without {lines_due} reply lines to TYPE")
            buf.extend(bytes(len(buf)))  # an error or a module's type name: longer lines
        with memoryview(buf) as view:
            r = recv_into(sock, view[got:], 0, deadline, per_read)
        if not r:
            raise FetchError("the store closed the connection mid-reply")
        lines += buf.count(b"\n", got, got + r)
        got += r
    if deadline is not None:
        sock.settimeout(per_read)
    arr = np.frombuffer(buf, dtype=np.uint8, count=got)
    ends = np.flatnonzero(arr == ord("\n"))
    if len(ends) != lines_due or ends[-1] != got - 1:
        raise FetchError("malformed reply: bytes after the replies to TYPE")
    starts = np.empty(lines_due, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    wrong = (ends - starts < 3) | (arr[ends - 1] != ord("\r"))
    wrong[0::step] |= arr[starts[0::step]] != ord("+")
    if width is not None:  # (STRLEN: an integer, or WRONGTYPE for a key of another type)
        wrong[1::2] |= (arr[starts[1::2]] != ord(":")) & ~_starts_with(arr, starts[1::2], ends[1::2], b"-WRONGTYPE")
    if wrong.any():
        at = int(np.argmax(wrong))
        line = bytes(buf[starts[at] : min(ends[at] + 1, starts[at] + 200)])
        what = " to TYPE" if at % step == 0 else " to STRLEN"
        if line[:1] == b"-":
            raise reply_error(line, what)
        raise FetchError(f"malformed reply: {line!r}{what}")
    out = np.full(n, KEY_OTHER, dtype=np.int8)
    for code, pattern in ((KEY_STRING, _STRING), (KEY_ABSENT, _NONE)):
        out[_matches(arr, starts[0::step], ends[0::step], pattern)] = code
    if width is not None:  # a string counts only where STRLEN said a value's length
        length = np.frombuffer(b":%d\r\n" % width, dtype=np.uint8)
        out[(out == KEY_STRING) & ~_matches(arr, starts[1::2], ends[1::2], length)] = KEY_WRONG_LENGTH
    return out


def _matches(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Which of the lines ``arr[starts[i] : ends[i] + 1]`` are ``pattern`` (a bool each)."""
    out = np.zeros(len(starts), dtype=bool)
    at = np.flatnonzero(ends - starts + 1 == len(pattern))
    if len(at):
        out[at] = (arr[starts[at, None] + np.arange(len(pattern))] == pattern).all(axis=1)
    return out


def _starts_with(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray, prefix: bytes) -> np.ndarray:
    """Which of the lines ``arr[starts[i] : ends[i] + 1]`` begin with ``prefix`` (a bool each)."""
    out = np.zeros(len(starts), dtype=bool)
    at = np.flatnonzero(ends - starts + 1 > len(prefix))
    if len(at):
        head = np.frombuffer(prefix, dtype=np.uint8)
        out[at] = (arr[starts[at, None] + np.arange(len(head))] == head).all(axis=1)
    return out
