"""The remote tier's circuit breakers: after a failed store call, calls are
skipped for a pause that doubles per failure (up to `MAX_PAUSE`), so an
outage costs one timeout, not one per allocate. The tier has one for the
store (it does not answer: every call waits) and one per kind of call
(lookups, probes, writes, deletes) that the store answers but refuses (an ACL's
``NOPERM``, a full store's ``OOM``, a replica's ``READONLY``): only that kind
pauses, and the others, still answered, neither wait for it nor close and
reopen the store's breaker at every call (which logged two warnings a call)."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("kvpager.remote")

MAX_PAUSE = 30.0


class Breaker:
    """Closed while the store answers. After a failure it is open for a pause
    (``base`` seconds, doubling per failure up to 30 s); then one call may try
    (the pause starts again meanwhile), and its success closes it."""

    def __init__(self, base: float, refused: str | None = None):
        self.base = base
        self.refused = refused  # None: the store's breaker; else the calls it pauses ("lookups", ...)
        self.failures = 0
        self._until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a call go to the store now (taking the one retry when due)."""
        if not self.failures:
            return True
        with self._lock:
            now = time.monotonic()
            if now < self._until:
                return False
            self._until = now + self._pause()
            return True

    def is_open(self) -> bool:
        return bool(self.failures) and time.monotonic() < self._until

    def success(self) -> None:
        if self.failures:
            with self._lock:
                was, self.failures, self._until = self.failures, 0, 0.0
            if was and self.refused is None:
                log.warning("remote store answers again (after %d failed calls)", was)
            elif was:
                log.warning("remote store takes %s again (after %d refused)", self.refused, was)

    def failure(self, what: str, error: Exception) -> None:
        with self._lock:
            self.failures += 1
            pause = self._pause()
            self._until = time.monotonic() + pause
            first = self.failures == 1
        # Once per outage at WARNING; each retry that fails at DEBUG.
        if self.refused is None:
            (log.warning if first else log.debug)(
                "remote store %s failed: %s; requests are served without it, next try in %.1fs",
                what, error, pause)
        else:
            (log.warning if first else log.debug)(
                "remote store refuses %s (%s failed: %s); %s are skipped, next try in %.1fs",
                self.refused, what, error, self.refused, pause)

    def _pause(self) -> float:
        return min(MAX_PAUSE, self.base * 2 ** max(self.failures - 1, 0))
