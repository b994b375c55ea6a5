"""The daemon's log of refused hellos (`RefusedHellos`), bounded against a client
retrying in a loop."""

from __future__ import annotations

import logging
import time
from typing import Any

from kvpager.render import printable

log = logging.getLogger("kvpager.server")


#: Seconds between two log lines of refused hellos of one kind (the next line counts the ones between).
REFUSED_LOG_EVERY_S = 60.0


class RefusedHellos:
    """The daemon's log of refused hellos: a wrong or missing token, every session
    taken, a rank taken. They were never logged: clients failed to connect and the
    operator found nothing in the log to say why. The first of each kind is logged at
    once, then at most one a `REFUSED_LOG_EVERY_S` with the count of those between,
    so a client retrying in a loop does not flood the log."""

    def __init__(self, every: float = REFUSED_LOG_EVERY_S):
        self.every = every
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def say(self, kind: str, a: Any, error: BaseException) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.every:
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        client, pid = (a.get("client"), a.get("pid")) if isinstance(a, dict) else (None, None)
        who = printable(client)[:80] if isinstance(client, str) else "?"
        log.warning("hello refused (%s) to %s (pid %s): %s%s", kind, who, pid if isinstance(pid, int) else "?",
                    str(error)[:300], f" [{held} more refused since the last such line]" if held else "")
