"""`Client`'s requests: one at a time on its socket with a deadline, a request
that timed out settled by a retry with the same id (freeing what a late
allocate or fork created, undoing a late pin), typed errors from replies,
what a lost session forgets, and the heartbeat thread on a socket of its own."""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any

import msgpack

from kvpager import cuda_ipc
from kvpager.batch_calls import free_all
from kvpager.channel import Channel
from kvpager.client_control import undo_pin
from kvpager.client_ids import id_list
from kvpager.errors import (
    DaemonUnavailable,
    InvalidArgument,
    KVPagerError,
    MessageTooLarge,
    ProtocolError,
    RequestTimeout,
    SessionLost,
    UnknownSequence,
)
from kvpager.protocol import RETRIED_OPS, VERSION, Reply, pack, unpack
from kvpager.release_count import forget_release_count
from kvpager.shm import forget_segments

log = logging.getLogger("kvpager.client")


class ClientWire:
    """Mixed into `Client`, which supplies ``session``, ``epoch``, ``timeout``,
    ``max_message_bytes``, ``heartbeat_timeout``, ``endpoint``, ``gpu``,
    ``memory``, ``_chan``, ``_lock``, ``_ids``, ``_unsettled``, ``_waiting``, ``_closed``,
    ``_lost``, ``_mirror``, ``_mapped`` and ``_staging``."""

    def _forked(self) -> bool:
        """Whether this is a forked child's copy of the client (a ZeroMQ socket
        cannot be used across ``fork()``: a call from the child blocked for good,
        whatever its timeout)."""
        return os.getpid() != self._pid

    def _check_process(self) -> None:
        if self._forked():
            raise InvalidArgument(f"this Client was made in process {self._pid}, not in this one ({os.getpid()}, "
                                  "a forked child): a Client cannot be shared across fork(); make a new one here")

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        """Request ``op`` and return its result (its error raised, typed); a
        `close` a signal handler made while this call waited is made once it is
        done (`after_call`), as the calls `SERIALIZED` do."""
        self._check_process()
        with self._lock:
            self._depth += 1
            try:
                reply = self._request_locked(op, args)
            finally:
                self._depth -= 1
                if self._close_after:
                    after_call(self)
        if reply.error is not None:
            raise self._error(reply)
        return reply.result

    def _request_locked(self, op: str, args: dict[str, Any]) -> Reply:
        """`_call`'s request and its reply, the client's lock held."""
        if self._closed:  # (by another thread too, while this one waited for the lock)
            raise SessionLost("this client is closed")
        if self._waiting == threading.get_ident():
            raise InvalidArgument(
                f"{op}: called from within a call of this Client that waits for its reply (a signal handler's, "
                "or a finalizer's, run meanwhile in the same thread): it would take that call's reply; make it "
                "once that call returns (close() is kept until then)")
        while self._later:  # (sequences of a dropped cache: freed with the orphans, in its session only)
            session, ids = self._later.popleft()
            if session == self.session and not self._lost:
                self._orphans.append(ids)
        try:
            self._settle()
        except (RequestTimeout, DaemonUnavailable):
            self._orphans.extend(_freed_by(op, args))  # never sent: freed once the daemon answers
            raise
        # Its id taken here, after any settling's requests: the daemon sees a session's
        # requests in the order of their ids (one older than its kept replies is a late
        # copy of a retried request, not run again), threads sharing the client included.
        rid = next(self._ids)
        body = pack([VERSION, rid, self.session, op, args])
        if len(body) > getattr(self, "max_message_bytes", len(body)):
            raise MessageTooLarge(
                f"{op}: message of {len(body)} bytes is over the daemon's limit of {self.max_message_bytes} "
                "(KVPAGER_MAX_MESSAGE on the daemon); split the batch"
            )
        return self._request(rid, body, op)

    def _request(self, rid: int, body: bytes, op: str) -> Reply:
        try:
            return self._wait_reply(rid, body, op)
        except BaseException:  # no reply: a timeout, a daemon found gone (it may come back and run it), or an
            if op in RETRIED_OPS:  # exception a signal handler raised mid-wait (KeyboardInterrupt: sent, it runs)
                self._unsettled = (rid, body, op)  # it may still run: settled before the next request
            raise

    def _wait_reply(self, rid: int, body: bytes, op: str) -> Reply:
        """The channel's request, the calling thread marked as waiting on the
        socket meanwhile: a call of this client from a signal handler (or a
        finalizer) run in that thread during the wait is refused (`_call`; it took
        the waiting call's reply, which then timed out), and its `close` is kept
        until the waiting call is done (`kvpager.client_lifetime._serialized`)."""
        self._waiting = threading.get_ident()
        try:
            return self._chan.request(body, rid, op, self.timeout)
        finally:
            self._waiting = None

    def _settle(self) -> None:
        """The outcome of a request that timed out: sent again with the same id
        on the reopened socket, the daemon answers with its first execution's
        reply (or runs it now, once). What it created, the caller never learnt
        of (it got RequestTimeout): those sequences are freed, so none is left
        orphaned. Raises RequestTimeout again while the daemon stays silent."""
        if self._unsettled is not None or self._orphans:
            self._check_process()  # (a forked child's copy: the parent's socket blocked it for good)
        while self._unsettled is not None:
            rid, body, op = self._unsettled
            reply = self._wait_reply(rid, body, op)
            self._unsettled = None
            if reply.error is None and op == "pin":  # a pin the caller never learnt of: undone
                undo = undo_pin(unpack(body)[4], reply.result)
                if undo:
                    frid = next(self._ids)
                    self._request(frid, pack([VERSION, frid, self.session, "unpin", undo]), "unpin")
                continue
            if op not in ("allocate", "fork"):
                continue  # nothing created; the mirror already forgot what the op touched
            if reply.error is not None:  # failed: nothing created, but for a reply too large to keep
                created = [int(i) for i in reply.error.details.get("created") or []]
            elif op == "allocate":
                created = [int(a[0]) for a in reply.result]
            else:
                created = [int(c) for kids in reply.result for c in kids]
            if created:
                log.warning("%s left without its reply (a timeout, or an exception a signal handler raised) "
                            "ran: freeing its %d new sequences", "an allocate" if op == "allocate" else "a fork",
                            len(created))
                frid = next(self._ids)
                self._request(frid, pack([VERSION, frid, self.session, "free", {"seq_ids": created}]), "free")
        if self._orphans:
            self._free_orphans()

    def _free_orphans(self) -> None:
        """Free the sequences whose `free` (or a `batch` freeing them) was never sent,
        its settling of an earlier request having timed out: a generation's cleanup
        after a timeout left them held for the session's life. Each such free goes
        as its caller made it (its refusal takes no other down), through `free_all`
        (ids no longer live left out, halves over the ids limit)."""
        orphans, self._orphans = self._orphans, []  # (taken whole: the frees below settle nothing more)
        for k, ids in enumerate(orphans):
            try:
                free_all(self, ids)
            except SessionLost:
                return
            except (RequestTimeout, DaemonUnavailable):  # (that free is settled as any request; the rest wait)
                self._orphans = orphans[k + 1 :] + self._orphans
                raise
            except KVPagerError as e:
                log.warning("freeing %d sequences whose free was never sent: %s", len(ids), e)

    def _error(self, reply: Reply) -> Exception:
        exc = reply.error.exception()
        if isinstance(exc, SessionLost):
            self._forget_session()
        if isinstance(exc, SessionLost) and self.epoch and getattr(exc, "epoch", self.epoch) != self.epoch:
            exc.args = (exc.args[0] + "; the daemon restarted (pool epoch changed): memory mapped "
                        "from the old daemon is stale, open a new Client",)
            self._forget_memory()
        return exc

    def _forget_session(self) -> None:
        """The daemon freed this session's sequences (or will, on bye): drop the mirror."""
        self._lost = True
        mirror = getattr(self, "_mirror", None)  # absent while hello is under way
        if mirror is not None:
            self._held_before.update(mirror.rows)
            self._held_before.update(mirror.forgotten)  # (held, for all the client knows)
            mirror.forgotten.clear()
            mirror.clear()

    def _check_held_before(self, seq_ids: Any) -> None:
        """UnknownSequence for an id this client's sequence had in a session lost
        since, and no sequence of its session has now: a restarted daemon gives its
        ids out again, so after `reconnect` such an id named another session's new
        sequence, and a read of it (tables, attend, sequence) answered that one's
        table and K/V as this client's. Writes and plans were refused already. (A
        client whose session is lost or closed gets SessionLost from its call.)"""
        if not self._held_before or self._lost:
            return
        ids = id_list(seq_ids)
        mine = self._mirror.rows
        for seq_id in ids or ():
            if seq_id in self._held_before and seq_id not in mine:
                # (raised as made, never held by a name here: a local naming it, its traceback and this
                # frame made a cycle that kept the client, its pool's mapping and descriptors, past `close`)
                raise _held_before(seq_id)

    def _forget_memory(self) -> None:
        """Drop mappings of a daemon that is gone: they are unmapped once no view is left."""
        self._mapped = self._staging = None
        if self.gpu:
            cuda_ipc.forget_pool(self.memory)
        else:
            forget_segments(self.memory)
        forget_release_count(self.memory.get("releases"))
        self._releases = None
        self._memory_gone = True  # not mapped again (`KVAccess._pool`) until a new hello


