"""Time to first token of transformers' ``generate`` on its own cache and on a `kvpager.hf.PagedCache`.

A ``generate`` call of one new token is the prompt's pass and its first token.
transformers feeds every row's whole prompt; a `PagedCache` runs less of it
where it can (`kvpager.hf.cached_tail`, `repeated_rows`, `early_prefix`).
Cases, on the same random-weight model (`bench_e2e.py`'s shapes), each call
with fresh prompts:

- ``shared new``: ``--batch`` rows sharing a ``--shared``-token system prompt
  no call has seen, ``--own`` tokens of their own each (the shared tokens run
  once, in a pass of their own, then the rows' own tokens);
- ``shared cached``: the same system prompt again, new own tokens (it is
  cached: only the rows' own tokens run);
- ``beams``: ``--batch`` distinct prompts of ``--shared`` + ``--own`` tokens,
  ``num_beams=4`` (transformers repeats each prompt a beam; each runs once);
- ``returned``: the same, sampled, ``num_return_sequences=4``.

The two paths alternate in ``--rounds`` rounds after a warm-up of each; the
table gives each path's median ms, the ratio, and the KV each held at the
end of its last call (a `PagedCache`: the pool's blocks in use).

    python tools/bench_prompt_pass.py [--shape 1b] [--batch 64] [--shared 1024] [--own 64] [--rounds 3]
    python tools/bench_prompt_pass.py --device cpu --shape s --batch 8 --shared 256 --own 32
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import e2e_paths  # noqa: E402
from e2e_models import add_model_arguments, model_from  # noqa: E402

from kvpager import KVPool  # noqa: E402
from kvpager.hf import PagedCache, spec_for_model  # noqa: E402

CASES = {
    "shared new": dict(do_sample=False),
    "shared cached": dict(do_sample=False),
    "beams": dict(num_beams=4, do_sample=False),
    "returned": dict(do_sample=True, num_return_sequences=4),
}


def prompts(case: str, batch: int, shared: int, own: int, vocab: int, system: torch.Tensor) -> torch.Tensor:
    """A call's input ids: fresh own tokens (and a fresh system prompt where the case wants one)."""
    device = e2e_paths.DEVICE
    if case.startswith("shared"):
        system = system if case == "shared cached" else torch.randint(2, vocab, (shared,), device=device)
        return torch.cat([system.expand(batch, shared), torch.randint(2, vocab, (batch, own), device=device)], 1)
    return torch.randint(2, vocab, (batch, shared + own), device=device)


def first_token_ms(model, ids: torch.Tensor, kw: dict, pool: KVPool | None) -> tuple[float, int | None]:
    """(ms of a 1-token ``generate`` call over ``ids``, the KV bytes its cache held at its end)."""
    kw = dict(kw, max_new_tokens=1, min_new_tokens=1, return_dict_in_generate=True)
    e2e_paths.sync()
    start = time.perf_counter()
    with torch.inference_mode():
        if pool is None:
            out = model.generate(ids, **kw)
            held = e2e_paths.cache_bytes(getattr(out, "cache", None) or getattr(out, "past_key_values", None))
        else:
            with PagedCache(model, pool) as cache:
                model.generate(ids, **e2e_paths.cache_argument(model, cache), **kw)
                held = pool.stats().used_blocks * pool.spec.bytes_per_block
    e2e_paths.sync()
    return (time.perf_counter() - start) * 1e3, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--shared", type=int, default=1024, help="system prompt tokens (the distinct prompts' length "
                                                             "with --own for beams and returned)")
    ap.add_argument("--own", type=int, default=64, help="own prompt tokens per row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    shape, model = model_from(args)
    vocab = model.config.vocab_size
    bs = 16
    blocks = 4 * args.batch * -(-(args.shared + args.own + bs) // bs) + 64
    pool = KVPool(spec_for_model(model, num_blocks=blocks, block_size=bs), device=e2e_paths.pool_device())
    system = torch.randint(2, vocab, (args.shared,), device=e2e_paths.DEVICE)
    print(f"# {shape}, batch {args.batch}, {args.shared} + {args.own} tokens a prompt, "
          f"{e2e_paths.card(args.device)}, {datetime.date.today()}")
    print("| case | hf generate ms | generate PagedCache ms | ratio | KV MiB hf / PagedCache |")
    print("|---|---|---|---|---|")
    try:
        for case in args.cases.split(","):
            kw = CASES[case]
            torch.manual_seed(0)
            for p in (None, pool):  # warm-up (and, for "shared cached", the system prompt cached)
                first_token_ms(model, prompts(case, args.batch, args.shared, args.own, vocab, system), kw, p)
            times: dict[bool, list[float]] = {False: [], True: []}
            held: dict[bool, int | None] = {}
            for _ in range(args.rounds):
                for paged in (False, True):
                    ids = prompts(case, args.batch, args.shared, args.own, vocab, system)
                    ms, held[paged] = first_token_ms(model, ids, kw, pool if paged else None)
                    times[paged].append(ms)
                e2e_paths.free_cache()
            hf, pc = float(np.median(times[False])), float(np.median(times[True]))
            mib = [f"{h / 2**20:.0f}" if h is not None else "-" for h in (held[False], held[True])]
            print(f"| {case} | {hf:.1f} | {pc:.1f} | {hf / pc:.2f}x | {mib[0]} / {mib[1]} |", flush=True)
    finally:
        pool.close()


if __name__ == "__main__":
    main()
