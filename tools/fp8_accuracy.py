"""FP8 KV cache accuracy: logits on an FP8 pool against the same run on a 16-bit pool.

    PYTHONPATH=. python tools/fp8_accuracy.py                       # random-weight Llamas, CPU
    PYTHONPATH=. python tools/fp8_accuracy.py --model PATH --device cuda:0 [--dtype bfloat16]
    PYTHONPATH=. python tools/fp8_accuracy.py --model DIR           # a tools/tiny_lm.py model: held-out text

For each model, a prompt is prefilled and then fed a few more tokens one decode
step at a time, through kvpager's attention, once on a pool storing `--dtype`
and once on FP8 pools (e4m3 and e5m2, with scales calibrated on another sample
by `kvpager.hf.calibrate_kv_scales` and with scales of 1.0), and, for scale,
on a pool of the other 16-bit type (float16 against bfloat16: the 16-bit
rounding of K/V, Q and the attention output alone). Printed: the largest
|logit difference| over the 16-bit run's logit spread (max - min), per step,
summarised as its smallest, median and largest value over the steps of every
prompt, and the share of steps whose greedy token agrees. Memory: the pool's
bytes per block over the 16-bit pool's.

Tokens: random ids for the random models and for a checkpoint, unless the
model is byte-level (a folder written by tools/tiny_lm.py, whose
``tiny_lm.json`` names its held-out text, or ``--text FILE`` for any model
whose ids 0-255 are bytes): then ``--prompts`` snippets of the held-out text,
each starting at a line, give the prompts and the bytes fed (the text's own
continuation), and a further snippet the calibration sample.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from kvpager import KVPool
from kvpager.hf import (
    PagedBatch,
    calibrate_kv_scales,
    layer_fit,
    layer_map,
    layer_windows,
    paged_attention,
    spec_for_model,
)

RANDOM = [(128, 0.02), (256, 0.02), (128, 0.05), (128, 0.1), (256, 0.1)]  # (hidden size, initializer range)
TINY_META = "tiny_lm.json"  # written by tools/tiny_lm.py next to its checkpoint


@dataclass
class Inputs:
    """What a model is run on: (prompt, tokens fed one decode step at a time) pairs, and
    the calibration sample."""

    cases: list[tuple[list[int], list[int]]]
    sample: list[int]


def random_llama(hidden: int, init: float) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, initializer_range=init,
        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def random_inputs(vocab: int, prompts: int, prompt_len: int, steps: int) -> Inputs:
    """Random ids in [3, vocab): for each prompt its ids and the ids fed, then the sample."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for _ in range(prompts):
        prompt = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        cases.append((prompt, torch.randint(3, vocab, (steps,), generator=g).tolist()))
    return Inputs(cases, torch.randint(3, vocab, (prompt_len,), generator=g).tolist())


def text_inputs(text: bytes, prompts: int, prompt_len: int, steps: int, sample_len: int) -> Inputs:
    """Byte ids of ``prompts`` snippets of ``text`` (prompt_len + steps bytes each) and of a
    calibration sample (sample_len bytes): the text cut into prompts + 1 equal parts, each
    snippet starting at the first line that starts in its part. ValueError if one does not fit."""
    part = len(text) // (prompts + 1)
    snippets = []
    for i, n in enumerate([prompt_len + steps] * prompts + [sample_len]):
        start = text.find(b"\n", i * part, (i + 1) * part) + 1 if i else 0
        if (i and start == 0) or start + n > (i + 1) * part:
            raise ValueError(f"the text ({len(text)} bytes) is too short for {prompts} prompts of "
                             f"{prompt_len} + {steps} bytes and a sample of {sample_len}")
        snippets.append(list(text[start:start + n]))
    cases = [(s[:prompt_len], s[prompt_len:]) for s in snippets[:-1]]
    return Inputs(cases, snippets[-1])


def tiny_meta(model_dir: str | None) -> dict | None:
    """tools/tiny_lm.py's record of a model folder, or None."""
    path = Path(model_dir) / TINY_META if model_dir else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def logits(model, pool, prompt: list[int], feed: list[int], dtype: torch.dtype) -> list[np.ndarray]:
    """The last position's logits after the prefill, then after each decode step fed ``feed``."""
    device = torch.device(str(pool.device))
    a = pool.allocate([prompt])[0]
    windows, layers, out = layer_windows(model), layer_map(model), []

    def forward(ids: list[int], start: int, slots) -> np.ndarray:
        plan = pool.plan([a.seq_id], [len(ids)], slots, num_q_heads=model.config.num_attention_heads)
        with torch.inference_mode(), paged_attention(model):
            res = model(input_ids=torch.tensor([ids], device=device),
                        position_ids=torch.arange(start, start + len(ids), device=device)[None],
                        attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
                        use_cache=False, kvpager=PagedBatch(plan, dtype, device, windows, layers=layers,
                                                           fit=layer_fit(model)))
        return res.logits[0, -1].float().cpu().numpy()

    out.append(forward(prompt, 0, a.slots))
    for i, t in enumerate(feed):
        out.append(forward([t], len(prompt) + i, pool.append_flat([a.seq_id], 1, [[t]])))
    pool.free(a.seq_id)
    return out


