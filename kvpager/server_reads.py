"""The daemon's read-only handlers (`tables`, `sequences`, `blocks`, `stats`,
`check`), mixed into `Server` through `kvpager.server_ops.ServerOps`.

Each bounds its reply by the daemon's message limit before building it on the
loop's thread: a small request never asks for a reply hundreds of times its
size, and `check` (a walk of every sequence in Python) holds a bounded share
of the loop's time.
"""

from __future__ import annotations

import bisect
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager import protocol
from kvpager.errors import IntegrityError, InvalidArgument, LimitExceeded
from kvpager.pins import salt_bytes
from kvpager.protocol import SEQUENCES_PAGE
from kvpager.wire_args import wire_ids, wire_int

if TYPE_CHECKING:
    from kvpager.sessions import Session

#: A `SequenceInfo`'s bytes in a reply besides its block table, at most (its
#: field names and values; the owner is a daemon-made session name).
INFO_BYTES = 256
#: A `TenantUsage`'s bytes in a `stats` reply besides its salt, at most.
TENANT_BYTES = 128

#: The share of the loop's time `check` may hold: it walks every sequence in Python (0.5-0.75 s
#: at 100k sequences), needs no session, and a script checking in a loop held every client's
#: steps behind it. A check within ``took / CHECK_SHARE`` of the last one's start is refused
#: (LimitExceeded, saying when), unless that one took under `CHECK_FREE_S` (a small pool's).
CHECK_SHARE = 0.1
CHECK_FREE_S = 0.02


