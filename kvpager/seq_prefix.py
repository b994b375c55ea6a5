"""The prefix-cache side of sequences, and the hashing path:

- allocate: new sequences sharing the longest committed prefix found in the
  prefix cache (and, on request, full blocks an earlier prompt of the same
  batch gets fresh), fresh blocks for the rest; a prompt's keys are hashed
  up to the first miss;
- cached_tokens: the read-only probe of how much a prompt would find cached;
- commit: K/V declared written; full blocks with known token ids published.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpager.block_pool import NULL_BLOCK, window_reach
from kvpager.errors import InvalidArgument, OutOfBlocks
from kvpager.history import History
from kvpager.prefix_cache import chain_keys, root_key, token_array
from kvpager.seq_lookup import ANY_OWNER
from kvpager.validate import all_type, is_int

if TYPE_CHECKING:
    from kvpager.sequences import SequenceManager


def allocate(
    m: SequenceManager,
    prompts: Seq[Seq[int] | np.ndarray],
    salts: Seq[str | bytes | None],
    owner: Any = None,
    share_in_batch: bool = False,
    window: int | None = None,
) -> tuple[list[int], np.ndarray, list[int], list[int], list[int]]:
    """New sequences holding ``prompts``. Returns their ids, every block table
    back to back (int64), and per sequence its blocks, cached tokens and tokens.

    The longest committed prefix of full blocks found in the cache is
    shared. At least one token is always left to compute, so a worker
    gets logits for the last prompt token: a fully cached prompt gives
    back its last block.

    With ``share_in_batch``, a prompt also shares the full blocks that an
    earlier prompt of the same batch gets fresh (same salt, same tokens):
    they count as cached for it, but their K/V is written by that earlier
    prompt's prefill, so the caller must write the whole batch's K/V (layer
    by layer, as a batched forward pass does) before attending over it.

    With ``window`` (every query of the caller's model reads at most that many
    positions, itself included: sliding windows in every layer), a hit past
    the first missing block counts too, as far as the blocks its first new
    token's window reads are cached; either way only the hit blocks that
    window reads are taken, the entries before them left released (the null
    block), as `release_before` leaves them (`_read_by_window`)."""
    bs, pool = m.block_size, m.pool
    plans = []
    # key -> (prompt index, table index) of a fresh full block earlier in this batch
    fresh: dict[bytes, tuple[int, int]] = {}
    ntok, lengths, cached, nhits, skips = [], [], [], [], []
    need = 0
    for i, prompt in enumerate(prompts):
        tokens = token_array(prompt, f"prompts[{i}]")
        root = root_key(salts[i])
        usable = max(len(tokens) - 1, 0) // bs  # blocks we may take from the cache
        keys, hits = pool.match(root, tokens, bs, usable)
        skip, every = 0, None  # leading entries left released (unread by the window); all keys hashed
        if window is not None:
            if len(hits) < usable:
                keys, hits, skip, every = pool.match_window(root, tokens, bs, usable, window, keys, hits)
            skip, hits = _read_by_window(window, bs, skip, hits)
        shared: list[tuple[int, int]] = []
        if share_in_batch:
            start = skip + len(hits)
            rest = chain_keys(keys[-1] if keys else root, tokens[start * bs :], bs)
            for key in rest[: usable - start]:
                where = fresh.get(key)
                if where is None:
                    break
                shared.append(where)
                keys.append(key)
            for t in range(start + len(shared), start + len(rest)):
                fresh.setdefault(rest[t - start], (i, t))
        # (the keys a windowed match hashed past the hit, kept for the commit: the same chain)
        plans.append((tokens, root, every if every is not None and len(every) > len(keys) else keys, hits, shared,
                      skip))
        n = -(-len(tokens) // bs)
        need += n - skip - len(hits) - len(shared)
        ntok.append(len(tokens))
        lengths.append(n)
        nhits.append(skip + len(hits))  # table entries taken as committed and published
        skips.append(skip)
        cached.append((skip + len(hits) + len(shared)) * bs)
    hit_ids = np.fromiter(itertools.chain.from_iterable(p[3] for p in plans), np.int64)
    # An evictable hit is taken before any new block: it must not be evicted
    # to make room for this very batch, so it does not count as available.
    idle = len(set(hit_ids[pool.ref_cnt[hit_ids] == 0].tolist())) if len(hit_ids) else 0
    available = pool.get_num_free_blocks() - idle
    if need > available:
        raise OutOfBlocks(need, available)

    if len(hit_ids):
        pool.touch(hit_ids)
    new = pool.get_new_blocks(need)
    total = sum(lengths)
    if need == total:  # nothing cached: the new blocks in order
        flat = new
    else:  # each table: its hits, blocks shared in the batch, then new blocks
        starts = list(itertools.accumulate(lengths, initial=0))
        flat = np.empty(total, dtype=np.int64)
        fresh_at = np.ones(total, dtype=bool)
        for start, (_, _, _, hits, shared, skip) in zip(starts, plans):
            fresh_at[start : start + skip + len(hits) + len(shared)] = False
        flat[fresh_at] = new
        from_batch = []
        for start, (_, _, _, hits, shared, skip) in zip(starts, plans):
            flat[start : start + skip] = NULL_BLOCK
            start += skip
            flat[start : start + len(hits)] = hits
            if shared:
                blocks = [int(flat[starts[pi] + t]) for pi, t in shared]
                flat[start + len(hits) : start + len(hits) + len(shared)] = blocks
                from_batch += blocks
        if from_batch:
            pool.touch(from_batch)
    ids = m.new_ids(len(plans))
    code = m.owners.add(owner, ids)
    bt = m.table
    if len(plans) == 1:
        rows = [bt.add_row(flat, ntok[0])]
        last = int(flat[-1]) if len(flat) else 0
        bt.cols[rows[0]] = (ids[0], code, nhits[0] * bs, nhits[0], ntok[0], 0, last, skips[0])
    else:
        ntok_a, nhits_a = np.array(ntok, dtype=np.int64), np.array(nhits, dtype=np.int64)
        rows = bt.add_rows(flat, np.array(lengths, dtype=np.int64), ntok_a).tolist()
        cols = np.zeros((len(rows), len(bt.column_names)), dtype=np.int64)
        cols[:, 0] = ids
        cols[:, 1] = code
        cols[:, 2] = nhits_a * bs
        cols[:, 3] = nhits_a
        cols[:, 4] = ntok_a
        ends = np.cumsum(lengths)
        cols[:, 6] = np.where(ntok_a > 0, flat[np.maximum(ends - 1, 0)] if len(flat) else 0, 0)
        cols[:, 7] = skips
        bt.cols[rows] = cols
    m.num_released += sum(1 for k in skips if k)
    m.rows.update(zip(ids, rows))
    m.history.update(zip(ids, (History(p[0], p[1], p[2], salt=salt) for p, salt in zip(plans, salts))))
    m.prefix_query_tokens += sum(ntok)
    m.prefix_hit_tokens += sum(cached)
    return ids, flat, lengths, cached, ntok


def _read_by_window(window: int, block_size: int, skip: int, hits: list[int]) -> tuple[int, list[int]]:
    """A windowed allocate's ``skip`` and ``hits`` cut to the hit blocks its
    prompt's queries read: the last `window_reach` before its first new token
    (later queries read later positions only). The blocks before them stay
    cached and, if idle, evictable for this very batch; their table entries
    are left released, as vLLM's sliding-window manager leaves null blocks,
    so a long cached prefix needs no room it would never read."""
    unread = len(hits) - window_reach(window, block_size)
    if unread <= 0:
        return skip, hits
    return skip + unread, hits[unread:]


def window_matches(m: SequenceManager, prompts: Seq[Seq[int] | np.ndarray], salts: Seq[str | bytes | None],
                   window: int) -> list[tuple[int, list[int]]]:
    """`SequenceManager.window_matches`."""
    bs, out = m.block_size, []
    for i, prompt in enumerate(prompts):
        tokens = token_array(prompt, f"prompts[{i}]")
        usable = max(len(tokens) - 1, 0) // bs
        root = root_key(salts[i])
        keys, hits = m.pool.match(root, tokens, bs, usable)
        skip = 0
        if len(hits) < usable:
            keys, hits, skip, _ = m.pool.match_window(root, tokens, bs, usable, window, keys, hits)
        out.append((skip, hits))
    return out


def cached_tokens(m: SequenceManager, prompts: Seq[Seq[int] | np.ndarray], salts: Seq[str | bytes | None],
                  window: int | None = None) -> list[int]:
    """How many tokens of each prompt `allocate` (given the same ``window``)
    would find cached now. Read-only: touches nothing, so the answer can
    change before an allocate."""
    bs = m.block_size
    if window is not None:
        return [(skip + len(hits)) * bs for skip, hits in window_matches(m, prompts, salts, window)]
    out = []
    for i, prompt in enumerate(prompts):
        tokens = token_array(prompt, f"prompts[{i}]")
        usable = max(len(tokens) - 1, 0) // bs
        _, hits = m.pool.match(root_key(salts[i]), tokens, bs, usable)
        out.append(len(hits) * bs)
    return out


def commit(m: SequenceManager, seq_ids: list[int] | np.ndarray, upto: Seq[int | None],
           fresh: list[tuple[int, bytes, bytes]] | None = None, owner: Any = ANY_OWNER) -> list[int]:
    """Declare K/V written for tokens ``[0, upto)`` (default: all) and publish
    the full blocks whose token ids are known. Returns blocks published per
    sequence; appends (block, root key, block key) of each newly published
    block to ``fresh`` if given (for the remote tier). ``owner``: as `SequenceManager.batch`'s."""
    bs, bt = m.block_size, m.table
    rows = m.batch(seq_ids, "commit", owner)
    nt = bt.num_tokens[rows]
    ups = None
    if all(u is None for u in upto):  # `per_seq` gives a list (`count(None)` compared arrays by ==)
        ups = nt
    elif upto and all_type(upto, int):  # a pipelined decode step's: checked at C speed
        try:
            ups = np.fromiter(upto, np.int64, len(upto))
        except OverflowError:  # past int64: the checks below say so, one by one
            pass
        else:
            bad = np.flatnonzero((ups < 0) | (ups > nt))
            if len(bad):
                k = int(bad[0])
                raise InvalidArgument(f"commit: upto for sequence {seq_ids[k]} must be in [0, {int(nt[k])}], "
                                      f"got {upto[k]!r}")
    if ups is None:
        for s, u, n in zip(seq_ids, upto, nt.tolist()):
            if u is not None and (not is_int(u) or not 0 <= u <= n):
                raise InvalidArgument(f"commit: upto for sequence {s} must be in [0, {n}], got {u!r}")
        ups = np.where([u is None for u in upto], nt, [0 if u is None else int(u) for u in upto])
    committed = np.maximum(bt.committed[rows], ups)
    bt.committed[rows] = committed
    full = np.minimum(committed, bt.known[rows]) // bs
    published = [0] * len(seq_ids)
    todo = np.flatnonzero(full > bt.published[rows])
    if not len(todo):
        return published
    sink, pool, history = m.pool.events, m.pool, m.history
    trows, tfull = rows[todo], full[todo]
    starts = np.maximum(bt.published[trows], bt.released[trows])  # released entries hold nothing
    ks = todo.tolist()
    ids = seq_ids[todo].tolist() if isinstance(seq_ids, np.ndarray) else [seq_ids[k] for k in ks]
    # A decode step completes one block per sequence at most: those blocks in one read,
    # published together where all are new.
    one = bt.table[trows, starts].tolist() if bool((tfull - starts == 1).all()) else None
    if one is not None and _publish_one_each(m, ids, one, starts.tolist(), ks, published, fresh):
        bt.published[trows] = tfull
        return published
    for i, (k, row, f, start) in enumerate(zip(ks, trows.tolist(), tfull.tolist(), starts.tolist())):
        h = history[ids[i]]
        keys = h.key_blocks(f, bs)
        run = None if one is not None else bt.table[row, start:f].astype(np.int64)
        blocks = [one[i]] if run is None else run.tolist()
        if not blocks:  # (every full block it completed was released: nothing to publish)
            continue
        code = pool.tenants.code(h.root, h.salt)
        # all new (a fresh prompt's blocks): at once; a 128k-token prompt's 8k blocks one by one held
        # the loop ~30% longer. Else one by one (a key cached already moves, or stays: `BlockPool.publish`)
        if len(blocks) > 1 and pool.publish_new(blocks, keys[start:f], np.full(len(blocks), code, np.int32), run):
            done = [True] * len(blocks)
            published[k] = len(blocks)
        else:
            done = list(map(pool.publish, blocks, keys[start:f], itertools.repeat(code, len(blocks))))
            if not any(done):  # (each key cached already: no tenant entry kept for nothing)
                pool.tenants.release_idle([code])
            published[k] = sum(done)
        if sink is not None:
            report_stored(m, h, list(range(start, f)), done)
        if fresh is not None:
            fresh += [(b, h.root, key) for b, key, new in zip(blocks, keys[start:f], done) if new]
    bt.published[trows] = tfull
    return published


