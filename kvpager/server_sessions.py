"""The daemon's side of sessions: expiry of the silent ones (judged after the
messages queued behind a slow request are read), the end of a session (its
sequences freed, its pins released, and its rank workers' sessions ended with
it), and ownership checks of a request's ids."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from kvpager.render import printable
from kvpager.wire_args import wire_ids

if TYPE_CHECKING:
    from kvpager.sessions import Session

log = logging.getLogger("kvpager.server")


class SessionEnds:
    """Mixed into `Server`, which supplies ``pool``, ``sessions``, ``releases``,
    ``request_metrics``, ``_idle`` and ``_flush_events``."""

    def expire(self) -> None:
        """End the sessions silent for longer than the heartbeat timeout, judged
        at the last moment the loop had read everything queued: after a slow
        request, the heartbeats that waited behind it count first."""
        t0 = time.perf_counter()
        ended = self.sessions.expired(self._idle)
        if ended and self.releases is not None:
            self.releases.session_ended()  # (before their blocks go: a worker checks it before it writes)
        expired = 0
        for s in ended:
            if self._ended_already(s):  # a rank worker of a driver that expired above: ended with it
                continue
            expired += 1
            try:
                self._end(s, "missed heartbeats")
            except Exception as e:  # a bug: it must not end the daemon, nor be met again every second
                log.error("ending session %s raised; the session is closed", s.name, exc_info=e)
                self.sessions.close(s)
        if self.request_metrics is not None:
            self.request_metrics.session_expiries += expired
            self.request_metrics.busy += time.perf_counter() - t0
        self._flush_events()

    def _expiry_interval(self) -> float:
        return min(1.0, self.sessions.heartbeat_timeout / 4)

    def _owned(self, session: Session, value: Any) -> list[int]:
        """The ids, checked to exist and belong to ``session`` (all before any change)."""
        ids = wire_ids(value)
        self.pool.check_owner(ids, session.name, self._op or None)
        return ids

    def _ended_already(self, session: Session) -> bool:
        return self.sessions.sessions.get(session.id) is not session

    def _end(self, session: Session, why: str) -> int:
        """End ``session`` (its sequences freed, its pins released) and, first, its
        rank workers' sessions (docs/protocol.md, "Ranks"): their writes go into
        the driver's blocks, which any session may hold once the driver's end
        frees them; left open, a worker wrote on into them (and held its own
        sequences, pins and staging). The count of sessions the daemon ended
        moves before any block goes, so a mapped worker asks before it writes.
        Returns the sequences ``session`` held."""
        if self._ended_already(session):  # (ended with its driver, or twice at shutdown)
            return 0
        workers = self.sessions.workers_of(session)
        if workers and self.releases is not None:
            self.releases.session_ended()
        for w in workers:
            self.sessions.ended_with_driver(w, session, why)
            try:
                self._end(w, f"its driver, session {session.name}, ended: {why}")
            except Exception as e:  # a bug: the driver's end goes on (as `expire`'s)
                log.error("ending session %s raised; the session is closed", w.name, exc_info=e)
                self.sessions.close(w)
        ids = self.pool.owned(session.name)
        if ids:
            self.pool.free(ids)
        pins = self.pool.release_pins(session.name)
        self.sessions.close(session)
        # (a quiet session, an inspection, that said bye holding nothing: at debug, as its open was)
        level = logging.DEBUG if session.quiet and why == "bye" and not ids and not pins else logging.INFO
        log.log(level, "session %s (%s, pid %s) ended: %s; freed %d sequences, released %d pins",
                session.name, printable(session.client), session.pid, why, len(ids), pins)
        return len(ids)
