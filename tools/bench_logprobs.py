"""Log-probabilities of a pass's tokens: kvpager's kernel against torch's operations, in one process.

For each batch, vocabulary and k, random logits [batch, vocab] (bf16 on a GPU,
float32 on the CPU), each row's token its argmax, and the time of one call,
host and device together (timed after a warm-up, the device drained before
and after):

- ``torch``: what a caller of transformers does with a step's logits
  (``output_logits``): the float32 log-softmax, a gather of the tokens' and a
  top-k over it (`kvpager.hf.logprobs.torch_logprobs`: the CPU's path and the
  kernel's reference);
- ``kvpager``: `kvpager.hf.logprobs.TokenLogprobs.of`, on a GPU the kernel
  ``cuda/token_logprobs.cu`` (a CTA a row, one read of it).

The floor is one read of the logits at the card's bandwidth.

    python tools/bench_logprobs.py [--batches 64,256] [--vocabs 128256,262144] [--ks 0,5,20]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e_paths  # noqa: E402
from bench_sampling import timed_ms  # noqa: E402

from kvpager.hf import logprob_kernel  # noqa: E402
from kvpager.hf.logprobs import TokenLogprobs, torch_logprobs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--vocabs", default="128256,262144")
    ap.add_argument("--ks", default="0,5,20")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--threads", type=int, help="the kernel's CTA size (default: logprob_kernel.THREADS)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        logprob_kernel.THREADS = args.threads
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    g = torch.Generator(device=args.device).manual_seed(0)
    rows = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            logits = (torch.randn((batch, vocab), generator=g, device=args.device) * 3).to(dtype)
            tokens = logits.argmax(dim=1)
            for k in [int(k) for k in args.ks.split(",")]:
                ours = TokenLogprobs(k, batch)
                got, want = ours.of(logits, tokens), torch_logprobs(logits, tokens, k)
                err = float((got[:, : 1 + k] - want[:, : 1 + k]).abs().max())
                paths = (("torch", torch_logprobs), ("kvpager", lambda x, t, _k, ours=ours: ours.of(x, t)))
                times = {name: timed_ms(functools.partial(f, logits, tokens, k), args.device, args.calls)
                         for name, f in paths}
                rows.append((vocab, batch, k, times, err, logits.numel() * logits.element_size()))
                print(vocab, batch, k, {n: round(t * 1e3, 1) for n, t in times.items()}, f"err {err:.1e}",
                      flush=True)
    card = e2e_paths.card(args.device)
    threads = (f"; kernel CTAs of {logprob_kernel.THREADS or '1,024 (k <= 16) or 512'} threads"
               if args.device == "cuda" else "")
    print(f"\n{card}, {datetime.date.today()}, torch {torch.__version__}; us a call (host and device){threads}")
    print(f"{'vocab':>7} {'batch':>5} {'k':>3} {'torch':>8} {'kvpager':>8} {'vs torch':>8} {'logits MB':>9} "
          f"{'max err':>8}")
    for vocab, batch, k, t, err, nbytes in rows:
        print(f"{vocab:>7} {batch:>5} {k:>3} {t['torch'] * 1e3:8.1f} {t['kvpager'] * 1e3:8.1f} "
              f"{t['torch'] / t['kvpager']:7.2f}x {nbytes / 1e6:9.1f} {err:8.1e}")


if __name__ == "__main__":
    main()
