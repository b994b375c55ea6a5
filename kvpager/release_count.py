"""The daemon's count of releases in shared memory: words every mapped worker
reads to learn that blocks may have gone to other sequences (releases, ended
sessions, each session's commits), made by the daemon (`ReleaseCount`) and
attached read-only by clients (`map_release_count`), in segments of
`kvpager.shm`."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kvpager.errors import InvalidArgument
from kvpager.shm import Segment, random_tag, segment_name

log = logging.getLogger("kvpager.shm")


#: sessions with a count of commits of their own (`ReleaseCount`)
COMMIT_WORDS = 1024
#: the most words of a count a client maps (a daemon's handle naming more is taken as this many)
MAX_COUNT_WORDS = 1 << 16


class ReleaseCount:
    """The daemon's count of releases (`kvpager.plan_guard.Moves.released`): a
    uint64 in a segment of its own, which every mapped worker reads (attached
    read-only) to learn that some session's blocks may have gone to another
    sequence; after it the count of sessions the daemon ended (expired), by
    which a worker learns that its own may be one before it writes
    (`kvpager.client_kv.KVAccess._check_not_ended`); then `COMMIT_WORDS` counts
    of commits, a session's at ``word(serial)`` (the hello reply's
    ``commit_word``), by which a rank worker learns that its driver published
    blocks its checked slots may lie in (`kvpager.client_slots`). Sessions past
    `COMMIT_WORDS` share words: a shared word only makes its workers ask again
    more often. Its name is random (`random_tag`), as the staging buffers'."""

    #: the words before the commit counts: releases, ended sessions
    FIRST_COMMIT = 2
    SIZE = 8 * (FIRST_COMMIT + COMMIT_WORDS)

    def __init__(self, epoch: str):
        self.segment = Segment.create(segment_name(epoch, random_tag("m")), self.SIZE, hold=True)
        self.array = self.segment.array((self.SIZE // 8,), np.uint64)

    def session_ended(self) -> None:
        self.array[1:2] += 1  # (as an array: wraps silently, see `committed`)

    @classmethod
    def word(cls, serial: int) -> int:
        """The word counting the commits of the session numbered ``serial``."""
        return cls.FIRST_COMMIT + serial % COMMIT_WORDS

    def committed(self, word: int) -> None:
        """A session committed (and may have published blocks its workers write).
        Added as an array, which wraps silently past 2**64 - 1: the words are
        shared memory any process of the daemon's user may map writable, and a
        scalar ``+= 1`` on a word a client set to the top warned (an error under
        ``-W error``: a commit answered ``internal`` after it had published, and an
        expiry, outside the loop's guard, ended the daemon)."""
        self.array[word : word + 1] += 1

    def handle(self) -> dict[str, Any]:
        """The hello reply's ``memory["releases"]``."""
        return {"name": self.segment.name, "offset": 0, "size": self.SIZE}

    def close(self) -> None:
        self.array = None
        self.segment.close()


# The release counts mapped by clients, read-only, one per segment per process.
_counts: dict[str, np.ndarray] = {}


def map_release_count(handle: Any) -> np.ndarray | None:
    """Client side: the daemon's counts named in a hello reply's
    ``memory["releases"]`` (a read-only view of its words: releases, ended
    sessions, commits), once per process; None where the reply names none (a
    daemon from before it) or it cannot be attached here (a CUDA IPC pool mapped
    across /dev/shm namespaces), with a warning."""
    if not isinstance(handle, dict) or not isinstance(handle.get("name"), str):
        return None
    name = handle["name"]
    got = _counts.get(name)
    if got is None:
        size = handle.get("size")
        # (a daemon from before counts releases alone, or releases and ended sessions)
        words = min(size // 8, MAX_COUNT_WORDS) if isinstance(size, int) and size >= 8 else 1
        try:
            segment = Segment.attach(name, 8 * words, readonly=True)
        except (InvalidArgument, OSError) as e:  # a GPU pool mapped from another /dev/shm (a container)
            log.warning("the daemon's count of releases (%s) cannot be mapped here (%s): plans over other "
                        "sessions' sequences recheck only when this worker's own sequences change", name, e)
            return None
        got = _counts[name] = segment.array((words,), np.uint64)
    return got


def forget_release_count(handle: Any) -> None:
    """Drop this process's mapping of a gone daemon's count of releases (unmapped once
    no plan holds a view of it)."""
    if isinstance(handle, dict) and isinstance(handle.get("name"), str):
        _counts.pop(handle["name"], None)
