"""Memory-efficiency simulator: a synthetic serving workload through the real allocator.

Replays request arrivals over discrete scheduler steps through a kvpager pool
(an embedded `KVPool` by default; any object with its methods works). No K/V
bytes matter here, so the pool has a tiny geometry (1 layer, 1 KV head, head
dim 8); every allocator decision is the real one.

Per step, like a continuous-batching scheduler:
1. decode: every running sequence appends one token (with its id, so full
   blocks publish) and commits; when `append` runs out of blocks, the most
   recently admitted request is swapped out (recomputed later if the host
   pool is full too); sequences that reach their output length are freed;
2. swap in: preempted requests come back, oldest first, while blocks remain;
3. admit: waiting requests, first come first served, while blocks remain
   (above a watermark); each prompt is allocated, its prefill is taken as
   written at once (commit), and a parallel-sampling request forks n - 1
   children.

Run ``python tools/simulate.py --help``; ``--json`` prints one JSON object,
``--plot memory.png`` draws memory over time (needs matplotlib: the ``tools`` extra).
The workload and scheduler live in ``sim_scheduler.py``, the measurements in
``sim_measure.py``, the table and plot in ``sim_render.py``; this file is the
command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

try:
    from kvpager import KVPool, PoolSpec
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kvpager import KVPool, PoolSpec

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests), not run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_render import plot, render  # noqa: E402
from sim_scheduler import Simulator, lengths  # noqa: E402, F401 (lengths: for tests and callers)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=2000, help="scheduler steps to simulate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rate", type=float, default=0.5, help="mean request arrivals per step (Poisson)"
    )
    p.add_argument("--blocks", type=int, default=4096, help="device pool size in blocks")
    p.add_argument("--host-blocks", type=int, default=4096, help="host (swap) pool size in blocks")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--max-model-len", type=int, default=4096, help="longest sequence; contiguous reserves this"
    )
    p.add_argument("--length-dist", choices=("lognormal", "pareto"), default="lognormal")
    p.add_argument(
        "--prompt-mean", type=float, default=300, help="mean prompt length, system prompt excluded"
    )
    p.add_argument(
        "--prompt-shape", type=float, default=1.0, help="lognormal sigma or Pareto alpha"
    )
    p.add_argument("--output-mean", type=float, default=250, help="mean output length per sample")
    p.add_argument(
        "--output-shape", type=float, default=1.0, help="lognormal sigma or Pareto alpha"
    )
    p.add_argument("--shared-prompt-len", type=int, default=500, help="common system prompt length")
    p.add_argument(
        "--shared-share", type=float, default=0.5, help="share of requests with the system prompt"
    )
    p.add_argument("--n", type=int, default=4, help="samples per parallel-sampling request")
    p.add_argument("--n-share", type=float, default=0.1, help="share of requests that sample n > 1")
    p.add_argument(
        "--watermark", type=float, default=0.01, help="share of blocks admission keeps free"
    )
    p.add_argument(
        "--check-every", type=int, default=250, help="check_integrity every N steps (0: end only)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PATH.png", help="write a plot of memory over time")
    return p


#: The most requests that may arrive in one step, on average (a Poisson draw of 1e9 a step
#: held the run for ever).
MAX_RATE = 1e4


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Every setting checked before anything runs: one line and exit status 2 for
    a value the run cannot take (they ended in tracebacks, or hung)."""
    for name in ("steps", "blocks", "block_size", "max_model_len", "n"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("seed", "host_blocks", "shared_prompt_len", "check_every"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be at least 0")
    for name in ("prompt_mean", "output_mean", "prompt_shape", "output_shape"):
        if not 0 < getattr(a, name) < float("inf"):
            p.error(f"--{name.replace('_', '-')} must be a positive number")
    if not 0 <= a.rate <= MAX_RATE:
        p.error(f"--rate must be in [0, {MAX_RATE:g}] requests a step")
    if not 0 <= a.watermark < 1:
        p.error("--watermark must be in [0, 1)")
    if a.plot and not os.path.isdir(os.path.dirname(os.path.abspath(a.plot))):
        p.error(f"--plot {a.plot}: its folder does not exist")
    if a.length_dist == "pareto" and min(a.prompt_shape, a.output_shape) <= 1:
        p.error("Pareto shape (alpha) must be > 1 for a finite mean")
    # The most one request takes at admission: every sample's max_model_len tokens and the
    # block its first decode step may open, a copy of the shared last block per fork, and the
    # watermark kept free. A pool smaller admitted nothing once such a request came first.
    need = a.n * (-(-a.max_model_len // a.block_size) + 1) + a.n - 1 + math.ceil(a.watermark * a.blocks)
    if a.blocks < need:
        p.error(f"the pool must hold a request of n={a.n} samples of max_model_len tokens at admission: "
                f"{need} blocks of {a.block_size} tokens with the watermark, --blocks is {a.blocks}")
    if a.max_model_len <= a.shared_prompt_len + 1:
        p.error("max_model_len must exceed the shared prompt")
    if not (0 <= a.shared_share <= 1 and 0 <= a.n_share <= 1):
        p.error("shares must be in [0, 1]")


def make_pool(a: argparse.Namespace) -> KVPool:
    """A pool of the requested size with the smallest geometry: only the allocator matters."""
    return KVPool(
        PoolSpec(
            num_layers=1,
            num_kv_heads=1,
            head_dim=8,
            num_blocks=a.blocks + 1,
            block_size=a.block_size,
            dtype="float32",
            num_host_blocks=a.host_blocks,
        )
    )


def simulate(
    a: argparse.Namespace, pool: Any = None
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Run the workload of ``a`` through ``pool`` (a fresh `KVPool` if None);
    returns the report and the per-step series."""
    sim = Simulator(pool if pool is not None else make_pool(a), a)
    start = time.perf_counter()
    result = sim.run()
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result, sim.series


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    check_args(p, a)
    result, series = simulate(a)
    if a.plot:
        plot(series, a, a.plot)
    print(json.dumps(result) if a.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
