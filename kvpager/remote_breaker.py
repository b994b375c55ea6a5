"""The remote tier's circuit breakers: after a failed store call, calls are
skipped for a pause that doubles per failure (up to `MAX_PAUSE`), so an
outage costs one timeout, not one per allocate. The tier has one for each
side of the store that does not answer: reads (lookups and probes, on the
caller's thread, at the lookup timeout) and writes (writes and deletes, on the
writer's thread and its own connections, at the writer's timeout), so a store
too slow to take writes (a writer timeout) no longer pauses the restores it
still answers, nor a lookup's timeout the writer; a store that is down fails
each side once. And one per kind of call (lookups, probes, writes, deletes)
that the store answers but refuses (an ACL's ``NOPERM``, a full store's
``OOM``, a replica's ``READONLY``): only that kind pauses, and the others,
still answered, neither wait for it nor close and reopen the store's breakers
at every call (which logged two warnings a call)."""

from __future__ import annotations

import logging
import threading
import time

from kvpager.remote_errors import StoreRefused

log = logging.getLogger("kvpager.remote")

MAX_PAUSE = 30.0
#: the side of the store each kind of call is on: reads on the caller's thread, at the lookup
#: timeout; writes on the writer's thread, its own connections, at the writer's timeout
SIDES = {"lookups": "reads", "probes": "reads", "writes": "writes", "deletes": "writes"}
#: the sides of the store: what is skipped while one does not answer, and what its recovery logs
_SIDES = {"reads": ("requests are served without it", "remote store answers again"),
          "writes": ("committed blocks are not written meanwhile", "remote store answers writes again")}


class Breaker:
    """Closed while the store answers. After a failure it is open for a pause
    (``base`` seconds, doubling per failure up to 30 s); then one call may try
    (the pause starts again meanwhile), and its success closes it."""

    def __init__(self, base: float, refused: str | None = None, side: str = "reads"):
        self.base = base
        self.refused = refused  # None: a side's breaker (``side``); else the calls it pauses ("lookups", ...)
        self.side = side
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
                log.warning("%s (after %d failed calls)", _SIDES[self.side][1], was)
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
                "remote store %s failed: %s; %s, next try in %.1fs", what, error, _SIDES[self.side][0], pause)
        else:
            (log.warning if first else log.debug)(
                "remote store refuses %s (%s failed: %s); %s are skipped, next try in %.1fs",
                self.refused, what, error, self.refused, pause)

    def _pause(self) -> float:
        return min(MAX_PAUSE, self.base * 2 ** max(self.failures - 1, 0))


class Breakers:
    """Mixed into `RemoteTier`: a breaker for each side of the store that may
    not answer (``breakers``: reads, writes) and for each kind of call it may
    refuse (``refusals``), and what a call's outcome does to them."""

    def _guard(self, base: float) -> None:
        # a side of the store does not answer: its calls skip it
        self.breakers = {side: Breaker(base, side=side) for side in ("reads", "writes")}
        # the store answers but refuses one kind of call: that kind skips it
        self.refusals = {kind: Breaker(base, kind) for kind in SIDES}

    def _allow(self, kind: str) -> bool:
        """May a call of ``kind`` go to the store now (taking a retry when due)."""
        refusal = self.refusals[kind]
        if refusal.is_open() or not self.breakers[SIDES[kind]].allow():
            return False
        return refusal.allow()

    def _failed(self, kind: str, what: str, e: Exception) -> None:
        """A call of ``kind`` failed: a refusal pauses that kind (the store
        answered), anything else every call of its side (reads or writes)."""
        if isinstance(e, StoreRefused):
            self.breakers[SIDES[kind]].success()
            self.refusals[kind].failure(what, e)
        else:
            self.breakers[SIDES[kind]].failure(what, e)

    def _answered(self, kind: str) -> None:
        self.breakers[SIDES[kind]].success()
        self.refusals[kind].success()
