"""Time to first token: a model's prefill on kvpager against the same model on transformers' own cache, in one process.

`bench_e2e.py`'s random-weight models (the Llama-3-8B shape by default, bf16), each
case a batch of prompts prefilled in one forward pass up to its first new tokens:

- ``cold``: B distinct prompts of L tokens, nothing cached. kvpager: a
  `kvpager.hf.PagedGeneration` of one new token (allocation, step plan, the
  model's forward on kvpager's attention, the first tokens on the host);
  transformers: the model's forward on a new DynamicCache (SDPA), logits of
  the last position only, the first tokens on the host.
- ``warm``: B requests of one S-token system prompt and Q tokens of their own,
  the system prompt already cached. kvpager: its prefix cache holds the system
  prompt (a generation before the rounds published it), so the pass computes
  the Q own tokens, attending over the cached S (the multi-token kernel on a
  cached prefix); transformers: a DynamicCache of the system prompt prefilled
  once, copied for the batch in the timed region (`batch_repeat_interleave`),
  then the Q own tokens (``hf, prefix reused``), and the whole prompt computed
  again (``hf, recomputed``: what `generate` does). A model with recurrent
  layers (``--shape q35s``): kvpager resumes from the state it holds where the
  system prompt's blocks end (its first request publishes them, its second,
  the untimed round, holds the state), transformers' copy carries the
  recurrent layers' states at the system prompt's end as well.
- ``turn``: a conversation's next turn. B first turns of S tokens each were
  answered with Q tokens (untimed, before each round); the next turn is the
  first, its answer and Q new tokens. kvpager: its prefix cache holds the first
  turn and its answer; a model with recurrent layers resumes from the state it
  held where the answer ended (its last block boundary), and ``kvpager, end
  states not held`` (`StateCache.hold_ends` off for its first turns) shows the
  path before that: the answer run again from the state held at the first
  turn's cached blocks. transformers: the cache its first turn left (a copy,
  made untimed), continued with the answer's last token and the new ones
  (``hf, cache continued``), and the whole turn computed again.
- ``turns``: as ``turn``, each next turn with a new message of its own length
  (B lengths evenly from Q/2 to 3Q/2), the first turns answered with 32 tokens.
  kvpager resumes the batch as ``turn`` does; a model with recurrent layers runs
  it in parts of lengths its rows share (`kvpager.hf.pass_schedule`), and
  ``kvpager, a pass per length`` is the way before it (the same code with a
  pass per distinct length). transformers cannot continue a batch of caches
  with new tokens of distinct lengths in one forward (its padding would sit
  between the cache and the new tokens): ``hf, caches continued one at a
  time`` runs a forward per conversation on its own cache, ``hf, recomputed``
  the whole turns left-padded.
- ``mixed``: B distinct prompts of B different lengths, evenly from L/2 to
  3L/2 (L the case's own tokens), nothing cached. kvpager: one generation of
  one new token, as ``cold``; transformers: the batch left-padded to the
  longest with its attention mask (what its ``generate`` does with a
  tokenizer's padded batch), one forward. A model with recurrent layers
  prefills them left-padded in one pass on a GPU, in parts on the CPU
  (`kvpager.hf.recurrent`).

``--device cpu`` runs the NumPy backend's pools (float32 models) on smaller
cases (`CPU_CASES`).

Paths take turns in ``--rounds`` rounds (this kind of host's speed drifts); a
path's time is the median of its rounds, its ratio the median of the rounds'
ratios (above 1.0x: kvpager is faster). Each round's requests are new (other
own tokens, another salt for the cold prompts), so nothing of a round is cached
for the next. Tokens/s counts the tokens each pass computes; the first tokens
of kvpager and transformers are compared.

    python tools/bench_prefill.py [--shape 8b] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import e2e_paths  # noqa: E402
from bench_e2e import make_model  # noqa: E402
from e2e_paths import cache_argument  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402

import kvpager.hf.generation as khf  # noqa: E402
from kvpager.hf.state_cache import StateCache  # noqa: E402

try:  # (transformers before 5.24 has no recurrent layers' cache: no such models to run)
    from transformers.cache_utils import LinearAttentionCacheLayerMixin as LinearAttention  # noqa: E402
except ImportError:
    LinearAttention = None
from kvpager import KVPool  # noqa: E402

#: (case, batch, cached system prompt tokens, new tokens per request)
CASES = [("cold", 1, 0, 8192), ("cold", 8, 0, 2048), ("cold", 32, 0, 512),
         ("warm", 32, 4096, 256), ("warm", 8, 8192, 1024), ("turn", 8, 2048, 256), ("mixed", 32, 0, 512),
         ("turns", 32, 1024, 192)]
CPU_CASES = [("cold", 4, 0, 256), ("warm", 4, 512, 64), ("turn", 4, 256, 64), ("mixed", 8, 0, 256),
             ("turns", 8, 256, 48)]
#: the ``turns`` case's answers (tokens)
TURNS_ANSWER = 32
# bench_e2e's models take positions up to 8,192 + its rope; the warm 8 x (8,192 + 1,024) runs past
# that, as a long system prompt does: the rotary embedding is computed for any position


def tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 32000, n).tolist()


def timed(fn, *args) -> tuple[float, list[int]]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    first = fn(*args)
    return time.perf_counter() - t0, first  # the first tokens are on the host: the pass is done


def hf_first(model, ids: list[list[int]], cache=None) -> list[int]:
    """The first new tokens of transformers' forward over ``ids`` (on ``cache``: a new DynamicCache)."""
    x = torch.tensor(ids, dtype=torch.long, device=next(model.parameters()).device)
    cache = transformers.DynamicCache(config=model.config) if cache is None else cache
    with torch.inference_mode():
        out = model(input_ids=x, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
        return out.logits[:, -1].argmax(-1).tolist()


def hf_padded(model, ids: list[list[int]]) -> list[int]:
    """The first new tokens of transformers' forward over ``ids`` left-padded to the longest,
    with their attention mask and the positions it gives (as its ``generate`` runs a padded batch)."""
    device = next(model.parameters()).device
    n = max(map(len, ids))
    x = torch.tensor([[0] * (n - len(p)) + p for p in ids], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in ids], dtype=torch.long, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = transformers.DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=x, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **cache_argument(model, cache))
        return out.logits[:, -1].argmax(-1).tolist()


