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

One dropped without `close` (collected) hands its sequences to the pool's
next call (`free_dropped`), unless its session was lost since.
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


def sequences_gone(pool: Any, stamp: str | None) -> bool:
    """Whether sequences held in session ``stamp`` went without a word: ``pool``'s
    session is another now (their ids may name another's), or the pool was closed
    (they went with its storage). Nothing is freed for them."""
    return pool_session(pool) != stamp or getattr(pool, "closed", False) is True


def free_dropped(pool: Any, seq_ids: list[int], stamp: str | None) -> None:
    """A cache's or a generation's sequences, held in session ``stamp``, freed at
    ``pool``'s next call (`KVPool.free_later`, `Client.free_later`): for a
    finalizer, which may run in the middle of a call, on any thread. Nothing
    where the session changed since (they went with it, and their ids may name
    another's now); ids freed already are left out there (ids only grow)."""
    free_later = getattr(pool, "free_later", None)
    if seq_ids and free_later is not None and pool_session(pool) == stamp:
        free_later(seq_ids, stamp)
