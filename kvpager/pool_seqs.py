"""`KVPool`'s sequence ops: allocate, the read-only probe (`cached_tokens`,
`probe_cache`), append, commit, fork, free, truncate, swap, release of blocks
behind a window.

Each takes a batch, validates all of it (`kvpager.validate`), and hands it
to the `SequenceManager`; copies the manager asks for (copy-on-write, swaps)
go to the backend in one batched call, after which the op clears the
manager's `copies_owed` (a call left before that breaks the pool:
`kvpager.pool._check_after`).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import numpy as np

from kvpager import seq_one, validate
from kvpager.errors import InvalidArgument
from kvpager.prefix_cache import root_key
from kvpager.sequences import ANY_OWNER
from kvpager.types import Allocation, CacheProbe


def _split(flat: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """One view of ``flat`` per sequence."""
    out, start = [], 0
    for n in counts:
        out.append(flat[start : start + n])
        start += n
    return out


_ONE_PROMPT = (list, np.ndarray)
_ONE_SALT = (type(None), str, bytes)


class PoolSequences:
    """Mixed into `KVPool`, which supplies ``spec``, ``manager``, ``backend``,
    ``remote``, ``pending``, ``_bs``, ``_offsets`` and the copy counters."""

    def allocate(
        self,
        prompts: Seq[Seq[int]],
        salt: str | bytes | None | Seq[str | bytes | None] = None,
        *,
        owner: str | None = None,
        share_in_batch: bool = False,
        window: int | None = None,
    ) -> list[Allocation]:
        """New sequences for ``prompts`` (a list of token-id lists). Each shares
        the longest committed prefix of full blocks found in the cache under its
        ``salt`` and gets fresh blocks for the rest.

        ``share_in_batch``: prompts of this batch also share the full blocks an
        earlier prompt of the batch gets fresh; those count in
        ``num_cached_tokens`` though their K/V comes from the earlier prompt's
        prefill in the same step, so write the whole batch's K/V of a layer
        before attending in it (a batched forward pass does).

        ``window``: for a model whose every layer attends within a sliding
        window of that many positions (the query's own included). A prompt
        whose cached prefix ends at a missing block (evicted: the oldest go
        first) also takes a later hit, as far as the blocks its first new
        token's window reads are cached. Either way the sequence holds only
        the hit blocks that window reads (a long cached prefix needs no room
        for the rest, as in vLLM's sliding-window manager); the entries before
        them hold the null block, as `release_before` leaves them
        (`Allocation.block_table`), their blocks stay cached, and attention
        over the sequence must use a window of at most ``window``. Without it
        only a prefix cached from the first block counts, all of it held.

        With a remote tier, full blocks missing here are first looked up in
        the store (one batch) and restored into device blocks; they count in
        ``num_cached_tokens`` and in ``num_remote_tokens``. With ``window``, a
        prompt the local cache already gives a windowed hit restores nothing
        (its leading blocks would go unread), and its hit blocks are held
        while the others' restore takes blocks; the others restore only the
        blocks their window reads, a hit past blocks the store lacks too
        (`kvpager.remote_restore.runs`), the tokens before them counted
        cached, not remote."""
        m = self.manager
        if owner is not None:
            validate.owner(owner)
        if window is not None:
            window = validate.whole_in(window, "allocate: window", 1, 1 << 63)
        if window is None and type(prompts) is list and len(prompts) == 1 and type(salt) in _ONE_SALT \
                and type(share_in_batch) is bool and type(prompts[0]) in _ONE_PROMPT and self.remote is None \
                and m.scalar:
            # One prompt, checked as `validate.prompts` / `per_seq` would: straight to its path.
            seq_id, flat, blocks, nh, ntok = seq_one.allocate_one(m, prompts[0], salt, owner)
            c = nh * self.spec.block_size
            if len(flat) - nh == 1:  # one block to compute (a prefix hit of all but the last)
                start = flat.item(-1) * self.spec.block_size
                slots = np.arange(start, start + ntok - c, dtype=np.int64)
            else:
                slots = (flat[nh:, None] * self._bs + self._offsets).ravel()[: ntok - c]
            return [Allocation(seq_id, blocks, c, slots)]
        validate.prompts(prompts)
        salts = validate.per_seq(salt, len(prompts), "salt")
        share_in_batch = validate.flag(share_in_batch, "share_in_batch")
        restore = None
        if self.remote is not None:
            from kvpager.remote_restore import restore as restore_from

            if window is None:
                restore = restore_from(self, prompts, salts)
            else:  # a prompt the local cache gives a windowed hit: its leading blocks would go unread
                matches = m.window_matches(prompts, salts, window)
                ask = [i for i, (skip, _) in enumerate(matches) if not skip]
                held = [b for skip, hits in matches if skip for b in hits]  # (not evicted for the others)
                # The blocks of those hits are used here too: offered to the writer again where the store
                # lost them, as an asked prompt's local hits are (left out, a windowed conversation never
                # wrote again the blocks its window reads, those other hosts restore, and where no prompt
                # of a batch was asked the store's loss went unchecked)
                key_of = m.pool.cache.key_of
                used = [(root_key(salts[i]), key_of[hits].tolist(), hits)
                        for i, (skip, hits) in enumerate(matches) if skip]
                if ask:
                    restore = restore_from(self, [prompts[i] for i in ask], [salts[i] for i in ask], held, window,
                                           used)
                else:
                    from kvpager.remote_republish import republish

                    republish(self, used)
        try:
            ids, flat, lengths, cached, ntok = m.allocate(prompts, salts, owner, share_in_batch, window)
        finally:
            if restore is not None:
                restore.release(m.pool)
        bs = self.spec.block_size
        remote = restore.remote_tokens(flat, lengths, cached, bs) if restore is not None else [0] * len(ids)
        if len(ids) == 1:  # one sequence: the slots of its uncached blocks only
            c, t = cached[0], ntok[0]
            slots = (flat[c // bs :, None] * self._bs + self._offsets).ravel()[: t - c]
            return [Allocation(ids[0], tuple(flat.tolist()), c, slots, remote[0])]
        # Slots of every block of every new sequence in one vectorised pass,
        # then each sequence's uncached token range is a slice of it.
        all_slots = (flat[:, None] * self._bs + self._offsets).ravel()
        blocks = flat.tolist()
        out, start = [], 0
        for seq_id, n, c, t, r in zip(ids, lengths, cached, ntok, remote):
            out.append(Allocation(seq_id, tuple(blocks[start : start + n]), c,
                                  all_slots[start * bs + c : start * bs + t], r))
            start += n
        return out

    def cached_tokens(
        self, prompts: Seq[Seq[int]], salt: str | bytes | None | Seq[str | bytes | None] = None, *,
        remote: bool | None = None, window: int | None = None,
    ) -> list[int]:
        """How many tokens of each prompt an `allocate` of ``prompts`` would find
        cached now (its ``num_cached_tokens``), without allocating or touching
        anything: for cache-aware admission.

        With a remote tier (and ``remote`` not False) that includes the blocks
        the allocate would restore from the store: one pipelined ``TYPE``
        round trip for the batch (no value read), under the tier's timeout and
        circuit breaker (a store that is down answers 0 blocks, never an
        error). ``remote=False``: this pool's prefix cache only, no store
        call. `probe_cache` says which part is remote. ``window``: as
        `allocate`'s."""
        return [p.num_cached_tokens for p in self.probe_cache(prompts, salt, remote=remote, window=window)]

    def probe_cache(
        self, prompts: Seq[Seq[int]], salt: str | bytes | None | Seq[str | bytes | None] = None, *,
        remote: bool | None = None, window: int | None = None,
    ) -> list[CacheProbe]:
        """As `cached_tokens`, per prompt a `CacheProbe`: the cached tokens and,
        of them, how many the allocate would restore from the remote tier
        (``num_remote_tokens``, as its `Allocation` would say). ``remote``:
        None (the default) or True asks the tier where the pool has one;
        False answers from this pool's prefix cache only. ``window``: as
        `allocate`'s (a hit past a missing block, from this pool's cache:
        where it reaches further than the tier's prefix, nothing of it counts
        as remote)."""
        validate.prompts(prompts)
        salts = validate.per_seq(salt, len(prompts), "salt")
        if remote is not None and not isinstance(remote, bool):
            raise InvalidArgument(f"remote must be a bool or None, got {validate.shown(remote)}")
        local_only = self.remote is None or remote is False
        if window is None:
            if local_only:
                return [CacheProbe(n) for n in self.manager.cached_tokens(prompts, salts)]
            from kvpager.remote_probe import probe

            return probe(self, prompts, salts)
        window = validate.whole_in(window, "cached_tokens: window", 1, 1 << 63)
        matches = self.manager.window_matches(prompts, salts, window)
        local = [(skip + len(hits)) * self.spec.block_size for skip, hits in matches]
        if local_only:
            return [CacheProbe(n) for n in local]
        from kvpager.remote_probe import probe

        # as `allocate`: a prompt the local cache gives a windowed hit restores nothing (its hit blocks held)
        ask = [i for i, (skip, _) in enumerate(matches) if not skip]
        held = [b for skip, hits in matches if skip for b in hits]
        probes = dict(zip(ask, probe(self, [prompts[i] for i in ask], [salts[i] for i in ask], window, held))) \
            if ask else {}
        return [probes[i] if i in probes and probes[i].num_cached_tokens >= n else CacheProbe(n)
                for i, n in enumerate(local)]

    def append(
        self,
        seq_ids: int | Seq[int],
        num_tokens: int | Seq[int] = 1,
        token_ids: Seq[Seq[int] | None] | None = None,
    ) -> list[np.ndarray]:
        """Extend each sequence by ``num_tokens`` slots; returns their slot ids.
        Passing the ``token_ids`` lets the new blocks be published on commit,
        where every earlier token's id is known (ids given after slots appended
        without them, before `record_tokens` filled those, are not kept: record
        them with `record_tokens`). A shared, partly filled last block is
        copied first (copy-on-write)."""
        ids = validate.seq_ids(seq_ids)
        counts = num_tokens if type(num_tokens) is int else validate.counts(num_tokens)
        flat = self.append_flat(ids, counts, token_ids)
        if isinstance(counts, (int, np.integer)):
            if not len(ids):  # (no rows: a count past what an array's shape holds made a bare ValueError)
                return []
            return list(flat.reshape(len(ids), int(counts)))  # row views, made in C
        return _split(flat, counts)

    def append_flat(
        self,
        seq_ids: int | Seq[int],
        num_tokens: int | Seq[int] = 1,
        token_ids: Seq[Seq[int] | None] | None = None,
        *,
        owner: Any = ANY_OWNER,
    ) -> np.ndarray:
        """As `append`, but every sequence's slots back to back in one int64 array.
        ``owner``: if given, every sequence must be its (as `check_owner`, in the
        same lookup: the daemon's decode step)."""
        ids = validate.batch_ids(seq_ids)
        counts = num_tokens if type(num_tokens) is int else validate.counts(num_tokens)
        if token_ids is not None and validate.token_rows(token_ids, len(ids)) is None:
            token_ids = validate.per_seq(token_ids, len(ids), "token_ids")
        flat, copies = self.manager.append(ids, counts, token_ids, owner)
        if len(copies):
            self.backend.copy_blocks(copies)
            self.pending = True
            self._cow_blocks += len(copies)
            # a copy-on-write moved a table entry off a shared block, which may go to another
            # sequence now: step plans of these sequences recheck (a stale one wrote there before)
            self.backend.moves.released()
            self.manager.copies_owed = None  # (the copies ran: set by the manager, see `_check_after`)
        return flat

    def record_tokens(self, seq_ids: int | Seq[int], token_ids: Seq[Seq[int]], *, owner: Any = ANY_OWNER) -> None:
        """Record the token ids of slots appended without them (`append` with no
        ``token_ids``): each sequence's ids continue the ids it knows, at most up
        to its length (else `InvalidArgument`, and nothing changes). A pipelined
        decode loop appends the next step's slots before it knows the tokens that
        go in them; once their ids are recorded, the blocks they fill are
        published on commit exactly as if the ids had come with the append.
        ``owner``: if given, every sequence must be its."""
        ids = validate.batch_ids(seq_ids)
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, (list, tuple, np.ndarray)) \
                or isinstance(token_ids, np.ndarray) and token_ids.ndim == 0:
            raise InvalidArgument(f"token_ids must be a list of token-id lists, got {type(token_ids).__name__}")
        rows = validate.token_rows(token_ids, len(ids))
        self.manager.record_tokens(ids, list(token_ids) if rows is None else rows, owner)

    def commit(self, seq_ids: int | Seq[int], upto: int | None | Seq[int | None] = None, *,
               synchronize: bool = False, owner: Any = ANY_OWNER) -> list[int]:
        """Declare K/V written for tokens ``[0, upto)`` (default: all), publishing
        full blocks in the prefix cache. Returns how many blocks each published.
        Call it only after the writes have completed on the device, or pass
        ``synchronize=True`` to wait for all of this pool's device work first
        (a daemon `Client`'s default). ``owner``: if given, every sequence must
        be its."""
        ids = validate.batch_ids(seq_ids)
        upto = validate.per_seq(upto, len(ids), "upto")
        if validate.flag(synchronize, "synchronize"):
            self.synchronize()
        self.backend.moves.bump()  # a step plan writing these tokens is done (`kvpager.plan_guard`)
        if self.remote is None:
            return self.manager.commit(ids, upto, owner=owner)
        fresh: list[tuple[int, bytes, bytes]] = []
        published = self.manager.commit(ids, upto, fresh, owner)
        self.remote.offer(self.backend, fresh)  # copies the bytes now, sends them later
        return published

    def fork(self, seq_ids: int | Seq[int], n: int = 1) -> list[list[int]]:
        """``n`` children per sequence, sharing all of its blocks; returns their ids."""
        m = self.manager
        if type(seq_ids) is list and len(seq_ids) == 1 and type(seq_ids[0]) is int and type(n) is int and n == 1 \
                and m.scalar:
            return seq_one.fork_one(m, seq_ids[0])  # one child of one sequence: straight to its path
        return m.fork(validate.seq_ids(seq_ids), n)

    def free(self, seq_ids: int | Seq[int]) -> None:
        """Release sequences. Committed full blocks stay matchable until evicted."""
        m = self.manager
        if type(seq_ids) is list and len(seq_ids) == 1 and type(seq_ids[0]) is int and m.scalar:
            seq_one.free(m, seq_ids[0])  # one sequence: straight to its path
        else:
            m.free(validate.seq_ids(seq_ids))
        # Their blocks may go to other sequences: plans of them are stale. Moved once the free is
        # done, not before its checks: each refused one (an unknown id) made every worker's plans
        # over other sessions' sequences recheck through the daemon, a round trip each.
        self.backend.moves.released()

    def truncate(self, seq_ids: int | Seq[int], lengths: int | Seq[int]) -> None:
        """Shorten sequences to ``lengths`` tokens, releasing blocks past the end."""
        ids = validate.seq_ids(seq_ids)
        self.manager.truncate(ids, validate.truncate_lengths(lengths, len(ids)))
        self.backend.moves.released()  # (once done: see `free`)

    def swap_out(self, seq_ids: int | Seq[int]) -> None:
        """Move the blocks only these sequences and sequences swapped out before
        hold to host memory in one batched copy (a group's shared blocks once
        each, with its last resident holder); a block a resident sequence or a
        pin holds stays on the device."""
        pairs = self.manager.swap_out(validate.seq_ids(seq_ids))
        self.backend.moves.released()  # (once done: see `free`)
        if len(pairs):
            self.backend.swap_out(pairs)
            self.pending = True
            self._swap_out_blocks += len(pairs)
            self.manager.copies_owed = None  # (the copies ran: set by the manager, see `_check_after`)

    def swap_in(self, seq_ids: int | Seq[int]) -> None:
        """Bring swapped sequences back to the device in one batched copy."""
        pairs = self.manager.swap_in(validate.seq_ids(seq_ids))
        if len(pairs):
            self.backend.swap_in(pairs)
            self.pending = True
            self._swap_in_blocks += len(pairs)
            self.manager.copies_owed = None  # (the copies ran: set by the manager, see `_check_after`)

    def release_before(self, seq_ids: int | Seq[int], positions: int | Seq[int], *, owner: Any = ANY_OWNER
                       ) -> list[int]:
        """Give back each sequence's whole blocks before ``positions[i]`` (its last
        block stays): K/V no attention will read again once every layer's sliding
        window has moved past it (see `kvpager.seq_release`). Their table entries
        become the null block; attention over the sequence must then use a window
        that starts at or after what is held. A block still shared or cached
        stays for the others. Returns blocks released per sequence."""
        ids = validate.seq_ids(seq_ids)
        positions = validate.per_seq(positions, len(ids), "positions")
        released = self.manager.release_before(ids, positions, owner)
        self.backend.moves.released()  # (once done: see `free`)
        return released
