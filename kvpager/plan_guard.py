"""What keeps a step plan from writing or reading blocks its sequences no longer hold.

A step plan (`kvpager.plan`) is a snapshot of its sequences' block tables and
of the slots its step writes. Once a sequence is freed, truncated, swapped
out or releases leading blocks, those blocks can go to another sequence (of
another worker, on a daemon); once its step is committed, the blocks its
slots fill may be published in the prefix cache, read by every sequence that
shares the prefix. A plan used past such a change would write into, or read
from, blocks that are no longer its sequences'.

So the pool (or a daemon `Client`, for the plans it makes over the mapped
pool) counts those changes on a `Moves` counter of its backend, and a plan
keeps the count it last saw: one comparison a call. When the count has
moved, the plan rechecks itself once (`check_rows`): every sequence it was
made of still resident, at least as long, with the same blocks where the
plan reads, and every slot it writes a position of its own sequence that is
not committed yet. A plan that passes goes on (the change was another
sequence's); one whose blocks changed raises `StalePlan` on every call until
it is refilled, and one whose slots are committed (its step is done) on
every write (its attends read what they read before). A closed pool moves
the count too, and its plans refuse.

A worker's count moves with its own session's changes. Its plan over
another session's sequences (read through the daemon's tables, attend only)
follows the daemon's count of releases too (`Foreign`): the daemon moves it,
in a shared-memory word every mapped worker reads, whenever any session's
blocks may go to another sequence (a free, truncate, swap-out or release,
a session ended); the plan then rechecks through the daemon.

Plans made from block tables alone (`kvpager.plan.make_plan` over a backend,
or a plan refilled by `StepPlan.update` from tables) know no sequences: they
check only that their pool is open. `KVPool.refill` / `Client.refill` refill
a plan from sequence ids and keep it checked.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvpager import native
from kvpager.errors import InvalidArgument, SequenceSwapped, StalePlan, UnknownSequence


class Moves:
    """A count of the changes that can make a step plan stale (blocks released
    or committed, the pool closed); shared by a backend and whoever changes its
    sequences. A daemon's pool also moves ``shared`` (a one-word uint64 array in
    shared memory, `kvpager.release_count.ReleaseCount`) at each release: the count that
    mapped workers' plans over other sessions' sequences follow."""

    __slots__ = ("count", "shared")

    def __init__(self) -> None:
        self.count = 0
        self.shared: np.ndarray | None = None

    def bump(self) -> None:
        self.count += 1

    def released(self) -> None:
        """Blocks of some sequence may go to another: `bump`, and the shared count."""
        self.count += 1
        if self.shared is not None:
            self.shared[0:1] += 1  # (as an array: wraps silently, as `ReleaseCount.committed` says)


class Foreign:
    """What a worker's plan over sequences of other sessions follows: its own
    session's count (``own``, a `Moves`) plus words of the daemon's shared
    counts (``releases``, the mapped words, `kvpager.release_count.ReleaseCount`):
    ``words`` (0,), its releases, and for a rank worker's plan that writes its
    driver's sequences the driver's commits too (a plan refilled with slots the
    driver committed since wrote into published blocks). All only grow, so their
    sum moves whenever one does. A plan over its own sequences alone follows
    word 1, the sessions the daemon ended (its own may be one: the recheck asks)."""

    __slots__ = ("own", "releases", "words")

    def __init__(self, own: Moves, releases: np.ndarray, words: tuple[int, ...] = (0,)):
        self.own, self.releases, self.words = own, releases, words

    @property
    def count(self) -> int:
        return self.own.count + sum(int(self.releases[w]) for w in self.words)


#: The compiled slot check (native/plan_slots.c), or None: `_explain` alone
SLOTS_OWN = getattr(native.load(), "slots_own", None)

#: A plan's check against its sequences: raises StalePlan where the plan no longer reads its
#: sequences' blocks; returns why its writes are refused (its slots), or None.
Guard = Callable[[Any], "str | None"]


def sequence_guard(ids: Sequence[int], rows_now: Callable[[list[int]], tuple[np.ndarray, np.ndarray, np.ndarray]],
                   ) -> Guard:
    """The guard of a plan made of sequences ``ids``: ``rows_now(ids)`` gives
    their block tables, lengths and committed token counts as they are now
    (UnknownSequence / SequenceSwapped for one no longer resident)."""
    ids = list(ids)

    def guard(plan: Any) -> str | None:
        try:
            tables, lens, committed = rows_now(ids)
        except UnknownSequence as e:
            raise StalePlan(f"this step plan is stale: sequence {e.seq_id} was freed "
                            f"since it was made; {REMEDY}") from None
        except SequenceSwapped as e:
            raise StalePlan(f"this step plan is stale: sequence {e.seq_id} was swapped out since it was made; "
                            f"{REMEDY}") from None
        return check_rows(plan, ids, tables, lens, committed)

    return guard


class _Stand:
    """What a parent plan's check reads of it (`check_rows`) and its guard, kept by its
    chunked views (`view_guard`) for when the parent itself is gone."""

    __slots__ = ("spec", "tables", "seq_lens", "query_lens", "slots", "guard")

    def __init__(self, plan: Any):
        self.spec, self.tables, self.seq_lens = plan.spec, plan.tables, plan.seq_lens
        self.query_lens, self.slots, self.guard = plan.query_lens, plan.slots, plan.guard


def view_guard(parent: Any) -> Guard:
    """The guard of a plan derived from ``parent`` (a chunked view): the parent's
    check, through the parent while it lives (held weakly: the parent keeps its
    views), else through what the parent's check read of it when the view was
    tied (`StepPlan.guard_with` ties its views again): a view kept after its plan
    was dropped (``pool.plan(...).chunked(c)``) checked nothing, and read freed
    blocks another sequence held, silently."""
    ref, stand = weakref.ref(parent), _Stand(parent)

    def guard(_view: Any) -> str | None:
        p = ref()
        if p is not None:
            p.recheck(write=False)  # a view only attends
        elif stand.guard is not None:
            stand.guard(stand)  # (StalePlan where its blocks changed; its slots are the parent's writes')
        return None

    return guard


REMEDY = "make a new plan (KVPool.plan) or refill this one (KVPool.refill) after the sequences change"


def check_rows(plan: Any, ids: list[int], tables: np.ndarray, lens: np.ndarray,
               committed: np.ndarray) -> str | None:
    """StalePlan unless ``plan`` (host copies ``tables``, ``seq_lens``,
    ``query_lens``, ``slots``) still reads its sequences ``ids`` as they are now
    (``tables``, ``lens``, ``committed``): each at least as long as the plan saw
    it, with the same blocks wherever the plan reads. Returns why its writes are
    refused (a slot that is no position of its own sequence, or one committed
    since: its step is done), or None."""
    bs = plan.spec.block_size
    old, old_lens = plan.tables, plan.seq_lens.astype(np.int64)
    lens = np.asarray(lens, np.int64)
    short = np.flatnonzero(lens < old_lens)
    if len(short):
        i = int(short[0])
        raise StalePlan(f"this step plan is stale: sequence {ids[i]} was cut to {int(lens[i])} tokens since the "
                        f"plan was made over {int(old_lens[i])}; {REMEDY}")
    width = old.shape[1]
    read = np.arange(width)[None, :] < (-(-old_lens // bs))[:, None]  # the entries the plan reads
    now = tables[:, :width]
    if now.shape[1] < width:
        now = np.pad(now, ((0, 0), (0, width - now.shape[1])))
    moved = np.argwhere(read & (now != old))
    if len(moved):
        i, col = map(int, moved[0])
        raise StalePlan(f"this step plan is stale: block {col} of sequence {ids[i]} was {int(old[i, col])} when "
                        f"it was made and is {int(now[i, col])} now (released, truncated or swapped out: another "
                        f"sequence may hold it); {REMEDY}")
    slots = plan.slots
    if slots is None or not len(slots):
        return None
    row = np.repeat(np.arange(len(ids)), plan.query_lens)
    live = slots >= 0
    row, s = row[live], slots[live]
    hit = (old[row] == (s // bs)[:, None]) & read[row]
    found = hit.any(axis=1)
    pos = hit.argmax(axis=1) * bs + s % bs
    bad = np.flatnonzero(~found | (pos < np.asarray(committed, np.int64)[row]))
    if len(bad):
        k = int(bad[0])
        i = int(row[k])
        what = (f"is committed (sequence {ids[i]} has {int(committed[i])} tokens committed)" if found[k]
                else f"is no position of sequence {ids[i]}")
        return (f"this step plan's writes are stale: the slot {int(s[k])} it writes {what}; its step is done "
                f"or its slots are not its sequences' (it still attends); {REMEDY}")
    return None


def check_positions(ids: Sequence[int], tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
                    slots: np.ndarray | None, block_size: int, committed: np.ndarray | None = None) -> None:
    """InvalidArgument unless each slot of a step plan (but -1, a token not
    written) is its own query token's position in its own sequence: token j of
    sequence i's ``query_lens[i]`` sits at position ``seq_lens[i] - query_lens[i]
    + j``, in block ``tables[i, position // block_size]``. Checked when a plan is
    made or refilled from sequence ids: slots of another sequence of the session
    (or another step) were written where they pointed, silently, and the
    sequence's own positions read zeros or stale K/V. With ``committed`` (tokens
    committed per sequence), a slot at a committed position is refused too: its
    block may be published and read by every sequence sharing the prefix. A
    sequence listed twice may not write one position from both rows."""
    if slots is None or not len(slots):
        return
    nseq, total = len(seq_lens), len(slots)
    if not _slots_own(tables, seq_lens, None if total == nseq else query_lens, slots, block_size, committed):
        _explain(ids, tables, seq_lens, query_lens, slots, block_size, committed)
    if nseq > 1 and len(set(ids)) != nseq:  # (rows of one sequence over distinct parts of it are fine)
        live = slots[slots >= 0]
        if len(np.unique(live)) != len(live):
            raise InvalidArgument("a step plan lists a sequence twice with slots both of its rows write "
                                  "(the same positions, once each: -1 in one of them)")


def _slots_own(tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray | None, slots: np.ndarray,
               block_size: int, committed: np.ndarray | None) -> bool:
    """Whether every slot is its own query token's open position, by the compiled
    check (native/plan_slots.c: a decode step of 64 rows in well under a
    microsecond, against 12 us for the NumPy twin); False where it is not built
    or takes no such arrays (then `_explain`, the twin, decides)."""
    if SLOTS_OWN is None:
        return False
    try:
        return bool(SLOTS_OWN(tables, seq_lens, query_lens, slots, block_size, committed))
    except (TypeError, ValueError, BufferError):  # (arrays of other types or layouts: the twin reads them)
        return False


def _explain(ids: Sequence[int], tables: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
             slots: np.ndarray, block_size: int, committed: np.ndarray | None) -> None:
    """`check_positions` in NumPy: InvalidArgument naming the first slot that is no
    open position of its own query token; nothing where every one is."""
    q = query_lens.astype(np.int64)
    row = np.repeat(np.arange(len(seq_lens)), q)
    pos = np.arange(len(slots)) + np.repeat(seq_lens.astype(np.int64) - np.cumsum(q), q)
    want = tables[row, pos // block_size].astype(np.int64) * block_size + pos % block_size
    bad = (slots != want) & (slots >= 0)
    if committed is not None:
        bad |= (pos < np.asarray(committed, np.int64)[row]) & (slots >= 0)
    if bad.any():
        k = int(np.argmax(bad))
        i = int(row[k])
        why = (f"is position {int(pos[k])}, committed (sequence {ids[i]} has {int(committed[i])} "  # type: ignore[index]
               "tokens committed: its block may be shared)" if slots[k] == want[k]
               else f"is not its position {int(pos[k])} (slot {int(want[k])})")
        raise InvalidArgument(f"slots[{k}] = {int(slots[k])}, query token {k - int(np.searchsorted(row, i))} of "
                              f"sequence {ids[i]}, {why}: a plan's slots are its query tokens' own, in order "
                              "(as append / allocate returned them; -1: not written)")