class ReadOps:
    """Inspection handlers and the reply-size checks `ServerOps` shares with
    them (`_tables_size`, `_tables_fit`); `Server` supplies ``pool``,
    ``sessions``, ``max_message_bytes``, ``_check_after`` and ``_check_took``,
    `kvpager.server_staging` ``_check_plan_slots``."""

    def _tables_size(self, ids: list[int]) -> tuple[int, int]:
        """(bytes, width): the tables of ``ids`` (known ids) as a reply carries
        them, [ids, longest table] int32 padded, and that width in blocks."""
        manager = self.pool.manager
        rows = manager.lookup(ids)
        longest = int(manager.table.num_tokens[rows].max()) if len(rows) else 0
        width = max(-(-longest // self.pool.spec.block_size), 1)
        return 4 * len(ids) * (width + 1), width

    def _tables_fit(self, op: str, ids: list[int]) -> None:
        """LimitExceeded where the tables of ``ids`` would take more bytes than the
        message limit: a small request (one long sequence's id repeated 65,536
        times, or one long one among many short) asked for a reply hundreds of
        times its size (525 MB for 64 KiB), built on the loop's thread. Bounded
        as a request is."""
        size, width = self._tables_size(ids)
        if size > self.max_message_bytes:
            raise LimitExceeded(f"{op}: the tables of {len(ids)} ids padded to {width} blocks take {size} bytes, "
                                f"over the daemon's message limit of {self.max_message_bytes} (ask for fewer ids "
                                "at a time)", "max_message_bytes", size, self.max_message_bytes)

    # -- inspection ----------------------------------------------------------------------------
    def _op_tables(self, s: Session | None, a: dict[str, Any]) -> list[np.ndarray]:
        ids = wire_ids(a["seq_ids"])
        if a.get("slots") is not None:  # a worker's step plan over them: its slots checked as a write's
            self._check_plan_slots(s, a["slots"])
        self._tables_fit("tables", ids)
        return list(self.pool.tables(ids))

    def _op_sequences(self, s: Session | None, a: dict[str, Any]) -> list[dict[str, Any]]:
        # A page at a time: a SequenceInfo costs microseconds on the loop's thread.
        limit = wire_int(a.get("limit", SEQUENCES_PAGE), "limit")
        if not 1 <= limit <= SEQUENCES_PAGE:
            raise InvalidArgument(f"sequences: limit must be in [1, {SEQUENCES_PAGE}], got {limit}")
        if a.get("seq_ids") is not None:
            ids = wire_ids(a["seq_ids"])
            if len(ids) > limit:
                raise LimitExceeded(f"sequences: {len(ids)} ids in one request; at most {limit} "
                                    "(ask for pages: after / limit)", "ids", len(ids), limit)
            size = self._infos_size(ids)
            if len(size) and size[-1] > self.max_message_bytes:
                raise LimitExceeded(f"sequences: the {len(ids)} sequences' block tables take about {size[-1]} "
                                    f"bytes, over the daemon's message limit of {self.max_message_bytes} (ask "
                                    "for fewer ids at a time)", "max_message_bytes", int(size[-1]),
                                    self.max_message_bytes)
        else:
            owner = a.get("owner")  # a session name; None: every session's (in id order: no sort, 0.9 ms for
            # 100,000 sequences on a 2-core VM where merging the sessions' lists took 5.3)
            if owner is not None and not isinstance(owner, str):  # (5 read as a session no one has: [])
                raise InvalidArgument(f"sequences: owner must be a session name (a string) or nil, got "
                                      f"{type(owner).__name__}")
            ids = self.pool.owned(owner) if owner is not None else self.pool.sequence_ids()
            after = wire_int(a.get("after", -1), "after")
            if after < -1:  # as `pins` (-1: from the first)
                raise InvalidArgument(f"sequences: after must be a sequence id or -1 (from the first), got {after}")
            ids = ids[bisect.bisect_right(ids, after):][:limit]
            if ids:  # a page within the message limit (4,096 forks of a long sequence made 82 MB): one at least
                ids = ids[: max(1, int(np.searchsorted(self._infos_size(ids), self.max_message_bytes, "right")))]
        if not ids:
            return []
        # (one gather, the maps made from its columns: a page one `SequenceInfo` at a time held the loop 4x as long)
        cols = self.pool.info_columns(ids)
        # Owners are public session names; the pid says which worker it is.
        by_name = self.sessions.by_name
        pids = [w.pid if (w := by_name.get(o)) is not None else None for o in cols.owners]
        return protocol.encode_infos(cols, pids)

    def _infos_size(self, ids: list[int]) -> np.ndarray:
        """The bytes the `SequenceInfo`s of ``ids`` (known ids) take in a reply, at
        most, added up id after id: each one's block table (int64) and its fields."""
        manager = self.pool.manager
        return np.cumsum(8 * manager.table.num_blocks[manager.lookup(ids)].astype(np.int64) + INFO_BYTES)

    def _op_blocks(self, s: Session | None, a: dict[str, Any]) -> list[np.ndarray]:
        return protocol.encode_blocks(self.pool.blocks())

    def _op_stats(self, s: Session | None, a: dict[str, Any]) -> dict[str, Any]:
        d = protocol.encode_stats(self.pool.stats())
        # the tenants listed within a quarter of the message limit (their salts may be long):
        # the rest are counted in num_tenants, as those past MAX_TENANTS_LISTED are
        room = self.max_message_bytes // 4
        for k, t in enumerate(d["tenants"]):
            room -= salt_bytes(t["salt"]) + TENANT_BYTES
            if room < 0:
                d["tenants"] = d["tenants"][:k]
                break
        d["sessions"] = len(self.sessions)
        d["requests"] = self.requests  # every request the daemon has answered: rates for `kvpager top`
        remote = self.pool.remote_stats()
        if remote is not None:
            d["remote"] = remote.to_dict()
        return d

    def _op_check(self, s: Session | None, a: dict[str, Any]) -> None:
        start = time.monotonic()
        if start < self._check_after:
            wait = self._check_after - start
            e = LimitExceeded(f"check: the last one held the daemon's loop {self._check_took:.2f} s, and checks "
                              f"may hold {CHECK_SHARE:.0%} of its time: try again in {wait:.1f} s", "check_share")
            e.retry_after = wait  # (a detail of the reply: `Client.check_integrity` waits that long)
            raise e
        try:
            self._check_all()
        finally:
            took = self._check_took = time.monotonic() - start
            self._check_after = start + took / CHECK_SHARE if took >= CHECK_FREE_S else 0.0

    def _check_all(self) -> None:
        self.pool.check_integrity()
        open_ids = self.sessions.by_name
        orphans = [i for o in self.pool.owners() if o not in open_ids for i in self.pool.owned(o)]
        if orphans:
            raise IntegrityError(f"{len(orphans)} sequences belong to no open session, e.g. {orphans[:5]}")
        counts = self.pool.pin_counts()
        stray = [o for o in counts if o is not None and o not in open_ids]
        if stray:
            raise IntegrityError(f"{sum(counts[o] for o in stray)} pins belong to no open session, "
                                 f"e.g. of {stray[0]!r}")
        for s in open_ids.values():
            if s.num_seqs != len(self.pool.owned(s.name)):
                raise IntegrityError(f"session {s.name} counts {s.num_seqs} sequences but owns "
                                     f"{len(self.pool.owned(s.name))}")
