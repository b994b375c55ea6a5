"""A `PagedCache`'s rows: a pool sequence a row, and what the cache counts of each.

A row's sequence is allocated by the pass that brings the row's first tokens
(None until then). Per row the cache keeps the tokens its sequence holds, its
first position still held (blocks behind a sliding window are given back),
and whether it was fed a token at a position other than its index (its K/V
then its own, never committed for other callers' prompts); for the cache as a
whole, the columns fed so far, pads included (transformers' cache length):
a crop removes the last columns where they hold each row's last tokens.

`CacheRows` changes these only for a pass that ran (`done`: its tokens
counted, the blocks it filled committed, those behind every window given
back), takes back what a pass that did not run did (`undo`), and follows
beam search's reorders (`reorder`: forks), crops and frees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kvpager.batch_calls import free_all
from kvpager.errors import InvalidArgument
from kvpager.hf.row_forks import continue_rows


@dataclass
class Step:
    """One pass's changes to the cache's sequences, undone if the pass fails."""

    batch: Any  # its `PagedBatch` (None for a replayed pass)
    rows: np.ndarray  # the rows that got tokens
    counts: np.ndarray  # their new tokens
    columns: int  # the pass's width (pads included)
    first: bool  # the cache held no rows before the pass
    fresh: list[int]  # rows whose sequences the pass allocated (their first tokens)
    placed: np.ndarray  # per row of the pass: its tokens at their positions in its sequence
    appended: bool = False  # the other rows' tokens were appended
    cut: dict[str, Any] | None = None  # the keywords of the pass cut to its rows' uncached tails (`cached_tail`)
    #: a first pass run in two (`early_prefix`): the first's batch and keywords
    early: tuple[Any, dict[str, Any]] | None = None
    #: a decode pass replayed from CUDA graphs (`cache_graphs`): `CacheGraphs.run`'s arguments
    replay: tuple[Any, ...] | None = None
    #: where each row's tokens fall in the pass (`cache_mask.Spans`), and its tokens (bool [rows, width])
    spans: Any = None
    real: np.ndarray | None = None
    decode: bool = False  # a token every row of the cache, each real (a decode pass)
    #: (sequences, token ids [rows, 1]) to record in slots taken ahead (`cache_ahead`), before `done` commits
    record: tuple[Any, Any] | None = None
    #: a pass begun before its inputs were read (`cache_pass.ahead_pass`): what reads them
    confirm: Any = None


class CacheRows:
    """The rows of a cache over ``pool``. ``reach``: where every layer of the model
    has a sliding window (and the pool gives blocks back), the widest; else None."""

    def __init__(self, pool: Any, reach: int | None) -> None:
        self.pool, self.reach = pool, reach
        #: the daemon session the sequences are held in (`kvpager.hf.held_session`; None: a KVPool)
        self.session: str | None = None
        self.clear()

    def clear(self) -> None:
        """No rows (their sequences not freed here: `free`)."""
        self.seq_ids: list[int | None] = []  # a sequence a row
        self.lens = np.zeros(0, dtype=np.int64)  # the tokens each row's sequence holds
        self.floors = np.zeros(0, dtype=np.int64)  # each row's first position still held
        self.own = np.zeros(0, dtype=bool)  # rows fed a token elsewhere than at its index
        self.ends = np.zeros(0, dtype=np.int64)  # each row's column after its last token
        self.gapped = np.zeros(0, dtype=bool)  # rows with padding between their tokens' columns
        # a gapped row's tokens in columns: its closed runs, [start, length] each, in `runs`
        # (`closed` tokens in all), then its open run, the rest of its tokens up to `ends`
        # (a row never gapped: one open run). A pass that continues a row's open run
        # changes only `lens` and `ends`.
        self.runs: dict[int, list[list[int]]] = {}
        self.closed = np.zeros(0, dtype=np.int64)
        self.columns = 0  # the tokens each row was fed, pads included: transformers' cache length

    def start(self, rows: int) -> None:
        """A first pass of ``rows`` rows: none has a sequence yet."""
        self.seq_ids = [None] * rows
        self.lens = np.zeros(rows, dtype=np.int64)
        self.floors = np.zeros(rows, dtype=np.int64)
        self.own = np.zeros(rows, dtype=bool)
        self.ends = np.zeros(rows, dtype=np.int64)
        self.gapped = np.zeros(rows, dtype=bool)
        self.runs = {}
        self.closed = np.zeros(rows, dtype=np.int64)

    def columns_of(self, r: int) -> np.ndarray:
        """The columns row ``r``'s tokens were fed at (int64, ascending)."""
        end = int(self.ends[r])
        tail = np.arange(end - int(self.lens[r] - self.closed[r]), end)
        return np.concatenate([np.arange(a, a + n) for a, n in self.runs.get(r, ())] + [tail])

    def _trim(self, r: int, cut: int) -> None:
        """Row ``r``'s last ``cut`` tokens off its runs (before `lens` drops them), and
        its end after them: a closed run becomes the open one where the cut reaches it."""
        runs = self.runs.get(r)
        cut -= int(self.lens[r] - self.closed[r])  # (past its open run)
        if cut <= 0 or not runs:
            self.ends[r] -= cut + int(self.lens[r] - self.closed[r])
            return
        while runs:
            a, n = runs.pop()
            self.closed[r] -= n
            if cut < n:
                self.ends[r] = a + n - cut
                return
            cut -= n
        self.ends[r] = 0

    def free(self) -> None:
        """Free every row's sequence: no rows."""
        ids = [s for s in self.seq_ids if s is not None]
        self.clear()
        free_all(self.pool, ids)

    def copy_onto(self, other: CacheRows, seq_ids: list[int | None]) -> None:
        """Make ``other`` (a `CacheRows` with no rows) count what this one does, for
        ``seq_ids`` (forks of this one's sequences, a row each)."""
        other.seq_ids = seq_ids
        for name in ("lens", "floors", "own", "ends", "gapped", "closed"):
            setattr(other, name, getattr(self, name).copy())
        other.runs = {r: [list(run) for run in runs] for r, runs in self.runs.items()}
        other.columns = self.columns

    def crop(self, cut: int, margin: int) -> None:
        """Cut the last ``cut`` tokens (> 0) of every row; ``margin``: the tokens held
        past what the windows read (`PagedCache.release_margin`)."""
        if cut > self.columns:
            raise InvalidArgument(f"crop: the cache holds {self.columns} tokens a row, cannot remove {cut}")
        if cut == self.columns:
            self.free()
            return
        # Exact where every row's last token is in the last column and its last run of tokens
        # (after its last padding) is at least ``cut`` long: each row then loses ``cut`` tokens.
        # (It was refused wherever the cut reached into a padded first pass: a left-padded
        # prompt's last tokens too, which a DynamicCache crops.)
        if None in self.seq_ids or not ((self.ends == self.columns).all() and (self.lens - self.closed >= cut).all()):
            raise InvalidArgument(f"crop: the last {cut} columns hold padding of some rows (a padded pass), "
                                  "so rows would lose different token counts: not supported")
        # (the next window's first position, at 0 where it reaches past the start: a row shorter
        # than the window was refused though it had given back nothing)
        if self.reach is not None and (np.maximum(self.lens - cut - self.reach + 1, 0) < self.floors).any():
            raise InvalidArgument(f"crop: {cut} tokens reach back past the blocks given back behind the "
                                  f"sliding windows (release_margin {margin}): the next query's "
                                  "window would read positions no longer held")
        self.pool.truncate(self.seq_ids, (self.lens - cut).tolist())
        if self.runs:
            for r in range(len(self.lens)):
                self._trim(r, cut)
        else:
            self.ends -= cut
        self.lens -= cut
        self.columns -= cut

    def drop_tails(self, drop: np.ndarray) -> None:
        """Cut ``drop[r]`` of each row's last tokens (those a later mask drops,
        `cache_mask.dropped_tails`): the rows' tokens then end in different
        columns (no crop across them)."""
        at = np.flatnonzero(drop)
        self.pool.truncate([self.seq_ids[r] for r in at], (self.lens[at] - drop[at]).tolist())
        for r in at.tolist():
            self._trim(r, int(drop[r]))
        self.lens[at] -= drop[at]

    def reorder(self, parents: list[int]) -> None:
        """Row i becomes a continuation of row ``parents[i]``: the first row that
        continues a sequence takes it, the others fork it, the sequences no row
        continues are freed."""
        new, _, gone = continue_rows(self.pool, self.seq_ids, parents)
        self.seq_ids = new
        self.lens = self.lens[parents]
        self.floors = self.floors[parents]
        self.own = self.own[parents]
        self.ends = self.ends[parents]
        self.gapped = self.gapped[parents]
        self.runs = {i: [list(run) for run in self.runs[p]] for i, p in enumerate(parents) if p in self.runs}
        self.closed = self.closed[parents]
        free_all(self.pool, gone)

    def done(self, step: Step, margin: int) -> None:
        """A pass ran: its tokens counted, the blocks it filled committed, and (every
        layer windowed) each row's blocks behind its window, past ``margin`` tokens, given back."""
        before = self.lens[step.rows]
        after = before + step.counts
        self.lens[step.rows] = after
        if step.spans is not None:
            apart = step.rows[step.spans.gaps[step.rows]]
            if len(apart):  # (rare: rows whose tokens this pass leaves apart close their open run)
                held = dict(zip(step.rows.tolist(), before.tolist()))
            for r in apart.tolist():
                runs = self.runs.setdefault(r, [])
                n_open = held[r] - int(self.closed[r])
                start = int(self.ends[r]) - n_open
                for a, n in _runs(step.real[r]):
                    if n_open and start + n_open == self.columns + a:
                        n_open += n
                        continue
                    if n_open:
                        runs.append([start, n_open])
                        self.closed[r] += n_open
                    start, n_open = self.columns + a, n
            self.ends[step.rows] = self.columns + step.spans.end[step.rows]
            self.gapped[step.rows] |= step.spans.gaps[step.rows]
        self.columns += step.columns
        self.own |= ~step.placed
        size = self.pool.spec.block_size
        filled = step.rows[(after // size > before // size) & ~self.own[step.rows]]
        if len(filled):
            self.pool.commit([self.seq_ids[r] for r in filled])
        if self.reach is not None:
            # the next query of a row sits at its length and reads positions after length - reach
            upto = (after - self.reach + 1 - margin) // size * size
            gone = step.rows[upto > self.floors[step.rows]]
            if len(gone):
                ends = upto[upto > self.floors[step.rows]]
                self.pool.release_before([self.seq_ids[r] for r in gone], ends.tolist())
                self.floors[gone] = ends

    def undo(self, step: Step, launched_on: Any = None) -> None:
        """Take back what a pass that did not run did: its fresh rows' sequences
        freed, the others' appended tokens cut off. ``launched_on``: the device a
        pass launched (wholly or in part) runs on, waited for first: no block it
        writes goes back to the pool while a kernel may still write it (a worker of
        another process mapping the pool could take it)."""
        if launched_on is not None and launched_on.type == "cuda":
            torch.cuda.synchronize(launched_on)
        fresh = [s for r in step.fresh if (s := self.seq_ids[r]) is not None]
        for r in step.fresh:
            self.seq_ids[r] = None
        try:
            if step.appended:
                held = [int(r) for r in step.rows if int(r) not in step.fresh]
                self.pool.truncate([self.seq_ids[r] for r in held], self.lens[held].tolist())
        finally:
            if step.first:
                self.start(0)
            free_all(self.pool, fresh)


def selected_rows(indices: Any, rows: int) -> Any:
    """``indices`` as row indices: a bool mask (a tensor, array or list of bools, one
    a row: `InvalidArgument` otherwise) as its True rows' indices, anything else as it is."""
    if isinstance(indices, torch.Tensor) and indices.dtype == torch.bool:
        mask = indices.cpu().numpy()
    elif isinstance(indices, np.ndarray) and indices.dtype == bool:
        mask = indices
    elif isinstance(indices, (list, tuple)) and indices and all(isinstance(i, (bool, np.bool_)) for i in indices):
        mask = np.asarray(indices, dtype=bool)
    else:
        return indices
    if mask.shape != (rows,):
        raise InvalidArgument(f"batch_select_indices: a bool mask selects rows with one entry a row ({rows}), "
                              f"got shape {tuple(mask.shape)}")
    return np.flatnonzero(mask).tolist()


def _runs(real: np.ndarray) -> list[tuple[int, int]]:
    """The runs of True in ``real`` (1-D bool): (start, length) each."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], real, [False]]).astype(np.int8)))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2])]
