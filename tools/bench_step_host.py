"""Where an eager decode step's host time goes, part by part, in a model on kvpager.

A `kvpager.hf.PagedGeneration` decodes a batch of prompts that share a
1,024-token system prompt (8-40 own tokens each), pipelined and eager (a plan
per pass, refilled in place on a GPU pool), and each part of its step is timed
by a wrapper around it: the pass's launch (the allocator's append, the plan,
the input ids, the model's forward, the token copy queued) and the completion
of the pass before (its tokens read, the outputs, the ids and commits told to
the pool), plus every layer's `write_attend` inside the forward. The table
gives microseconds a step, per batch; "outside the forward" is the step's
wall time less the forward's, what kvpager's own loop costs the host.

Shapes: `bench_e2e.py`'s random-weight models (``1b``, ``8b``, ``sc3``, ...; a GPU)
or ``tiny`` (2 layers of width 64: the loop's own costs on a CPU, where the
forward is cheap).

    python tools/bench_step_host.py [--shape 1b] [--batches 64,256] [--steps 64]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_e2e  # noqa: E402

import kvpager.hf.attention as attention  # noqa: E402
import kvpager.hf.pipeline as pipeline  # noqa: E402
from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedGeneration, spec_for_model  # noqa: E402

#: (label, where, name): what is timed; where is "gen", "plans" (its `DecodePlans`), "pool", "pipeline" or
#: "attention"
PARTS = [
    ("launch of the next pass", "gen", "_launch"),
    ("launch: append (allocator)", "gen", "_append"),
    ("launch: plan (a new one, or refilled)", "plans", "plan"),
    ("plan: refill (tables, upload)", "pool", "refill"),
    ("launch: input ids gathered", "pipeline", "fed_tokens"),
    ("launch: forward (the model)", "gen", "_forward"),
    ("forward: each layer's write_attend", "attention", "write_attend"),
    ("launch: token copy queued", "pipeline", "queue_copy"),
    ("completion of the pass before", "gen", "_complete"),
    ("completion: outputs updated", "gen", "_update"),
    ("completion: record_tokens", "pool", "record_tokens"),
    ("completion: commit", "pool", "commit"),
]


def tiny_model() -> Any:
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000,
                                      max_position_embeddings=8192)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def measure(model: Any, device: str, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """Microseconds a step for each part, "step" and "outside the forward"."""
    vocab = model.config.vocab_size
    prompts = [[t % vocab for t in p] for p in bench_e2e.prompts(batch, 1024, (8, 40))]
    pool = KVPool(spec_for_model(model, num_blocks=batch * 80 + 4096), device=device)
    gen = PagedGeneration(model, pool, prompts, max_new_tokens=warmup + steps + 2, eos_token_id=None)
    spent: dict[str, float] = collections.defaultdict(float)
    undo = []
    owners = {"gen": gen, "plans": gen._plans, "pool": pool, "pipeline": pipeline, "attention": attention}
    for _, where, name in PARTS:
        obj = owners[where]
        fn = getattr(obj, name)

        def timed(*a: Any, _fn: Any = fn, _name: str = name, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - t0

        setattr(obj, name, timed)
        undo.append((obj, name, fn, where))
    try:
        for _ in range(warmup):
            gen.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            gen.step()
        wall = time.perf_counter() - t0
        taken = dict(spent)  # what `close` runs after is not a step's
    finally:
        for obj, name, fn, where in undo:
            if where in ("pipeline", "attention"):
                setattr(obj, name, fn)
        gen.close()
        pool.close()
    out = {name: taken.get(name, 0.0) / steps * 1e6 for _, _, name in PARTS}
    out["step"] = wall / steps * 1e6
    out["outside the forward"] = (wall - taken.get("_forward", 0.0)) / steps * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", choices=["tiny", *bench_e2e.SHAPES])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--device", default=None, help="default: cuda:0 where there is a GPU, else cpu")
    args = ap.parse_args()
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if args.shape != "tiny" and not device.startswith("cuda"):
        raise SystemExit(f"--shape {args.shape} needs a GPU; --shape tiny runs on a CPU")
    model = tiny_model().to(device) if args.shape == "tiny" else bench_e2e.make_model(args.shape)
    batches = [int(b) for b in args.batches.split(",")]
    rows = {b: measure(model, device, b, args.steps, args.warmup) for b in batches}
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    print(f"{where}, {datetime.date.today()}: shape {args.shape}, eager pipelined decode, "
          f"{args.steps} steps after {args.warmup}; us a step")
    print("| part | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for label, key in [("step (wall)", "step"), ("outside the forward", "outside the forward")] + [
            (label, name) for label, _, name in PARTS]:
        print(f"| {label} | " + " | ".join(f"{rows[b][key]:,.1f}" for b in batches) + " |")


if __name__ == "__main__":
    main()
