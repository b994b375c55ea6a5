"""The multi-token kernels' work lists, pure arithmetic (tested on the CPU):
`prefill_tiles`, a step's query tiles longest K/V first (a CTA each, with a
grid row per kv head and head chunk), `prefill_items`, the (query tile, kv head) items of
paged_prefill_sm90.cu's persistent grid, each K/V stream's items side by side, and
`head_chunk`, the query heads of a GQA group a tile holds."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

#: GQA groups up to this many query heads share one multi-token tile whole (each K/V tile read
#: once for all of them); larger groups are cut into chunks (`head_chunk`)
WHOLE_GROUP_MAX = 16
#: the fewest heads of a larger group a tile's chunk holds
MIN_CHUNK = 8


def head_chunk(group: int, rows: int, forced: int | None = None) -> int:
    """The query heads of a kv head's ``group`` that one multi-token tile of ``rows`` rows
    holds (the kernels' HCH; the tile holds ``rows // chunk`` query tokens of them, and a
    kv head's group takes ``ceil(group / chunk)`` tiles a run of tokens). ``forced`` (a
    `KernelConfig.prefill_head_chunk`), cut to the group and the rows; else the whole
    group up to `WHOLE_GROUP_MAX` heads (and ``rows``); past that the chunk of at least
    `MIN_CHUNK` heads whose tiles waste the fewest rows (rows past the whole tokens a tile
    holds, and the heads a group's last chunk lacks), the largest of those. Every tile
    streams its tokens' K/V, so a run of tokens costs its tiles, the fewer the more rows hold
    a head; the floor keeps a tile's tokens few (the causal diagonal's masked share small,
    and a K/V stream read by few tiles a run). Falcon-7B's 71 heads a kv head run as 9
    chunks of 8 (16 tokens a 128-row tile, 98.6% of its rows used) instead of one token a
    tile (71 of 128 rows)."""
    if forced is not None:
        return max(1, min(forced, group, rows))
    if group <= min(WHOLE_GROUP_MAX, rows):
        return group

    def used(h: int) -> Fraction:  # the share of a group's tiles' rows that hold a query head
        chunks = -(-group // h)
        return Fraction(group, chunks * h) * Fraction(rows // h * h, rows)

    return max(range(min(MIN_CHUNK, rows), min(group, rows) + 1), key=lambda h: (used(h), h))


def prefill_tiles(query_lens: np.ndarray, seq_lens: np.ndarray, rows: int, own: Any = None) -> np.ndarray:
    """int32 [tiles, 2]: (sequence, first query) of every tile of ``rows`` queries, the
    tiles that see the most K/V first (so the long ones do not trail the launch);
    ``own``: each sequence's first position read (a cascade's own parts), else 0."""
    ql, sl = query_lens, seq_lens
    counts = -(-ql // rows)
    seq = np.repeat(np.arange(len(ql), dtype=np.int32), counts)
    first = np.cumsum(counts) - counts
    j0 = ((np.arange(len(seq)) - np.repeat(first, counts)) * rows).astype(np.int32)
    start = own[seq] if own is not None else 0
    order = np.argsort(-(sl[seq] - start - ql[seq] + j0), kind="stable")
    return np.ascontiguousarray(np.stack([seq[order], j0[order]], axis=1), dtype=np.int32)


def prefill_items(query_lens: np.ndarray, seq_lens: np.ndarray, rows: int, heads: int, own: Any = None
                  ) -> np.ndarray:
    """int32 [tiles * heads, 3]: (sequence, first query, kv head), the work items of
    paged_prefill_sm90.cu's persistent grid: `prefill_tiles`' tiles for each kv head, the
    items of one K/V stream (a sequence's kv head) side by side and longest first, so that
    the CTAs running at once read a few streams, each from L2 once (all of them at once
    would not fit it); the sequences whose longest tile sees the most K/V first."""
    tiles = prefill_tiles(query_lens, seq_lens, rows, own)
    n = len(tiles)
    # each sequence ranked by where its first (longest) tile comes
    rank = np.full(len(query_lens), n, dtype=np.int64)
    np.minimum.at(rank, tiles[:, 0], np.arange(n))
    k = np.repeat(np.arange(n), heads)  # item (tile k, kv head h), ordered by sequence, head, tile
    h = np.tile(np.arange(heads, dtype=np.int32), n)
    order = np.lexsort((k, h, rank[tiles[k, 0]]))
    return np.ascontiguousarray(np.column_stack([tiles[k[order]], h[order]]), dtype=np.int32)
