"""A `Client`'s ties to its process: a client collected without `close` ends its
session (`_dropped`: through its heartbeat thread; `_dropped_quiet`: one
without, from a short thread of its own), a client still open at the
interpreter's exit says bye (`_close_at_exit`), and a forked child's copies of
its parent's clients refuse every call (`_after_fork_in_child`). `_LIVE`: every
live client of this process.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING

from kvpager.client_wire import say_bye

if TYPE_CHECKING:
    from kvpager.client import Client

log = logging.getLogger("kvpager.client")


def _dropped(stop: threading.Event, gone: threading.Event) -> None:
    """A client collected without `close`: its heartbeat thread ends its session."""
    gone.set()
    stop.set()


def _dropped_quiet(session: str | None, endpoint: str, timeout: float) -> None:
    """A client without a heartbeat thread collected without `close`: its session is
    ended from a short thread of its own (it held its sequences until the daemon's
    heartbeat timeout; the collector's thread is not kept waiting for the daemon)."""
    if session is not None:
        threading.Thread(target=say_bye, args=(session, endpoint, timeout), name="kvpager-bye", daemon=True).start()


#: Every live client of this process, for `_after_fork_in_child` and `_close_at_exit`.
_LIVE: weakref.WeakSet[Client] = weakref.WeakSet()

#: The longest a client left open at exit waits for its daemon (its heartbeat, then bye).
EXIT_WAIT = 1.0


def _close_at_exit() -> None:
    """At the interpreter's exit, every client still open says bye. A process that
    returned without `close` never collects its clients, and their heartbeat
    threads (daemon threads) died before they said it: the session and its blocks
    stayed until the daemon's heartbeat timeout. Each waits at most `EXIT_WAIT`
    (a stalled daemon: the session ends at its timeout instead), and a client
    another thread is in a call on is left to it."""
    for client in list(_LIVE):
        if client._closed or not client._lock.acquire(timeout=EXIT_WAIT):
            continue
        try:
            client.timeout = min(client.timeout, EXIT_WAIT)
            client.close()
        except Exception as e:  # (nothing to tell at exit: the daemon ends it at its timeout)
            log.debug("closing a client at exit failed: %s", e)
        finally:
            client._lock.release()


atexit.register(_close_at_exit)


def _after_fork_in_child() -> None:
    """In a forked child, every client inherited from the parent is the parent's:
    its lock gets a fresh copy (one a parent's thread held at the fork is never
    released here: any call, ``close`` included, blocked for good), its finalizer
    is detached (the copy's collection ended the parent's session), its session
    is marked lost and its plans' count moved, so each of its calls and its step
    plans' writes refuse by name (`ClientWire._check_process`) instead of writing
    through the parent's tables into blocks that may be another session's."""
    for client in list(_LIVE):
        client._lock = threading.RLock()
        finalizer = client.__dict__.get("_finalizer")
        if finalizer is not None:  # (collected here, a copy said bye for the parent's session, which ended)
            finalizer.detach()
        client._lost = True
        client._own_slots = client._driver_slots = None
        mirror = client.__dict__.get("_mirror")
        if mirror is not None:
            mirror.moves.bump()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
