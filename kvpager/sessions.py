"""Daemon sessions: who a client is, when it was last heard, its staging buffer.

A session has two names. Its ``id`` is a secret (128 random bits) that only
its client learns, from the hello reply, and that every later request
carries: it is the session's credential, so no other reply and no log line
shows it. Its ``name`` (``s1``, ``s2``, ...) is public: the allocator records
it as the owner of the session's sequences, and inspection (`sequences`,
`kvpager seqs`, `kvpager top`) shows it with the client's pid.

A staging buffer is POSIX shared memory (CPU pools) or a ``cudaMalloc``
allocation exported by CUDA IPC on the pool's GPU (`cuda_ipc.DeviceBuffer`).

A session opens with ``hello`` and ends with ``bye`` or when it has been
silent for ``heartbeat_timeout`` seconds; the server then frees every
sequence it owns. Only the server's event loop touches this table.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kvpager.errors import SessionLost
from kvpager.limits import Limits
from kvpager.shm import Segment, SegmentExists, random_tag, segment_name


@dataclass(eq=False)
class Session:
    id: str  # the secret
    name: str  # public: the owner of its sequences in the pool
    client: str
    pid: int | None
    last_seen: float
    staging: Any = None  # shm Segment or cuda_ipc DeviceBuffer
    num_seqs: int = 0  # live sequences it owns (allocate, fork and free keep count)
    #: request id -> (digest of the request, reply) of its last RETRIED_OPS requests
    replies: OrderedDict = field(default_factory=OrderedDict)
    kept_bytes: int = 0  # of those replies
    ops: int = 0  # requests it sent
    opened: float = field(default_factory=time.time)
    control: bool = False  # hello carried the daemon's control token
    rank: int | None = None  # the tensor-parallel rank hello named (None: none named)
    driver: str | None = None  # a rank session's driver: the session (public name) whose sequences it writes

    def close(self) -> None:
        if self.staging is not None:
            self.staging.close()
            self.staging = None


class SessionTable:
    """Open sessions by id, with heartbeat expiry. ``device`` is the pool's CUDA
    device index (staging in device memory), or None (shared memory)."""

    def __init__(self, heartbeat_timeout: float, epoch: str, device: int | None = None,
                 limits: Limits | None = None, rank_devices: list[int] | None = None):
        self.heartbeat_timeout = heartbeat_timeout
        self.limits = limits or Limits()
        self.staging_bytes = 0  # all sessions' staging buffers
        self.epoch = epoch
        self.device = device
        #: a tensor-parallel GPU pool: each rank's device (a session stages on its rank's)
        self.rank_devices = rank_devices
        self.sessions: dict[str, Session] = {}  # by secret id
        self.by_name: dict[str, Session] = {}
        self._serial = 0

    def __len__(self) -> int:
        return len(self.sessions)

    def open(self, client: str, pid: int | None) -> Session:
        self._serial += 1
        s = Session(secrets.token_urlsafe(16), f"s{self._serial}", client, pid, time.monotonic())
        self.sessions[s.id] = s
        self.by_name[s.name] = s
        return s

    def get(self, session_id: str | None) -> Session:
        """The session, its clock reset; SessionLost if it is not open."""
        s = self.sessions.get(session_id) if session_id is not None else None
        if s is None:
            err = SessionLost(  # the id is a secret: never echoed
                "this session is not open on this daemon (it said bye, missed heartbeats "
                "for longer than the heartbeat timeout, or the daemon restarted)"
            )
            err.epoch = self.epoch  # lets the client tell a restart from an expiry
            raise err
        s.last_seen = time.monotonic()
        return s

    def expired(self, now: float | None = None) -> list[Session]:
        """Sessions not heard from for longer than the heartbeat timeout before ``now``."""
        now = time.monotonic() if now is None else now
        limit = now - self.heartbeat_timeout
        return [s for s in self.sessions.values() if s.last_seen < limit]

    def close(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.by_name.pop(session.name, None)
        if session.staging is not None:
            self.staging_bytes -= session.staging.size
        session.close()

    def staging(self, session: Session, nbytes: int) -> Any:
        """The session's staging buffer, grown (replaced) to hold ``nbytes``."""
        if session.staging is None or session.staging.size < nbytes:
            # Round up so a growing worker does not re-map on every step.
            size = min(max(1 << 20, 1 << (max(nbytes, 1) - 1).bit_length()), max(nbytes, self.limits.staging))
            held = session.staging.size if session.staging is not None else 0
            self.limits.check("staging_total", self.staging_bytes - held + size,
                              "staging: bytes of every session's buffers")
            if session.staging is not None:
                session.staging.close()
                session.staging = None
                self.staging_bytes -= held
            if self.device is not None:
                from kvpager.cuda_ipc import DeviceBuffer

                dev = self.device if not self.rank_devices else self.rank_devices[session.rank or 0]
                session.staging = DeviceBuffer.create(size, dev)
            else:
                session.staging = self._segment(size)
            self.staging_bytes += size
        return session.staging

    def _segment(self, size: int) -> Segment:
        """A new shared-memory staging segment under an unguessable name, created
        exclusively; a name someone else made first is skipped."""
        for attempt in range(3):
            try:
                return Segment.create(segment_name(self.epoch, random_tag()), size)
            except SegmentExists:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")
