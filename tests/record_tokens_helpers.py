"""What the `record_tokens` tests share: a small CPU pool, block keys
recomputed from their definition and the published blocks (`pool_helpers`'s
`chain` and `published`, re-exported), the known ids of a pool, and the
stored-block events."""

from __future__ import annotations

import numpy as np
from pool_helpers import chain, published

from kvpager import KVPool, PoolSpec
from kvpager.events import EventSink

BS = 8


def make(bs: int = BS, num_blocks: int = 64, scalar: bool = True) -> KVPool:
    pool = KVPool(PoolSpec(1, 1, 8, num_blocks=num_blocks, block_size=bs, dtype="float32", num_host_blocks=16))
    pool.manager.scalar = scalar
    return pool


def known(pool: KVPool, seq_id: int) -> int:
    m = pool.manager
    return int(m.table.known[m.rows[seq_id]])


def known_ids(pool: KVPool, seq_id: int) -> list[int]:
    h = pool.manager.history[seq_id]
    return h.prompt.tolist() + list(h.tail)


def state(pool: KVPool):
    """Everything an op could change: stats, block states, sequences, each
    sequence's known ids and keys, which sequences hold one history, the cache."""
    m = pool.manager
    holders: dict[int, list[int]] = {}
    for s, h in m.history.items():
        holders.setdefault(id(h), []).append(s)
    histories = {s: (known_ids(pool, s), list(h.keys), h.shared) for s, h in m.history.items()}
    return (pool.stats(), pool.blocks(), pool.sequences(), {s: known(pool, s) for s in m.rows}, histories,
            sorted(holders.values()), published(pool))


def expected_cache(pool: KVPool, tokens: dict[int, list[int]], full: dict[int, int], bs: int) -> dict[bytes, int]:
    """Key -> block of each sequence's first ``full[s]`` blocks (distinct ids: no key is shared)."""
    out = {}
    for s, toks in tokens.items():
        table = pool.sequence(s).block_table
        for i, key in enumerate(chain(toks, bs)[: full[s]]):
            out[key] = table[i]
    return out


def stored_blocks(sink: EventSink, bs: int) -> set[tuple[bytes, bytes | None, tuple[int, ...]]]:
    """The BlockStored events as one (key, parent, token ids) per block."""
    out = set()
    for item in sink.take():
        if item[0] == 0:
            _, keys, parent, tokens = item
            toks = np.asarray(tokens).tolist()
            for i, key in enumerate(keys):
                out.add((key, parent if i == 0 else keys[i - 1], tuple(toks[i * bs : (i + 1) * bs])))
    return out
