"""Step plans kept across decode passes: `PagedGeneration`'s eager steps and a `PagedCache`'s passes.

A model decodes a token a pass, each pass a step of the same sequences. A new
plan a pass would cost the host new device buffers, kernel launches prepared
again and the cascade planned again, in a step the host paces; so a decode
pass over the sequences of the last one refills that pass's plan in place
(`KVPool.refill`: the plan stays tied to its sequences). Its tables have room
for a fixed number of blocks (a generation's longest sequence) or for twice
the longest row when it is made (a `PagedCache`, whose length is not known
ahead); a row that outgrows them, another set of sequences (beam search's
reorder, rows that ended), or a pass of several tokens a row gets a new plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager.hf.graphs import graph_width


class DecodePlans:
    """Plans over ``pool`` for a model of ``heads`` query heads, ``cascade`` as
    `KVPool.plan` takes it. ``width``: the blocks a kept plan's tables hold (None:
    room for twice the longest row when it is made). Plans say ``host_bound`` (an
    eager pass: shared-prefix attention only where it spares enough reading to pace
    the device, `kvpager.cascade.HOST_BOUND_MIN_SAVED`), and are refilled only on a
    GPU pool (a NumPy plan is made anew: it costs no device buffers)."""

    def __init__(self, pool: Any, heads: int, *, cascade: Any = None, width: int | None = None) -> None:
        self.pool, self.heads, self.cascade, self.width = pool, heads, cascade, width
        self.refills = str(getattr(pool, "device", "cpu")).startswith("cuda") and hasattr(pool, "refill")
        self._kept: tuple[Any, list[int]] | None = None  # (the last decode plan, its sequences)

    def plan(self, ids: list[int], fed: np.ndarray, slots: np.ndarray, longest: int,
             context_lens: np.ndarray | None = None) -> Any:
        """The plan of a pass of ``fed`` new tokens for each of ``ids`` (their K/V to
        ``slots``), whose longest sequence then holds ``longest`` tokens; of the tokens
        before each one's ``context_lens`` where given (a pass over the sequences' first
        tokens, `kvpager.plan.context_of`: a new plan)."""
        options = {"num_q_heads": self.heads, "cascade": self.cascade, "host_bound": True}
        if not self.refills or not (fed == 1).all() or context_lens is not None:
            return self.pool.plan(ids, fed.tolist(), slots, context_lens=None if context_lens is None else
                                  context_lens.tolist(), **options)
        kept = self._kept
        if kept is not None and kept[1] == ids and -(-longest // self.pool.spec.block_size) <= kept[0].width:
            self.pool.refill(kept[0], ids, None, slots)
            return kept[0]
        width = self.width if self.width is not None else graph_width(self.pool, 2 * longest)
        plan = self.pool.plan(ids, None, slots, num_rows=len(ids), width=width, **options)
        self._kept = (plan, list(ids))
        return plan

    def drop(self) -> None:
        """Let the kept plan go (its device buffers with it): its sequences were freed."""
        self._kept = None