def hf_reused(model, system_cache, own: list[list[int]]) -> list[int]:
    """transformers with its prefix reused: the system prompt's DynamicCache copied for each
    request, then the first new tokens of the requests' own tokens on it."""
    cache = copy.deepcopy(system_cache)
    for layer in cache.layers:  # (recurrent layers' states have no batch_repeat_interleave: row 0, n times)
        if LinearAttention is not None and isinstance(layer, LinearAttention):
            LinearAttention.reorder_cache(layer, torch.zeros(len(own), dtype=torch.long))
        if isinstance(layer, DynamicLayer):
            DynamicLayer.batch_repeat_interleave(layer, len(own))
    return hf_first(model, own, cache)


def kv_first(model, pool, prompts: list[list[int]], salt: str, cached: list[int] | None = None) -> list[int]:
    """The first new tokens of a kvpager generation of ``prompts`` (then freed: its full blocks
    stay cached); each prompt's tokens found in the prefix cache appended to ``cached``."""
    with khf.PagedGeneration(model, pool, prompts, 1, salt=salt) as gen:
        if cached is not None:
            cached += gen.num_cached_tokens
        return [o[0] for o in gen.outputs]


def first_turns(model, pool, firsts: list[list[int]], answer: int, salt: str, hold_ends: bool = True) -> list[list[int]]:
    """Each first turn with its answer (``answer`` greedy tokens of kvpager's), its blocks
    left in ``pool``'s prefix cache, and with recurrent layers its states held where its
    answer ended (none with ``hold_ends`` False)."""
    store = StateCache.of(model)
    store.hold_ends = hold_ends
    try:
        answers = khf.generate(model, pool, firsts, answer, salt=salt, eos_token_id=None)
    finally:
        store.hold_ends = True
    return [f + a for f, a in zip(firsts, answers)]


def hf_turn_cache(model, answered: list[list[int]]):
    """transformers' cache after a first turn and its answer (the answer's last token not yet
    fed, as after its ``generate``)."""
    cache = transformers.DynamicCache(config=model.config)
    hf_first(model, [a[:-1] for a in answered], cache)
    return cache


