"""A model on kvpager against the same model on transformers' own cache, in one process (GPU).

Random-weight Llama-shaped models (Llama-3.2-1B: 16 layers, 32 q / 8 kv heads,
head dim 64; Llama-3-8B: 32 layers, head dim 128), bf16, greedy decoding of
prompts that share a system prompt. Paths, on the same model and prompts:

- ``hf loop``: the model's forward with a DynamicCache in a plain decode loop
  (with the attention mask `generate` passes), warmed up and timed in the
  rounds as the kvpager paths are;
- ``hf generate``: transformers' ``generate`` (DynamicCache); with ``--static``
  also with its StaticCache (``cache_implementation="static"``: transformers
  then compiles the model, whose compile time the timed steps include);
- ``kvpager eager``: `kvpager.hf.PagedGeneration`, one step plan per pass,
  pipelined (each pass launched before the last one's tokens reach the host:
  `kvpager.hf.pipeline`); with ``--sync`` also ``kvpager eager sync`` and
  ``kvpager graphs sync``, the loop that waits for each pass's tokens;
- ``kvpager graphs``: the same with the decode step captured in CUDA graphs;
  ``kvpager graphs plain``: the same without shared-prefix (cascade) attention,
  to show what the cascade brings to a captured step.

``generate``, the hf loop and the kvpager paths run in alternating rounds
(``--rounds`` of ``--steps`` steps each), since this kind of host's speed
drifts by tens of percent within minutes: a path's ms/step is the median of
its rounds, its ratios to the hf loop and to ``generate`` the medians of the
rounds' ratios (their ranges printed beside them). Per path: decode ms/step (wall: from one step's return to the
next's, the steady rate of a loop of steps), host ms/step (from the step's
start until its last kernel is queued: the forward call's return, or the graph
replay's), tokens/s of the decode steps, KV bytes held at the end, and the
first decode tokens' agreement with the hf loop. Then the fixed-memory case:
an 8 GiB KV budget, the largest batch each side fits (transformers pads a
batch to its longest prompt and keeps every request's cache contiguous;
kvpager stores the shared prompt once), and the tokens/s each reaches.

    python tools/bench_e2e.py [--shapes 1b,8b] [--batches 64,256] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import inspect
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

import kvpager.hf.generation as khf  # noqa: E402
from kvpager import KVPool  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256),
}


def make_model(shape: str) -> torch.nn.Module:
    config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0,
                                      initializer_range=0.02, bos_token_id=1, eos_token_id=None,
                                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompts(batch: int, shared: int, own: int | tuple[int, int], seed: int = 1) -> list[list[int]]:
    g = np.random.default_rng(seed)
    system = g.integers(3, 32000, shared).tolist()
    out = []
    for _ in range(batch):
        n = own if isinstance(own, int) else int(g.integers(own[0], own[1] + 1))
        out.append(system + g.integers(3, 32000, n).tolist())
    return out


class HostClock:
    """Marks when a step's last kernel is queued: wraps the forward of the paged
    paths and the graph replay, and the hf loop times its forward call itself."""

    def __init__(self) -> None:
        self.mark = 0.0
        fwd, replay = khf.paged_forward, torch.cuda.CUDAGraph.replay

        def timed_forward(*a, **k):
            r = fwd(*a, **k)
            self.mark = time.perf_counter()
            return r

        def timed_replay(g):
            replay(g)
            self.mark = time.perf_counter()

        khf.paged_forward = timed_forward  # DecodeGraphs imports it from there at capture
        torch.cuda.CUDAGraph.replay = timed_replay


def cache_argument(model, cache) -> dict:
    """The forward's cache keyword: ``cache`` where transformers names it so (5.x,
    which deprecates ``past_key_values``), else ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


class Timed:
    """What a path kept live across the rounds records: its steps' wall and host
    times, per round (the rounds that are timed)."""

    batch: int
    tokens: list[list[int]]

    def __init__(self) -> None:
        self.wall: list[list[float]] = []  # per round
        self.host: list[list[float]] = []

    def keep(self, wall: list[float], host: list[float], timed: bool) -> None:
        if timed:
            self.wall.append(wall)
            self.host.append(host)

    def round_ms(self) -> list[float]:
        return [float(np.median(w)) * 1e3 for w in self.wall]

    def summary(self, label: str, kv: int) -> dict:
        return summarize(label, sum(self.wall, []), sum(self.host, []), self.batch, kv, self.tokens,
                         self.round_ms())


