"""Every causal-LM model type of the installed transformers through kvpager.hf, against transformers.

    python3 tools/hf_families.py                    # every registered type (a table)
    python3 tools/hf_families.py llama falcon ...   # only these
    python3 tools/hf_families.py --json
    python3 tools/hf_families.py --jsonl            # a line a type and variant as they end
    python3 tools/hf_families.py --variants mha4 qwen2 ...  # a K/V head per query head

Each model type transformers registers for causal LM (`AutoModelForCausalLM`)
is built as a tiny random float32 model from its config (64 hidden, 2
layers, 4 heads, a 128-token vocabulary, each type's own fields in
`family_configs.py`; the parameters it is built with at
one value throughout moved by noise, `draw_constants`; once with 2 K/V heads, once
without setting them; ``--variants mha4``: with 4, a K/V head per query
head), and `kvpager.hf.generate` (a CPU pool) is compared
with transformers' greedy ``generate`` on the same prompts (21 and 9
tokens, 8 new ones each). Where they match, `kvpager.hf.score` is compared
with the log-softmax of one plain forward pass (every token from the second,
within 1e-3), `kvpager.hf.beam_search` with transformers' beams (2 beams,
5 new tokens; where transformers' own beam search runs for the type), and
transformers' ``generate`` on a `kvpager.hf.PagedCache` with the same on its
own cache (each prompt alone, twice; then a batch of three rows sharing 200
tokens, one row given twice). Each
type runs in a process of its own, under a time limit. Outcomes:

- ``match``: transformers' tokens, scores and beams (the detail says what was
  refused or not compared);
- ``weak match``: transformers' tokens, but they repeat one token a prompt (a model
  this small and random can: a wrong window or state could give them too) in
  each of `DRAWS` draws of the model, its built constants and its prompts (a
  type whose first draw repeats is drawn again; the detail says which draw
  decided);
- ``MISMATCH``: other tokens, scores or beams and no error (a defect: kvpager
  must refuse what it cannot reproduce);
- ``refused``: kvpager refused it, with the error shown;
- ``not built`` / ``no reference``: transformers itself could not build or
  run the model at these sizes (the type needs its own config);
- ``killed``: the process died (memory) or ran past the limit.

The exit status is 1 if any type mismatched. Not a test: a sweep for when
transformers changes (new families, changed attention code).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests), not run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from family_configs import COMMON, LEAVE, OVERRIDES, VOCAB, tiny_config  # noqa: E402

#: with 2 K/V heads, without setting num_key_value_heads (the config's default), and with a K/V
#: head per query head set (a config whose default K/V heads do not divide 4 query heads runs too)
VARIANTS = ("gqa", "mha", "mha4")
DEFAULT_VARIANTS = ("gqa", "mha")


def draw_constants(model, seed: int = 2) -> None:
    """Every parameter a model is built with at one value throughout (zeros, ones: gates,
    biases, norms, Doge's mask bias ``dt_proj`` and ``A``) moved by normal noise (std 0.5),
    as training would move it: a feature kvpager does not follow but whose built weights
    make it a no-op would otherwise match transformers here (Doge's dynamic mask did)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and bool((p == p.reshape(-1)[0]).all()):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.5)


#: draws of a model and its prompts a type gets before a match whose tokens repeat one token a
#: prompt stays a weak match (each draw another model, other built constants, other prompts)
DRAWS = 3


def one(model_type: str, variant: str) -> dict:
    """Build, generate both ways, compare (in this process); a weak match drawn again,
    up to `DRAWS` models (a mismatch in any is the outcome)."""
    for draw in range(DRAWS):
        row = one_draw(model_type, variant, draw)
        if row["outcome"] != "weak match":
            break
    if draw:
        row["detail"] = f"draw {draw + 1} of {DRAWS}" + (f"; {row['detail']}" if row["detail"] else "")
    return row


def one_draw(model_type: str, variant: str, draw: int) -> dict:
    """`one` for one draw of the model (``draw`` 0: the sweep's first) and its prompts."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from kvpager import KVPool
    from kvpager.hf import generate, spec_for_model

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    row = {"type": model_type, "variant": variant}
    common = {k: v for k, v in {**COMMON, **OVERRIDES.get(model_type, {})}.items() if v is not LEAVE}
    if variant == "mha":
        common.pop("num_key_value_heads")
    elif variant == "mha4":
        common["num_key_value_heads"] = common["num_attention_heads"]
    try:
        torch.manual_seed(draw)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, common)).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        draw_constants(model, 2 + draw)
    except Exception as e:  # noqa: BLE001 - transformers' own failure at these sizes
        return {**row, "outcome": "not built", "detail": f"{type(e).__name__}: {e}"}
    g = torch.Generator().manual_seed(1 + draw)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (21, 9)]
    try:
        with torch.no_grad():
            ref = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, num_beams=1)[0, len(p):]
                   .tolist() for p in prompts]
    except Exception as e:  # noqa: BLE001
        return {**row, "outcome": "no reference", "detail": f"{type(e).__name__}: {e}"}
    try:
        pool = KVPool(spec_for_model(model, num_blocks=128, block_size=8))
        out = generate(model, pool, prompts, 8, eos_token_id=None)
    except Exception as e:  # noqa: BLE001 - a refusal: what it says is the detail
        return {**row, "outcome": "refused", "detail": f"{type(e).__name__}: {e}"}
    if out != ref:
        return {**row, "outcome": "MISMATCH", "detail": f"kvpager {out} transformers {ref}"}
    wrong, refused = also_served(model, pool, prompts)
    if wrong:
        return {**row, "outcome": "MISMATCH", "detail": wrong}
    if all(len(set(r)) == 1 for r in ref):  # (a wrong window, softcap or state could give these too)
        return {**row, "outcome": "weak match", "detail": f"transformers' tokens repeat one token a prompt: {ref}"}
    return {**row, "outcome": "match", "detail": refused}


def also_served(model, pool, prompts: list[list[int]]) -> tuple[str, str]:
    """A type whose generation matched: `score` against the log-softmax of one plain
    forward pass (every token from the second), and `beam_search` (2 beams, 5 new
    tokens) against transformers' beams where transformers runs them. (What differs,
    what was refused or not compared), each "" where nothing."""
    import numpy as np
    import torch

    from kvpager.hf import beam_search, score

    wrong, notes = [], []
    try:
        got = score(model, pool, prompts)
    except Exception as e:  # noqa: BLE001 - a refusal: said, not a mismatch
        notes.append(f"score refused: {type(e).__name__}: {e}")
    else:
        for p, g in zip(prompts, got):
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([p])).logits[0].double(), dim=-1)
            want = lp[torch.arange(len(p) - 1), torch.tensor(p[1:])].numpy()
            diff = float(np.abs(g - want).max())
            if diff > 1e-3:
                wrong.append(f"score differs from a plain forward pass by {diff:.3g}")
    try:
        with torch.no_grad():
            want_beams = [model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, num_beams=2)[0, len(p):]
                          .tolist() for p in prompts]
    except Exception as e:  # noqa: BLE001 - transformers' own beam search fails for this type
        notes.append(f"beams not compared: transformers: {type(e).__name__}: {e}")
    else:
        try:
            beams = [b.tokens[0] for b in beam_search(model, pool, prompts, 5, num_beams=2, eos_token_id=None)]
        except Exception as e:  # noqa: BLE001
            notes.append(f"beam_search refused: {type(e).__name__}: {e}")
        else:
            if beams != want_beams:
                wrong.append(f"beams: kvpager {beams} transformers {want_beams}")
    wrong_cache, note = through_paged_cache(model, pool, prompts)
    wrong += [wrong_cache] if wrong_cache else []
    notes += [note] if note else []
    return "; ".join(wrong), "; ".join(notes)


def through_paged_cache(model, pool, prompts: list[list[int]]) -> tuple[str, str]:
    """transformers' own greedy ``generate`` on a `kvpager.hf.PagedCache` against the same on
    its default cache, each prompt alone (8 new tokens), twice: the second on its own blocks
    cached by the first (the prompt pass cut to the uncached tail); then a batch of rows sharing
    200 tokens not yet cached, one of them twice: (what differs, what was refused)."""
    import torch

    from kvpager.hf import PagedCache
    from kvpager.hf.recurrent_states import cache_argument

    name = cache_argument(model)
    got, want = [], []
    try:
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p])
                want.append(model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=1)[0, len(p):].tolist())
                for _ in range(2):
                    with PagedCache(model, pool) as cache:
                        got.append(model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=1,
                                                  **{name: cache})[0, len(p):].tolist())
                want.append(want[-1])
        # a batch: rows sharing 200 tokens no call has seen (written first, once: `early_prefix`),
        # the first row given twice (run once: `repeated_rows`)
        a = prompts[0]
        shared = (a * (200 // len(a) + 1))[:200]
        ids = torch.tensor([shared + a, shared + a[::-1], shared + a])
        with torch.no_grad():
            want.append(model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=1)[:, ids.shape[1]:].tolist())
            with PagedCache(model, pool) as cache:
                got.append(model.generate(ids, max_new_tokens=8, do_sample=False, num_beams=1,
                                          **{name: cache})[:, ids.shape[1]:].tolist())
    except Exception as e:  # noqa: BLE001 - a refusal: said, not a mismatch
        return "", f"PagedCache refused: {type(e).__name__}: {e}"
    return ("" if got == want else f"PagedCache: {got} transformers {want}"), ""


def run(model_type: str, variant: str, timeout: float) -> dict:
    """`one` in a fresh process (a family that takes the memory or hangs takes only its own)."""
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", model_type, variant],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"type": model_type, "variant": variant, "outcome": "killed", "detail": f"over {timeout:g} s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"type": model_type, "variant": variant, "outcome": "killed",
            "detail": f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:] or ''}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("types", nargs="*", help="model types (default: every causal-LM type registered)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per type and variant")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default: %(default)s)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--jsonl", action="store_true",
                    help="a JSON line a type and variant as each ends (what ended survives a kill)")
    ap.add_argument("--one", nargs=2, metavar=("TYPE", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    variants = args.variants.split(",")
    if not variants or set(variants) - set(VARIANTS):
        ap.error(f"--variants: each of {', '.join(VARIANTS)}, got {args.variants!r}")
    jobs = [(t, v) for t in types for v in variants]
    with ThreadPoolExecutor(args.jobs) as ex:
        if args.jsonl:
            print(json.dumps({"transformers": transformers.__version__}), flush=True)
            for done in as_completed([ex.submit(run, *tv, args.timeout) for tv in jobs]):
                print(json.dumps(done.result()), flush=True)
            return
        rows = list(ex.map(lambda tv: run(*tv, args.timeout), jobs))
    if args.json:
        print(json.dumps({"transformers": transformers.__version__, "rows": rows}, indent=1))
    else:
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        print(f"transformers {transformers.__version__}; {len(types)} model types x {len(variants)} variants: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print("| type | variant | outcome | detail |")
        print("|---|---|---|---|")
        for r in rows:
            detail = r["detail"].replace("|", "/").replace("\n", " ")[:140]
            print(f"| {r['type']} | {r['variant']} | {r['outcome']} | {detail} |")
    sys.exit(1 if any(r["outcome"] == "MISMATCH" for r in rows) else 0)


if __name__ == "__main__":
    main()