def _freed_by(op: str, args: dict[str, Any]) -> list[list[int]]:
    """The sequence ids a request of ``op`` frees (a `free`, or each free of a
    `batch`), a list of them a free, read as the daemon reads them (`id_list`: ints,
    no bools; a packed array decoded); a free the daemon would refuse, none."""
    calls = [(op, args)] if op == "free" else args.get("ops", ()) if op == "batch" else ()
    groups: list[list[int]] = []
    for call in calls:
        if len(call) != 2 or call[0] != "free" or not isinstance(call[1], dict):
            continue
        seq_ids = call[1].get("seq_ids")
        if isinstance(seq_ids, msgpack.ExtType):  # (a batch's ids packed as they go on the wire)
            try:
                seq_ids = unpack(pack(seq_ids))
            except ProtocolError:
                continue
        ids = id_list(seq_ids)
        if ids:
            groups.append(ids)
    return groups


def beat_interval(heartbeat_timeout: float) -> float:
    """Seconds between a client's beats: a third of the daemon's heartbeat timeout,
    0.05 at least, an hour at most (a wait past TIMEOUT_MAX killed the thread)."""
    return min(max(0.05, heartbeat_timeout / 3), 3600.0)


def heartbeat_loop(client: Any, stop: Any, gone: Any, session: str | None, endpoint: str,
                   heartbeat_timeout: float) -> None:
    """A `Client`'s heartbeat thread: beat for ``session`` until ``stop`` is set.
    ``client`` is a weak reference: the thread does not keep its client alive. Where
    the client was collected without `Client.close` (``gone``), its session is ended
    here, as close would (its sequences freed then, not a heartbeat timeout later).
    ``stop`` and ``session`` are the thread's own, so a thread that outlived its
    ``join`` (a beat in flight past a `reconnect`) ends at its next wake-up instead of
    beating on as a second thread, for the next session."""
    chan, ids = Channel(endpoint), itertools.count(-1, -1)  # ids apart from the calls
    interval = beat_interval(heartbeat_timeout)
    try:
        while not stop.wait(interval):
            rid = next(ids)
            try:
                reply = chan.request(pack([VERSION, rid, session, "heartbeat", {}]), rid,
                                     "heartbeat", max(interval, 1.0))
            except Exception as e:  # a missed beat is not fatal; the next may get through
                log.debug("heartbeat failed: %s", e)
                continue
            if reply.error is not None and reply.error.code == "session_lost":
                owner = client()
                if stop.is_set() or owner is None or session != owner.session:
                    return  # (that session ended on purpose: bye, or a reconnect)
                log.warning("heartbeat: %s", reply.error.message)
                owner._lost = True  # the mirror is stale; the next call learns why
                owner._mirror.moves.bump()  # and step plans of its sequences recheck (and refuse)
                return
        if gone.is_set() and session in OWED_BYES:
            say_bye(session, endpoint, max(interval, 1.0), chan, next(ids))
    finally:
        chan.close()