def keep_round(times: dict[str, list[float]], runs: dict[str, tuple[float, list[int]]], r: int) -> bool:
    """After round ``r``: its device memory cached by torch given back, and its paths' times
    kept, unless it is round 0 (every path warmed up, untimed). Whether they were kept."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if r == 0:
        return False
    for path, (t, _) in runs.items():
        times.setdefault(path, []).append(t)
    return True


def run_case(model, pool, case: str, batch: int, system: int, own: int, rounds: int) -> list[dict]:
    if case == "turn":
        return run_turns(model, pool, batch, system, own, rounds)
    if case == "turns":
        return run_distinct_turns(model, pool, batch, system, own, rounds)
    sys_ids = tokens(system, 1)
    hf_sys = None
    if case == "warm":
        kv_first(model, pool, [sys_ids], "warm")  # the system prompt in kvpager's prefix cache
        hf_sys = transformers.DynamicCache(config=model.config)
        hf_first(model, [sys_ids], hf_sys)        # ... and in a DynamicCache of transformers' to copy
    times: dict[str, list[float]] = {}
    agree: list[float] = []
    cached: list[int] = []  # kvpager's prefix-cache hits per request, timed rounds
    for r in range(rounds + 1):  # round 0 warms every path up (kernels built, allocator grown), untimed
        if case == "mixed":  # lengths evenly from own / 2 to 3 own / 2
            lens = [own // 2 + (own * i) // max(batch - 1, 1) for i in range(batch)]
            reqs = [tokens(n, 1000 * r + i + 2) for i, n in enumerate(lens)]
        else:
            reqs = [sys_ids + tokens(own, 1000 * r + i + 2) for i in range(batch)]
        hits = cached if r else None
        runs = {}
        if case == "mixed":
            runs["kvpager"] = timed(kv_first, model, pool, reqs, f"mixed {batch} x {own}, round {r}", hits)
            runs["hf, left-padded"] = timed(hf_padded, model, reqs)
        elif case == "cold":
            # a salt of the case's own: another case's prompts of the same seeds begin with these tokens
            runs["kvpager"] = timed(kv_first, model, pool, reqs, f"cold {batch} x {own}, round {r}", hits)
            runs["hf"] = timed(hf_first, model, reqs)
        else:
            runs["kvpager, system prompt cached"] = timed(kv_first, model, pool, reqs, "warm", hits)
            runs["hf, prefix reused"] = timed(hf_reused, model, hf_sys, [q[system:] for q in reqs])
            runs["hf, recomputed"] = timed(hf_first, model, reqs)
        if not keep_round(times, runs, r):
            continue
        first = list(runs.values())
        agree.append(float(np.mean(np.array(first[0][1]) == np.array(first[1][1]))))
    return summary(case, batch, system, own, times, agree, cached)


def run_turns(model, pool, batch: int, first: int, own: int, rounds: int) -> list[dict]:
    """The ``turn`` case (module docstring): B first turns of ``first`` tokens answered with
    ``own``, then their next turns of ``own`` more, timed."""
    recurrent = khf.has_recurrent_layers(model)
    times: dict[str, list[float]] = {}
    agree: list[float] = []
    cached: list[int] = []
    for r in range(rounds + 1):
        firsts = [tokens(first, 5000 * r + i + 7) for i in range(batch)]
        more = [tokens(own, 5000 * r + i + 2007) for i in range(batch)]
        answered = first_turns(model, pool, firsts, own, "turn")
        turns = [a + m for a, m in zip(answered, more)]
        runs = {"kvpager": timed(kv_first, model, pool, turns, "turn", cached if r else None)}
        if recurrent:  # the same conversations answered without their end states held
            again = first_turns(model, pool, firsts, own, "turn, ends not held", hold_ends=False)
            runs["kvpager, end states not held"] = timed(kv_first, model, pool, [a + m for a, m in zip(again, more)],
                                                         "turn, ends not held")
        hf_cache = hf_turn_cache(model, answered)
        runs["hf, cache continued"] = timed(hf_first, model, [[a[-1], *m] for a, m in zip(answered, more)], hf_cache)
        runs["hf, recomputed"] = timed(hf_first, model, turns)
        del hf_cache
        if not keep_round(times, runs, r):
            continue
        agree.append(float(np.mean(np.array(runs["kvpager"][1]) == np.array(runs["hf, cache continued"][1]))))
    # the tokens each path computes: the new ones; the answers again where their end states are not held
    computed = {path: batch * (2 * own if "not held" in path else own + first + own if "recomputed" in path else own)
                for path in times}
    return summary("turn", batch, first + own, own, times, agree, cached, computed)


def by_length(lens, first_whole=False):
    """A pass per distinct length: the prefill's way before `kvpager.hf.pass_schedule`."""
    return [(n, [i for i, m in enumerate(lens) if m == n]) for n in sorted(set(lens))]


def hf_one_at_a_time(model, answered: list[list[int]], more: list[list[int]], caches: list) -> list[int]:
    """Each conversation's first new token, its own cache continued by a forward of its own."""
    return [hf_first(model, [[a[-1], *m]], c)[0] for a, m, c in zip(answered, more, caches)]


