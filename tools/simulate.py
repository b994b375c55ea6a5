"""Memory-efficiency simulator: a synthetic serving workload through the real allocator.

Replays request arrivals over discrete scheduler steps through a kvpager pool
(an embedded `KVPool` by default; any object with its methods works). No K/V
bytes matter here, so the pool has a tiny geometry (1 layer, 1 KV head, head
dim 8); every allocator decision is the real one.

Per step, like a continuous-batching scheduler:
1. decode: every running sequence appends one token (with its id, so full
   blocks publish) and commits; when `append` runs out of blocks, the most
   recently admitted request is swapped out (recomputed later if the host
   pool is full too); sequences that reach their output length are freed;
2. swap in: preempted requests come back, oldest first, while blocks remain;
3. admit: waiting requests, first come first served, while blocks remain
   (above a watermark); each prompt is allocated, its prefill is taken as
   written at once (commit), and a parallel-sampling request forks n - 1
   children.

Run ``python tools/simulate.py --help``; ``--json`` prints one JSON object,
``--plot memory.png`` draws memory over time (needs matplotlib: the ``tools`` extra).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    from kvpager import KVPool, OutOfBlocks, PoolSpec
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from kvpager import KVPool, OutOfBlocks, PoolSpec

VOCAB = 32000


@dataclass
class Sample:
    """One sequence of a request (a request with n > 1 has n of them)."""

    seq_id: int
    tokens: list[int]  # every token id the pool holds for it
    remaining: int  # decode tokens still to append


@dataclass
class Request:
    rid: int
    arrival: int
    prompt: np.ndarray
    output_lens: list[int]
    shared: bool  # starts with the common system prompt
    samples: list[Sample] = field(default_factory=list)
    # after a recompute preemption: (tokens, remaining) per sample still to run
    resume: list[tuple[list[int], int]] = field(default_factory=list)


def _distinct_tokens(keys: np.ndarray, fill: np.ndarray) -> int:
    """Tokens held by distinct blocks: each key counted once, at its fullest use."""
    if not len(keys):
        return 0
    order = np.lexsort((fill, keys))
    keys, fill = keys[order], fill[order]
    last = np.append(keys[1:] != keys[:-1], True)
    return int(fill[last].sum())


def lengths(
    rng: np.random.Generator, dist: str, mean: float, shape: float, size: int
) -> np.ndarray:
    """Heavy-tailed positive integers with the given mean: lognormal (shape = sigma)
    or Pareto (Lomax, shape = alpha > 1)."""
    if dist == "lognormal":
        x = rng.lognormal(math.log(mean) - shape**2 / 2, shape, size)
    else:
        x = rng.pareto(shape, size) * mean * (shape - 1)
    return np.maximum(np.rint(x), 1).astype(np.int64)


class Simulator:
    def __init__(self, pool: Any, args: argparse.Namespace):
        self.pool, self.args = pool, args
        self.bs = args.block_size
        # Two streams: the workload does not depend on scheduling decisions.
        self.rng, self.token_rng = (
            np.random.default_rng(x) for x in np.random.SeedSequence(args.seed).spawn(2)
        )
        self.system_prompt = self.rng.integers(0, VOCAB, args.shared_prompt_len).astype(np.int64)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order
        self.swapped: deque[Request] = deque()  # preemption order
        self.next_rid = 0
        self.counts = dict(
            requests_arrived=0,
            requests_admitted=0,
            requests_finished=0,
            swap_outs=0,
            swap_ins=0,
            recomputes=0,
            forks=0,
            decode_tokens=0,
        )
        self.series: dict[str, list[float]] = {
            k: []
            for k in (
                "used_slots",
                "tokens_stored",
                "running_seqs",
                "swapped_seqs",
                "contiguous_reserved",
                "logical_tokens",
                "family_tokens",
            )
        }
        self.shared_prompt_max_copies = 0

    # -- workload -------------------------------------------------------------------
    def arrive(self, step: int) -> None:
        a = self.args
        n = self.rng.poisson(a.rate)
        if not n:
            return
        users = lengths(self.rng, a.length_dist, a.prompt_mean, a.prompt_shape, n)
        for i in range(n):
            shared = a.shared_prompt_len > 0 and self.rng.random() < a.shared_share
            user = self.rng.integers(0, VOCAB, int(users[i])).astype(np.int64)
            prompt = np.concatenate([self.system_prompt, user]) if shared else user
            prompt = prompt[: a.max_model_len - 1]
            width = a.n if self.rng.random() < a.n_share else 1
            outs = lengths(self.rng, a.length_dist, a.output_mean, a.output_shape, width)
            outs = np.minimum(outs, a.max_model_len - len(prompt))
            self.waiting.append(
                Request(self.next_rid, step, prompt, [int(o) for o in outs], shared)
            )
            self.next_rid += 1
            self.counts["requests_arrived"] += 1

    # -- scheduler ------------------------------------------------------------------
    def running_samples(self) -> list[Sample]:
        return [s for r in self.running for s in r.samples]

    def decode(self) -> None:
        while self.running:
            samples = self.running_samples()
            new = self.token_rng.integers(0, VOCAB, len(samples)).tolist()
            ids = [s.seq_id for s in samples]
            try:
                self.pool.append(ids, 1, [[t] for t in new])
            except OutOfBlocks:
                self.preempt(self.running.pop())
                continue
            self.pool.commit(ids)
            self.counts["decode_tokens"] += len(ids)
            for s, t in zip(samples, new):
                s.tokens.append(t)
                s.remaining -= 1
            break
        for r in list(self.running):
            done = [s for s in r.samples if s.remaining <= 0]
            if done:
                self.pool.free([s.seq_id for s in done])
                r.samples = [s for s in r.samples if s.remaining > 0]
            if not r.samples:
                self.running.remove(r)
                self.counts["requests_finished"] += 1

    def preempt(self, r: Request) -> None:
        """Swap the request out; if the host pool is full, free it for recompute."""
        ids = [s.seq_id for s in r.samples]
        try:
            self.pool.swap_out(ids)
            self.swapped.append(r)
            self.counts["swap_outs"] += 1
        except OutOfBlocks:
            self.pool.free(ids)
            r.resume = [(s.tokens, s.remaining) for s in r.samples]
            r.samples = []
            self.waiting.appendleft(r)
            self.counts["recomputes"] += 1

    def headroom(self) -> int:
        """Blocks that may be handed out now while keeping next step's appends safe."""
        st = self.pool.stats()
        growth = sum(1 for s in self.running_samples() if len(s.tokens) % self.bs == 0)
        watermark = math.ceil(self.args.watermark * st.total_blocks)
        return st.free_blocks + st.evictable_blocks - growth - watermark

    def swap_in(self, room: int) -> int:
        """Swap preempted requests back in while ``room`` allows; returns the room left."""
        while self.swapped:
            r = self.swapped[0]
            ids = [s.seq_id for s in r.samples]
            need = sum(self.pool.sequence(i).host_blocks for i in ids) + len(ids)
            if need > room:
                return room
            try:
                self.pool.swap_in(ids)
            except OutOfBlocks:
                return room
            room -= need
            self.swapped.popleft()
            self.running.append(r)
            self.counts["swap_ins"] += 1
        return room

    def admit(self, room: int) -> None:
        if self.swapped:  # preempted requests go first
            return
        # A running user of the system prompt holds its blocks on the device; an
        # evictable copy would count against the room like a fresh block.
        shared_in_use = any(r.shared for r in self.running)
        while self.waiting:
            r = self.waiting[0]
            prompts = [t for t, _ in r.resume] if r.resume else [r.prompt.tolist()]
            # The first decode step needs a fresh block per sample at a block
            # boundary, and forked children copy a shared, partly filled last block.
            need = sum(-(-len(p) // self.bs) + 1 for p in prompts) + (len(r.output_lens) - 1)
            if r.shared and not r.resume and shared_in_use:
                need -= self.args.shared_prompt_len // self.bs  # hits blocks in use: no new ones
            if need > room:
                return
            try:
                allocs = self.pool.allocate(prompts)
            except OutOfBlocks:
                return
            ids = [a.seq_id for a in allocs]
            self.pool.commit(ids)  # the prefill has written every prompt token
            room -= sum(len(a.block_table) - a.num_cached_tokens // self.bs for a in allocs)
            self.waiting.popleft()
            if r.resume:
                r.samples = [
                    Sample(a.seq_id, list(t), rem) for a, (t, rem) in zip(allocs, r.resume)
                ]
                r.resume = []
            else:
                kids = (
                    self.pool.fork(ids, len(r.output_lens) - 1)[0] if len(r.output_lens) > 1 else []
                )
                self.counts["forks"] += len(kids)
                r.samples = [
                    Sample(sid, r.prompt.tolist(), out)
                    for sid, out in zip(ids + kids, r.output_lens)
                ]
                self.counts["requests_admitted"] += 1
            self.running.append(r)
            shared_in_use = shared_in_use or r.shared

    # -- measurement ---------------------------------------------------------------
    def measure(self) -> None:
        """Record one step: pool stats, and an independent count from the block tables
        of what is stored, what each request family stores, and what would be stored
        without any sharing."""
        st = self.pool.stats()
        infos = {i.seq_id: i for i in self.pool.sequences()}
        families = self.running + list(self.swapped)
        tables, family, ntok, shared_rows = [], [], [], []
        for f, r in enumerate(families):
            for s in r.samples:
                info = infos[s.seq_id]
                if r.shared:
                    shared_rows.append(len(tables))
                tables.append(info.block_table)
                family.append(f)
                ntok.append(info.num_tokens)
        lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        blocks = np.fromiter(
            itertools.chain.from_iterable(tables), dtype=np.int64, count=int(lens.sum())
        )
        row = np.repeat(np.arange(len(tables)), lens)
        index = np.arange(len(blocks)) - np.repeat(np.cumsum(lens) - lens, lens)
        fill = np.minimum(self.bs, np.asarray(ntok, dtype=np.int64)[row] - index * self.bs)
        on_device = blocks != 0  # 0: swapped out to the host
        blocks, fill, row = blocks[on_device], fill[on_device], row[on_device]
        logical = int(fill.sum())
        stored = _distinct_tokens(blocks, fill)
        fam_key = np.asarray(family, dtype=np.int64)[row] * (self.args.blocks + 1) + blocks
        family_tokens = _distinct_tokens(fam_key, fill)
        if stored != st.tokens_stored:
            raise AssertionError(
                f"tokens stored: block tables say {stored}, stats say {st.tokens_stored}"
            )
        # The system prompt's full blocks: how many distinct device blocks hold each.
        k = self.args.shared_prompt_len // self.bs
        if k and shared_rows:
            heads = np.sort(
                np.asarray([tables[i][:k] for i in shared_rows], dtype=np.int64), axis=0
            )
            distinct = (heads[:1] != 0).astype(np.int64) + (
                (np.diff(heads, axis=0) != 0) & (heads[1:] != 0)
            ).sum(axis=0)
            self.shared_prompt_max_copies = max(self.shared_prompt_max_copies, int(distinct.max()))
        resident = sum(len(r.samples) for r in self.running)
        ser = self.series
        ser["used_slots"].append(st.token_slots_allocated)
        ser["tokens_stored"].append(st.tokens_stored)
        ser["running_seqs"].append(resident)
        ser["swapped_seqs"].append(st.swapped_sequences)
        ser["contiguous_reserved"].append(resident * self.args.max_model_len)
        ser["logical_tokens"].append(logical)
        ser["family_tokens"].append(family_tokens)

    def step(self, t: int) -> None:
        """Scheduler step ``t``: arrivals, decode, swap in, admit, measure."""
        self.arrive(t)
        self.decode()
        self.admit(self.swap_in(self.headroom()))
        self.measure()

    def run(self) -> dict[str, Any]:
        a = self.args
        for t in range(a.steps):
            self.step(t)
            if a.check_every and (t + 1) % a.check_every == 0:
                self.pool.check_integrity()
        self.pool.check_integrity()
        final = self.pool.stats()
        # Drain: everything still alive is freed; the pool must come back whole.
        for r in self.swapped:
            self.pool.free([s.seq_id for s in r.samples])
        for r in self.running:
            self.pool.free([s.seq_id for s in r.samples])
        self.pool.check_integrity()
        drained = self.pool.stats()
        if drained.used_blocks or drained.host_free_blocks != drained.host_total_blocks:
            raise AssertionError(f"blocks still in use after freeing everything: {drained}")
        return self.report(final)

    def report(self, final: Any) -> dict[str, Any]:
        a, ser = self.args, self.series
        pool_tokens = a.blocks * self.bs
        contiguous = pool_tokens // a.max_model_len
        used = np.asarray(ser["used_slots"], dtype=np.float64)
        stored = np.asarray(ser["tokens_stored"], dtype=np.float64)
        peak = int(np.argmax(used)) if len(used) else 0
        logical = float(np.sum(ser["logical_tokens"]))
        family = float(np.sum(ser["family_tokens"]))
        peak_seqs = int(max(ser["running_seqs"], default=0))
        return dict(
            config={k: v for k, v in vars(a).items() if k not in ("json", "plot")},
            pool_tokens=pool_tokens,
            slot_utilization_avg=float(stored.sum() / used.sum()) if used.sum() else 1.0,
            slot_utilization_at_peak=float(stored[peak] / used[peak])
            if len(used) and used[peak]
            else 1.0,
            peak_used_slots=int(used[peak]) if len(used) else 0,
            peak_concurrent_seqs=peak_seqs,
            contiguous_max_seqs=contiguous,
            concurrency_vs_contiguous=peak_seqs / contiguous if contiguous else float("inf"),
            avg_running_seqs=float(np.mean(ser["running_seqs"])) if ser["running_seqs"] else 0.0,
            tokens_without_sharing_avg=logical / max(len(used), 1),
            tokens_stored_avg=float(stored.mean()) if len(stored) else 0.0,
            saved_by_sharing=1 - stored.sum() / logical if logical else 0.0,
            saved_by_fork=(logical - family) / logical if logical else 0.0,
            saved_by_prefix=(family - stored.sum()) / logical if logical else 0.0,
            prefix_hit_rate=final.prefix_hit_rate,
            shared_prompt_full_blocks=a.shared_prompt_len // self.bs,
            shared_prompt_max_copies=self.shared_prompt_max_copies,
            **self.counts,
            requests_waiting_at_end=len(self.waiting),
        )


def plot(series: dict[str, list[float]], args: argparse.Namespace, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install 'kvpager[tools]' "
            "(or pip install matplotlib)"
        ) from None
    pool_tokens = args.blocks * args.block_size
    steps = np.arange(len(series["used_slots"]))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=[3, 2])
    top.plot(
        steps,
        series["contiguous_reserved"],
        color="tab:red",
        label="contiguous: max_model_len reserved per running sequence",
    )
    top.plot(
        steps,
        series["logical_tokens"],
        color="tab:purple",
        lw=0.8,
        label="paged without sharing: tokens of every sequence",
    )
    top.plot(
        steps,
        series["used_slots"],
        color="tab:blue",
        label="paged: token slots in allocated blocks",
    )
    top.plot(
        steps,
        series["tokens_stored"],
        color="tab:green",
        lw=0.8,
        ls=":",
        label="paged: real tokens stored",
    )
    top.axhline(
        pool_tokens, color="black", ls="--", lw=1, label=f"pool size ({pool_tokens} tokens)"
    )
    top.set_yscale("log")
    top.set_ylim(bottom=max(args.block_size, pool_tokens / 100))
    top.set_ylabel("KV memory (tokens, log scale)")
    top.set_title(
        "KV memory of the same running requests "
        f"(block size {args.block_size}, max_model_len {args.max_model_len})",
        fontsize=10,
    )
    top.legend(loc="lower right", fontsize=7)
    bottom.plot(steps, series["running_seqs"], color="tab:blue", label="running sequences (paged)")
    bottom.plot(steps, series["swapped_seqs"], color="tab:orange", label="swapped out")
    bottom.axhline(
        pool_tokens // args.max_model_len,
        color="tab:red",
        ls="--",
        lw=1,
        label="contiguous capacity",
    )
    bottom.set_xlabel("scheduler step")
    bottom.set_ylabel("sequences")
    bottom.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int, default=2000, help="scheduler steps to simulate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--rate", type=float, default=0.5, help="mean request arrivals per step (Poisson)"
    )
    p.add_argument("--blocks", type=int, default=4096, help="device pool size in blocks")
    p.add_argument("--host-blocks", type=int, default=4096, help="host (swap) pool size in blocks")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--max-model-len", type=int, default=4096, help="longest sequence; contiguous reserves this"
    )
    p.add_argument("--length-dist", choices=("lognormal", "pareto"), default="lognormal")
    p.add_argument(
        "--prompt-mean", type=float, default=300, help="mean prompt length, system prompt excluded"
    )
    p.add_argument(
        "--prompt-shape", type=float, default=1.0, help="lognormal sigma or Pareto alpha"
    )
    p.add_argument("--output-mean", type=float, default=250, help="mean output length per sample")
    p.add_argument(
        "--output-shape", type=float, default=1.0, help="lognormal sigma or Pareto alpha"
    )
    p.add_argument("--shared-prompt-len", type=int, default=500, help="common system prompt length")
    p.add_argument(
        "--shared-share", type=float, default=0.5, help="share of requests with the system prompt"
    )
    p.add_argument("--n", type=int, default=4, help="samples per parallel-sampling request")
    p.add_argument("--n-share", type=float, default=0.1, help="share of requests that sample n > 1")
    p.add_argument(
        "--watermark", type=float, default=0.01, help="share of blocks admission keeps free"
    )
    p.add_argument(
        "--check-every", type=int, default=250, help="check_integrity every N steps (0: end only)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PATH.png", help="write a plot of memory over time")
    return p


