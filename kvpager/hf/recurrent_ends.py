"""The recurrent states held where a generation's sequences end (`kvpager.hf.recurrent`).

A conversation's next turn is its prompt, the answer and a new message: for it
to resume after the answer, the states at the last block boundary each
sequence ran must be held when that sequence ends, under the keys of its
tokens up to there (`kvpager.hf.state_cache`). The decode steps only know the
state after their latest token, so each row's states are copied aside
(`States.mark`) as its passes fill a block (`stepped`), and those marks are
held when rows end, before the rows left are moved up (`keep`), or when the
generation ends (`close`). Holding them is a saving, not a result: where there
is no memory for the marks the generation goes on without them, warned.

`HeldEnds` is mixed into `Recurrent`, which supplies ``states`` (`States`),
``store`` (the model's `StateCache`), ``history`` (a prompt's tokens so far),
``broken``, and what `Recurrent.allocate` and the prefill set: ``_ends``
(whether end states are held at all), ``_block_size``, ``_held_as`` (the key's
salt and dtype) and ``_layout``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Container, Iterable, Sequence
from typing import TYPE_CHECKING

from kvpager.hf.state_cache import prefix_key

if TYPE_CHECKING:
    from kvpager.hf.recurrent_states import Layout, States
    from kvpager.hf.state_cache import StateCache


class HeldEnds:
    """Marking rows as their passes fill blocks and holding the marks where
    sequences end, for `Recurrent`."""

    states: States | None
    store: StateCache
    history: Callable[[int], list[int]] | None
    broken: bool
    _ends: bool
    _block_size: int
    _held_as: str | None
    _layout: Layout | None

    def stepped(self, positions: Sequence[int], past_end: Container[int] = ()) -> None:
        """A pass was queued that ran the token at ``positions`` of each row held (in
        order), and no pass after it yet: the rows whose tokens now fill their last
        block are marked (`States.mark`), so their states there can be held when
        they end; not the rows ``past_end`` (indices), whose token there was an end
        token a pipelined pass ran all the same (the block it filled is never
        published, so the mark before it stays)."""
        if self._ends:
            bs = self._block_size
            rows = [k for k, p in enumerate(positions) if (p + 1) % bs == 0 and k not in past_end]
            try:
                self.states.mark(rows, [positions[k] + 1 for k in rows])
            except MemoryError as e:  # the generation goes on, holding no end states
                self._ends = False
                warnings.warn(f"kvpager: {e}; the states where this generation's sequences end are not held "
                              "(StateCache.hold_ends = False keeps from trying)", ResourceWarning, stacklevel=2)

    def keep(self, rows: list[int]) -> None:
        """The next pass is over ``rows``: the states of sequences that ended go
        (where they were marked, held first: `close`)."""
        if self._ends and rows != self.states.rows:
            kept = set(rows)
            self._hold([k for k, r in enumerate(self.states.rows) if r not in kept])
        self.states.keep(rows)

    def close(self) -> None:
        """The generation ends: the states of its sequences' last block boundaries
        are held (those marked), under the keys of their tokens up to there, so a
        prompt that continues one of them (a conversation's next turn) resumes
        there. Nothing after a decode pass failed (`broken`)."""
        if self._ends and self.states is not None:
            self._hold(range(self.states.n))
            self._ends = False

    def _hold(self, rows: Iterable[int]) -> None:
        if self.broken:
            return
        states = self.states
        held = []
        for k in rows:
            at = states.marked[k]
            tokens = self.history(states.rows[k]) if at else ()
            if at and len(tokens) > at:  # (every token to its mark known here)
                held.append((prefix_key(self._held_as, tokens, at), self._layout, states.marked_rows(k)))
        self.store.put_many(held)
