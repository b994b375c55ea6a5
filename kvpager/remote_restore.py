"""Restoring prefix blocks from the remote tier before an allocate.

`restore` runs before `seq_prefix.allocate` and turns the tier's hits into
ordinary published prefix-cache blocks, so the allocate that follows (and
every later one) finds them locally:

1. probe: per prompt, the chain keys of its full blocks that an allocate may
   take from the cache (all but the last token's), and which of them the
   local cache holds; every key it lacks goes into one tier lookup;
2. per prompt, the run after its local hits of keys held locally or found
   in the tier: the tier's keys in such runs are restored (once per batch);
   with a ``window``, the run ends where that window's hit does (the
   furthest point whose `window_reach` blocks before it are each held or
   found) and only those blocks are restored: the store is first asked
   which keys it holds (``TYPE``, no value read), then for the values of
   those alone; so is a plain lookup of more than `ASK_FIRST_BYTES`, so that
   no value past a prompt's first key the store lacks is read;
3. capacity: restoring happens only if the allocate is then sure to fit
   (fresh blocks, restored blocks and the cached blocks it holds from
   eviction counted against free + evictable); otherwise nothing changes;
4. the local blocks of the runs get a temporary reference (so taking blocks
   for the restore evicts none of them), fresh blocks are taken, the
   payloads go into them in one batched host-to-device copy (completed
   before this returns) and each is published under its key.

Before step 2, the prompts' local hits that the store lost since they were
written are offered to the writer again (`kvpager.remote_republish`: at most
`REPUBLISH_BYTES` an allocate, nothing until the store is seen losing blocks).

Steps 1-3 only read (`missing`, `runs`, `fits`): the read-only probe
(`kvpager.remote_probe`) runs them too, with the store's ``TYPE``
answers in place of fetched values, so it counts what this restores.

The caller drops the temporary references (`Restore.release`) once the
allocate has taken its own. With an event sink on the block pool, the
restored keys are reported as stored (they are hittable here now), with
their parents and token ids, one event per chain of them. A prompt's tokens count as remote when its
allocation's cached blocks include blocks restored here.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvpager.block_pool import window_reach
from kvpager.prefix_cache import chain_keys, root_key, token_array
from kvpager.remote_republish import republish, restored

if TYPE_CHECKING:
    from kvpager.block_pool import BlockPool
    from kvpager.events import EventSink
    from kvpager.pool import KVPool
    from kvpager.remote_tier import RemoteTier


#: a plain lookup asking for more bytes of values than this (about one round of a lookup's
#: connections: 2 pipelines of 4 MiB) first asks which keys the store holds (``TYPE``, no
#: value read) and then reads only the values the prompts' runs can use: it read every key
#: a prompt missed, those past one the store lacked (evicted, refused, never written) too,
#: which no run can restore (a prompt of 40 blocks of 256 KiB whose first block was evicted
#: made the store send 10 MB, on the loop, for nothing restored, and kept those unusable
#: blocks recent in an ``allkeys-lru`` store). A smaller lookup costs one round either way.
ASK_FIRST_BYTES = 8 << 20


@dataclass
class Restore:
    """What `restore` did: the blocks it restored and the references it holds."""

    restored: np.ndarray  # int64 device blocks restored from the tier
    held: np.ndarray  # int64 blocks with a temporary reference (restored ones included)

    def release(self, pool: BlockPool) -> None:
        """Drop the temporary references (restored blocks no allocation took
        become evictable: still cached)."""
        if len(self.held):
            pool.free_blocks(self.held)
            self.held = self.held[:0]

    def remote_tokens(self, flat: np.ndarray, lengths: Seq[int], cached: Seq[int], block_size: int) -> list[int]:
        """Per allocation (tables back to back in ``flat``): tokens of its cached
        prefix held by blocks restored here."""
        out, start = [], 0
        for n, c in zip(lengths, cached):
            head = flat[start : start + c // block_size]
            out.append(int(np.count_nonzero(np.isin(head, self.restored))) * block_size)
            start += n
        return out


@dataclass
class Missing:
    """Step 1 (read-only): per prompt its local hits, the chain keys after them
    an allocate may take from the cache, and the blocks the local cache holds
    under those keys (None: missing); every missing key once, in the order an
    allocate asks the tier for them."""

    plans: list[tuple[list[int], list[bytes], list[int | None]]]
    wants: dict[bytes, tuple[bytes, str | bytes | None]]  # block key -> (root key, salt)
    origin: dict[bytes, tuple[bytes | None, np.ndarray]]  # for events: key -> (parent key, token ids)
    need: int  # fresh blocks of the batch if nothing were restored
    used: list[tuple[bytes, list[bytes], list[int]]] = field(default_factory=list)  # per prompt: root, hits' keys, hits


def missing(bp: BlockPool, block_size: int, prompts: Seq[Seq[int]], salts: Seq[str | bytes | None],
            events: bool = False) -> Missing:
    """Step 1 for ``prompts`` (see `Missing`); ``events``: note each missing
    key's parent and token ids (for BlockStored events)."""
    bs = block_size
    out = Missing([], {}, {}, 0)
    for i, prompt in enumerate(prompts):
        tokens = token_array(prompt, f"prompts[{i}]")
        usable = max(len(tokens) - 1, 0) // bs
        root = root_key(salts[i])
        keys, hits = bp.match(root, tokens, bs, usable)
        rest = chain_keys(keys[-1] if keys else root, tokens[len(hits) * bs : usable * bs], bs) \
            if len(hits) < usable else []
        local = [bp.lookup(k) for k in rest]
        for j, (k, b) in enumerate(zip(rest, local)):
            if b is None:
                out.wants.setdefault(k, (root, salts[i]))
                if events and k not in out.origin:
                    at = (len(hits) + j) * bs
                    out.origin[k] = (rest[j - 1] if j else keys[-1] if keys else None, tokens[at : at + bs])
        out.plans.append((hits, rest, local))
        out.used.append((root, keys, hits))
        out.need += -(-len(tokens) // bs) - len(hits)
    return out


def runs(m: Missing, found: Container[bytes], reach: int | None = None
         ) -> tuple[list[tuple[int, int]], dict[bytes, None], list[int], int]:
    """Step 2 for ``found``, the tier's hits: per prompt, its run after its
    local hits of blocks held locally or found, as (blocks, of which found);
    the keys to restore (each once, in order); the local blocks to hold while
    restoring; and the fresh blocks the allocate then needs. ``reach``: a
    windowed allocate's `kvpager.block_pool.window_reach` (`_window_run`)."""
    extra: list[tuple[int, int]] = []
    todo: dict[bytes, None] = {}
    keep: list[int] = []
    need = m.need
    for hits, rest, local in m.plans:
        if reach is not None:
            blocks, new, held = _window_run(hits, rest, local, found, reach)
            keep += held
            need -= blocks
            todo.update(dict.fromkeys(new))
            extra.append((blocks, len(new)))
            continue
        keep += hits
        run: list[int] = []
        new = []
        for k, b in zip(rest, local):
            if b is not None:
                run.append(b)
            elif k in found:
                new.append(k)
            else:
                break
        need -= len(run) + len(new)
        if new:
            keep += run
            todo.update(dict.fromkeys(new))
        extra.append((len(run) + len(new), len(new)))
    return extra, todo, keep, need


def _window_run(hits: list[int], rest: list[bytes], local: list[int | None], found: Container[bytes],
                reach: int) -> tuple[int, list[bytes], list[int]]:
    """A windowed prompt's step 2: the blocks after its local hits that count
    as hit, the keys to restore and the local blocks to hold. The hit ends at
    the furthest point whose ``reach`` blocks before it are each held here or
    found (those before the rest are the local hits), as `PrefixCache.match_window`
    finds it locally; only those ``reach`` blocks are restored or held: the
    window reads no block before them, so their tokens count as hit without
    taking a device block (a block missing from the store before the reach
    costs nothing; one inside it ends the hit before it, as the run does)."""
    ok = [b is not None or k in found for k, b in zip(rest, local)]
    end, run = 0, 0
    for j in range(len(ok) - 1, -1, -1):  # furthest first; run: blocks held or found from j on
        run = run + 1 if ok[j] else 0
        if run == reach:
            end = j + reach
            break
    else:
        end = run  # (no full reach after the local hits: the run straight after them)
    first = max(end - reach, 0)
    new = [k for k, b in zip(rest[first:end], local[first:end]) if b is None]
    held = hits[max(len(hits) + end - reach, 0):] + [b for b in local[first:end] if b is not None]
    return end, new, held


def fits(bp: BlockPool, need: int, restores: int, kept: np.ndarray) -> bool:
    """Step 3: is the allocate sure to fit after restoring ``restores`` blocks
    (held idle blocks leave the evictable list, restored ones are taken)?"""
    idle = len(np.unique(kept[bp.ref_cnt[kept] == 0])) if len(kept) else 0
    return need + restores + idle <= bp.get_num_free_blocks()


def restore(kv: KVPool, prompts: Seq[Seq[int]], salts: Seq[str | bytes | None],
            hold: Seq[int] = (), window: int | None = None,
            used: Seq[tuple[bytes, Seq[bytes], Seq[int]]] = ()) -> Restore | None:
    """Restore from ``kv.remote`` the blocks that ``prompts`` miss locally and the
    tier holds (see the module docstring). None when nothing was restored.
    ``hold``: cached blocks the allocate will take besides (a windowed hit's),
    held with the run's own so the restore's new blocks never evict them.
    ``window``: the allocate's; only the blocks that window reads are
    restored (`runs`, `_windowed`). ``used``: (root key, keys, blocks) of the
    allocate's other prompts' local hits (a windowed hit's), offered to the writer
    again with ``prompts``' own where the store lost them (`republish`)."""
    m, tier = kv.manager, kv.remote
    bp = m.pool
    # 1. probe (read-only): every prompt checked before anything changes
    miss = missing(bp, m.block_size, prompts, salts, bp.events is not None)
    republish(kv, [*miss.used, *used])  # (the store lost some of them: written again, a few an allocate)
    if not miss.wants:
        return None
    reach = None if window is None else window_reach(window, m.block_size)
    if reach is not None and all(len(hits) + len(rest) <= reach for hits, rest, _ in miss.plans):
        reach = None  # (each window reads every block its prompt may hit: the plain restore, one lookup)
    asked = min(len(miss.wants), tier.most_blocks()) * tier.codec.value_bytes
    if reach is not None or (asked > ASK_FIRST_BYTES and not tier.refusals["probes"].is_open()):
        found, held = _windowed(tier, miss, reach)
    else:
        found, held = _fetch(tier, miss, miss.wants), None
    if not found:
        return None
    # 2. runs: the blocks each prompt would share after the restore
    _, todo, keep, need = runs(miss, found if held is None else held, reach)
    # 3. capacity
    kept = np.asarray([*keep, *hold], dtype=np.int64)
    if not fits(bp, need, len(todo), kept):
        return None  # the allocate may not fit: leave it as it would be without the tier
    # 4. hold, take, copy, publish
    if len(kept):
        bp.touch(kept)
    new_blocks = bp.get_new_blocks(len(todo))
    keys = list(todo)
    try:
        kv.backend.write_blocks(new_blocks, [found[k] for k in keys])
    except BaseException:
        bp.free_blocks(np.concatenate([kept, new_blocks]))
        raise
    # each restored block belongs to its salt's tenant, as if committed here
    codes = [bp.tenants.code(*miss.wants[k]) for k in keys]
    done = [bp.publish(b, k, c) for b, k, c in zip(new_blocks.tolist(), keys, codes)]
    bp.tenants.release_idle({c for c, d in zip(codes, done) if not d})  # (entries made for blocks not published)
    published = [b for b, new in zip(new_blocks.tolist(), done) if new]
    if bp.events is not None:
        _report(bp.events, [k for k, new in zip(keys, done) if new], miss.origin)
    tier.restored(len(published))
    restored(kv, published)  # (in the store: not written again)
    return Restore(np.asarray(published, dtype=np.int64), np.concatenate([kept, new_blocks]))


def _fetch(tier: RemoteTier, miss: Missing, keys: Iterable[bytes]) -> dict[bytes, memoryview]:
    """The payloads of ``keys`` (wanted by ``miss``) the store holds, in one lookup."""
    return tier.fetch([(miss.wants[k][0], k) for k in keys])


def _windowed(tier: RemoteTier, miss: Missing, reach: int | None) -> tuple[dict[bytes, memoryview], set[bytes] | None]:
    """A windowed allocate's lookup: which missing keys the store holds
    (`RemoteTier.exists`, no value read), then the values of those its
    windows read (`runs` with ``reach``), so a long conversation reads and
    restores ``reach`` blocks, not its whole prefix. Without a ``reach``: a
    plain lookup of more than `ASK_FIRST_BYTES`, which reads only the values of
    each prompt's run (up to its first key the store lacks). Returns the payloads and
    the keys to plan the restore with: the held ones, or, where a value went
    between the two calls (expired, evicted, refused), only the fetched ones,
    so no run counts a block it cannot restore."""
    held = tier.exists([(root, key) for key, (root, _) in miss.wants.items()])
    if not held:
        if reach is None:  # (a plain lookup: an empty answer may be a probe skipped or failed, not a
            return _fetch(tier, miss, miss.wants), None  # store that holds none: read as before, misses cheap)
        return {}, held
    _, todo, _, _ = runs(miss, held, reach)
    got = _fetch(tier, miss, todo)
    return got, held if len(got) == len(todo) else set(got)


def _report(sink: EventSink, keys: list[bytes], origin: dict[bytes, tuple[bytes | None, np.ndarray]]) -> None:
    """Restored ``keys`` (in chain order per prompt) as BlockStored events: one
    per run of keys each the parent of the next."""
    run: list[bytes] = []
    for k in [*keys, None]:
        if run and (k is None or origin[k][0] != run[-1]):
            sink.stored(run, origin[run[0]][0], np.concatenate([origin[r][1] for r in run]))
            run = []
        if k is not None:
            run.append(k)
