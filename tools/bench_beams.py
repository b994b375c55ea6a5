"""Beam search: `kvpager.hf.beam_search` against transformers' ``generate(num_beams=...)``, in one process.

Random-weight Llama-shaped models of `bench_e2e.py` (bf16 on a GPU, float32 on
the CPU), ``--batch`` prompts of ``--prompt`` tokens, ``--beams`` beams,
``--new`` new tokens, no end token (every step runs). Per path: the time of a
whole search (median of ``--rounds`` after an untimed one), the KV bytes held
at the end (transformers: its cache's tensors, a row a beam; kvpager: the
pool's used blocks at the most, beams sharing the blocks they have in common),
and the share of prompts whose best hypothesis is transformers'. On a GPU
kvpager runs eagerly and with its steps captured (``cuda_graphs=True``; with
``--compile`` also compiled by ``torch.compile``).

    python tools/bench_beams.py [--device cuda] [--shape 1b] [--batch 8] [--beams 4] [--compile]
    python tools/bench_beams.py --device cpu --shape s --batch 4 --prompt 256 --new 16
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_paths  # noqa: E402
from bench_e2e import add_model_arguments, model_from  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import beam_search, spec_for_model  # noqa: E402


def hf_beams(model, prompts: list[list[int]], args) -> tuple[list[list[int]], int]:
    """transformers' best hypothesis of each prompt and its cache's bytes."""
    ids = torch.tensor(prompts, device=next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, do_sample=False,
                             num_beams=args.beams, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    held = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", ())
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
    return out.sequences[:, len(prompts[0]) :].tolist(), held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also the captured steps compiled (GPU)")
    args = ap.parse_args()
    shape, model = model_from(args)
    g = np.random.default_rng(0)
    prompts = [g.integers(3, 32000, args.prompt).tolist() for _ in range(args.batch)]
    spec = spec_for_model(model, num_blocks=args.batch * args.beams * (-(-(args.prompt + args.new) // 16) + 2))
    pool = KVPool(spec, device=e2e_paths.pool_device())
    peak = [0]
    real = pool.append_flat

    def append_flat(*a, **k):
        out = real(*a, **k)
        peak[0] = max(peak[0], pool.stats().used_blocks)
        return out

    pool.append_flat = append_flat
    paths = {"kvpager": {}}
    if args.device == "cuda":
        paths["kvpager graphs"] = dict(cuda_graphs=True)
        if args.compile:
            paths["kvpager compiled"] = dict(cuda_graphs=True, compile=True)
    times: dict[str, list[float]] = {"transformers": [], **{name: [] for name in paths}}
    agree: dict[str, float] = {}
    for r in range(args.rounds + 1):  # the first untimed
        e2e_paths.sync()
        t0 = time.perf_counter()
        want, hf_bytes = hf_beams(model, prompts, args)
        e2e_paths.sync()
        if r:
            times["transformers"].append(time.perf_counter() - t0)
        for name, options in paths.items():
            t1 = time.perf_counter()
            got = beam_search(model, pool, prompts, args.new, num_beams=args.beams, eos_token_id=None,
                              salt=f"{name} round {r}", **options)  # (nothing cached from the round before)
            e2e_paths.sync()
            if r:
                times[name].append(time.perf_counter() - t1)
            agree[name] = sum(b.tokens[0] == w for b, w in zip(got, want)) / len(want)
    card = e2e_paths.card(args.device)
    print(f"\n{card}, {datetime.date.today()}, shape {shape}, {args.batch} prompts of {args.prompt} tokens, "
          f"{args.beams} beams, {args.new} new tokens, {args.rounds} rounds")
    hf_ms = float(np.median(times["transformers"])) * 1e3
    kv_bytes = peak[0] * spec.bytes_per_block
    print(f"{'path':<18} {'ms':>9} {'vs transformers':>16} {'KV MiB':>9} {'best agrees':>12}")
    print(f"{'transformers':<18} {hf_ms:9.1f} {1.0:15.2f}x {hf_bytes / 2**20:9.1f} {'-':>12}")
    for name in paths:
        ms = float(np.median(times[name])) * 1e3
        print(f"{name:<18} {ms:9.1f} {hf_ms / ms:15.2f}x {kv_bytes / 2**20:9.1f} {agree[name]:12.2f}")


if __name__ == "__main__":
    main()
