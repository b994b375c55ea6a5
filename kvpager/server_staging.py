"""The daemon's tensor ops through a session's staging buffer (shared memory,
or device memory exported by CUDA IPC): ``staging`` hands one out, ``write``
stores K/V from it into the session's own unpublished blocks only, ``attend``
reads q from it and leaves the output there."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager import validate, validate_arrays
from kvpager.attend_options import check_sinks
from kvpager.errors import InvalidArgument, NotOwner, UnknownSequence
from kvpager.server_ranks import on_rank_device, session_kv
from kvpager.wire_args import wire_ids, wire_int

if TYPE_CHECKING:
    from kvpager.sessions import Session


class StagingOps:
    """Op handlers mixed into `Server`, which supplies ``pool``, ``sessions`` and ``limits``."""

    def _op_staging(self, s: Session, a: dict[str, Any]) -> dict[str, Any]:
        nbytes = wire_int(a["nbytes"], "nbytes")
        if nbytes < 0:
            raise InvalidArgument(f"staging: nbytes must be >= 0, got {nbytes}")
        self.limits.check("staging", nbytes, "staging: bytes of this session's buffer")
        return self.sessions.staging(s, nbytes).handles()

    def _staged(self, s: Session, ref: Any, what: str) -> np.ndarray:
        """A view of ``ref`` = [offset, shape] in the session's staging buffer."""
        if s.staging is None:
            raise InvalidArgument(f"{what}: this session has no staging buffer; ask for one with 'staging'")
        if not (isinstance(ref, list) and len(ref) == 2 and isinstance(ref[1], list)):
            raise InvalidArgument(f"{what} must be [offset, shape] in the staging buffer")
        offset = wire_int(ref[0], f"{what} offset")
        shape = tuple(wire_int(d, f"{what} shape") for d in ref[1])
        return s.staging.array(shape, self.pool.spec.np_dtype, offset)

    def _op_write(self, s: Session, a: dict[str, Any]) -> None:
        slots = a["slots"]  # (within the tokens limit: `Dispatch._bound`)
        # checked as slots first (a null block's slot among them was `not_owner`, "block 0 is not held"),
        # then as this session's to write
        slots = validate_arrays.slots(slots if isinstance(slots, (list, np.ndarray)) else [slots], self.pool.spec)
        self._check_writable(s, slots)
        kv = session_kv(self, s, "write")
        with on_rank_device(self, s):
            kv.write(a["layer"], slots, self._staged(s, a["k"], "k"), self._staged(s, a["v"], "v"))

    def _check_writable(self, s: Session, slots: np.ndarray) -> None:
        """A session writes only slots of its own sequences' blocks, and never a
        block published in the prefix cache: other sessions read its K/V through
        the cache, so a published block is immutable. (A worker that maps the
        pool is trusted as its user is: see "Trust" in docs/protocol.md.)"""
        spec = self.pool.spec
        if slots.ndim != 1 or slots.dtype.kind not in "iu" or not slots.size:
            return  # KVPool.write names what is wrong
        slots = slots.astype(np.int64, copy=False)
        if ((slots < -1) | (slots >= spec.num_blocks * spec.block_size)).any():
            return  # out of range: KVPool.write says so
        blocks = np.unique(slots[slots >= 0] // spec.block_size)
        driver = None if s.driver is None else self.sessions.by_name.get(s.driver)
        count = (s.changes, 0 if driver is None else driver.changes)
        foreign = None
        if s.held is not None and s.held[0] == count:
            foreign = _outside(s.held[1], blocks)  # (blocks the tables took since: looked at again below)
        if foreign is None or len(foreign):
            # A rank's worker writes its heads into its own sequences and its driver's (docs/protocol.md,
            # "Ranks"); it wrote into any session's before, a client with the socket into another's K/V.
            held = self._held([s.name] if s.driver is None else [s.name, s.driver])
            s.held = (count, held)
            foreign = _outside(held, blocks)
        if len(foreign):
            raise NotOwner(f"write: block {int(foreign[0])} (slot {int(foreign[0]) * spec.block_size}...) is not "
                           "held by any sequence of this session" + ("" if s.driver is None else " or its driver"))
        published = blocks[self.pool.manager.pool.holds_key(blocks)]  # (not blocks(): a copy of every block's state)
        if len(published):
            raise NotOwner(f"write: block {int(published[0])} is published in the prefix cache; its K/V "
                           "is immutable (write before commit)")

    def _held(self, owners: list[str]) -> np.ndarray:
        """The device blocks the sequences of ``owners`` hold now: a mask a
        block, or their ids, sorted (int32), whichever is smaller.

        Kept on the session with its and its driver's counts of changes
        (`Session.changes`, `Session.held`): a block leaves a sequence's table
        only by a free, truncate, swap-out, release or copy-on-write of its
        owner's, each of which moves the pool's `Moves` count during that
        session's request and so its count of changes, so while they stand
        every block found held is still held, and the layers of a step that
        write the same blocks gather the tables once. Each write gathered every
        table of the session (and its driver) before: 5 ms a call for 256
        sequences of 32k tokens, 32 a step for a model's layers; and kept on the
        pool's count, any session's free gathered them again."""
        spec, manager = self.pool.spec, self.pool.manager
        held = np.zeros(spec.num_blocks, bool)  # (a mark a block: np.isin sorted every table, 3.6 ms for 16k entries)
        table = manager.table
        for owner in owners:
            ids = self.pool.owned(owner)
            # Its rows gathered as they are (a swapped-out one's moved entries are the null block, the shared
            # blocks it keeps on the device held), a run of rows at a time: 49,152 forks of a 4,000-block
            # sequence took 761 MiB in one gather. (A `SequenceInfo` a sequence here held the loop 250 ms a
            # write after each change for 65,000 forks beside one swapped out, 3 ms without it.)
            for part in table.row_chunks(manager.lookup(ids)) if ids else ():
                held[table.gather(part)[0].ravel()] = True
        # the mask where it is no larger than their ids would be (no pass over it to list them), else the ids
        return held if spec.num_blocks <= 4 * np.count_nonzero(held) else np.flatnonzero(held).astype(np.int32)

    def _check_plan_slots(self, s: Session | None, value: Any) -> None:
        """A step plan's slots, sent with its `tables` by a rank worker: checked as
        its staged write's (`_check_writable`) before the plan is made, with the
        round trip the plan makes anyway. A worker mirrors no tables of its
        driver's, so its plan wrote wherever its slots pointed: into another
        session's committed K/V."""
        if s is None:
            raise InvalidArgument("tables: slots (a step plan's, checked as a write's) need the session "
                                  "that writes them")
        slots = validate_arrays.slots(value if isinstance(value, (list, np.ndarray)) else [value], self.pool.spec)
        self._check_writable(s, slots)

    def _op_attend(self, s: Session, a: dict[str, Any]) -> list[Any]:
        q = self._staged(s, a["q"], "q")
        self._check_attend_work(a, q)
        with on_rank_device(self, s):
            out = session_kv(self, s, "attend").attend(a["layer"], wire_ids(a["seq_ids"]), q, a.get("query_lens"),
                                                       a.get("scale"), window=a.get("window"),
                                                       softcap=a.get("softcap"), sinks=_wire_sinks(a.get("sinks"), q),
                                                       chunk=a.get("chunk"))
            offset = wire_int(a["out"], "out")
            s.staging.array(out.shape, out.dtype, offset)[...] = out  # a device copy on a GPU
        return [offset, list(out.shape)]

    def _check_attend_work(self, a: dict[str, Any], q: np.ndarray) -> None:
        """LimitExceeded (``attend_work``) for an attend that would hold the loop too
        long: its query-key pairs (each query token against its sequence's tokens, at
        most its window or chunk) times the kernels' cost of a pair, query heads x head
        dim multiply-adds and about 256 more of bookkeeping (measured on the CPU
        kernel: a pair of 2 heads of 16 costs a tenth of one of 32 of 128, not a
        hundredth). Ids may repeat and query tokens are bounded only by the staging
        buffer: 65,536 copies of one 16k-token sequence held the loop 18 s, every
        other client timed out. What the pool refuses anyway (unknown ids, a
        malformed q or query_lens) is left to it, to name."""
        if q.ndim != 3:
            return
        try:
            ids = validate.seq_ids(wire_ids(a["seq_ids"]))
            manager = self.pool.manager
            lens = manager.table.num_tokens[manager.lookup(ids)].astype(np.int64)
            qlens = np.asarray(validate.per_seq(1 if a.get("query_lens") is None else a["query_lens"], len(ids),
                                                "query_lens"), dtype=np.int64)
        except (InvalidArgument, UnknownSequence, TypeError, ValueError, OverflowError):
            return
        if len(qlens) != len(lens) or (qlens < 1).any() or (qlens > lens).any() or qlens.sum() != q.shape[0]:
            return  # (q's tokens, held to the staging buffer, bound the product below int64's range)
        reach = min(int(x) for x in (a.get("window"), a.get("chunk"), 1 << 62) if type(x) is int and x > 0)
        pairs = int(np.dot(qlens, np.minimum(lens, reach)))
        work = pairs * (q.shape[1] * q.shape[2] + 256)
        self.limits.check("attend_work", work, "attend: query-key pairs x (query heads x head dim + 256)")


def _wire_sinks(sinks: Any, q: Any) -> Any:
    """An attend's ``sinks`` as sent (a packed float array, as a `Client` sends them,
    or a list of numbers) checked on the host by `attend_options.check_sinks` (one per query
    head of ``q``, finite), whatever the pool: a GPU pool reads them as they are."""
    if sinks is None or getattr(q, "ndim", 0) != 3:
        return sinks  # (a malformed q is the pool's to refuse, by its own name)
    if isinstance(sinks, list) and sinks and all(type(x) in (int, float) for x in sinks):
        sinks = np.asarray(sinks, dtype=np.float64)
    return check_sinks(sinks, q.shape[1])


def _outside(held: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Those of ``blocks`` not in ``held`` (`StagingOps._held`: a mask, or sorted ids)."""
    if held.dtype == bool:
        return blocks[~held[blocks]]
    if not len(held):
        return blocks
    # (blocks as ``held``'s int32: searchsorted casts the other way a copy of all of ``held``)
    at = np.minimum(np.searchsorted(held, blocks.astype(held.dtype)), len(held) - 1)
    return blocks[held[at] != blocks]
