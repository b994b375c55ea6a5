"""Bytes of large replies the daemon has queued for clients that have not read
them, bounded across all connections.

Each connection holds at most `kvpager.server_bind.QUEUED_MESSAGES` replies,
but connections are many: thirty that each asked six 16 MiB `tables` replies
(a 64 KiB request each) and read none held 1.5 GiB of the daemon's memory.
A reply of `LARGE` bytes or more is sent tracked (ZeroMQ says when it has let
go of it: read by its peer, or its connection gone); while those still held
would pass the budget, a large reply of an op that changed nothing is
answered `limit_exceeded` instead (ask again once the clients read theirs).
A reply of an op that changed something always goes: its client must learn
what happened.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from kvpager.protocol import RETRIED_OPS, ErrorInfo, encode_reply

#: Replies from this many bytes on are tracked and counted.
LARGE = 1 << 20
#: Ops whose large replies may be refused: they change nothing (hello opens a session,
#: bye ends one; every op a retry replays changes something).
_KEPT_ANYWAY = RETRIED_OPS | {"hello", "bye"}


class UnreadReplies:
    """Large replies queued and not yet let go of by ZeroMQ (`budget` bytes at most
    for those of ops that changed nothing)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.held: deque[tuple[Any, int]] = deque()  # (tracker, bytes), oldest first
        self.bytes = 0
        self._prune_at = 64  # entries held past which `sent` prunes

    def prune(self) -> None:
        """Forget the replies ZeroMQ let go of."""
        if not self.held:
            return
        kept = deque((t, n) for t, n in self.held if not t.done)
        self.bytes = sum(n for _, n in kept)
        self.held = kept

    def admit(self, op: str, rid: int | None, reply: bytes) -> bytes:
        """``reply`` to send, or, where it is large, of an op that changed nothing,
        and would pass the budget, a `limit_exceeded` reply in its place."""
        if len(reply) < LARGE or op in _KEPT_ANYWAY:
            return reply
        if self.bytes + len(reply) > self.budget:
            self.prune()
            if self.bytes + len(reply) > self.budget:
                return encode_reply(rid, None, ErrorInfo(
                    "limit_exceeded", f"{op}: its reply of {len(reply)} bytes would pass the {self.budget} bytes "
                    f"of replies the daemon holds for clients that have not read them ({self.bytes} now): ask "
                    "again once they are read", {"limit": "unread_replies", "value": self.bytes + len(reply),
                                                 "maximum": self.budget}))
        return reply

    def sent(self, tracker: Any, size: int) -> None:
        """A large reply sent; those let go of are forgotten once the entries held
        double (amortized O(1) a reply): `admit` prunes only for ops that change
        nothing, and a daemon whose large replies were all allocates or swap-ins
        kept an entry for every one it ever sent."""
        self.held.append((tracker, size))
        self.bytes += size
        if len(self.held) > self._prune_at:
            self.prune()
            self._prune_at = 2 * len(self.held) + 64
