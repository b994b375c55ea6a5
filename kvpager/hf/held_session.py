"""The daemon session a cache's or a generation's sequences are held in.

Sequence ids are a session's: after `Client.reconnect()` (a restarted daemon,
an expired session) the old session's sequences are gone, and the new
session hands the same ids to new sequences. A `PagedCache` or
`PagedGeneration` made before the reconnect went on with its bare ids: its
next pass appended to, attended over and at `close` freed sequences of a
cache made after it on the same client (the client's own check refuses an old
id only where none of its sequences has it now). Each stamps the session its
sequences were allocated in, refuses a pass in another one (`SessionLost`),
and at `close` frees nothing there (its sequences went with their session).
An embedded `KVPool` has no sessions (None throughout).
"""

from __future__ import annotations

from typing import Any

from kvpager.errors import SessionLost


def pool_session(pool: Any) -> str | None:
    """The session ``pool`` (a daemon `Client`) holds sequences in now; None for a `KVPool`."""
    return getattr(pool, "session", None)


def check_session(pool: Any, stamp: str | None, what: str, whose: str) -> None:
    """`SessionLost` where ``pool``'s session is no longer ``stamp``, the one
    ``whose`` sequences were allocated in."""
    if pool_session(pool) != stamp:
        raise SessionLost(f"{what}: this {whose}'s sequences were held in its client's session lost since "
                          "(Client.reconnect); they are gone, and the new session gives their ids to other "
                          f"sequences: make a new {whose}")
