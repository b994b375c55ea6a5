"""The daemon's side of sessions: expiry of the silent ones (judged after the
messages queued behind a slow request are read), the end of a session (its
sequences freed, its pins released), and ownership checks of a request's ids."""

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
        for s in ended:
            try:
                self._end(s, "missed heartbeats")
            except Exception as e:  # a bug: it must not end the daemon, nor be met again every second
                log.error("ending session %s raised; the session is closed", s.name, exc_info=e)
                self.sessions.close(s)
        if self.request_metrics is not None:
            self.request_metrics.session_expiries += len(ended)
            self.request_metrics.busy += time.perf_counter() - t0
        self._flush_events()

    def _expiry_interval(self) -> float:
        return min(1.0, self.sessions.heartbeat_timeout / 4)

    def _owned(self, session: Session, value: Any) -> list[int]:
        """The ids, checked to exist and belong to ``session`` (all before any change)."""
        ids = wire_ids(value)
        self.pool.check_owner(ids, session.name)
        return ids

    def _end(self, session: Session, why: str) -> int:
        ids = self.pool.owned(session.name)
        if ids:
            self.pool.free(ids)
        pins = self.pool.release_pins(session.name)
        self.sessions.close(session)
        log.info("session %s (%s, pid %s) ended: %s; freed %d sequences, released %d pins",
                 session.name, printable(session.client), session.pid, why, len(ids), pins)
        return len(ids)
