"""The decode paths `bench_e2e.py` times in its alternating rounds, each kept
live across them: transformers' own loop (`HFLoop`), a kvpager generation
(`Paged`, eager or captured), transformers' ``generate`` (`generate_ms`), what
each records per round (`Timed`, `summarize`) and the mark of a step's last
queued kernel (`HostClock`)."""

from __future__ import annotations

import inspect
import os
import time

import numpy as np
import torch
import transformers

import kvpager.hf.generation as khf
from kvpager import KVPool
from kvpager.hf.recurrent import Recurrent

#: where the models, inputs and pools live: "cuda" (the default), or "cpu" (`bench_e2e.py --device cpu`:
#: the NumPy backend's pools, eager paths only)
DEVICE = "cuda"
#: sampled decoding on every path (`bench_e2e.py --sample`: temperature, top_k, top_p, min_p,
#: repetition_penalty), or
#: None: greedy. transformers' paths apply its own warpers and draw with ``torch.multinomial``, as
#: its ``generate`` does with ``do_sample=True``; kvpager's take it as a `kvpager.hf.Sampling`
SAMPLING: dict | None = None
#: keep each token's log-probability and this many top ones at its position on every path
#: (`bench_e2e.py --logprobs`), or None: none. The hf loop computes them as kvpager does (the
#: log-softmax of the pass's logits in float32, a gather and a top-k), copied to the host each step
LOGPROBS: int | None = None


def hf_sample_kwargs() -> dict:
    """``generate``'s keyword arguments for `SAMPLING` (greedy: ``do_sample=False``)."""
    return dict(do_sample=True, **SAMPLING) if SAMPLING else dict(do_sample=False)


def hf_next(logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' next tokens [batch, 1] from a pass's last logits [batch, vocab]: greedy, or
    its warpers in its ``generate``'s order and a multinomial draw (`SAMPLING`); a
    ``repetition_penalty`` there applies its processor first over ``seen`` [batch, tokens so far]."""
    from transformers.generation import logits_process as lp

    s = SAMPLING or {}
    scores = logits
    if s.get("repetition_penalty", 1.0) != 1.0:
        scores = lp.RepetitionPenaltyLogitsProcessor(s["repetition_penalty"])(seen, logits.float())
    if not s.get("temperature", 1.0) or s.get("top_k") == 1 or not SAMPLING:
        return scores.argmax(-1, keepdim=True)
    warpers = [lp.TemperatureLogitsWarper(s.get("temperature", 1.0))]
    if s.get("top_k"):
        warpers.append(lp.TopKLogitsWarper(s["top_k"]))
    if s.get("top_p", 1.0) < 1.0:
        warpers.append(lp.TopPLogitsWarper(s["top_p"]))
    if s.get("min_p"):
        warpers.append(lp.MinPLogitsWarper(s["min_p"]))
    scores = lp.LogitsProcessorList(warpers)(None, scores.float())
    return torch.multinomial(scores.softmax(-1), num_samples=1)


def hf_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> list | None:
    """The hf loop's log-probabilities of ``tokens`` [batch, 1] under ``logits`` [batch, vocab]
    (and the `LOGPROBS` top ones), on the host; None where `LOGPROBS` is None."""
    if LOGPROBS is None:
        return None
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens)
    if not LOGPROBS:
        return chosen.tolist()
    best, ids = torch.topk(lp, LOGPROBS, dim=-1)
    return torch.cat([chosen.double(), best.double(), ids.double()], dim=1).tolist()


def kvpager_sampling():
    """`SAMPLING` as kvpager takes it (None: greedy)."""
    from kvpager.hf import Sampling

    return Sampling(**SAMPLING) if SAMPLING else None


def card(device: str) -> str:
    """The machine a table's figures come from: the GPU's name, or the CPU's cores and torch threads."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def sync() -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_cache() -> None:
    """Give the device's cached free memory back (the CUDA caching allocator's; none on the CPU)."""
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def pool_device() -> str:
    return "cuda:0" if DEVICE == "cuda" else "cpu"


class HostClock:
    """Marks when a step's last kernel is queued: wraps the forward of the paged
    paths and the graph replay, and the hf loop times its forward call itself."""

    def __init__(self) -> None:
        self.mark = 0.0
        fwd, replay = khf.paged_forward, getattr(getattr(torch.cuda, "CUDAGraph", None), "replay", None)

        def timed_forward(*a, **k):
            r = fwd(*a, **k)
            self.mark = time.perf_counter()
            return r

        def timed_replay(g):
            replay(g)
            self.mark = time.perf_counter()

        khf.paged_forward = timed_forward  # DecodeGraphs imports it from there at capture
        decode = Recurrent.decode  # a model with recurrent layers: its decode passes

        def timed_decode(rec, *a, **k):
            r = decode(rec, *a, **k)
            self.mark = time.perf_counter()
            return r

        Recurrent.decode = timed_decode
        if replay is not None:
            torch.cuda.CUDAGraph.replay = timed_replay


def cache_argument(model, cache) -> dict:
    """The forward's cache keyword: ``cache`` where transformers names it so (5.x,
    which deprecates ``past_key_values``), else ``past_key_values``."""
    params = inspect.signature(type(model).forward).parameters  # (the class's: a PagedCache takes the instance's)
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
        ids = torch.tensor(ps, device=DEVICE)
        self.cache = transformers.DynamicCache(config=model.config)  # (recurrent layers: their own kind)
        self.kv = cache_argument(model, self.cache)
        self.mask = torch.ones_like(ids)
        self.column = torch.ones_like(ids[:, :1])
        self.length = ids.shape[1]
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=self.mask, **self.kv, use_cache=True, logits_to_keep=1)
        self.seen = ids  # every token so far (a repetition penalty's)
        self.nxt = hf_next(out.logits[:, -1], self.seen)
        self.seen = torch.cat([self.seen, self.nxt], dim=1)
        self.tokens = [self.nxt[:, 0].tolist()]
        self.logprobs = [hf_logprobs(out.logits[:, -1], self.nxt)]

    def run(self, steps: int, timed: bool = True) -> None:
        """``steps`` decode steps, each timed from its start to its tokens on the host."""
        wall, host = [], []
        with torch.inference_mode():
            for _ in range(steps):
                pos = torch.tensor([self.length], device=DEVICE)
                sync()
                t0 = time.perf_counter()
                self.mask = torch.cat([self.mask, self.column], dim=1)
                out = self.model(input_ids=self.nxt, attention_mask=self.mask, **self.kv, use_cache=True,
                                 cache_position=pos, position_ids=pos.expand(self.batch, 1))
                t1 = time.perf_counter()
                self.nxt = hf_next(out.logits[:, -1], self.seen)
                self.seen = torch.cat([self.seen, self.nxt], dim=1)
                self.tokens.append(self.nxt[:, 0].tolist())
                self.logprobs.append(hf_logprobs(out.logits[:, -1], self.nxt))
                wall.append(time.perf_counter() - t0)
                host.append(t1 - t0)
                self.length += 1
        self.keep(wall, host, timed)

    def row(self) -> dict:
        return self.summary("hf loop", cache_bytes(self.cache))

    def close(self) -> None:
        self.cache = self.kv = None


