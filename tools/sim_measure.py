"""The simulator's measurements (see `simulate.py`): per step, the pool's stats
and an independent count from the block tables (tokens stored, stored per
request family, stored without any sharing, copies of the system prompt's
blocks); at the end, the report's figures from those series.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np


def _distinct_tokens(keys: np.ndarray, fill: np.ndarray) -> int:
    """Tokens held by distinct blocks: each key counted once, at its fullest use."""
    if not len(keys):
        return 0
    order = np.lexsort((fill, keys))
    keys, fill = keys[order], fill[order]
    last = np.append(keys[1:] != keys[:-1], True)
    return int(fill[last].sum())


class Measurement:
    """Mixed into `Simulator` (which holds ``pool``, ``args``, ``bs``, the request
    queues, ``counts``, ``series`` and ``shared_prompt_max_copies``)."""

    def measure(self) -> None:
        """Record one step: pool stats, and an independent count from the block tables
        of what is stored, what each request family stores, and what would be stored
        without any sharing."""
        st = self.pool.stats()
        infos = {i.seq_id: i for i in self.pool.sequences()}
        families = self.running + list(self.swapped)
        tables, family, ntok, shared_rows = [], [], [], []
        for f, r in enumerate(families):
            for s in r.samples:
                info = infos[s.seq_id]
                if r.shared:
                    shared_rows.append(len(tables))
                tables.append(info.block_table)
                family.append(f)
                ntok.append(info.num_tokens)
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        blocks = np.fromiter(
            itertools.chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum())
        )
        row = np.repeat(np.arange(len(tables)), lens)
        index = np.arange(len(blocks)) - np.repeat(np.cumsum(lens) - lens, lens)
        fill = np.minimum(self.bs, np.asarray(ntok, dtype=np.int64)[row] - index * self.bs)
        on_device = blocks != 0  # 0: swapped out to the host
        blocks, fill, row = blocks[on_device], fill[on_device], row[on_device]
        logical = int(fill.sum())
        stored = _distinct_tokens(blocks, fill)
        fam_key = np.asarray(family, dtype=np.int64)[row] * (self.args.blocks + 1) + blocks
        family_tokens = _distinct_tokens(fam_key, fill)
        if stored != st.tokens_stored:
            raise AssertionError(
                f"tokens stored: block tables say {stored}, stats say {st.tokens_stored}"
            )
        # The system prompt's full blocks: how many distinct device blocks hold each.
        k = self.args.shared_prompt_len // self.bs
        if k and shared_rows:
            heads = np.sort(
                np.asarray([tables[i][:k] for i in shared_rows], dtype=np.int64), axis=0
            )
            distinct = (heads[:1] != 0).astype(np.int64) + (
                (np.diff(heads, axis=0) != 0) & (heads[1:] != 0)
            ).sum(axis=0)
            self.shared_prompt_max_copies = max(self.shared_prompt_max_copies, int(distinct.max()))
        resident = sum(len(r.samples) for r in self.running)
        ser = self.series
        ser["used_slots"].append(st.token_slots_allocated)
        ser["tokens_stored"].append(st.tokens_stored)
        ser["running_seqs"].append(resident)
        ser["swapped_seqs"].append(st.swapped_sequences)
        ser["contiguous_reserved"].append(resident * self.args.max_model_len)
        ser["logical_tokens"].append(logical)
        ser["family_tokens"].append(family_tokens)

    def report(self, final: Any) -> dict[str, Any]:
        a, ser = self.args, self.series
        pool_tokens = a.blocks * self.bs
        contiguous = pool_tokens // a.max_model_len
        used = np.asarray(ser["used_slots"], dtype=np.float64)
        stored = np.asarray(ser["tokens_stored"], dtype=np.float64)
        peak = int(np.argmax(used)) if len(used) else 0
        logical = float(np.sum(ser["logical_tokens"]))
        family = float(np.sum(ser["family_tokens"]))
        peak_seqs = int(max(ser["running_seqs"], default=0))
        return dict(
            config={k: v for k, v in vars(a).items() if k not in ("json", "plot")},
            pool_tokens=pool_tokens,
            slot_utilization_avg=float(stored.sum() / used.sum()) if used.sum() else 1.0,
            slot_utilization_at_peak=float(stored[peak] / used[peak])
            if len(used) and used[peak]
            else 1.0,
            peak_used_slots=int(used[peak]) if len(used) else 0,
            peak_concurrent_seqs=peak_seqs,
            contiguous_max_seqs=contiguous,
            concurrency_vs_contiguous=peak_seqs / contiguous if contiguous else float("inf"),
            avg_running_seqs=float(np.mean(ser["running_seqs"])) if ser["running_seqs"] else 0.0,
            tokens_without_sharing_avg=logical / max(len(used), 1),
            tokens_stored_avg=float(stored.mean()) if len(stored) else 0.0,
            saved_by_sharing=1 - stored.sum() / logical if logical else 0.0,
            saved_by_fork=(logical - family) / logical if logical else 0.0,
            saved_by_prefix=(family - stored.sum()) / logical if logical else 0.0,
            prefix_hit_rate=final.prefix_hit_rate,
            shared_prompt_full_blocks=a.shared_prompt_len // self.bs,
            shared_prompt_max_copies=self.shared_prompt_max_copies,
            **self.counts,
            requests_waiting_at_end=len(self.waiting),
        )
