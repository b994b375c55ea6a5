"""The remote tier's store errors: what a failed store call is raised as
(`store_error`), and the store that could never work as given
(`StoreMisconfigured`). Shared by the stores (`kvpager.remote_store`,
`kvpager.remote_cluster`) and their access check (`kvpager.remote_access`)."""

from __future__ import annotations

import sys

from kvpager.errors import InvalidArgument
from kvpager.remote_resp import ReplyError


class StoreError(Exception):
    """A store call failed (connection, timeout, cluster or protocol error).
    ``written``: keys a failed `Store.put_many` stored before it failed."""

    written = 0


class StoreRefused(StoreError):
    """The store answered, with an error reply about the call itself: an ACL's
    ``NOPERM``, ``OOM`` (full, ``noeviction``), ``READONLY`` (a replica),
    ``MISCONF``, an unknown (renamed or disabled) command. The store is up but
    declines this kind of call; the tier pauses that kind only (`RemoteTier`)."""


class StoreMisconfigured(InvalidArgument):
    """`Store.verify`: the store answers, but the tier could never work with it
    as given: credentials refused, a DB index out of range, commands the ACL
    user may not run, a Redis Cluster node given as a standalone store or a
    standalone one as a cluster, TLS asked of a server without it, values too
    long for the store. The message names what is wrong; ``kvpager serve``
    exits with it."""


_TRANSIENT = ("LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN")  # error replies that pass by themselves

#: What redis-py raises, beside its own errors, on replies it cannot read as a Redis
#: server's: an endpoint that answers ``+OK`` to every command (a sidecar, a proxy)
#: made its ``HELLO`` check fail with AttributeError, and `kvpager serve` die with a
#: traceback (one that answers HTTP or binary gets redis-py's InvalidResponse).
UNREADABLE_REPLY = (AttributeError, TypeError, IndexError, KeyError, ValueError)


def store_error(e: BaseException) -> StoreError:
    """``e`` (a redis-py error, `FetchError`, `OSError`, ...) as the tier's error:
    `StoreRefused` for an error reply that refuses the call (not a state that
    passes by itself: ``LOADING``, ``BUSY``, ``CLUSTERDOWN``, ``TRYAGAIN``,
    ``MASTERDOWN``; nor a cluster redirection), `StoreError` for the rest."""
    if isinstance(e, StoreError):
        return e
    if isinstance(e, ReplyError):
        return (StoreError if e.reply.startswith(_TRANSIENT) else StoreRefused)(str(e))
    text = f"{type(e).__name__}: {e}"
    redis = sys.modules.get("redis")
    if redis is not None and isinstance(e, redis.exceptions.ResponseError):
        exc = redis.exceptions
        passing = isinstance(e, (exc.ClusterError, exc.AskError, exc.TryAgainError, exc.ClusterCrossSlotError))
        if not passing and not str(e).startswith(_TRANSIENT):
            return StoreRefused(text)
    return StoreError(text)