def run_distinct_turns(model, pool, batch: int, first: int, own: int, rounds: int) -> list[dict]:
    """The ``turns`` case (module docstring): B first turns of ``first`` tokens answered
    with `TURNS_ANSWER`, then their next turns with new messages of B lengths from
    ``own`` / 2 to 3 ``own`` / 2, timed."""
    import kvpager.hf.recurrent as recurrent

    recurrent_model = khf.has_recurrent_layers(model)
    lens = [own // 2 + (own * i) // max(batch - 1, 1) for i in range(batch)]
    times: dict[str, list[float]] = {}
    agree: list[float] = []
    cached: list[int] = []
    for r in range(rounds + 1):
        firsts = [tokens(first, 7000 * r + i + 7) for i in range(batch)]
        more = [tokens(n, 7000 * r + i + 3007) for i, n in enumerate(lens)]
        answered = first_turns(model, pool, firsts, TURNS_ANSWER, "turns")
        runs = {"kvpager": timed(kv_first, model, pool, [a + m for a, m in zip(answered, more)], "turns",
                                 cached if r else None)}
        if recurrent_model:  # the same conversations (under a salt of their own), a pass per length
            again = first_turns(model, pool, firsts, TURNS_ANSWER, "turns, by length")
            schedule, recurrent.schedule = recurrent.schedule, by_length
            try:
                runs["kvpager, a pass per length"] = timed(kv_first, model, pool, [a + m for a, m in zip(again, more)],
                                                           "turns, by length")
            finally:
                recurrent.schedule = schedule
        caches = [hf_turn_cache(model, [a]) for a in answered]
        runs["hf, caches continued one at a time"] = timed(hf_one_at_a_time, model, answered, more, caches)
        runs["hf, recomputed"] = timed(hf_padded, model, [a + m for a, m in zip(answered, more)])
        del caches
        if not keep_round(times, runs, r):
            continue
        agree.append(float(np.mean(np.array(runs["kvpager"][1]) == np.array(runs["hf, caches continued one at a time"][1]))))
    computed = {path: (sum(lens) + batch * (first + TURNS_ANSWER) if "recomputed" in path else sum(lens))
                for path in times}
    return summary("turns", batch, first + TURNS_ANSWER, own, times, agree, cached, computed)


def summary(case: str, batch: int, system: int, own: int, times: dict[str, list[float]], agree: list[float],
            cached: list[int], computed_by: dict[str, int] | None = None) -> list[dict]:
    """A case's rows: each path's median time, its tokens/s computed (``computed_by`` the
    path, else the case's rule) and its ratio to kvpager's (the first path's), the first
    tokens' agreement and kvpager's cache hits."""
    kv_path = next(iter(times))
    rows = []
    for path, ts in times.items():
        ms = float(np.median(ts)) * 1e3
        computed = (computed_by or {}).get(path) or batch * (
            own + system if path == "hf, recomputed" or case in ("cold", "mixed") else own)
        ratio = float(np.median(np.array(ts) / np.array(times[kv_path])))
        rows.append(dict(case=case, batch=batch, system=system, own=own, path=path, ms=ms,
                         tok_s=computed / ms * 1e3, ratio=ratio, agree=float(np.mean(agree)),
                         kv_cached=float(np.mean(cached))))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b", help="bench_e2e.py's shape: 1b, 8b or w512 (heads 512 wide)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cases", default="", help="indices into CASES (comma-separated); empty: all")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the NumPy backend's pools, float32 models, CPU_CASES")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here: pass --device cpu (with --shape s: a float32 8b model does not fit a "
                 "small host)")
    e2e_paths.DEVICE = args.device
    torch.backends.cuda.enable_cudnn_sdp(False)  # as bench_e2e.py: cuDNN plans a new shape on first use
    model = make_model(args.shape)
    cases = CASES if args.device == "cuda" else CPU_CASES
    picked = [cases[int(i)] for i in args.cases.split(",")] if args.cases else cases
    longest = max(b * (s + o) for _, b, s, o in picked)
    spec = khf.spec_for_model(model, num_blocks=2 * longest // 16 + 4096)
    pool = KVPool(spec, device="cuda:0" if args.device == "cuda" else "cpu")
    rows = []
    try:
        for case, batch, system, own in picked:
            for row in run_case(model, pool, case, batch, system, own, args.rounds):
                rows.append(row)
                print(f"{case} {batch} x ({system} + {own}) {row['path']:<32} {row['ms']:9.2f} ms "
                      f"{row['tok_s']:9.0f} tok/s  {row['ratio']:5.2f}x  first tokens agree {row['agree']:.2f}  "
                      f"kvpager's cache hits {row['kv_cached']:.0f} a request", flush=True)
    finally:
        pool.close()
    card = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{card}, {datetime.date.today()}, shape {args.shape}, transformers {transformers.__version__}, "
          f"torch {torch.__version__}; {args.rounds} rounds; ratio: the path's time / kvpager's (median of rounds)")
    print("| case | batch x (system + own) | path | ms | tokens/s computed | time / kvpager's | first tokens agree |"
          " kvpager's cache hits a request |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} x ({r['system']:,} + {r['own']:,}) | {r['path']} | {r['ms']:.2f} | "
              f"{r['tok_s']:,.0f} | {r['ratio']:.2f}x | {r['agree']:.2f} | {r['kv_cached']:,.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card, shape=args.shape, rows=rows), indent=1))


if __name__ == "__main__":
    main()