class HFLoop(Timed):
    """transformers' own decode loop, kept live across the rounds as the kvpager
    paths are: the model's forward on a DynamicCache, with the 2-D attention mask
    `generate` passes (grown by a column a step). Its forward is slow the first
    times it meets a shape (batch, length) in a process (1b shape, batch 64, H200:
    51-72 ms a step in a loop's first run, 13.7-13.9 in the same loop's second,
    2026-11-30), so its warm-up steps are untimed as theirs are."""

    def __init__(self, model, ps: list[list[int]]) -> None:
        super().__init__()
        self.model, self.batch = model, len(ps)
        ids = torch.tensor(ps, device="cuda")
        self.cache = transformers.DynamicCache()
        self.kv = cache_argument(model, self.cache)
        self.mask = torch.ones_like(ids)
        self.column = torch.ones_like(ids[:, :1])
        self.length = ids.shape[1]
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=self.mask, **self.kv, use_cache=True, logits_to_keep=1)
        self.nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        self.tokens = [self.nxt[:, 0].tolist()]

    def run(self, steps: int, timed: bool = True) -> None:
        """``steps`` decode steps, each timed from its start to its tokens on the host."""
        wall, host = [], []
        with torch.inference_mode():
            for _ in range(steps):
                pos = torch.tensor([self.length], device="cuda")
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                self.mask = torch.cat([self.mask, self.column], dim=1)
                out = self.model(input_ids=self.nxt, attention_mask=self.mask, **self.kv, use_cache=True,
                                 cache_position=pos, position_ids=pos.expand(self.batch, 1))
                t1 = time.perf_counter()
                self.nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                self.tokens.append(self.nxt[:, 0].tolist())
                wall.append(time.perf_counter() - t0)
                host.append(t1 - t0)
                self.length += 1
        self.keep(wall, host, timed)

    def row(self) -> dict:
        kv = sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))
        return self.summary("hf loop", kv)

    def close(self) -> None:
        self.cache = self.kv = None


