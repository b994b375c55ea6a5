"""The beams of a model with recurrent layers (`kvpager.hf.beams.beam_search`): the
prompts prefilled as rows, each beam's recurrent states gathered from its parent's
every step, eager or in a captured step over states at fixed addresses."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from kvpager.hf.attention import paged_attention, run_pass
from kvpager.hf.graphs import bucket_for
from kvpager.hf.recurrent import captured_pass
from kvpager.hf.recurrent_states import States, cache_over, fixed_states, stacked, tensors_of
from kvpager.hf.scoring_rows import RowPasses, logits_rows
from kvpager.hf.state_cache import PrefixKeys


class RecurrentBeams:
    """The recurrent layers' states of a beam search's beams: the prompts prefilled
    as rows (from held states where their cached blocks have them:
    `kvpager.hf.scoring_rows.RowPasses`), each prompt's state repeated for its
    beams, and at each step every beam's state gathered from its parent's (a
    parent continued by several copied to each, transformers' cache reorder) and
    run a token further with the beams' K/V in the pool."""

    def __init__(self, model: Any, pool: Any, salt: Any, prompts: list[list[int]], beams: int):
        self.prompts, self.k = prompts, beams
        # (a budget every prompt fits at once, padded: the prefill in as few passes as its lengths allow)
        self.runner = RowPasses(model, pool, salt, len(prompts) * max(map(len, prompts), default=1))
        self.passes = self.runner.passes
        self.states: list[torch.Tensor] = []
        # with captured steps (`captured`): the states at fixed addresses, a row a beam (`States`:
        # the graph's cache over them), the graph bucket's rows; eager: `states`, the rows alone
        self.captures = False
        self.fixed: States | None = None
        self.compile: str | None = None  # the backend compiling the captured step
        self.graphs: Any = None  # the captured steps (`fixed_states`: a `CapturedSteps`' states kept with them)

    def prefill(self, took: Any) -> torch.Tensor:
        """The prompts allocated (``took(b, seq_id)`` each) and run: their last
        positions' logits [B, V]; each prompt's states repeated for its beams."""
        run, prompts = self.runner, self.prompts
        bs = run.pool.spec.block_size
        ids: dict[int, int] = {}
        segments = []
        allocated = run.allocate(prompts, list(range(len(prompts))), ids)
        for k, seq_id in ids.items():
            took(k, seq_id)
        for k, slots, c in allocated:
            upto = min(c, len(prompts[k]) - 1)
            at, states = run.resume_at(PrefixKeys(run.held_as, prompts[k], bs, upto), upto)
            segments.append((k, at, len(prompts[k]), slots[at:], states))
        last: dict[int, torch.Tensor] = {}

        def wanted(k: int, a: int, b: int) -> tuple[int, int]:  # (each prompt's last position)
            n = len(prompts[k])
            return (n - 1, n) if b == n else (0, 0)

        def take(picks: list[tuple[int, int]], logits: torch.Tensor) -> None:
            for (k, _), row in zip(picks, logits):
                last[k] = row

        final: dict[int, Any] = {}
        run.run_segments(ids, prompts, segments, wanted, take, final)
        run.passes.commit(list(ids.values()))
        rows = [final[k] for k in range(len(prompts)) for _ in range(self.k)]  # (a prompt's states a beam)
        if not self.captures:
            self.states = stacked(run.layout, rows)
        else:  # (at fixed addresses, the graph bucket's rows, the rest zero)
            self.fixed = fixed_states(self.graphs, run.model, run.layout, rows, len(rows), bucket_for(len(rows)))
        return torch.stack([last[k] for k in range(len(prompts))])

    def captured(self, compile: bool) -> Any:
        """The step `DecodeGraphs` captures (`captured_pass`, compiled where ``compile``),
        over the states kept at fixed addresses from the prefill on."""
        self.captures = True  # (`fixed` made by `prefill`)
        self.compile = "inductor" if compile else None

        def forward(model: Any, batch: Any, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
            return captured_pass(model, batch, input_ids, position_ids, self.fixed, self.runner.arg, self.compile)

        return forward

    def step(self, ids: list[int], parents: list[int], fed: list[int], positions: list[int],
             slots: np.ndarray, graphs: Any = None) -> torch.Tensor:
        """One token a beam (``fed`` at ``positions``, K/V to ``slots``), each beam from
        its parent's states (``parents``: rows of the last step): the logits [B * K, V]
        (a replay of ``graphs``' captured step where given: the states gathered in
        place first)."""
        run = self.runner
        device = run.passes.device
        at = torch.tensor(parents, dtype=torch.long, device=device)
        if graphs is not None:
            with torch.inference_mode():  # (the gather makes a copy first: rows move onto rows read)
                for full in self.fixed.tensors:
                    full[: len(parents)] = full[at]
            return graphs.launch(ids, torch.tensor([fed], dtype=torch.long, device=device),
                                 torch.tensor([positions], dtype=torch.long, device=device), slots)
        self.states = [t.index_select(0, at) for t in self.states]
        cache = cache_over(run.model, run.layout, self.states)
        plan = run.pool.plan(ids, [1] * len(ids), slots, num_q_heads=run.passes.heads)
        tokens = torch.tensor(fed, dtype=torch.long, device=device).view(-1, 1)
        where = torch.tensor(positions, dtype=torch.long, device=device).view(-1, 1)
        with torch.inference_mode(), paged_attention(run.model):
            logits = run_pass(run.model, run.passes.batch(plan), functools.partial(logits_rows, cache=cache,
                                                                                  arg=run.arg), tokens, where, 1)
        self.states = tensors_of(cache, run.layout)
        return logits[:, -1]