def compare(name: str, model, inputs: Inputs, args: argparse.Namespace) -> list[dict]:
    """One row per pool: the other 16-bit dtype (the scale of 16-bit rounding alone), then each
    FP8 format with calibrated scales and with 1.0: the metric's smallest, median and largest
    value over every step of every prompt, the greedy agreement, the memory ratio."""
    dtype = getattr(torch, args.dtype)
    longest = max(len(p) + len(f) for p, f in inputs.cases)
    blocks = -(-longest // 16) + 2

    def pool(pool_dtype=dtype, **kw):
        return KVPool(spec_for_model(model, blocks, 16, dtype=pool_dtype, **kw), device=args.device)

    def run(p: KVPool, pool_dtype=dtype) -> list[np.ndarray]:
        return [x for prompt, feed in inputs.cases for x in logits(model, p, prompt, feed, pool_dtype)]

    base_pool = pool()
    want = run(base_pool)
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    runs = [(str(other).removeprefix("torch."), "-", lambda: pool(other), other)]
    for kv_dtype in ("float8_e4m3", "float8_e5m2"):
        runs.append((kv_dtype, "calibrated",
                     lambda k=kv_dtype: pool(kv_dtype=k, kv_scales=calibrate_kv_scales(model, inputs.sample, k)),
                     dtype))
        runs.append((kv_dtype, "1.0", lambda k=kv_dtype: pool(kv_dtype=k), dtype))
    rows = []
    for kv_dtype, how, make, pool_dtype in runs:
        p = make()
        got = run(p, pool_dtype)
        rel = [float(np.abs(g - w).max() / (w.max() - w.min())) for g, w in zip(got, want)]
        agree = np.mean([g.argmax() == w.argmax() for g, w in zip(got, want)])
        rows.append(dict(model=name, kv_dtype=kv_dtype, scales=how, min=min(rel), median=float(np.median(rel)),
                         max=max(rel), agree=agree, memory=p.spec.bytes_per_block / base_pool.spec.bytes_per_block))
    return rows


def tiny_name(path: str, meta: dict) -> str:
    """A tools/tiny_lm.py model as the table names it."""
    s = meta["settings"]
    return (f"byte-level Llama, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} q / {s['kv_heads']} kv "
            f"heads of {s['head_dim']}, {meta['heldout_bits_per_byte']:.2f} bits/byte held out")


def dtype_argument(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` from transformers 4.56 on (which
    deprecates ``torch_dtype``), ``torch_dtype`` before it (which would ignore ``dtype``)."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_models(args: argparse.Namespace, ap: argparse.ArgumentParser) -> list[tuple[str, object, Inputs]]:
    """(name, model, inputs) of each model to measure."""
    if not args.model:
        if args.text:
            ap.error("--text needs a byte-level --model (the random models' ids are not bytes)")
        models = [(f"random Llama, hidden {h}, init {i}", random_llama(h, i).to(args.device)) for h, i in RANDOM]
        return [(name, m, random_inputs(m.config.vocab_size, args.prompts or 1, args.prompt_len or 40,
                                        args.steps or 6)) for name, m in models]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **dtype_argument(getattr(torch, args.dtype)))
    model = model.to(args.device).eval()
    meta = tiny_meta(args.model)
    text = Path(args.text) if args.text else None
    if text is None and meta and meta.get("byte_level"):
        text = Path(args.model) / meta["heldout_text"]
    if text is None:
        inputs = random_inputs(model.config.vocab_size, args.prompts or 1, args.prompt_len or 40, args.steps or 6)
        return [(args.model, model, inputs)]
    if model.config.vocab_size < 256:
        ap.error(f"--text feeds bytes as token ids; this model's vocabulary has {model.config.vocab_size} ids")
    try:
        inputs = text_inputs(text.read_bytes(), args.prompts or 4, args.prompt_len or 256, args.steps or 32,
                             args.sample_len)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    return [(tiny_name(args.model, meta) if meta else args.model, model, inputs)]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--model", help="a Hugging Face causal LM folder (default: the random-weight Llamas)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (the model and the pools)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="the 16-bit pool's dtype, and the FP8 pools' compute dtype")
    ap.add_argument("--text", help="a file whose bytes are the prompts (byte-level models; default for a "
                                   "tools/tiny_lm.py folder: its held-out text)")
    ap.add_argument("--prompts", type=int, help="prompts per model (default 1; 4 with text)")
    ap.add_argument("--prompt-len", type=int, help="tokens per prompt (default 40; 256 with text)")
    ap.add_argument("--steps", type=int, help="decode steps per prompt (default 6; 32 with text)")
    ap.add_argument("--sample-len", type=int, default=512, help="calibration sample bytes (text)")
    args = ap.parse_args(argv)
    for key in ("prompts", "prompt_len", "steps", "sample_len"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            ap.error(f"--{key.replace('_', '-')} must be positive")
    models = load_models(args, ap)
    print(f"{args.dtype} pool against FP8 pools on {args.device}: max |logit difference| / logit spread, "
          f"per step; over {len(models[0][2].cases)} prompt(s) x (prefill + {len(models[0][2].cases[0][1])} steps)")
    print("| model | kv dtype | scales | min | median | max | same greedy token | bytes / 16-bit |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name, model, inputs in models:
        for r in compare(name, model, inputs, args):
            rows.append(r)
            print(f"| {r['model']} | {r['kv_dtype']} | {r['scales']} | {r['min']:.2%} | {r['median']:.2%} | "
                  f"{r['max']:.2%} | {r['agree']:.0%} | {r['memory']:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
