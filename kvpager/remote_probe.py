"""The read-only probe with a remote tier: how many tokens of each prompt an
`allocate` would find cached now, counting the blocks it would restore.

It runs the restore's own steps (`kvpager.remote_restore`: the missing
chain keys in the order a lookup asks for them, under the same
``max_restore_bytes`` cap; the runs after each prompt's local hits; the
capacity rule) with the store's answer to "which of these keys hold a
string of a value's length" (`RemoteTier.exists`: pipelined ``TYPE`` and
``STRLEN``, no value read) in place of the fetched values. Nothing is taken, held, touched, published or reported:
the block pool, the prefix cache, the tenants and the event sink are only
read. A store that is down, slow or skipped by the breaker holds nothing,
and so does one whose lookups are paused (``refusals["lookups"]``: it
refused ``GETRANGE``), which the allocate would not ask (`RemoteTier.exists`).
(A key of another Redis type or a string of another length, which no lookup
could restore, does not count and is deleted from the store, as a lookup
deletes a value it refuses; an empty string among them, which a lookup misses
as an absent key without deleting it, was counted at every probe.)

So the answer equals what an allocate of the same batch (without
``share_in_batch``, with the same ``window``) reports, unless the pool or the store changes between
the two, or a value the store holds is refused when fetched (a bad checksum
or header: the probe reads no value).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import numpy as np

from kvpager.block_pool import window_reach
from kvpager.remote_restore import fits, missing, runs
from kvpager.types import CacheProbe

if TYPE_CHECKING:
    from kvpager.pool import KVPool


def probe(kv: KVPool, prompts: Seq[Seq[int]], salts: Seq[str | bytes | None], window: int | None = None,
          hold: Seq[int] = ()) -> list[CacheProbe]:
    """Per prompt, the tokens an allocate of ``prompts`` would find cached, of
    which restored from ``kv.remote`` (see the module docstring). ``window``
    and ``hold``: the allocate's (`remote_restore.restore`): a windowed
    allocate restores only the blocks its window reads, and counts only them
    as remote."""
    m, tier = kv.manager, kv.remote
    bp, bs = m.pool, m.block_size
    miss = missing(bp, bs, prompts, salts)
    local = [CacheProbe(len(hits) * bs) for hits, _, _ in miss.plans]
    if tier is None or not miss.wants:
        return local
    found = tier.exists([(root, key) for key, (root, _) in miss.wants.items()])
    if not found:
        return local
    extra, todo, keep, need = runs(miss, found, None if window is None else window_reach(window, bs))
    if not fits(bp, need, len(todo), np.asarray([*keep, *hold], dtype=np.int64)):
        return local  # the allocate would restore nothing
    return [CacheProbe(c.num_cached_tokens + blocks * bs, new * bs) for c, (blocks, new) in zip(local, extra)]
