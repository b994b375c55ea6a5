"""What a `Client` may write into the mapped pool: its slots and its liveness.

A worker writes K/V straight into the daemon's memory, so the daemon's checks
of a staged write (`kvpager.server_staging`: blocks of the session's own
sequences, none published) are made here: against the mirror of its own
sequences' tables (`_check_own_slots`), once per slot array and change of its
sequences. A rank worker with a driver writes into the driver's sequences,
whose tables it does not mirror: the daemon checks its slots, as its staged
write's, with a `tables` request of no sequences (`_check_driver_slots`),
once per slot array and change of what the driver may hold or may have
published (the daemon's mapped counts of releases, of ended sessions and of
the driver's commits); a step plan's slots go
with the plan's own `tables` request (`_plan_tables`: no round trip more
than the plan makes anyway). And no mapped write is made by a session the
daemon ended (closed, lost, past its heartbeat timeout, or ended with its
driver): `_check_alive`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager import validate_arrays
from kvpager.client_ids import id_list
from kvpager.errors import NotOwner, SessionLost


class SlotChecks:
    """Mixin of `KVAccess` (and so of `Client`): needs ``spec``, ``session_name``,
    ``plan_slots``, ``_mirror``, ``_lost``, ``_closed``, ``_hello_args``, ``_commit_word``, ``_tables``,
    ``_daemon_tables``, ``sequences``, ``blocks``, ``_call`` and ``_check_process``."""

    def _plan_tables(self, seq_ids: Any, slots: Any, op: str) -> tuple[np.ndarray, np.ndarray]:
        """The tables and lengths of a step plan's sequences (as `tables`). A rank
        worker's plan that writes (``slots``) into its driver's sequences has its
        slots checked by the daemon with them, as its staged write's (NotOwner:
        another session's blocks, or published ones; the plan is not made, or not
        refilled): it wrote wherever its slots pointed, over another session's
        committed K/V. Slots of its own sequences are checked against its mirror
        first (no round trip). A daemon that predates the check leaves them unchecked."""
        if slots is None or not self._writes_for_driver() or not self.plan_slots:
            return self._tables(seq_ids, op)
        checked = self._check_slots(slots)
        ids = None if self._lost else id_list(seq_ids)
        got = self._mirror.gather(ids, op) if ids is not None else None
        if got is not None:  # its own sequences: its own slots need no round trip
            try:
                self._check_own_slots(checked)
                return got
            except NotOwner:
                pass  # (its driver's blocks, maybe: the daemon says)
        self._check_alive()
        return self._daemon_tables(seq_ids, checked)

    def _check_plan_slots(self, slots: Any) -> None:
        """A plan's slots as a write's (`_check_own_slots`: this session's blocks, none
        published), checked once when it is made or refilled: its writes into them
        went unchecked before (another session's committed K/V overwritten through a
        plan given its slots, or over its sequences). A rank worker's with a driver:
        `_plan_tables`."""
        if slots is not None and not self._writes_for_driver():
            self._check_own_slots(self._check_slots(slots))

    def _check_own_slots(self, slots: np.ndarray) -> None:
        """NotOwner unless every slot (but -1, padding) lies in a block of one of this
        session's resident sequences, as the daemon checks a staged write (a pool of
        one rank; a rank's worker writes into the sequences its driver holds): slots kept
        from before a free, truncate or swap-out would write into blocks that may be
        another worker's now. Checked against the mirror once per slot array and
        change of the session's sequences (a model's layers write the same slots:
        the first layer pays the check, ~0.3 us the others); a mirror that lost
        sequences (an op without an outcome) is completed from the daemon first."""
        self._check_alive()
        mirror = self._mirror
        key = (mirror.moves.count, slots.tobytes())
        if self._own_slots == key:
            return
        self._check_process()
        blocks = np.unique(slots[slots >= 0] >> (self.spec.block_size.bit_length() - 1))
        foreign = mirror.foreign_blocks(blocks)
        if mirror.incomplete and (len(foreign) or len(blocks)):  # the daemon's own tables and cache (slow, rare)
            mine = [b for s in self.sequences() if s.owner == self.session_name and not s.swapped
                    for b in s.block_table]
            foreign = foreign[~np.isin(foreign, np.asarray(mine, np.int64))]
            if not len(foreign):
                cached = blocks[self.blocks().cached[blocks]]
                if len(cached):
                    raise NotOwner(f"write: block {int(cached[0])} is published in the prefix cache; its K/V is "
                                   "immutable, other sessions read it (write before commit)")
        if len(foreign):
            b = int(foreign[0])
            raise NotOwner(f"write: block {b} (slots {b * self.spec.block_size}...) is held by no resident sequence "
                           "of this session: slots kept from before a free, truncate or swap-out (take them from "
                           "the latest allocate / append)")
        # (a mirror that forgot sequences had the daemon's cache say it above: its own marks may be
        # stale, a timed-out append having handed a block it once published out again)
        published = blocks[:0] if mirror.incomplete and len(blocks) else mirror.published_blocks(blocks)
        if len(published):
            raise NotOwner(f"write: block {int(published[0])} is published in the prefix cache (found cached, or "
                           "filled by a commit); its K/V is immutable, other sessions read it (write before commit)")
        self._own_slots = key

    def _check_driver_slots(self, slots: np.ndarray) -> None:
        """NotOwner unless every slot (but -1, padding) lies in a block of this
        session's or its driver's resident sequences, none published: a rank
        worker's mapped write, checked by the daemon as its staged write's (a
        `tables` request of no sequences, with a slot of each block). It mirrors no tables of
        its driver's, so its writes went wherever its slots pointed: slots kept
        from before the driver freed, truncated or swapped out a sequence, or
        another session's, overwrote committed K/V. Asked once per slot array and
        change of what the driver may hold or may have published (a model's layers
        write the same slots: the first pays the round trip): the daemon's mapped
        counts of releases, of the sessions it ended and of the driver's commits
        (the same slots written again after the driver's commit went unasked, into
        K/V other sessions read), and this session's own changes. Without the
        mapped counts (a pool mapped where they are not) every write asks."""
        self._check_alive()
        if not self.plan_slots:
            return  # a daemon that predates `tables`' slots cannot check them: unchecked, as they were
        counts = self._releases
        # read before the round trip: a release or commit while it is under way makes the next write ask again
        key = None if counts is None else (self._mirror.moves.count, *counts[self._followed()].tolist(),
                                           slots.tobytes())
        if key is not None and key == self._driver_slots:
            return
        live = slots[slots >= 0]  # (padding writes nothing)
        if len(live):  # the daemon checks blocks: one slot of each (a long prefill's request stays small)
            bs = self.spec.block_size
            self._daemon_tables([], np.unique(live // bs) * bs)
        self._driver_slots = key

    def _followed(self) -> list[int]:
        """The words of the mapped counts (``_releases``) a rank worker's checked
        slots follow: releases, ended sessions, its driver's commits (those the
        daemon has)."""
        words = [0, 1][: len(self._releases)]
        w = self._commit_word
        if w is not None and w < len(self._releases):
            words.append(w)
        return words

    def _writes_for_driver(self) -> bool:
        """Whether this client's mapped writes go into sequences it mirrors no tables
        of: a rank worker's with a driver named, on any pool (a one-rank daemon takes
        rank 0 and its driver too: its mapped writes into the driver's sequences were
        refused as foreign while its staged ones were taken). A rank worker without
        a driver writes into its own sequences, as the daemon holds its staged writes
        to: on a pool of several ranks its mapped writes and plans went unchecked,
        into any session's blocks."""
        return self._hello_args.get("driver") is not None

    def _check_alive(self) -> None:
        """SessionLost where this client may not write into the mapped pool: closed,
        told its session is lost, or its session ended by the daemon since it last
        looked (`_check_not_ended`: past its heartbeat timeout, or ended with its
        driver). Every mapped write checks it first, a rank worker's too (whose
        slots the daemon checks then, once per change: `_check_driver_slots`):
        closed, lost or past its heartbeat timeout, a worker of a pool of two ranks
        wrote on, into blocks the daemon may have given to another session."""
        if self._closed:
            raise SessionLost("this client is closed")
        if self._lost:
            self._check_process()  # (a forked child's copy is marked lost: told why)
            raise SessionLost("this session is lost: its sequences (and their blocks) are the daemon's again")
        ends = self._releases
        if ends is not None and len(ends) > 1 and ends[1] != self._ends_seen:
            self._check_not_ended()

    def _check_not_ended(self) -> None:
        """SessionLost where the daemon ended a session since this one last looked (its
        count of sessions it ended, mapped with its count of releases, moved) and
        this is one: a worker stopped past its heartbeat timeout (SIGSTOP, a long
        pause) wrote its next K/V into blocks the daemon had given to another
        session meanwhile, before its heartbeat thread learnt that the session was
        over. One heartbeat's round trip each time the count moves."""
        ends = self._releases
        if ends is None or len(ends) < 2:
            return
        now = int(ends[1])
        if now != self._ends_seen:
            self._call("heartbeat", {})  # SessionLost (and the mirror dropped) if it was this one
            self._ends_seen = now

    #: the (count of changes, slot bytes) last found all this session's (`_check_own_slots`)
    _own_slots: tuple[int, bytes] | None = None
    #: the (counts, slot bytes) the daemon last found this session's or its driver's (`_check_driver_slots`)
    _driver_slots: tuple[Any, ...] | None = None
    #: the daemon's count of releases, mapped with its pool (`kvpager.release_count.ReleaseCount`; None: not named),
    #: of the sessions it ended (a second word, where it has one: `_check_not_ended`) and of commits
    _releases: np.ndarray | None = None
    #: the word of ``_releases`` counting its driver's commits (its own's, without a driver; None: none)
    _commit_word: int | None = None
    _ends_seen = 0

    def _check_slots(self, slots: Any) -> np.ndarray:
        """Slot ids as int64, checked as `KVPool.write` checks them (uint64 past int64 included)."""
        return validate_arrays.slots(slots, self.spec)