#: The sessions of clients collected without `Client.close` whose bye is not said
#: yet (session -> endpoint, timeout): said by the client's heartbeat thread (or a
#: thread of its own), and at the interpreter's exit by `_close_at_exit` where still
#: owed: those threads are daemon threads, which die at exit before they say it (a
#: client dropped as a script's ``main()`` returned held its session until the
#: daemon's heartbeat timeout).
OWED_BYES: dict[str, tuple[str, float]] = {}


def after_call(client: Any) -> None:
    """At the end of a client's call (its lock held): a `close` a signal handler
    made while a call of the same thread waited for its reply, made now that the
    outermost call is done and nothing waits (made there, it called itself for
    ever: the handler's own call ended while the interrupted one still waited)."""
    if client._close_after and not client._depth and client._waiting is None:
        client._close_after = False
        client.close()


def say_bye(session: str | None, endpoint: str, timeout: float, chan: Channel | None = None,
            rid: int = -1) -> None:
    """End the session of a client collected without `Client.close` (over ``chan``,
    or a socket of its own); where the daemon does not answer in ``timeout``
    seconds, it ends the session at its heartbeat timeout instead. No longer owed
    once said (or tried: twice is harmless, the second answered `session_lost`)."""
    own = chan is None
    chan = Channel(endpoint) if chan is None else chan
    try:
        chan.request(pack([VERSION, rid, session, "bye", {}]), rid, "bye", timeout)
    except Exception as e:
        log.debug("bye of a dropped client failed: %s", e)
    finally:
        OWED_BYES.pop(session, None)  # type: ignore[arg-type]
        if own:
            chan.close()


def _held_before(seq_id: int) -> UnknownSequence:
    """`ClientWire._check_held_before`'s error for ``seq_id``."""
    e = UnknownSequence(seq_id)
    e.args = (f"sequence {seq_id} was this client's in a session lost since (before a reconnect): it is gone, "
              "and a restarted daemon gives the id to another session's new sequence; a read of that one goes "
              "through another Client",)
    return e
