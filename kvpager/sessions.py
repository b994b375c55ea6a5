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

A tensor-parallel rank worker's session names a driver (the session whose
sequences it writes its heads into) and a rank: the table keeps who serves
each rank of each driver, so a second worker of one rank is refused
(`RankTaken`: two would write the same heads of the same blocks), and so the
server ends a driver's workers with it (a worker's writes go into the
driver's blocks, free for any session once the driver is gone). A worker
ended so is told why when it next asks (a few such secrets are kept, not
the sessions).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kvpager.errors import RankTaken, SessionLost
from kvpager.limits import Limits
from kvpager.render import printable
from kvpager.shm import Segment, SegmentExists, random_tag, segment_name

#: how many secrets of rank workers ended with their driver `SessionTable.get` tells apart
ENDED_KEPT = 1024


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
    #: requests of its that moved the pool's `Moves` count (a free, truncate, swap-out, release, commit,
    #: copy-on-write: `Dispatch._reply`): no block leaves its tables otherwise
    changes: int = 0
    #: (its and its driver's ``changes``, the blocks their sequences held then: a mask or sorted ids): a
    #: staged write's check of its slots (`StagingOps._held`), kept while neither took a block out of a table
    held: tuple[tuple[int, int], Any] | None = None
    quiet: bool = False  # hello's `quiet`: its open and its clean end logged at debug (an inspection)
    serial: int = 0  # its number (its name's): the word counting its commits (`kvpager.release_count.ReleaseCount.word`)

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
        #: rank workers by driver (public name), then rank: one a rank
        self.workers: dict[str, dict[int, Session]] = {}
        #: secrets of rank workers' sessions ended with their driver's -> why (`get` says it)
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._serial = 0

    def __len__(self) -> int:
        return len(self.sessions)

    def open(self, client: str, pid: int | None, rank: int | None = None, driver: Session | None = None) -> Session:
        """A new session; a rank worker's (``driver``: the open session it works
        for, with ``rank``) claims that rank of that driver, RankTaken (nothing
        opened) where an open session serves it already."""
        if driver is not None:
            self._check_claim(driver, rank)
        self._serial += 1
        s = Session(secrets.token_urlsafe(16), f"s{self._serial}", client, pid, time.monotonic())
        s.rank, s.serial = rank, self._serial
        self.sessions[s.id] = s
        self.by_name[s.name] = s
        if driver is not None and rank is not None:
            s.driver = driver.name
            self.workers.setdefault(driver.name, {})[rank] = s
        return s

    def _check_claim(self, driver: Session, rank: int | None) -> None:
        """RankTaken where rank ``rank`` of ``driver`` has its worker (or is the
        driver's own: a driver that named a rank serves it)."""
        holder = driver if driver.rank == rank else self.workers.get(driver.name, {}).get(rank)
        if holder is None or rank is None:
            return
        who = ("itself (the driver named that rank in its hello)" if holder is driver
               else f"session {holder.name} ({printable(holder.client)}, pid {holder.pid})")
        err = RankTaken(f"hello: rank {rank} of session {driver.name} is served by {who}: one worker a rank "
                        "of a driver, two would write the same heads of the same blocks; close that worker "
                        f"first (one whose process is gone ends within the heartbeat timeout, "
                        f"{self.heartbeat_timeout:g} s) or serve another rank")
        err.rank, err.holder = rank, holder.name
        raise err

    def find(self, session_id: Any) -> Session | None:
        """The open session of that secret, its clock left as it is (another
        session names it: that says nothing of whether it is alive)."""
        return self.sessions.get(session_id) if isinstance(session_id, str) else None

    def get(self, session_id: str | None) -> Session:
        """The session, its clock reset; SessionLost if it is not open."""
        s = self.sessions.get(session_id) if session_id is not None else None
        if s is None:
            why = self._ended.get(session_id) if session_id is not None else None
            err = SessionLost(why or (  # the id is a secret: never echoed
                "this session is not open on this daemon (it said bye, missed heartbeats "
                "for longer than the heartbeat timeout, its driver's session ended, or the daemon restarted)"
            ))
            err.epoch = self.epoch  # lets the client tell a restart from an expiry
            raise err
        s.last_seen = time.monotonic()
        return s

    def workers_of(self, driver: Session) -> list[Session]:
        """The open rank workers whose driver is ``driver``."""
        return list(self.workers.get(driver.name, {}).values())

    def ended_with_driver(self, worker: Session, driver: Session, why: str) -> None:
        """Remember why ``worker``'s session ended (its driver's did), for its next
        request: the last `ENDED_KEPT` such secrets are kept."""
        self._ended[worker.id] = (
            f"this rank worker's session was ended with its driver's, session {driver.name} ({why}): the "
            "blocks it wrote into are the daemon's again; reconnect once the driver has a session (a worker "
            "given the driver's Client names its current one), or open a new Client with the new driver")
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def expired(self, now: float | None = None) -> list[Session]:
        """Sessions not heard from for longer than the heartbeat timeout before ``now``."""
        now = time.monotonic() if now is None else now
        limit = now - self.heartbeat_timeout
        return [s for s in self.sessions.values() if s.last_seen < limit]

    def close(self, session: Session) -> None:
        self.sessions.pop(session.id, None)
        self.by_name.pop(session.name, None)
        ranks = self.workers.get(session.driver) if session.driver is not None else None
        if ranks is not None and ranks.get(session.rank) is session:  # its rank is free again
            del ranks[session.rank]
            if not ranks:
                del self.workers[session.driver]
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
