"""A `Client`'s ties to its process: a client collected without `close` ends its
session (`_dropped`: through its heartbeat thread; `_dropped_quiet`: one
without, from a short thread of its own), a client still open at the
interpreter's exit says bye (`_close_at_exit`), and a forked child's copies of
its parent's clients refuse every call (`_after_fork_in_child`). `_LIVE`: every
live client of this process. `SERIALIZED`: the calls that hold a client's lock
whole, so threads sharing one run them one after another (`serialize`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from kvpager.client_wire import OWED_BYES, after_call, say_bye

if TYPE_CHECKING:
    from kvpager.client import Client

log = logging.getLogger("kvpager.client")


def _dropped(stop: threading.Event, gone: threading.Event, session: str | None, endpoint: str,
             timeout: float) -> None:
    """A client collected without `close`: its heartbeat thread ends its session
    (owed until then: `_close_at_exit` says it where the process exits first)."""
    if session is not None:
        OWED_BYES[session] = (endpoint, timeout)
    gone.set()
    stop.set()


def _dropped_quiet(session: str | None, endpoint: str, timeout: float) -> None:
    """A client without a heartbeat thread collected without `close`: its session is
    ended from a short thread of its own (it held its sequences until the daemon's
    heartbeat timeout; the collector's thread is not kept waiting for the daemon)."""
    if session is not None:
        OWED_BYES[session] = (endpoint, timeout)
        threading.Thread(target=say_bye, args=(session, endpoint, timeout), name="kvpager-bye", daemon=True).start()


#: Every live client of this process, for `_after_fork_in_child` and `_close_at_exit`.
_LIVE: weakref.WeakSet[Client] = weakref.WeakSet()

#: The longest the clients left open at exit wait for their daemons, all together (their
#: heartbeats, then their byes).
EXIT_WAIT = 1.0


def _close_at_exit() -> None:
    """At the interpreter's exit, every client still open says bye. A process that
    returned without `close` never collects its clients, and their heartbeat
    threads (daemon threads) died before they said it: the session and its blocks
    stayed until the daemon's heartbeat timeout. All of them wait at most
    `EXIT_WAIT` together (a stalled daemon: the sessions not ended by then end at
    its timeout instead; each waited up to twice that before, a process of 8
    clients 13 s at exit), and a client another thread is in a call on is left
    to it. The byes still owed for clients collected without `close` are said too
    (`OWED_BYES`: their threads die at exit before they say them)."""
    deadline = time.monotonic() + EXIT_WAIT
    for session, (endpoint, timeout) in list(OWED_BYES.items()):
        left = deadline - time.monotonic()
        if left > 0:
            say_bye(session, endpoint, max(1e-3, min(timeout, left / 2)))
    for client in list(_LIVE):
        left = deadline - time.monotonic()
        if client._closed or left <= 0 or not client._lock.acquire(timeout=left):
            continue
        try:
            # (close waits for the heartbeat thread, then for the bye: each at most the timeout)
            client.timeout = max(1e-3, min(client.timeout, (deadline - time.monotonic()) / 2))
            client.close()
        except Exception as e:  # (nothing to tell at exit: the daemon ends it at its timeout)
            log.debug("closing a client at exit failed: %s", e)
        finally:
            client._lock.release()


atexit.register(_close_at_exit)

_EXIT_HOOKED: list[int] = []  # the process (pid) whose multiprocessing exit says the byes too


def hook_process_exit() -> None:
    """Where this process is a `multiprocessing` child, `_close_at_exit` runs at its
    exit too: such a child ends with ``os._exit``, which runs no atexit handler
    (its open clients held their sessions until the daemon's heartbeat timeout),
    after multiprocessing's own finalizers, which this registers it with. Once a
    process; nothing where multiprocessing is not loaded or this is no child."""
    if _EXIT_HOOKED and _EXIT_HOOKED[0] == os.getpid():
        return
    mp = sys.modules.get("multiprocessing")
    if mp is None or mp.parent_process() is None:
        return
    _EXIT_HOOKED[:] = [os.getpid()]
    from multiprocessing import util

    util.Finalize(None, _close_at_exit, exitpriority=100)


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


#: The calls that read or change the client's session, socket or mirror: each
#: holds the client's lock throughout (an RLock: `_call` takes it again), so
#: calls from several threads run one after another, each with its mirror
#: update, never interleaved (uncontended, about 0.2 us a call).
SERIALIZED = ("reconnect", "close", "allocate", "append", "append_flat", "record_tokens", "commit", "fork",
              "free", "truncate", "release_before", "swap_out", "swap_in", "tables", "write", "attend", "plan",
              "refill", "local_write", "local_attend", "remote_write", "remote_attend", "batch", "pin", "unpin")


def _serialized(method: Any) -> Any:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._depth += 1
            try:
                return method(self, *args, **kwargs)
            finally:
                self._depth -= 1
                if self._close_after:  # (a `close` a signal handler made meanwhile)
                    after_call(self)

    return call


def serialize(cls: type) -> None:
    """Hold ``cls``' lock around each of its `SERIALIZED` methods (`kvpager.client.Client`)."""
    for name in SERIALIZED:
        setattr(cls, name, _serialized(getattr(cls, name)))
