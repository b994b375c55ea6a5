"""Train a small byte-level Llama on the Python standard library's sources.

    PYTHONPATH=. python tools/tiny_lm.py --preset cpu --out /tmp/tiny-cpu
    PYTHONPATH=. python tools/tiny_lm.py --preset gpu --device cuda:0 --out /tmp/tiny-gpu

A trained checkpoint that needs no download, for measurements that random
weights serve badly (FP8 K/V accuracy: tools/fp8_accuracy.py). Tokens are the
256 byte values plus BOS (256) and EOS (257) around each file. The corpus is
the running interpreter's standard library (``sysconfig``'s ``stdlib``): its
``.py`` files (tests, site-packages and build-specific files left out) in a
fixed order (by a BLAKE2b hash of the relative path); the first files up to
``--heldout-bytes`` are held out, the next ones up to ``--train-bytes`` train.
The same interpreter version gives the same corpus (its SHA-256 is recorded).

Training: AdamW (fused on CUDA), linear warmup then cosine decay to a tenth of
the peak rate, gradient clipping at 1.0, random windows of ``--seq-len + 1``
bytes drawn on the device; bfloat16 autocast on CUDA, float32 on the CPU. The
loss is printed (bits per byte) every ``--log-every`` steps, the only host
syncs. At the end: the held-out loss over non-overlapping windows. ``--out``
gets the ``save_pretrained`` folder, ``tiny_lm.json`` (corpus, settings,
losses) and ``heldout.txt`` (the held-out files' bytes, which
tools/fp8_accuracy.py reads its prompts from).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

BOS, EOS, VOCAB = 256, 257, 258
META, HELDOUT = "tiny_lm.json", "heldout.txt"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
PRESETS = {
    "cpu": dict(device="cpu", dtype="float32", steps=1200, hidden=256, layers=4, heads=4, kv_heads=2,
                head_dim=64, seq_len=128, batch=16, lr=3e-3, warmup=100),
    "gpu": dict(device="cuda:0", dtype="bfloat16", steps=3000, hidden=1024, layers=8, heads=8, kv_heads=2,
                head_dim=128, seq_len=512, batch=24, lr=1e-3, warmup=200),
}


@dataclass
class Corpus:
    """Token streams (int64 ids) of the training and held-out files."""

    root: str
    train: np.ndarray
    heldout: np.ndarray
    train_files: list[str]
    heldout_files: list[str]
    heldout_text: bytes
    sha256: str


def source_files(root: Path) -> list[Path]:
    """The library's .py files, sorted, without tests, installed packages or build-specific files."""
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("_sysconfigdata") \
                or rel.parts[0].startswith("config-") or not p.is_file():
            continue
        files.append(p)
    return files


