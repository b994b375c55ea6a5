"""A model on kvpager against the same model on transformers' own cache, in one process (GPU; or the CPU).

Random-weight Llama-shaped models (Llama-3.2-1B: 16 layers, 32 q / 8 kv heads,
head dim 64; Llama-3-8B: 32 layers, head dim 128) and ``mla``, a DeepSeek-V3
model with DeepSeek-V2-Lite's latent attention (27 layers, 16 heads, q and k
of 192 dims, v of 128; a dense MLP in every layer), ``q15`` (Qwen2.5-1.5B's layout: a GQA
group of 6, not a power of two), bf16, greedy decoding (or,
with ``--sample``, sampled: each side's own warpers and draw in its step) of
prompts that share a system prompt; with ``--logprobs K``, every path also keeps
each token's log-probability and the K most likely tokens' (the hf loop
computing them from its logits as kvpager does). Paths, on the same model and prompts:

- ``hf loop``: the model's forward with a DynamicCache in a plain decode loop
  (with the attention mask `generate` passes), warmed up and timed in the
  rounds as the kvpager paths are;
- ``hf generate``: transformers' ``generate`` (DynamicCache); with ``--static``
  also with its StaticCache (``cache_implementation="static"``: transformers
  then compiles the decode step; an untimed call compiles it first), timed
  once after the rounds;
- ``generate PagedCache``: the same ``generate`` on a `kvpager.hf.PagedCache`
  over a pool of its own (made and closed in each timed call), timed in the
  rounds beside it; the KV bytes of both are what their caches held at the end
  of the longer call (the pool's blocks in use, the prompt's shared blocks once);
  on a GPU also ``generate PagedCache graphs``, its decode passes replayed from
  CUDA graphs (``cuda_graphs``: a `kvpager.hf.CapturedSteps` kept across the
  calls, captured in the warm-up);
- ``kvpager eager``: `kvpager.hf.PagedGeneration`, one step plan per pass,
  pipelined (each pass launched before the last one's tokens reach the host:
  `kvpager.hf.pipeline`); with ``--sync`` also ``kvpager eager sync`` and
  ``kvpager graphs sync``, the loop that waits for each pass's tokens;
- ``kvpager graphs``: the same with the decode step captured in CUDA graphs;
  ``kvpager graphs plain``: the same without shared-prefix (cascade) attention,
  to show what the cascade brings to a captured step; with ``--compiled`` also
  ``kvpager graphs compiled``, the captured step compiled by ``torch.compile``
  first (`kvpager.hf.compiled`: the model's small kernels fused; its compile
  time is spent in the warm-up, before the rounds).

``generate``, the hf loop and the kvpager paths run in alternating rounds
(``--rounds`` of ``--steps`` steps each), since this kind of host's speed
drifts by tens of percent within minutes: a path's ms/step is the median of
its rounds, its ratios to the hf loop and to ``generate`` the medians of the
rounds' ratios (their ranges printed beside them). Per path: decode ms/step (wall: from one step's return to the
next's, the steady rate of a loop of steps), host ms/step (from the step's
start until its last kernel is queued: the forward call's return, or the graph
replay's), tokens/s of the decode steps, KV bytes held at the end, the
first decode tokens' agreement with the hf loop, and for the two ``generate``
rows the time to first token (a 1-token call: the prompt's pass; a
PagedCache finds the shared prompt cached by the calls before and runs the
rows' uncached tails alone). Then the fixed-memory case:
an 8 GiB KV budget (the 8b shape, or ``--budget-shape``), the largest batch each side fits (transformers pads a
batch to its longest prompt and keeps every request's cache contiguous;
kvpager stores the shared prompt once), and the tokens/s each reaches: one
whole generation each (prefill included), timed after a 2-token warm-up of
the same batch.

On the CPU (``--device cpu``: the model in float32, kvpager's pools on its
NumPy backend, the default where no GPU exists) the eager paths run, on the
``s`` shape (8 layers of width 512) or any other.

    python tools/bench_e2e.py [--shapes 1b,8b,mla] [--batches 64,256] [--json out.json]
    python tools/bench_e2e.py --device cpu --shapes s --batches 8,32 --shared 256 --own 32 --budget-gib 0
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time
from pathlib import Path

# The hf loop's DynamicCache grows beside generate's and the pools: fragmentation
# ran the 8b x256 case out of memory (24 GiB reserved but unallocated).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import e2e_paths  # noqa: E402

# the models (shapes) live in e2e_models; the other benchmarks import them from here, after this
# module set the allocator's configuration above
from e2e_models import SHAPES, add_model_arguments, make_model, model_from  # noqa: E402, F401
from e2e_paths import (  # noqa: E402
    HFLoop,
    HostClock,
    Paged,
    cache_argument,
    free_cache,
    generate_ms,
    summarize,
    sync,
)

import kvpager.hf.generation as khf  # noqa: E402
from kvpager import KVPool  # noqa: E402


def prompts(batch: int, shared: int, own: int | tuple[int, int], seed: int = 1) -> list[list[int]]:
    g = np.random.default_rng(seed)
    system = g.integers(3, 32000, shared).tolist()
    out = []
    for _ in range(batch):
        n = own if isinstance(own, int) else int(g.integers(own[0], own[1] + 1))
        out.append(system + g.integers(3, 32000, n).tolist())
    return out


def agreement(a: list[list[int]], b: list[list[int]], steps: int = 4) -> float:
    """Share of (sequence, step) tokens equal over the first ``steps`` decode steps."""
    x, y = np.array(a[:steps]), np.array(b[:steps])
    return float((x == y).mean())


def run_case(model, shape: str, batch: int, shared: int, own: int, steps: int, clock: HostClock,
             static: bool = False, rounds: int = 5, sync: bool = False, compiled: bool = False) -> list[dict]:
    """Every path on the same prompts. transformers' ``generate``, its plain decode loop
    and the kvpager paths run in ``rounds`` alternating rounds of ``steps`` decode steps
    each (this host's speed drifts by tens of percent within minutes): a path's ms/step
    is the median of its rounds, its ratios to the loop and to ``generate`` the medians
    of the rounds' ratios."""
    ps = prompts(batch, shared, own)
    ids = torch.tensor(ps, device=e2e_paths.DEVICE)
    bs, warm = 16, 2
    total = warm + 1 + rounds * (steps + 1) + 2
    blocks = batch * (-(-(own + total) // bs) + 1) + -(-shared // bs) + 64
    if khf.has_recurrent_layers(model):  # no prefix sharing: each sequence holds its system prompt
        blocks += batch * -(-shared // bs)
    loop = HFLoop(model, ps)
    # graphs (and the compiled step) need a GPU; a model with recurrent layers shares no prefix
    # (no cascade to leave out)
    gpu = e2e_paths.DEVICE == "cuda"
    recurrent = khf.has_recurrent_layers(model)
    kinds = [(False, None, True, False)]
    if gpu:
        kinds += [(True, None, True, False)] + ([] if recurrent else [(True, False, True, False)])
    if compiled and gpu:
        kinds.append((True, None, True, True))
    if sync:  # the same without pipelined steps
        kinds += [(False, None, False, False)] + ([(True, None, False, False)] if gpu else [])
    paths = [Paged(model, ps, total, graphs, clock, blocks, cascade, pipeline, compile)
             for graphs, cascade, pipeline, compile in kinds]
    # transformers' generate on a kvpager PagedCache: a pool of its own, the prefix of each call
    # found cached by the next (transformers still runs the whole prompt)
    cache_pool = KVPool(khf.spec_for_model(model, num_blocks=blocks, block_size=bs), device=e2e_paths.pool_device())
    # (on a GPU also with its decode passes replayed from CUDA graphs, kept across the calls)
    cache_steps = khf.CapturedSteps(model, cache_pool) if gpu else None
    try:
        generate_ms(model, ids, 1)  # warm-up
        generate_ms(model, ids, 1, pool=cache_pool)
        if cache_steps is not None:  # (captures its bucket)
            generate_ms(model, ids, steps, pool=cache_pool, graphs=cache_steps)
        loop.run(warm + 1, timed=False)
        for p in paths:
            p.run(warm, timed=False)  # the graph paths capture their buckets here
        gen_rounds, cache_rounds, gen_held, cache_held, gen_first, cache_first = [], [], [], [], [], []
        graph_rounds, graph_held = [], []
        for _ in range(rounds):
            gen_rounds.append(generate_ms(model, ids, steps, held=gen_held, first=gen_first))
            free_cache()
            cache_rounds.append(generate_ms(model, ids, steps, pool=cache_pool, held=cache_held, first=cache_first))
            if cache_steps is not None:
                graph_rounds.append(generate_ms(model, ids, steps, pool=cache_pool, held=graph_held,
                                                graphs=cache_steps))
            loop.run(steps + 1)
            for p in paths:
                p.run(steps)
        rows = [loop.row()]
        gen_row = summarize("hf generate", [], [], batch, gen_held[-1], None, gen_rounds)
        gen_row["first_ms"] = float(np.median(gen_first))
        rows.append(gen_row)
        rows.append(summarize("generate PagedCache", [], [], batch, cache_held[-1], None, cache_rounds))
        rows[-1]["first_ms"] = float(np.median(cache_first))
        if graph_rounds:
            rows.append(summarize("generate PagedCache graphs", [], [], batch, graph_held[-1], None, graph_rounds))
        if static:
            try:
                ms = generate_ms(model, ids, steps, cache="static")
                rows.append(summarize("hf generate static", [], [], batch, None, None, [ms]))
            except Exception as e:  # reported, not fatal: the static cache is optional in transformers
                print(f"hf generate static: {type(e).__name__}: {e}", flush=True)
            free_cache()
        paged_rows = [p.row() for p in paths]
    finally:
        loop.close()
        if cache_steps is not None:
            cache_steps.close()
        cache_pool.close()
        for p in paths:
            p.close()
    rows += paged_rows
    base_tokens, loop_rounds = rows[0]["tokens"], np.array(rows[0]["rounds"])
    for r in rows:
        r.update(shape=shape, batch=batch)
        rr = r.pop("rounds", None)
        if rr and len(rr) == len(gen_rounds):  # timed in the rounds: the rounds' ratios
            each, by_loop = np.array(gen_rounds) / np.array(rr), loop_rounds / np.array(rr)
            r["vs_generate"], r["vs_generate_range"] = float(np.median(each)), [float(each.min()), float(each.max())]
            r["ratio"], r["ratio_range"] = float(np.median(by_loop)), [float(by_loop.min()), float(by_loop.max())]
        else:
            r["vs_generate"], r["vs_generate_range"] = gen_row["ms_step"] / r["ms_step"], None
            r["ratio"], r["ratio_range"] = rows[0]["ms_step"] / r["ms_step"], None
        toks = r.pop("tokens", None)
        # (sampled: each side draws its own tokens, and only the prefill's first could agree)
        r["agree"] = agreement(base_tokens, toks) if toks and not e2e_paths.SAMPLING else None
    return rows


def hf_bytes_per_token(model, tokens: int = 16) -> int:
    """Bytes a token takes in transformers' DynamicCache for ``model``: a prefill of
    ``tokens`` tokens, its cache's tensors summed (K and V a head for the Llama shapes,
    as kvpager's pool; the compressed latent for latent attention)."""
    cache = transformers.DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.full((1, tokens), 5, device=e2e_paths.DEVICE), **cache_argument(model, cache), use_cache=True,
              logits_to_keep=1)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held // tokens


def budget_case(model, budget: int, shared: int, own: tuple[int, int], new: int, clock: HostClock,
                compiled: bool = False) -> list[dict]:
    """Largest batch within ``budget`` KV bytes on each side, and the tokens/s it reaches
    (transformers' bytes a token as its own cache holds them: `hf_bytes_per_token`)."""
    spec = khf.spec_for_model(model, num_blocks=2)
    hf_batch = budget // (hf_bytes_per_token(model) * (shared + own[1] + new))  # padded to the longest prompt
    shared_blocks = -(-shared // spec.block_size)
    worst = -(-(own[1] + new) // spec.block_size) + 1  # own tokens, new tokens, a copy of the shared tail
    num_blocks = budget // spec.bytes_per_block
    kv_batch = (num_blocks - 1 - shared_blocks) // worst
    out = []
    ps = prompts(hf_batch, shared, own, seed=7)
    ids_list = [[0] * (max(map(len, ps)) - len(p)) + p for p in ps]  # left padding
    ids = torch.tensor(ids_list, device=e2e_paths.DEVICE)
    mask = (torch.tensor([[0] * (len(ids_list[0]) - len(p)) + [1] * len(p) for p in ps], device=e2e_paths.DEVICE))
    with torch.inference_mode():
        for n in (2, new):  # warm-up at this batch's shapes first, as for every path below
            sync()
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           **e2e_paths.hf_sample_kwargs())
            sync()
            dt = time.perf_counter() - t0
    out.append(dict(path="hf generate", batch=int(hf_batch), tok_s=hf_batch * new / dt, seconds=dt))
    free_cache()
    ps = prompts(kv_batch, shared, own, seed=7)
    gpu = e2e_paths.DEVICE == "cuda"
    kinds = [(False, False)] + ([(True, False)] if gpu else []) + ([(True, True)] if compiled and gpu else [])
    for graphs, compile in kinds:
        # a warm-up of 2 new tokens first (kernels built; the compiled path compiles for this
        # batch's shapes, as a server does at start): the timed run still plans, prefills and captures
        for n in (2, new):
            pool = KVPool(spec.replace(num_blocks=num_blocks), device=e2e_paths.pool_device())
            try:
                sync()
                t0 = time.perf_counter()
                khf.generate(model, pool, ps, n, salt=f"budget{graphs}{compile}", eos_token_id=None,
                             cuda_graphs=graphs, compile=compile, sampling=e2e_paths.kvpager_sampling())
                sync()
                dt = time.perf_counter() - t0
            finally:
                pool.close()
        path = ("kvpager graphs" if graphs else "kvpager eager") + (" compiled" if compile else "")
        out.append(dict(path=path, batch=int(kv_batch), tok_s=kv_batch * new / dt, seconds=dt))
    for r in out:
        r["ratio"] = r["tok_s"] / out[0]["tok_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--shared", type=int, default=1024, help="system prompt tokens")
    ap.add_argument("--own", type=int, default=64, help="own prompt tokens per request")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per round")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating rounds of generate and the kvpager paths (ratios: median of the rounds')")
    ap.add_argument("--budget-gib", type=float, default=8.0, help="fixed-memory case; 0 skips it")
    ap.add_argument("--budget-shape", default="8b", help="the shape the fixed-memory case runs")
    ap.add_argument("--sync", action="store_true",
                    help="also run the kvpager eager and graph paths without pipelined steps")
    ap.add_argument("--compiled", action="store_true",
                    help="also capture the kvpager graphs compiled by torch.compile (compiles each shape first)")
    ap.add_argument("--static", action="store_true",
                    help="also generate with transformers' StaticCache (it compiles the model first, untimed)")
    ap.add_argument("--cudnn-sdp", action="store_true",
                    help="leave torch's cuDNN attention on for transformers (it builds a plan per new length)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the model in float32 on the CPU and kvpager's NumPy pools, eager paths only "
                         "(with --shapes s --budget-gib 0, say)")
    ap.add_argument("--sample", metavar="temperature=0.7,top_p=0.9,...",
                    help="sampled decoding on every path (temperature, top_k, top_p, min_p, repetition_penalty); "
                         "default greedy")
    ap.add_argument("--logprobs", type=int, metavar="K",
                    help="every path keeps each token's log-probability and the K most likely tokens' "
                         "(0: the token's alone); default none")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: pass --device cpu (the NumPy backend's pools, float32 models)")
    e2e_paths.DEVICE = args.device
    e2e_paths.LOGPROBS = args.logprobs
    if args.sample:
        kinds = dict(temperature=float, top_k=int, top_p=float, min_p=float, repetition_penalty=float)
        pairs = [kv.split("=", 1) for kv in args.sample.split(",") if kv]
        if any(len(kv) != 2 or kv[0] not in kinds for kv in pairs):
            ap.error(f"--sample takes name=value pairs of {', '.join(kinds)}, got {args.sample!r}")
        e2e_paths.SAMPLING = {k: kinds[k](v) for k, v in pairs}
    if args.device == "cuda" and not args.cudnn_sdp:
        # torch's cuDNN SDPA builds an execution plan the first time it meets a shape: on an
        # H200 (torch 2.11) transformers' generate took 64-65 ms a step at lengths it had not
        # seen and 10-11 at lengths it had (1b x64), 15-16 with cuDNN attention off.
        # generate's rounds replay the same lengths and the hf loop always meets new
        # ones, so with it on the two baselines would not be comparable.
        torch.backends.cuda.enable_cudnn_sdp(False)
    clock = HostClock()
    card = e2e_paths.card(args.device)
    rows, budget_rows = [], []
    for shape in args.shapes.split(","):
        model = make_model(shape)
        for batch in [int(b) for b in args.batches.split(",") if b]:  # none: the fixed-memory case alone
            for r in run_case(model, shape, batch, args.shared, args.own, args.steps, clock, args.static,
                              args.rounds, args.sync, args.compiled):
                rows.append(r)
                print(f"{shape} x{batch:<4} {r['path']:<20} {r['ms_step']:8.2f} ms/step  host "
                      f"{r['host_ms'] if r['host_ms'] is not None else float('nan'):7.2f} ms  "
                      f"{r['tok_s']:9.0f} tok/s  {r['ratio']:5.2f}x  KV "
                      f"{(r['kv_bytes'] or 0) / 2**30:6.2f} GiB  agree {r['agree']}", flush=True)
            # the closed paths' graphs and states sit in reference cycles: collected here, not at
            # the next case's largest allocation (transformers' prefill of q35 x256 ran out of
            # memory beside batch 64's)
            gc.collect()
            free_cache()
        if shape == args.budget_shape and args.budget_gib:
            budget_rows = budget_case(model, int(args.budget_gib * 2**30), args.shared, (64, 256), 128, clock,
                                      args.compiled)
            for r in budget_rows:
                print(f"budget {args.budget_gib:g} GiB {r['path']:<15} batch {r['batch']:4d} "
                      f"{r['tok_s']:9.0f} tok/s  {r['ratio']:5.2f}x", flush=True)
        del model
        gc.collect()
        free_cache()
    print(f"\n{card}, {datetime.date.today()}, transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{'shape':<5} {'batch':>5} {'path':<20} {'ms/step':>8} {'host ms':>8} {'tok/s':>8} {'vs loop':>8} "
          f"{'(rounds)':>12} {'vs generate':>11} {'(rounds)':>12} {'KV GiB':>7} {'1st token ms':>12}")
    for r in rows:
        host = f"{r['host_ms']:.2f}" if r["host_ms"] is not None else "-"
        kv = f"{r['kv_bytes'] / 2**30:.2f}" if r["kv_bytes"] else "-"
        rng = "{:.2f}-{:.2f}".format(*r["vs_generate_range"]) if r.get("vs_generate_range") else "-"
        lrng = "{:.2f}-{:.2f}".format(*r["ratio_range"]) if r.get("ratio_range") else "-"
        first = f"{r['first_ms']:.1f}" if r.get("first_ms") is not None else "-"
        print(f"{r['shape']:<5} {r['batch']:>5} {r['path']:<20} {r['ms_step']:8.2f} {host:>8} {r['tok_s']:8.0f} "
              f"{r['ratio']:7.2f}x {lrng:>12} {r['vs_generate']:10.2f}x {rng:>12} {kv:>7} {first:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card, rows=rows, budget=budget_rows), indent=1))


if __name__ == "__main__":
    main()