def _publish_one_each(m: SequenceManager, ids: list[int], blocks: list[int], starts: list[int], ks: list[int],
                      published: list[int], fresh: list[tuple[int, bytes, bytes]] | None) -> bool:
    """`commit`'s publishing where each sequence of ``ids`` completed one block,
    ``blocks[i]`` at table entry ``starts[i]``: every key hashed, then all
    published at once if every key and block is new (True: ``published[ks[i]]``
    set, events reported, ``fresh`` extended). False, nothing published, for the
    block-by-block way (a key already cached, as forks that generate alike have)."""
    bs, pool, history = m.block_size, m.pool, m.history
    hs = [history[s] for s in ids]
    keys = [h.key_blocks(start + 1, bs)[start] for h, start in zip(hs, starts)]
    code = pool.tenants.code
    codes = np.fromiter((code(h.root, h.salt) for h in hs), np.int32, len(hs))
    if not pool.publish_new(blocks, keys, codes):
        return False  # (the caller publishes each of these blocks, its codes released there if idle)
    for k in ks:
        published[k] = 1
    if pool.events is not None:
        for h, start in zip(hs, starts):
            report_stored(m, h, [start], [True])
    if fresh is not None:
        fresh += [(b, h.root, key) for b, h, key in zip(blocks, hs, keys)]
    return True


def report_stored(m: SequenceManager, history: History, index: list[int], done: list[bool]) -> None:
    """Tell the event sink about blocks of one sequence just offered to the
    cache: its table entries ``index`` (ascending), published where ``done`` (a
    key already cached under another block is not published again). One event
    per run of consecutive published entries."""
    bs, keys = m.block_size, history.keys
    i = 0
    while i < len(index):
        if not done[i]:
            i += 1
            continue
        j = i + 1
        while j < len(index) and done[j] and index[j] == index[j - 1] + 1:
            j += 1
        first, end = index[i], index[j - 1] + 1
        m.pool.events.stored(keys[first:end], keys[first - 1] if first else None,
                             history.known(first * bs, end * bs))
        i = j
