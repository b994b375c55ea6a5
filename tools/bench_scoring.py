"""Scoring multiple-choice answers: `kvpager.hf.score` against transformers' forward passes, in one process.

An evaluation's log-likelihood requests: ``--questions`` questions, each a
few-shot preamble shared by all (``--shared`` tokens), its own context
(``--context``) and ``--answers`` answers of 4 to ``--answer-len`` tokens;
each answer's tokens are scored given everything before them. Random-weight
Llama-shaped models of `bench_e2e.py` (bf16 on a GPU, float32 on the CPU), or
its Qwen3.5 layouts (``--shape q35s`` / ``q35``: linear-attention layers, scored
as rows from held states, `kvpager.hf.scoring_rows`).

- ``transformers``: what an evaluation harness does with a model alone: the
  prompts in right-padded batches of ``--hf-batch``, one forward pass each (no
  cache), the float32 log-softmax at the positions before each answer token;
- ``kvpager``: one `score` call over all the prompts (``start``: each answer's
  first token), a fresh salt each round, so nothing is cached from the round
  before: the preamble's and each context's full blocks run once, the rest of
  each prompt from the last full block before its answer.

Each round times both (median of ``--rounds``); the table gives the time, the
tokens each ran, and the largest difference between their scores.

    python tools/bench_scoring.py [--device cuda] [--shape 1b] [--questions 32]
    python tools/bench_scoring.py --device cpu --shape s --questions 8 --shared 128 --context 64
    python tools/bench_scoring.py --device cpu --shape q35s --questions 8 --shared 128 --context 64
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
from kvpager.hf import eager, scoring, scoring_rows, spec_for_model  # noqa: E402


def workload(args) -> tuple[list[list[int]], list[int]]:
    """The prompts (preamble + context + answer) and each one's answer start."""
    g = np.random.default_rng(0)
    shared = g.integers(3, 32000, args.shared).tolist()
    prompts, starts = [], []
    for _ in range(args.questions):
        context = g.integers(3, 32000, args.context).tolist()
        for _ in range(args.answers):
            answer = g.integers(3, 32000, int(g.integers(4, args.answer_len + 1))).tolist()
            prompts.append(shared + context + answer)
            starts.append(len(shared) + len(context))
    return prompts, starts


def hf_scores(model, prompts: list[list[int]], starts: list[int], batch: int) -> tuple[list[np.ndarray], int]:
    """transformers alone: right-padded batches, a forward pass each; (scores, tokens run)."""
    out, ran = [], 0
    device = next(model.parameters()).device
    for b in range(0, len(prompts), batch):
        ps, ss = prompts[b : b + batch], starts[b : b + batch]
        width = max(map(len, ps))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in ps], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in ps], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
        ran += ids.numel()
        for k, (p, s) in enumerate(zip(ps, ss)):
            lp = torch.log_softmax(logits[k, s - 1 : len(p) - 1].float(), dim=-1)
            out.append(lp.gather(1, ids[k, s : len(p)].view(-1, 1))[:, 0].double().cpu().numpy())
    return out, ran


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--shared", type=int, default=512, help="few-shot preamble tokens, shared by every question")
    ap.add_argument("--context", type=int, default=256, help="each question's own tokens")
    ap.add_argument("--answers", type=int, default=4)
    ap.add_argument("--answer-len", type=int, default=24)
    ap.add_argument("--hf-batch", type=int, default=16, help="prompts a transformers forward pass")
    ap.add_argument("--tokens-per-pass", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    shape, model = model_from(args)
    prompts, starts = workload(args)
    blocks = sum(-(-len(p) // 16) + 1 for p in prompts) + 64
    pool = KVPool(spec_for_model(model, num_blocks=blocks), device=e2e_paths.pool_device())
    ran: list[int] = []
    real = eager.paged_forward

    def counted(model, batch, input_ids, *a):
        ran.append(input_ids.shape[1])
        return real(model, batch, input_ids, *a)

    eager.paged_forward = counted
    real_rows = scoring_rows.RowPasses._pass

    def counted_rows(runner, ids, ps, rows, parts, *a):  # (a model with recurrent layers: rows)
        ran.append(sum(b - e for e, b in parts))
        return real_rows(runner, ids, ps, rows, parts, *a)

    scoring_rows.RowPasses._pass = counted_rows
    times: dict[str, list[float]] = {"transformers": [], "kvpager": []}
    for r in range(args.rounds + 1):  # the first untimed: kernels compiled, shapes seen
        e2e_paths.sync()
        t0 = time.perf_counter()
        want, hf_ran = hf_scores(model, prompts, starts, args.hf_batch)
        e2e_paths.sync()
        t1 = time.perf_counter()
        ran.clear()
        got = scoring.score(model, pool, prompts, starts, salt=f"round {r}", tokens_per_pass=args.tokens_per_pass)
        e2e_paths.sync()
        t2 = time.perf_counter()
        if r:
            times["transformers"].append(t1 - t0)
            times["kvpager"].append(t2 - t1)
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
    card = e2e_paths.card(args.device)
    print(f"\n{card}, {datetime.date.today()}, shape {shape}, {len(prompts)} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens ({args.questions} questions x {args.answers} "
          f"answers; preamble {args.shared}, context {args.context}), {args.rounds} rounds")
    hf_ms, kv_ms = (float(np.median(times[k])) * 1e3 for k in ("transformers", "kvpager"))
    print(f"{'path':<14} {'ms':>9} {'tokens run':>11} {'vs transformers':>16} {'max |diff|':>11}")
    print(f"{'transformers':<14} {hf_ms:9.1f} {hf_ran:11d} {1.0:15.2f}x {'-':>11}")
    print(f"{'kvpager':<14} {kv_ms:9.1f} {sum(ran):11d} {hf_ms / kv_ms:15.2f}x {err:11.2e}")


if __name__ == "__main__":
    main()
