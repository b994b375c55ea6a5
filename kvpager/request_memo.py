"""Requests decoded and checked before, found again by their bytes.

A decode loop sends the same request step after step: the same session, op
and arguments (the batch's ids, packed), only the request id differs. The
daemon keeps the last few such requests as decoded and checked (envelope,
argument names, per-request limits), keyed by their bytes after the id, so a
repeat skips the decoding and those checks: one comparison instead. Nothing
those checks depend on changes while a daemon runs (protocol version, message
and per-request limits); what can change is checked on every request anyway
(the session, ownership of the ids, the pool's state).

Only ops in `MEMO_OPS` (a decode step's `append`) are kept, and only requests
of at most `MEMO_BYTES`: a scan of a few entries costs a few memory
comparisons, each ending at the first differing byte.
"""

from __future__ import annotations

from typing import Any

from kvpager.protocol import VERSION
from kvpager.recent_batches import RecentItems

#: Ops whose requests are kept: a decode loop repeats them byte for byte but for the id.
MEMO_OPS = frozenset({"append"})
#: Requests kept, newest last.
MEMO_ENTRIES = 8
#: Longest request kept (a decode step of 256 packed ids is about 2 KiB).
MEMO_BYTES = 8192

#: msgpack's unsigned integer headers: byte -> length of the integer after it.
_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_ARRAY5 = 0x95  # a fixarray of five: [version, id, session, op, args]


def split_id(body: bytes) -> tuple[int, bytes] | None:
    """(request id, the bytes after it) of a request of this protocol version
    whose id is a non-negative integer, read without decoding the rest; None
    for anything else (the full decoder judges it)."""
    if len(body) < 4 or len(body) > MEMO_BYTES or body[0] != _ARRAY5 or body[1] != VERSION:
        return None
    t = body[2]
    if t < 0x80:  # a positive fixint
        return t, body[3:]
    n = _UINT.get(t)
    if n is None:
        return None
    return int.from_bytes(body[3 : 3 + n], "big"), body[3 + n :]


class RequestMemo(RecentItems):
    """Up to ``size`` requests (the bytes after the id -> session, op, args), least
    recently used dropped first. ``args`` are shared by every repeat: handlers
    read them and never change them (a packed array arrives read-only)."""

    __slots__ = ()

    def __init__(self, size: int = MEMO_ENTRIES):
        super().__init__(size)

    def put(self, tail: bytes, session: str, op: str, args: dict[str, Any]) -> None:  # type: ignore[override]
        """Keep a request that decoded and passed its checks."""
        super().put(tail, None, (session, op, args))
