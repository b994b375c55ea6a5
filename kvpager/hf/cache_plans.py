"""The step plans of a `PagedCache`'s passes: one kept across decode passes.

transformers' ``generate`` calls the model once a token, each pass a decode
step of the same rows. A new plan a pass would cost the host new device
buffers, kernel launches prepared again and the cascade planned again, in a
step the host paces; so a decode pass over the sequences of the last one
refills that pass's plan in place (`KVPool.refill`: the plan stays tied to its
sequences), as `PagedGeneration`'s eager steps do (`kvpager.hf.pipeline`).
Its tables have room for twice the longest row when it is made; a row that
outgrows them, another set of rows (beam search's reorder), or a pass of
several tokens a row gets a new plan.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpager.hf.graphs import graph_width


class CachePlans:
    """Plans over ``pool`` for a model of ``heads`` query heads. Plans say
    ``host_bound`` (an eager pass: shared-prefix attention only where it spares
    enough reading to pace the device, `kvpager.cascade.HOST_BOUND_MIN_SAVED`),
    and are refilled only on a GPU pool (a NumPy plan is made anew: it costs no
    device buffers)."""

    def __init__(self, pool: Any, heads: int) -> None:
        self.pool, self.heads = pool, heads
        self.refills = str(getattr(pool, "device", "cpu")).startswith("cuda") and hasattr(pool, "refill")
        self._kept: tuple[Any, list[int]] | None = None  # (the last decode plan, its sequences)

    def plan(self, ids: list[int], fed: np.ndarray, slots: np.ndarray, longest: int,
             context_lens: np.ndarray | None = None) -> Any:
        """The plan of a pass of ``fed`` new tokens for each of ``ids`` (their K/V to
        ``slots``), whose longest sequence then holds ``longest`` tokens; of the tokens
        before each one's ``context_lens`` where given (a pass over the sequences' first
        tokens, `kvpager.plan.context_of`: a new plan)."""
        if not self.refills or not (fed == 1).all() or context_lens is not None:
            return self.pool.plan(ids, fed.tolist(), slots, num_q_heads=self.heads, host_bound=True,
                                  context_lens=None if context_lens is None else context_lens.tolist())
        kept = self._kept
        if kept is not None and kept[1] == ids and -(-longest // self.pool.spec.block_size) <= kept[0].width:
            self.pool.refill(kept[0], ids, None, slots)
            return kept[0]
        plan = self.pool.plan(ids, None, slots, num_rows=len(ids), width=graph_width(self.pool, 2 * longest),
                              num_q_heads=self.heads, host_bound=True)
        self._kept = (plan, list(ids))
        return plan

    def drop(self) -> None:
        """Let the kept plan go (its device buffers with it): the rows were freed."""
        self._kept = None