def generate_ms(model, ids: torch.Tensor, steps: int, cache: str | None = None, pool=None,
                held: list | None = None, first: list | None = None, graphs=False) -> float:
    """ms per decode step of transformers' ``generate``: the time of ``steps`` + 1 new tokens
    less that of 1 (the prefill's share cancels out; the faster of a 1-token call before
    and one after it, so one stalled call does not take the rate below zero); ``cache="static"``: its StaticCache,
    with which transformers compiles the decode step: two untimed calls of ``steps`` + 1
    tokens first compile it and let any CUDA graphs of the compiled step be recorded (the
    cache keeps that length for the calls after them); ``pool``: a `kvpager.hf.PagedCache`
    over it a call (made and closed inside the timed call; ``graphs``: its ``cuda_graphs``). ``held``: gets the KV bytes the
    longer call's cache held at its end (its tensors; a PagedCache's pool blocks in use).
    ``first``: gets the ms of the faster 1-token call (the prompt's pass and its first token: the
    time to first token; on a PagedCache, its prompts found cached by the calls before)."""
    from kvpager.hf import PagedCache

    kw = dict(hf_sample_kwargs(), cache_implementation=cache) if cache else hf_sample_kwargs()
    kw["return_dict_in_generate"] = True
    times = []
    with torch.inference_mode():
        for _ in range(2 if cache else 0):
            model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
        for n in (1, steps + 1, 1):  # (the 1-token call on either side: the faster is the baseline)
            sync()
            t0 = time.perf_counter()
            if pool is None:
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                kv = cache_bytes(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
            else:
                with PagedCache(model, pool, cuda_graphs=graphs) as paged:
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **cache_argument(model, paged), **kw)
                    kv = pool.stats().used_blocks * pool.spec.bytes_per_block
            sync()
            times.append(time.perf_counter() - t0)
    if held is not None:
        held.append(kv)
    # One slow 1-token call (a host stall, a collection) subtracted from the longer call's time made
    # the rate small or negative (1.47 ms a step, ratios of -4x, on an H100): the faster of two
    base = min(times[0], times[2])
    if first is not None:
        first.append(base * 1e3)
    return (times[1] - base) / steps * 1e3


def cache_bytes(cache) -> int | None:
    """The bytes of a transformers cache's K/V tensors (None: no cache)."""
    if cache is None or not hasattr(cache, "layers"):
        return None
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)


class Paged(Timed):
    """A kvpager path kept live across the rounds: `kvpager.hf.PagedGeneration` on a pool of its own."""

    def __init__(self, model, ps: list[list[int]], total_steps: int, graphs: bool, clock: HostClock,
                 num_blocks: int, cascade: bool | None = None, pipeline: bool = True, compile: bool = False) -> None:
        super().__init__()
        self.spec = khf.spec_for_model(model, num_blocks=num_blocks)
        self.pool = KVPool(self.spec, device=pool_device())
        self.gen = khf.PagedGeneration(model, self.pool, ps, total_steps, salt="bench", cuda_graphs=graphs,
                                       cascade=cascade, pipeline=pipeline, compile=compile,
                                       sampling=kvpager_sampling(), logprobs=LOGPROBS)
        self.clock, self.batch = clock, len(ps)
        self.label = (("kvpager graphs" if graphs else "kvpager eager") + (" plain" if cascade is False else "")
                      + ("" if pipeline else " sync") + (" compiled" if compile else ""))

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