def generate_ms(model, ids: torch.Tensor, steps: int, cache: str | None = None) -> float:
    """ms per decode step of transformers' ``generate``: the time of ``steps`` + 1 new tokens
    less that of 1 (the prefill's share cancels out); ``cache="static"``: its StaticCache."""
    kw = dict(do_sample=False, cache_implementation=cache) if cache else dict(do_sample=False)
    times = []
    with torch.inference_mode():
        for n in (1, steps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / steps * 1e3


class Paged(Timed):
    """A kvpager path kept live across the rounds: `kvpager.hf.PagedGeneration` on a pool of its own."""

    def __init__(self, model, ps: list[list[int]], total_steps: int, graphs: bool, clock: HostClock,
                 num_blocks: int, cascade: bool | None = None, pipeline: bool = True) -> None:
        super().__init__()
        self.spec = khf.spec_for_model(model, num_blocks=num_blocks)
        self.pool = KVPool(self.spec, device="cuda:0")
        self.gen = khf.PagedGeneration(model, self.pool, ps, total_steps, salt="bench", cuda_graphs=graphs,
                                       cascade=cascade, pipeline=pipeline)
        self.clock, self.batch = clock, len(ps)
        self.label = (("kvpager graphs" if graphs else "kvpager eager") + (" plain" if cascade is False else "")
                      + ("" if pipeline else " sync"))

    @property
    def tokens(self) -> list[list[int]]:
        """Each step's tokens (the prefill's first), as the hf loop lists them."""
        outs = self.gen.outputs
        return [[o[k] for o in outs] for k in range(min(map(len, outs)))]

    def run(self, steps: int, timed: bool = True) -> None:
        """``steps`` decode steps after one untimed one; a step's time runs from the
        last one's return to its own (a pipelined step returns once the pass
        before it has completed and the next one is queued: its steady rate)."""
        self.gen.step()
        wall, host = [], []
        last = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            self.gen.step()
            t1 = time.perf_counter()
            wall.append(t1 - last)
            host.append(self.clock.mark - t0)
            last = t1
        self.keep(wall, host, timed)

    def row(self) -> dict:
        return self.summary(self.label, self.pool.stats().used_blocks * self.spec.bytes_per_block)

    def close(self) -> None:
        self.gen.close()
        self.pool.close()


def summarize(path: str, wall: list[float], host: list[float], batch: int, kv: int | None,
              tokens: list[list[int]] | None, rounds: list[float] | None = None) -> dict:
    """A path's row; ``rounds``: its ms/step in each round (the step time is then their median)."""
    ms = float(np.median(rounds)) if rounds else float(np.median(wall)) * 1e3
    return dict(path=path, ms_step=ms, host_ms=float(np.median(host)) * 1e3 if host else None,
                tok_s=batch / ms * 1e3, kv_bytes=kv, tokens=tokens, rounds=rounds)


def agreement(a: list[list[int]], b: list[list[int]], steps: int = 4) -> float:
    """Share of (sequence, step) tokens equal over the first ``steps`` decode steps."""
    x, y = np.array(a[:steps]), np.array(b[:steps])
    return float((x == y).mean())


def run_case(model, shape: str, batch: int, shared: int, own: int, steps: int, clock: HostClock,
             static: bool = False, rounds: int = 5, sync: bool = False) -> list[dict]:
    """Every path on the same prompts. transformers' ``generate``, its plain decode loop
    and the kvpager paths run in ``rounds`` alternating rounds of ``steps`` decode steps
    each (this host's speed drifts by tens of percent within minutes): a path's ms/step
    is the median of its rounds, its ratios to the loop and to ``generate`` the medians
    of the rounds' ratios."""
    ps = prompts(batch, shared, own)
    ids = torch.tensor(ps, device="cuda")
    bs, warm = 16, 2
    total = warm + 1 + rounds * (steps + 1) + 2
    blocks = batch * (-(-(own + total) // bs) + 1) + -(-shared // bs) + 64
    loop = HFLoop(model, ps)
    kinds = [(False, None, True), (True, None, True), (True, False, True)]
    if sync:  # the same without pipelined steps
        kinds += [(False, None, False), (True, None, False)]
    paths = [Paged(model, ps, total, graphs, clock, blocks, cascade, pipeline)
             for graphs, cascade, pipeline in kinds]
    try:
        generate_ms(model, ids, 1)  # warm-up
        loop.run(warm + 1, timed=False)
        for p in paths:
            p.run(warm, timed=False)  # the graph paths capture their buckets here
        gen_rounds = []
        for _ in range(rounds):
            gen_rounds.append(generate_ms(model, ids, steps))
            torch.cuda.empty_cache()
            loop.run(steps + 1)
            for p in paths:
                p.run(steps)
        rows = [loop.row()]
        gen_row = summarize("hf generate", [], [], batch, None, None, gen_rounds)
        rows.append(gen_row)
        if static:
            try:
                ms = generate_ms(model, ids, steps, cache="static")
                rows.append(summarize("hf generate static", [], [], batch, None, None, [ms]))
            except Exception as e:  # reported, not fatal: the static cache is optional in transformers
                print(f"hf generate static: {type(e).__name__}: {e}", flush=True)
            torch.cuda.empty_cache()
        paged_rows = [p.row() for p in paths]
    finally:
        loop.close()
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
        r["agree"] = agreement(base_tokens, toks) if toks else None
    return rows


def budget_case(model, budget: int, shared: int, own: tuple[int, int], new: int, clock: HostClock) -> list[dict]:
    """Largest batch within ``budget`` KV bytes on each side, and the tokens/s it reaches."""
    spec = khf.spec_for_model(model, num_blocks=2)
    per_token = spec.bytes_per_token
    hf_batch = budget // (per_token * (shared + own[1] + new))  # padded to the longest prompt
    shared_blocks = -(-shared // spec.block_size)
    worst = -(-(own[1] + new) // spec.block_size) + 1  # own tokens, new tokens, a copy of the shared tail
    num_blocks = budget // spec.bytes_per_block
    kv_batch = (num_blocks - 1 - shared_blocks) // worst
    out = []
    ps = prompts(hf_batch, shared, own, seed=7)
    ids_list = [[0] * (max(map(len, ps)) - len(p)) + p for p in ps]  # left padding
    ids = torch.tensor(ids_list, device="cuda")
    mask = (torch.tensor([[0] * (len(ids_list[0]) - len(p)) + [1] * len(p) for p in ps], device="cuda"))
    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    out.append(dict(path="hf generate", batch=int(hf_batch), tok_s=hf_batch * new / dt, seconds=dt))
    torch.cuda.empty_cache()
    ps = prompts(kv_batch, shared, own, seed=7)
    for graphs in (False, True):
        pool = KVPool(spec.replace(num_blocks=num_blocks), device="cuda:0")
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            khf.generate(model, pool, ps, new, salt=f"budget{graphs}", eos_token_id=None, cuda_graphs=graphs)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        finally:
            pool.close()
        out.append(dict(path="kvpager graphs" if graphs else "kvpager eager", batch=int(kv_batch),
                        tok_s=kv_batch * new / dt, seconds=dt))
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
    ap.add_argument("--budget-gib", type=float, default=8.0, help="fixed-memory case (8b shape); 0 skips it")
    ap.add_argument("--sync", action="store_true",
                    help="also run the kvpager eager and graph paths without pipelined steps")
    ap.add_argument("--static", action="store_true",
                    help="also generate with transformers' StaticCache (it compiles the model first: minutes)")
    ap.add_argument("--cudnn-sdp", action="store_true",
                    help="leave torch's cuDNN attention on for transformers (it builds a plan per new length)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    if not args.cudnn_sdp:
        # torch's cuDNN SDPA builds an execution plan the first time it meets a shape: on an
        # H200 (torch 2.11) transformers' generate took 64-65 ms a step at lengths it had not
        # seen and 10-11 at lengths it had (1b x64), 15-16 with cuDNN attention off.
        # generate's rounds replay the same lengths and the hf loop always meets new
        # ones, so with it on the two baselines would not be comparable.
        torch.backends.cuda.enable_cudnn_sdp(False)
    clock = HostClock()
    card = torch.cuda.get_device_name()
    rows, budget_rows = [], []
    for shape in args.shapes.split(","):
        model = make_model(shape)
        for batch in map(int, args.batches.split(",")):
            for r in run_case(model, shape, batch, args.shared, args.own, args.steps, clock, args.static,
                              args.rounds, args.sync):
                rows.append(r)
                print(f"{shape} x{batch:<4} {r['path']:<20} {r['ms_step']:8.2f} ms/step  host "
                      f"{r['host_ms'] if r['host_ms'] is not None else float('nan'):7.2f} ms  "
                      f"{r['tok_s']:9.0f} tok/s  {r['ratio']:5.2f}x  KV "
                      f"{(r['kv_bytes'] or 0) / 2**30:6.2f} GiB  agree {r['agree']}", flush=True)
            torch.cuda.empty_cache()
        if shape == "8b" and args.budget_gib:
            budget_rows = budget_case(model, int(args.budget_gib * 2**30), args.shared, (64, 256), 128, clock)
            for r in budget_rows:
                print(f"budget {args.budget_gib:g} GiB {r['path']:<15} batch {r['batch']:4d} "
                      f"{r['tok_s']:9.0f} tok/s  {r['ratio']:5.2f}x", flush=True)
        del model
        torch.cuda.empty_cache()
    print(f"\n{card}, {datetime.date.today()}, transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"{'shape':<5} {'batch':>5} {'path':<20} {'ms/step':>8} {'host ms':>8} {'tok/s':>8} {'vs loop':>8} "
          f"{'(rounds)':>12} {'vs generate':>11} {'(rounds)':>12} {'KV GiB':>7}")
    for r in rows:
        host = f"{r['host_ms']:.2f}" if r["host_ms"] is not None else "-"
        kv = f"{r['kv_bytes'] / 2**30:.2f}" if r["kv_bytes"] else "-"
        rng = "{:.2f}-{:.2f}".format(*r["vs_generate_range"]) if r.get("vs_generate_range") else "-"
        lrng = "{:.2f}-{:.2f}".format(*r["ratio_range"]) if r.get("ratio_range") else "-"
        print(f"{r['shape']:<5} {r['batch']:>5} {r['path']:<20} {r['ms_step']:8.2f} {host:>8} {r['tok_s']:8.0f} "
              f"{r['ratio']:7.2f}x {lrng:>12} {r['vs_generate']:10.2f}x {rng:>12} {kv:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card, rows=rows, budget=budget_rows), indent=1))


if __name__ == "__main__":
    main()