def check_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.length_dist == "pareto" and min(a.prompt_shape, a.output_shape) <= 1:
        p.error("Pareto shape (alpha) must be > 1 for a finite mean")
    if a.blocks * a.block_size < a.max_model_len * max(a.n, 1):
        p.error("the pool must hold at least n sequences of max_model_len tokens")
    if a.max_model_len <= a.shared_prompt_len + 1:
        p.error("max_model_len must exceed the shared prompt")
    if not (0 <= a.shared_share <= 1 and 0 <= a.n_share <= 1 and a.n >= 1 and a.rate >= 0):
        p.error("shares must be in [0, 1], n >= 1, rate >= 0")


def make_pool(a: argparse.Namespace) -> KVPool:
    """A pool of the requested size with the smallest geometry: only the allocator matters."""
    return KVPool(
        PoolSpec(
            num_layers=1,
            num_kv_heads=1,
            head_dim=8,
            num_blocks=a.blocks + 1,
            block_size=a.block_size,
            dtype="float32",
            num_host_blocks=a.host_blocks,
        )
    )


def simulate(
    a: argparse.Namespace, pool: Any = None
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Run the workload of ``a`` through ``pool`` (a fresh `KVPool` if None);
    returns the report and the per-step series."""
    sim = Simulator(pool if pool is not None else make_pool(a), a)
    start = time.perf_counter()
    result = sim.run()
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result, sim.series


def render(r: dict[str, Any]) -> str:
    rows = [
        ("token slots holding real tokens (time average)", f"{r['slot_utilization_avg']:.2%}"),
        (
            "token slots holding real tokens (at peak memory)",
            f"{r['slot_utilization_at_peak']:.2%}",
        ),
        ("peak concurrent sequences (paged)", r["peak_concurrent_seqs"]),
        ("concurrent sequences, contiguous max-length", r["contiguous_max_seqs"]),
        ("paged / contiguous", f"{r['concurrency_vs_contiguous']:.1f}x"),
        (
            "tokens stored vs without sharing (average)",
            f"{r['tokens_stored_avg']:.0f} / {r['tokens_without_sharing_avg']:.0f}",
        ),
        ("memory saved by sharing, total", f"{r['saved_by_sharing']:.2%}"),
        ("  of it by prefix sharing", f"{r['saved_by_prefix']:.2%}"),
        ("  of it by fork (parallel sampling)", f"{r['saved_by_fork']:.2%}"),
        ("prefix hit rate (prompt tokens)", f"{r['prefix_hit_rate']:.2%}"),
        (
            "system prompt: full blocks / max copies",
            f"{r['shared_prompt_full_blocks']} / {r['shared_prompt_max_copies']}",
        ),
        ("requests arrived / finished", f"{r['requests_arrived']} / {r['requests_finished']}"),
        (
            "swap outs / swap ins / recomputes",
            f"{r['swap_outs']} / {r['swap_ins']} / {r['recomputes']}",
        ),
        ("wall time", f"{r['wall_s']} s"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    check_args(p, a)
    result, series = simulate(a)
    if a.plot:
        plot(series, a, a.plot)
    print(json.dumps(result) if a.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
