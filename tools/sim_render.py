"""The simulator's output (see `simulate.py`): the report as a table, and memory
over time as a plot (matplotlib, the ``tools`` extra)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def plot(series: dict[str, list[float]], args: argparse.Namespace, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install 'kvpager[tools]' "
            "(or pip install matplotlib)"
        ) from None
    pool_tokens = args.blocks * args.block_size
    steps = np.arange(len(series["used_slots"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=[3, 2])
    top.plot(
        steps,
        series["contiguous_reserved"],
        color="tab:red",
        label="contiguous: max_model_len reserved per running sequence",
    )
    top.plot(
        steps,
        series["logical_tokens"],
        color="tab:purple",
        lw=0.8,
        label="paged without sharing: tokens of every sequence",
    )
    top.plot(
        steps,
        series["used_slots"],
        color="tab:blue",
        label="paged: token slots in allocated blocks",
    )
    top.plot(
        steps,
        series["tokens_stored"],
        color="tab:green",
        lw=0.8,
        ls=":",
        label="paged: real tokens stored",
    )
    top.axhline(
        pool_tokens, color="black", ls="--", lw=1, label=f"pool size ({pool_tokens} tokens)"
    )
    top.set_yscale("log")
    top.set_ylim(bottom=max(args.block_size, pool_tokens / 100))
    top.set_ylabel("KV memory (tokens, log scale)")
    top.set_title(
        "KV memory of the same running requests "
        f"(block size {args.block_size}, max_model_len {args.max_model_len})",
        fontsize=10,
    )
    top.legend(loc="lower right", fontsize=7)
    bottom.plot(steps, series["running_seqs"], color="tab:blue", label="running sequences (paged)")
    bottom.plot(steps, series["swapped_seqs"], color="tab:orange", label="swapped out")
    bottom.axhline(
        pool_tokens // args.max_model_len,
        color="tab:red",
        ls="--",
        lw=1,
        label="contiguous capacity",
    )
    bottom.set_xlabel("scheduler step")
    bottom.set_ylabel("sequences")
    bottom.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(r: dict[str, Any]) -> str:
    rows = [
        ("token slots holding real tokens (time average)", f"{r['slot_utilization_avg']:.2%}"),
        (
            "token slots holding real tokens (at peak memory)",
            f"{r['slot_utilization_at_peak']:.2%}",
        ),
        ("peak concurrent sequences (paged)", r["peak_concurrent_seqs"]),
        ("concurrent sequences, contiguous max-length", r["contiguous_max_seqs"]),
        ("paged / contiguous", f"{r['concurrency_vs_contiguous']:.1f}x"),
        (
            "tokens stored vs without sharing (average)",
            f"{r['tokens_stored_avg']:.0f} / {r['tokens_without_sharing_avg']:.0f}",
        ),
        ("memory saved by sharing, total", f"{r['saved_by_sharing']:.2%}"),
        ("  of it by prefix sharing", f"{r['saved_by_prefix']:.2%}"),
        ("  of it by fork (parallel sampling)", f"{r['saved_by_fork']:.2%}"),
        ("prefix hit rate (prompt tokens)", f"{r['prefix_hit_rate']:.2%}"),
        (
            "system prompt: full blocks / max copies",
            f"{r['shared_prompt_full_blocks']} / {r['shared_prompt_max_copies']}",
        ),
        ("requests arrived / finished", f"{r['requests_arrived']} / {r['requests_finished']}"),
        (
            "swap outs / swap ins / recomputes",
            f"{r['swap_outs']} / {r['swap_ins']} / {r['recomputes']}",
        ),
        ("wall time", f"{r['wall_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
