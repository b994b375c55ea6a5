"""A `PagedCache` first pass whose rows share blocks that the pass itself fills.

A batch whose prompts share a system prompt not yet cached shares its blocks
in the pool (``share_in_batch``): one row fills them, the others find them
cached. The other rows' uncached tails are all they need to run
(`cached_tail`), but only once those blocks hold their K/V. So where it
spares enough of the pass, the pass runs in two: first the shared tokens
alone (each block once, from the row that fills it, at the positions the
whole pass gives them: the K/V are the whole pass's), then every row's tokens
after its cached blocks, the cut pass. The first pass keeps one logit a row,
which nothing reads.

Not for a model whose rotary frequencies follow each pass's length
(`kvpager.hf.rope.pass_dependent`): the shorter first pass would store K/V of
other frequencies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvpager.hf.cached_tail import cut_inputs, layout, rows_of

#: the two passes run where they spare at least this share of the one pass's token columns (rows x
#: width, each pass) and at least `MIN_SAVED` columns: an extra pass costs a forward's launches, which
#: a small saving does not repay
WORTH = 0.25
MIN_SAVED = 256


def early_tokens(tables: np.ndarray, cached: np.ndarray, written: np.ndarray, block_size: int) -> np.ndarray:
    """Per row (block ``tables`` [rows, W] after the pass's allocation; ``cached``
    tokens each, those in blocks some row of the pass fills included): the tokens
    it must have written before the others' tails run, ``cached`` where none.
    ``written``: the blocks the pass writes (its slots' blocks)."""
    columns = np.arange(tables.shape[1])
    first = cached // block_size  # each row's first block of its own, after those it reads as cached
    cached_part = columns[None, :] < first[:, None]
    read = tables[cached_part & np.isin(tables, written)]  # blocks rows read as cached that the pass writes
    # each row writes early its own blocks from its first one on, while others read them
    unread = ~cached_part & ~np.isin(tables, read)
    stop = np.where(unread, columns[None, :], tables.shape[1]).min(axis=1)
    return np.maximum(cached, stop * block_size)


def worth_it(rows: int, early: np.ndarray, tails: np.ndarray, whole: np.ndarray) -> bool:
    """Whether a first pass of ``early`` tokens a row and a cut pass of ``tails``
    spare enough (`WORTH`, `MIN_SAVED`) of one pass of ``whole`` tokens a row (the
    tails it would run, cut or not) over ``rows`` rows."""
    one = rows * int(whole.max(initial=0))
    two = int((early > 0).sum()) * int(early.max(initial=0)) + rows * int(tails.max(initial=0))
    return one - two >= max(MIN_SAVED, WORTH * one)


def first_pass(named: dict[str, Any], real: np.ndarray, cached: np.ndarray, upto: np.ndarray
               ) -> tuple[np.ndarray, dict[str, Any], np.ndarray, torch.Tensor]:
    """(the rows of the first pass, its keywords, its real tokens bool [rows, W], the
    whole pass's column each of its columns takes, int [rows, W] on the device): each
    row's real tokens ``cached`` to ``upto`` (those before its cached ones written),
    left-padded, at the whole pass's positions; one logit a row kept."""
    rows = np.flatnonzero(upto > cached)
    device = named["input_ids"].device
    take, kept = layout(real[rows], (upto - cached)[rows], ends=upto[rows])
    index = torch.as_tensor(take, device=device)
    inputs = cut_inputs(rows_of(named, torch.as_tensor(rows, device=device)), index, kept, real.shape[1], 0)
    inputs["logits_to_keep"] = 1
    return rows, inputs, kept, index
