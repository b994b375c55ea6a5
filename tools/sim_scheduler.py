"""The simulator's workload and scheduler (see `simulate.py`): requests with
heavy-tailed prompt and output lengths (some behind a common system prompt, some
sampling n > 1), and one continuous-batching step after another: decode (with
preemption by swap out, or recompute when the host pool is full), swap in,
admission under a watermark. Every decision goes through the real allocator.
"""

from __future__ import annotations

import argparse
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sim_measure import Measurement

from kvpager import OutOfBlocks

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


class Simulator(Measurement):
    """One simulated server: the workload of ``args`` through ``pool``; `run`
    steps it, checks the pool's integrity, drains it and returns the report."""

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
            # (a host block the samples share counts once per sample: an over-estimate, on the safe side)
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
