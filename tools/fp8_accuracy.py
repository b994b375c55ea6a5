"""FP8 KV cache accuracy: logits on an FP8 pool against the same run on a 16-bit pool.

    PYTHONPATH=. python tools/fp8_accuracy.py                       # random-weight Llamas, CPU
    PYTHONPATH=. python tools/fp8_accuracy.py --model PATH --device cuda:0 [--dtype bfloat16]

For each model, a prompt is prefilled and then fed a few more tokens one decode
step at a time, through kvpager's attention, once on a pool storing `--dtype`
and once on FP8 pools (e4m3 and e5m2, with scales calibrated on another sample
by `kvpager.hf.calibrate_kv_scales` and with scales of 1.0). Printed: the
largest |logit difference| over the 16-bit run's logit spread (max - min), the
smallest and largest over the steps, and the share of steps whose greedy token
agrees. Memory: the FP8 pool's bytes per block over the 16-bit pool's.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import transformers

from kvpager import KVPool
from kvpager.hf import (
    PagedBatch,
    calibrate_kv_scales,
    layer_windows,
    paged_attention,
    spec_for_model,
)

RANDOM = [(128, 0.02), (256, 0.02), (128, 0.05), (128, 0.1), (256, 0.1)]  # (hidden size, initializer range)


def random_llama(hidden: int, init: float) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, initializer_range=init,
        bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(config).eval()


def logits(model, pool, prompt: list[int], feed: list[int], dtype: torch.dtype) -> list[np.ndarray]:
    """The last position's logits after the prefill, then after each decode step fed ``feed``."""
    device = torch.device(str(pool.device))
    a = pool.allocate([prompt])[0]
    windows, out = layer_windows(model), []

    def forward(ids: list[int], start: int, slots) -> np.ndarray:
        plan = pool.plan([a.seq_id], [len(ids)], slots, num_q_heads=model.config.num_attention_heads)
        with torch.inference_mode(), paged_attention(model):
            res = model(input_ids=torch.tensor([ids], device=device),
                        position_ids=torch.arange(start, start + len(ids), device=device)[None],
                        attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
                        use_cache=False, kvpager=PagedBatch(plan, dtype, device, windows))
        return res.logits[0, -1].float().cpu().numpy()

    out.append(forward(prompt, 0, a.slots))
    for i, t in enumerate(feed):
        out.append(forward([t], len(prompt) + i, pool.append_flat([a.seq_id], 1, [[t]])))
    pool.free(a.seq_id)
    return out


def compare(name: str, model, args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
    feed = torch.randint(3, vocab, (args.steps,), generator=g).tolist()
    sample = torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()
    blocks = -(-(args.prompt_len + args.steps) // 16) + 2

    def pool(**kw):
        return KVPool(spec_for_model(model, blocks, 16, dtype=dtype, **kw), device=args.device)

    base_pool = pool()
    want = logits(model, base_pool, prompt, feed, dtype)
    rows = []
    for kv_dtype in ("float8_e4m3", "float8_e5m2"):
        for how in ("calibrated", "1.0"):
            scales = calibrate_kv_scales(model, sample, kv_dtype) if how == "calibrated" else None
            fp8 = pool(kv_dtype=kv_dtype, kv_scales=scales)
            got = logits(model, fp8, prompt, feed, dtype)
            rel = [float(np.abs(g - w).max() / (w.max() - w.min())) for g, w in zip(got, want)]
            agree = np.mean([g.argmax() == w.argmax() for g, w in zip(got, want)])
            rows.append(dict(model=name, kv_dtype=kv_dtype, scales=how, min=min(rel), max=max(rel), agree=agree,
                             memory=fp8.spec.bytes_per_block / base_pool.spec.bytes_per_block))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a Hugging Face causal LM folder (default: the random-weight Llamas)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (the model and the pools)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="the 16-bit pool's dtype, and the FP8 pools' compute dtype")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
        models = [(args.model, model.to(args.device if args.device != "cpu" else "cpu").eval())]
    else:
        models = [(f"random Llama, hidden {h}, init {i}", random_llama(h, i).to(args.device)) for h, i in RANDOM]
    print(f"{args.dtype} pool against FP8 pools on {args.device}: max |logit difference| / logit spread")
    print("| model | kv dtype | scales | min over steps | max over steps | same greedy token | bytes / 16-bit |")
    print("|---|---|---|---|---|---|---|")
    for name, model in models:
        for r in compare(name, model, args):
            print(f"| {r['model']} | {r['kv_dtype']} | {r['scales']} | {r['min']:.2%} | {r['max']:.2%} | "
                  f"{r['agree']:.0%} | {r['memory']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