def load_corpus(train_bytes: int, heldout_bytes: int, root: str | None = None) -> Corpus:
    """Held-out files first, then training files, each set filled up to its byte budget (a
    file that would pass the budget is skipped) in the fixed hash order of the paths."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = source_files(base)
    files.sort(key=lambda p: hashlib.blake2b(p.relative_to(base).as_posix().encode(), digest_size=8).digest())
    sets: dict[str, list[tuple[str, bytes]]] = {"heldout": [], "train": []}
    budgets, used = {"heldout": heldout_bytes, "train": train_bytes}, {"heldout": 0, "train": 0}
    for p in files:
        data = p.read_bytes()
        for name in ("heldout", "train"):
            if used[name] + len(data) <= budgets[name]:
                sets[name].append((p.relative_to(base).as_posix(), data))
                used[name] += len(data)
                break
    if not sets["heldout"] or not sets["train"]:
        raise SystemExit(f"no .py files under {base} fit the byte budgets ({heldout_bytes}, {train_bytes})")
    digest = hashlib.sha256()
    for name in ("heldout", "train"):
        for rel, data in sets[name]:
            digest.update(f"{name}:{rel}:{len(data)}\n".encode())
            digest.update(data)

    def stream(items: list[tuple[str, bytes]]) -> np.ndarray:
        parts = []
        for _, data in items:
            parts += [np.array([BOS]), np.frombuffer(data, np.uint8).astype(np.int64), np.array([EOS])]
        return np.concatenate(parts)

    return Corpus(str(base), stream(sets["train"]), stream(sets["heldout"]), [r for r, _ in sets["train"]],
                  [r for r, _ in sets["heldout"]], b"".join(d for _, d in sets["heldout"]), digest.hexdigest())


def unigram_bits(ids: np.ndarray) -> float:
    """Entropy of the token frequencies (bits per byte): what a model of no context achieves."""
    p = np.bincount(ids, minlength=VOCAB) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def build_model(args: argparse.Namespace) -> transformers.LlamaForCausalLM:
    """A Llama of the requested shape (intermediate size 8/3 of hidden, rounded up to 64)."""
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=-(-args.hidden * 8 // 3 // 64) * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(2048, args.seq_len), bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=None, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup to 1, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _loss(model, ids: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``ids`` [batch, seq_len + 1]."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids[:, :-1], use_cache=False).logits
    return torch.nn.functional.cross_entropy(out.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def evaluate(model, stream: torch.Tensor, seq_len: int, batch: int, autocast: bool, windows: int = 0) -> float:
    """Held-out bits per byte: the mean loss over the stream's non-overlapping windows (every
    one, or ``windows`` of them spread evenly over the stream)."""
    total_windows = (len(stream) - 1) // seq_len
    n = min(windows, total_windows) if windows > 0 else total_windows
    starts = torch.arange(n, device=stream.device) * (total_windows // n) * seq_len
    model.eval()
    total = torch.zeros((), device=stream.device)
    with torch.inference_mode():
        for i in range(0, n, batch):
            s = starts[i:i + batch]
            ids = stream[s[:, None] + torch.arange(seq_len + 1, device=stream.device)]
            total += _loss(model, ids, autocast) * len(s)
    model.train()
    return float(total) / n / math.log(2)


def train(model, corpus: Corpus, args: argparse.Namespace, log=print) -> dict:
    """Train ``model`` in place; the printed losses and the final figures as a dict."""
    device = torch.device(args.device)
    autocast = args.dtype == "bfloat16"
    model.to(device).train()
    data = torch.from_numpy(corpus.train).to(device)
    held = torch.from_numpy(corpus.heldout).to(device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, args.warmup, args.steps))
    gen = torch.Generator(device=device).manual_seed(args.seed)
    offsets = torch.arange(args.seq_len + 1, device=device)
    running, history, t0 = torch.zeros((), device=device), [], time.perf_counter()
    for step in range(1, args.steps + 1):
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch, 1), generator=gen, device=device)
        loss = _loss(model, data[starts + offsets], autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        running += loss.detach()
        if step % args.log_every == 0 or step == args.steps:
            n = step - (history[-1][0] if history else 0)
            bits = running.item() / n / math.log(2)
            running.zero_()
            history.append((step, bits))
            log(f"step {step:5d}  train {bits:.3f} bits/byte  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.perf_counter() - t0:.0f} s")
    seconds = time.perf_counter() - t0
    heldout = evaluate(model, held, args.seq_len, args.batch, autocast, args.eval_windows)
    log(f"held-out {heldout:.3f} bits/byte (unigram entropy {unigram_bits(corpus.train):.3f}) after {seconds:.0f} s")
    return dict(history=history, train_bits_per_byte=history[-1][1], heldout_bits_per_byte=heldout,
                seconds=seconds)


def save(model, corpus: Corpus, args: argparse.Namespace, result: dict, out: Path) -> None:
    """The checkpoint (float32), ``tiny_lm.json`` and ``heldout.txt`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").float().save_pretrained(out)
    (out / HELDOUT).write_bytes(corpus.heldout_text)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    meta = dict(
        format="kvpager tiny_lm 1", tokens="bytes 0-255, BOS 256 and EOS 257 around each file",
        byte_level=True, bos=BOS, eos=EOS, heldout_text=HELDOUT,
        corpus=dict(source="Python standard library .py files", root=corpus.root, python=sys.version.split()[0],
                    train_files=len(corpus.train_files), heldout_files=corpus.heldout_files,
                    train_tokens=len(corpus.train), heldout_tokens=len(corpus.heldout), sha256=corpus.sha256),
        settings=settings, parameters=sum(p.numel() for p in model.parameters()),
        unigram_bits_per_byte=unigram_bits(corpus.train), **result)
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for every shape option")
    ap.add_argument("--out", type=Path, help="folder for the checkpoint, tiny_lm.json and heldout.txt")
    ap.add_argument("--device", help="cpu or cuda:N")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="training compute (bfloat16: autocast)")
    for name in ("steps", "hidden", "layers", "heads", "kv-heads", "head-dim", "seq-len", "batch", "warmup"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--train-bytes", type=int, default=8 << 20)
    ap.add_argument("--heldout-bytes", type=int, default=256 << 10)
    ap.add_argument("--eval-windows", type=int, default=0,
                    help="held-out windows of --seq-len bytes to evaluate, spread over the set (0: all)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    args = ap.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    positive = ("steps", "hidden", "layers", "heads", "kv_heads", "head_dim", "seq_len", "batch", "warmup",
                "log_every", "train_bytes", "heldout_bytes")
    for key in positive:
        if getattr(args, key) <= 0:
            ap.error(f"--{key.replace('_', '-')} must be positive")
    if args.heads % args.kv_heads:
        ap.error("--heads must be a multiple of --kv-heads")
    if args.dtype == "bfloat16" and not args.device.startswith("cuda"):
        ap.error("--dtype bfloat16 (autocast) is for CUDA; train on the CPU in float32")
    if args.lr <= 0 or args.eval_windows < 0:
        ap.error("--lr must be positive and --eval-windows at least 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args.train_bytes, args.heldout_bytes)
    model = build_model(args)
    print(f"corpus: {len(corpus.train_files)} training files ({len(corpus.train)} tokens), "
          f"{len(corpus.heldout_files)} held out ({len(corpus.heldout)}), {corpus.root}; "
          f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    result = train(model, corpus, args, log=lambda line: print(line, flush=True))
    if args.out:
        save(model, corpus, args, result, args.out)
        print(f"saved to {args.out}")
    return result


if __name__ == "__main__":
    main()
