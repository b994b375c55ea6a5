"""`Client`'s sequence ops and inspection over the wire, with `KVPool`'s names
and result types.

Each op that changes block tables updates the mirror of this session's
sequences from its ok reply (see `TableMirror`): attention and plans need no
round trip. ``tables`` reads that mirror when it holds every sequence asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager.client_ids import as_ids, id_list, packed, packed_rows, read_ids, scalar
from kvpager.client_wire import beat_interval
from kvpager.errors import (
    DaemonUnavailable,
    InternalError,
    InvalidArgument,
    KVPagerError,
    LimitExceeded,
    ProtocolError,
    RequestTimeout,
)
from kvpager.protocol import (
    SEQUENCES_PAGE,
    decode_allocations,
    decode_blocks,
    decode_info,
    decode_probes,
    decode_remote_stats,
    decode_slots,
    decode_stats,
    decode_tables,
)
from kvpager.types import Allocation, BlockMap, CacheProbe, PoolStats, RemoteStats, SequenceInfo
from kvpager.validate import counts, flag, salt_value, zero_d


class ClientSequences:
    """Mixed into `Client`, which supplies ``remote``, ``_call``, ``_mirror``,
    ``_lost``, ``_hb``, ``heartbeat``, ``heartbeat_timeout`` and ``synchronize``."""

    def allocate(
        self, prompts: Seq[Seq[int]], salt: Any = None, *, owner: None = None, share_in_batch: bool = False,
        window: int | None = None,
    ) -> list[Allocation]:
        """As `KVPool.allocate`; the sequences belong to this client's session.
        ``window`` is sent only to a daemon that takes it (`windowed_hits`):
        one that predates it answers prefix hits only, as without it."""
        if owner is not None:
            raise InvalidArgument("owner: a daemon sequence always belongs to the calling session")
        args: dict[str, Any] = {"prompts": prompts}
        if salt is not None:
            args["salt"] = salt_value(salt)
        if flag(share_in_batch, "share_in_batch"):  # (checked here: a daemon is not sent False)
            args["share_in_batch"] = True
        if window is not None and self.windowed_hits:
            args["window"] = window
        if self.remote:  # only a daemon with a tier knows the argument
            args["remote_tokens"] = True
        allocs = decode_allocations(self._call("allocate", args))
        self._mirror.allocated(allocs)
        return allocs

    def cached_tokens(self, prompts: Seq[Seq[int]], salt: Any = None, *, remote: bool | None = None,
                      window: int | None = None) -> list[int]:
        """As `KVPool.cached_tokens`: a read-only probe of the daemon's prefix
        cache and, where it has a remote tier, of the store (``window`` as `allocate`'s)."""
        return [p.num_cached_tokens for p in self._probe(prompts, salt, remote, False, window)]

    def probe_cache(self, prompts: Seq[Seq[int]], salt: Any = None, *, remote: bool | None = None,
                    window: int | None = None) -> list[CacheProbe]:
        """As `KVPool.probe_cache`. A daemon with a remote tier that predates
        the tier's probe answers from its local cache (no remote tokens)."""
        return self._probe(prompts, salt, remote, True, window)

    def _probe(self, prompts: Any, salt: Any, remote: bool | None, split: bool, window: int | None) -> list[CacheProbe]:
        if remote is not None and not isinstance(remote, bool):
            raise InvalidArgument(f"remote must be a bool or None, got {remote!r}")
        args: dict[str, Any] = {"prompts": prompts}
        if salt is not None:
            args["salt"] = salt_value(salt)
        if window is not None and self.windowed_hits:
            args["window"] = window
        if self.remote and self.remote.get("probe"):  # only such a daemon knows the arguments
            if remote is not None:
                args["remote"] = remote
            if split:
                args["remote_tokens"] = True
        return decode_probes(self._call("cached_tokens", args))

    def append(self, seq_ids: Any, num_tokens: Any = 1, token_ids: Any = None) -> list[np.ndarray]:
        """As `KVPool.append`: the new tokens' slot ids per sequence."""
        seq_ids, num_tokens = as_ids(seq_ids), one_shot_counts(num_tokens)
        if type(num_tokens) is not int:
            num_tokens = scalar(num_tokens)
        flat = self._append(seq_ids, num_tokens, token_ids)
        one = isinstance(seq_ids, (int, np.integer)) or isinstance(seq_ids, np.ndarray) and seq_ids.ndim == 0
        if not one and not len(seq_ids):
            return []  # no sequences: no arrays (as `KVPool.append`)
        return decode_slots(flat, 1 if one else len(seq_ids), num_tokens)

    def append_flat(self, seq_ids: Any, num_tokens: Any = 1, token_ids: Any = None) -> np.ndarray:
        """As `KVPool.append_flat`: every sequence's new slots in one int64 array."""
        return decode_slots(self._append(seq_ids, one_shot_counts(num_tokens), token_ids), 1, None)[0]

    def _append(self, seq_ids: Any, num_tokens: Any, token_ids: Any) -> bytes:
        ids, sent = read_ids(seq_ids)
        args: dict[str, Any] = {"seq_ids": sent}
        if type(num_tokens) is not int:
            num_tokens = scalar(num_tokens)  # a 0-d integer array: its int (the mirror follows a count)
        if not (type(num_tokens) is int and num_tokens == 1):  # a bool goes to the daemon, which refuses it
            args["num_tokens"] = num_tokens
        if token_ids is not None:
            args["token_ids"] = packed_rows(token_ids)
        return self._mutate("append", args, ids,
                            lambda raw: self._mirror.appended(ids, num_tokens, decode_slots(raw, 1, None)[0]))

    def record_tokens(self, seq_ids: Any, token_ids: Any) -> None:
        """As `KVPool.record_tokens`: record the token ids of slots appended
        without them (`append` with no ``token_ids``): each sequence's ids
        continue the ids it knows, at most up to its length (else
        `InvalidArgument`, and nothing changes). A pipelined decode loop
        appends the next step's slots before it knows the tokens that go in
        them; once their ids are recorded, the blocks they fill are published
        on commit exactly as if the ids had come with the append. No block
        table changes, so the mirror has nothing to follow; a retry after a
        timeout gets the first execution's reply (the ids are recorded once)."""
        self._call("record_tokens", {"seq_ids": packed(as_ids(seq_ids)), "token_ids": packed_rows(token_ids)})

    def commit(self, seq_ids: Any, upto: Any = None, *, synchronize: bool = True) -> list[int]:
        """As `KVPool.commit`. On a GPU pool mapped in this process, it first waits
        until this process's device work (K/V writes on any stream) has completed,
        unless ``synchronize=False``: the caller has already waited for the writes
        of these tokens (an event recorded after them, as a pipelined decode loop
        does while its next pass is running)."""
        if flag(synchronize, "commit: synchronize"):
            self.synchronize()
        seq_ids = as_ids(seq_ids)
        ids = id_list(seq_ids)
        seq_ids = packed(seq_ids)
        args = {"seq_ids": seq_ids} if upto is None else {"seq_ids": seq_ids, "upto": packed(upto)}
        try:
            return self._mutate("commit", args, ids, lambda _: self._mirror.committed(ids, upto))
        except BaseException:  # (step plans recheck; one without a clear outcome may have run: `_mutate`)
            self._mirror.moves.bump()
            raise

    def fork(self, seq_ids: Any, n: int = 1) -> list[list[int]]:
        seq_ids = as_ids(seq_ids)
        ids = id_list(seq_ids)
        return self._mutate("fork", {"seq_ids": seq_ids, "n": n}, ids,
                            lambda children: self._mirror.forked(ids, children))

    def free(self, seq_ids: Any) -> None:
        seq_ids = as_ids(seq_ids)
        ids = id_list(seq_ids)
        self._mutate("free", {"seq_ids": seq_ids}, ids, lambda _: self._mirror.freed(ids))

    def truncate(self, seq_ids: Any, lengths: Any) -> None:
        seq_ids = as_ids(seq_ids)
        ids = id_list(seq_ids)
        self._mutate("truncate", {"seq_ids": seq_ids, "lengths": lengths}, ids,
                     lambda _: self._mirror.truncated(ids, lengths))

    def release_before(self, seq_ids: Any, positions: Any) -> list[int]:
        """As `KVPool.release_before`; this worker's mirror follows (null entries)."""
        seq_ids = as_ids(seq_ids)
        ids = id_list(seq_ids)
        return self._mutate("release", {"seq_ids": seq_ids, "positions": positions}, ids,
                            lambda counts: self._mirror.released(ids, counts))

    def swap_out(self, seq_ids: Any) -> None:
        seq_ids = as_ids(seq_ids)
        ids = id_list(seq_ids)
        self._mutate("swap_out", {"seq_ids": seq_ids}, ids, lambda _: self._mirror.swapped_out(ids))

    def swap_in(self, seq_ids: Any) -> None:
        seq_ids = as_ids(seq_ids)
        ids = id_list(seq_ids)
        got = self._mutate("swap_in", {"seq_ids": seq_ids}, ids)
        if ids is None:  # (the mirror lost track: the daemon's tables are the truth)
            return
        try:
            # None: the tables would pass the daemon's message limit (or a daemon
            # from before swap_in answered with them): asked a part at a time.
            tables, lens = self._daemon_tables(ids) if got is None else decode_tables(got)
            self._mirror.swapped_in(ids, tables, lens)
        except (LimitExceeded, RequestTimeout, DaemonUnavailable):  # the swap ran; its tables asked for later
            self._mirror.forget(ids)  # (the daemon's unread-replies budget full, say: not the swap's failure)
        except BaseException:  # (a signal handler's too: the swap ran)
            self._mirror.forget(ids)
            raise

    def _mutate(self, op: str, args: dict[str, Any], ids: Iterable[int] | None,
                follow: Callable[[Any], Any] | None = None, always: bool = False) -> Any:
        """``_call`` for an op that changes the tables of ``ids`` (read only if it
        fails), then ``follow(reply)``: the mirror made to follow the op (where
        ``ids`` are known, or ``always``: a batch's, whose ops' ids each may be
        unread). Without a
        clear outcome (no reply in time, or a daemon bug) the op may have been
        applied: the mirror forgets ``ids``, whose tables then come from the
        daemon. So does any exception but kvpager's own, any at all once the reply
        came or while the call waited for it (``_unsettled``): one a signal handler raised (KeyboardInterrupt) while the call
        waited for its reply, after it came or while the mirror followed it left a
        `free` the daemon ran, and the mirror's slots, still taken, wrote into the
        blocks another session got next (only the wait was covered). An id of a
        session lost since that no sequence of this one has is UnknownSequence
        first, as reads say (`_check_held_before`: the daemon's `not_owner` told
        that another session holds it now)."""
        if ids is not None and self._held_before:
            self._check_held_before(ids)
        replied = False
        try:
            got = self._call(op, args)
            replied = True
            if ids is None:  # the daemon took ids this mirror cannot read: it cannot follow the op
                self._mirror.lost_track()
            if follow is not None and (ids is not None or always):
                follow(got)
        except BaseException as e:  # (found gone: it may run, settled, later)
            if replied or not isinstance(e, KVPagerError) or self._unsettled is not None \
                    or isinstance(e, (RequestTimeout, DaemonUnavailable, InternalError)):
                self._unfollowed(ids)
            raise
        return got

    def _unfollowed(self, ids: Iterable[int] | None) -> None:
        """An op on ``ids`` that may have run without the mirror following it:
        they are forgotten (None: ids the daemon may have taken, not read here:
        all of them)."""
        if ids is None:
            self._mirror.lost_track()
        else:
            forget = list(ids)
            if forget:
                self._mirror.forget(forget)

    def tables(self, seq_ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """Padded int32 block tables [B, max_blocks] and lengths [B], as `KVPool.block_tables`:
        from this client's mirror when it owns every sequence, else from the daemon."""
        return self._tables(seq_ids, "tables")

    def _tables(self, seq_ids: Any, op: str) -> tuple[np.ndarray, np.ndarray]:
        """`tables` for ``op`` (named by SequenceSwapped for a swapped-out sequence)."""
        seq_ids = as_ids(seq_ids)
        if not self._lost:
            ids = id_list(seq_ids)
            if ids is not None:
                got = self._mirror.gather(ids, op)
                if got is not None:
                    return got
        return self._daemon_tables(seq_ids)

    def _daemon_tables(self, seq_ids: Any, slots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The daemon's `tables` of ``seq_ids``; a batch whose padded reply would pass the
        daemon's message limit asked in halves (read-only: nothing to undo), padded again.
        ``slots``: a step plan's, which the daemon checks as a write's first (NotOwner;
        the halves need not carry them: a reply too large is refused after the check)."""
        self._check_held_before(seq_ids)
        args = {"seq_ids": seq_ids} if slots is None else {"seq_ids": seq_ids, "slots": slots}
        try:
            return decode_tables(self._call("tables", args))
        except LimitExceeded as e:
            ids = id_list(seq_ids)
            if getattr(e, "limit", None) != "max_message_bytes" or ids is None or len(ids) < 2:
                raise
        half = len(ids) // 2
        (ta, la), (tb, lb) = self._daemon_tables(ids[:half]), self._daemon_tables(ids[half:])
        width = max(ta.shape[1], tb.shape[1])
        tables = np.zeros((len(ids), width), np.int32)
        tables[:half, : ta.shape[1]] = ta
        tables[half:, : tb.shape[1]] = tb
        return tables, np.concatenate([la, lb])

    def sequence(self, seq_id: int) -> SequenceInfo:
        if isinstance(seq_id, np.ndarray) and seq_id.ndim == 0:
            seq_id = zero_d(seq_id, "seq_id")  # the int it holds, as `KVPool.sequence`
        self._check_held_before([seq_id])
        return decode_info(self._call("sequences", {"seq_ids": [seq_id]})[0])

    def sequences(self) -> list[SequenceInfo]:
        """Every live sequence of every session, in id order (asked a page at a
        time, so the daemon never spends long on one request: `sequence_pages`)."""
        return [info for page in sequence_pages(self) for info in page]

    def _infos(self, ids: list[int]) -> list[SequenceInfo]:
        """The `SequenceInfo`s of ``ids`` in one request, or in halves where their
        block tables would pass the daemon's message limit."""
        self._check_held_before(ids)
        try:
            return [decode_info(d) for d in self._call("sequences", {"seq_ids": ids})]
        except LimitExceeded as e:
            if getattr(e, "limit", None) != "max_message_bytes" or len(ids) < 2:
                raise
        half = len(ids) // 2
        return self._infos(ids[:half]) + self._infos(ids[half:])

    def blocks(self) -> BlockMap:
        return decode_blocks(self._call("blocks", {}))

    def stats(self) -> PoolStats:
        return decode_stats(self._call("stats", {}))

    def remote_stats(self) -> RemoteStats | None:
        """As `KVPool.remote_stats`: the daemon's remote tier counters, or None."""
        d = self._call("stats", {}).get("remote")
        return decode_remote_stats(d) if d is not None else None

    def check_integrity(self) -> None:
        """The daemon's `KVPool.check_integrity`, plus: every sequence has an open session.
        The daemon holds checks to a share of its time (a large pool's takes most of a
        second): refused as too soon, this waits as long as it is told, within the
        client's timeout, and asks again; a client without heartbeats beats while it
        waits (a wait past the heartbeat timeout ended its session: `kvpager check`
        twice in a row on a large pool said "this session is not open")."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._call("check", {})
                return
            except LimitExceeded as e:
                wait = getattr(e, "retry_after", None)
                if e.limit != "check_share" or not isinstance(wait, float) or time.monotonic() + wait > deadline:
                    raise
                self._wait_open(wait + 0.01)

    def _wait_open(self, seconds: float) -> None:
        """Sleep ``seconds`` with this session kept open: without a heartbeat thread,
        a beat every third of the daemon's heartbeat timeout."""
        if self._hb is not None:  # (its thread beats)
            time.sleep(seconds)
            return
        end, every = time.monotonic() + seconds, beat_interval(self.heartbeat_timeout)
        while (left := end - time.monotonic()) > every:
            time.sleep(every)
            self.heartbeat()
        time.sleep(max(0.0, left))


def sequence_pages(client: Any, page: int = SEQUENCES_PAGE, owner: str | None = None) -> Iterator[list[SequenceInfo]]:
    """The live sequences of ``client``'s daemon (``owner``: of the session of that
    name alone) a page of at most ``page`` at a time, in id order, asked as they are
    taken (a caller that stops early asks no more). A page may hold fewer than
    asked, to keep within the message limit, so the pages go on until an empty one;
    a page whose ids do not go up is no daemon's: `ProtocolError`."""
    after = -1
    ask: dict[str, Any] = {"limit": page} if owner is None else {"limit": page, "owner": owner}
    while True:
        infos = [decode_info(d) for d in client._call("sequences", {**ask, "after": after})]
        if not infos:
            return
        if any(not isinstance(i.seq_id, int) or i.seq_id <= after for i in infos):
            raise ProtocolError(f"a page of sequences after {after} holds one not after it: no kvpager "
                                "daemon's reply (its pages go up)")
        yield infos
        after = infos[-1].seq_id


def one_shot_counts(value: Any) -> Any:
    """`append`'s ``num_tokens`` given as another iterable than a list, a tuple or
    an array (a generator, a range) read once into a list, as `KVPool` reads it;
    what `KVPool` refuses (a str, bytes, a dict, a set, a float...) refused the same
    way before anything is sent; None, an int, a list or an array as given."""
    if value is None or isinstance(value, (int, np.integer, np.ndarray, list, tuple)):
        return value
    return counts(value)
